//! Listening sockets: options the user asked for, and one port shared by every
//! interface of a server.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// How a listening socket is made.
#[derive(Clone, Copy)]
pub struct SocketOptions {
    pub backlog: i32,
    pub v6_only: bool,
    pub shared: bool,
}

/// How often `port=0` on several interfaces retries when the port picked on the
/// first interface is taken on another.
const SHARED_PORT_ATTEMPTS: usize = 16;

/// A bind that failed, with the address it was for.
pub struct BindError {
    pub addr: Option<SocketAddr>,
    pub error: io::Error,
}

impl From<io::Error> for BindError {
    fn from(error: io::Error) -> Self {
        BindError { addr: None, error }
    }
}

/// Binds `port` on every address. With `port == 0` the kernel picks a port on
/// the first address and the others get the same one, so a client can use one
/// port number whichever loopback address it resolves.
pub fn bind_all(ips: &[IpAddr], port: u16, opts: SocketOptions) -> Result<Vec<TcpListener>, BindError> {
    if ips.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no address to bind").into());
    }
    let attempts = if port == 0 && ips.len() > 1 { SHARED_PORT_ATTEMPTS } else { 1 };
    let mut last_error = None;
    for _ in 0..attempts {
        match bind_with_first_port(ips, port, opts) {
            Ok(listeners) => return Ok(listeners),
            Err(e) if e.error.kind() == io::ErrorKind::AddrInUse && port == 0 => last_error = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_error.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse).into()))
}

fn bind_with_first_port(
    ips: &[IpAddr],
    port: u16,
    opts: SocketOptions,
) -> Result<Vec<TcpListener>, BindError> {
    let first = bind_one(SocketAddr::new(ips[0], port), opts)?;
    let chosen = first.local_addr()?.port();
    let mut listeners = vec![first];
    for ip in &ips[1..] {
        listeners.push(bind_one(SocketAddr::new(*ip, chosen), opts)?);
    }
    Ok(listeners)
}

fn bind_one(addr: SocketAddr, opts: SocketOptions) -> Result<TcpListener, BindError> {
    bind_socket(addr, opts).map_err(|error| BindError { addr: Some(addr), error })
}

fn bind_socket(addr: SocketAddr, opts: SocketOptions) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(opts.v6_only)?;
    }
    // On Unix SO_REUSEADDR only lets a restarted server rebind past TIME_WAIT;
    // on Windows it would allow port stealing, so there it means `shared` only.
    if cfg!(unix) || opts.shared {
        socket.set_reuse_address(true)?;
    }
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
    if opts.shared {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    let backlog = if opts.backlog <= 0 { 1024 } else { opts.backlog };
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}
