//! Listening sockets: options the user asked for, one port shared by every
//! interface of a server, and sockets made elsewhere (an inherited `--fd`,
//! a Unix socket the Python side bound).

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

/// A socket the server accepts connections on.
pub enum Listener {
    Tcp(TcpListener),
    #[cfg(unix)]
    Unix(std::os::unix::net::UnixListener),
}

impl Listener {
    /// The address of a TCP listener; None for a Unix one.
    pub fn tcp_address(&self) -> Option<io::Result<SocketAddr>> {
        match self {
            Listener::Tcp(tcp) => Some(tcp.local_addr()),
            #[cfg(unix)]
            Listener::Unix(_) => None,
        }
    }
}

/// Adopts the listening socket `fd` (TCP or Unix). The server works on its
/// own duplicate: the caller's descriptor stays open and theirs to close;
/// unless `close`: the caller gives `fd` up (a descriptor inherited for the
/// server alone) and it is closed at once, so that the socket stops
/// listening with the server if nobody else holds it.
#[cfg(unix)]
pub fn adopt(fd: i32, backlog: i32, close: bool) -> io::Result<Listener> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // F_DUPFD_CLOEXEC checks `fd` is open without assuming anything about it.
    let duplicate = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if duplicate < 0 {
        let error = io::Error::last_os_error();
        return Err(io::Error::new(error.kind(), format!("cannot use file descriptor {fd}: {error}")));
    }
    if close {
        // SAFETY: the caller gave `fd` up; the duplicate stands for it.
        unsafe { libc::close(fd) };
    }
    // SAFETY: `duplicate` was just made and nothing else owns it.
    let socket = Socket::from(unsafe { OwnedFd::from_raw_fd(duplicate) });
    let not_a_stream =
        || io::Error::new(io::ErrorKind::InvalidInput, format!("file descriptor {fd} is not a stream socket"));
    if socket.r#type().map_err(|_| not_a_stream())? != Type::STREAM {
        return Err(not_a_stream());
    }
    // Listening again only updates the backlog (asyncio does the same with
    // a socket it is given); a socket that was merely bound starts listening.
    socket.listen(backlog_or_default(backlog))?;
    socket.set_nonblocking(true)?;
    let unix = socket.local_addr()?.as_socket().is_none();
    Ok(if unix { Listener::Unix(socket.into()) } else { Listener::Tcp(socket.into()) })
}

#[cfg(not(unix))]
pub fn adopt(_fd: i32, _backlog: i32, _close: bool) -> io::Result<Listener> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "serving on an inherited file descriptor needs a Unix system"))
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

fn bind_with_first_port(ips: &[IpAddr], port: u16, opts: SocketOptions) -> Result<Vec<TcpListener>, BindError> {
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
    socket.listen(backlog_or_default(opts.backlog))?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn backlog_or_default(backlog: i32) -> i32 {
    if backlog <= 0 {
        1024
    } else {
        backlog
    }
}
