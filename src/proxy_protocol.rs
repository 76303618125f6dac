//! The PROXY protocol (HAProxy's proxy-protocol.txt, versions 1 and 2): a
//! proxy in front of the server opens each connection with a header naming
//! the client it carries, so that the server sees that client instead of the
//! proxy. With `proxy_protocol` on, every connection must open with one, from
//! a peer in `forwarded_allow_ips` (a Unix socket peer is trusted: the socket
//! file's permissions say who may connect); anything else is closed and
//! logged. The header is read before TLS; `ppp` parses it.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use ppp::{v1, v2, HeaderResult, PartialResult};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::config::seconds;
use crate::exchange::Addresses;
use crate::log::{Kind, Level};
use crate::server::ServerShared;

/// The first read's size: a version 1 header (107 bytes at most) or a
/// version 2 one with a few TLVs, and whatever the client sent behind it.
const FIRST_READ: usize = 512;

/// The peers allowed to send a header: `forwarded_allow_ips`.
#[derive(Clone, Debug)]
pub struct Trusted {
    any: bool,
    networks: Vec<(IpAddr, u8)>,
}

impl Trusted {
    /// Addresses and networks (`"10.0.0.0/8"`, `"::1"`), or `"*"` for any peer.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, String> {
        let mut trusted = Trusted { any: false, networks: Vec::new() };
        for item in items.iter().map(|item| item.as_ref().trim()).filter(|item| !item.is_empty()) {
            if item == "*" {
                trusted.any = true;
                continue;
            }
            let invalid = || format!("forwarded_allow_ips: not an IP address or network: {item:?}");
            let (address, prefix) = item.split_once('/').unwrap_or((item, ""));
            let address: IpAddr = address.parse().map_err(|_| invalid())?;
            let bits = if address.is_ipv4() { 32 } else { 128 };
            let prefix = if prefix.is_empty() { bits } else { prefix.parse().map_err(|_| invalid())? };
            if prefix > bits {
                return Err(invalid());
            }
            trusted.networks.push((address, prefix));
        }
        Ok(trusted)
    }

    pub fn contains(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.any || self.networks.iter().any(|&(network, prefix)| same_network(peer, network, prefix))
    }
}

fn same_network(peer: IpAddr, network: IpAddr, prefix: u8) -> bool {
    let (peer, network, bits) = match (peer, network) {
        (IpAddr::V4(peer), IpAddr::V4(network)) => (u32::from(peer) as u128, u32::from(network) as u128, 32),
        (IpAddr::V6(peer), IpAddr::V6(network)) => (u128::from(peer), u128::from(network), 128),
        _ => return false,
    };
    let shift = bits - u32::from(prefix);
    shift >= bits || (peer >> shift) == (network >> shift)
}

/// `ServerConfig.forwarded_allow_ips`, checked once when the server starts.
pub fn trusted_from_python(value: &Bound<'_, PyAny>) -> PyResult<Trusted> {
    Trusted::parse(&value.extract::<Vec<String>>()?).map_err(PyValueError::new_err)
}

/// Reads the PROXY header of a new connection when the server expects one,
/// and returns the socket with the client it names (the real peer for a
/// LOCAL or UNKNOWN header, a health check of the proxy's own). None: the
/// connection is refused (logged) or the server is shutting down.
pub async fn accept<S>(mut stream: S, addresses: Addresses, server: &ServerShared) -> Option<(Rewound<S>, Addresses)>
where
    S: AsyncRead + Unpin,
{
    if !server.config.proxy_protocol {
        return Some((Rewound::new(stream, Bytes::new()), addresses));
    }
    let refuse = |why: &str| {
        let report = format!("closed a connection{}: {why}", addresses.peer_note());
        server.log.report(Kind::Request, Level::Warning, report);
    };
    if let Addresses::Ip { peer, .. } = &addresses {
        if !server.config.forwarded_allow_ips.contains(peer.ip()) {
            refuse("the PROXY protocol is on and the peer is not in forwarded_allow_ips");
            return None;
        }
    }
    let limit = seconds(server.config.header_read_timeout);
    let read = async {
        match limit {
            Some(limit) => tokio::time::timeout(limit, read_header(&mut stream)).await.unwrap_or(Err(Refusal::Overdue)),
            None => read_header(&mut stream).await,
        }
    };
    let outcome = tokio::select! {
        outcome = read => outcome,
        _ = server.shutdown.cancelled() => return None,
    };
    match outcome {
        Ok(Header { client, ahead }) => {
            let addresses = match client {
                Some(client) => with_client(addresses, client),
                None => addresses,
            };
            Some((Rewound::new(stream, ahead), addresses))
        }
        // Not news: a client that left, or whose connection broke.
        Err(refusal @ (Refusal::Silent | Refusal::Io(_))) => {
            let report =
                format!("a connection{} ended before its PROXY protocol header: {refusal}", addresses.peer_note());
            server.log.report(Kind::Request, Level::Debug, report);
            None
        }
        Err(refusal) => {
            refuse(&refusal.to_string());
            None
        }
    }
}

/// The same connection, coming from `client`.
fn with_client(addresses: Addresses, client: SocketAddr) -> Addresses {
    match addresses {
        Addresses::Ip { local, .. } => Addresses::Ip { peer: client, local },
        Addresses::Unix { path, .. } => Addresses::Unix { path, client: Some(client) },
    }
}

/// A header read off the socket.
#[derive(Debug, PartialEq)]
struct Header {
    /// None: use the real peer.
    client: Option<SocketAddr>,
    /// Bytes the client sent behind the header.
    ahead: Bytes,
}

#[derive(Debug)]
enum Refusal {
    Malformed(String),
    Ended,
    /// Closed without a byte: a port probe or a proxy's TCP check.
    Silent,
    Overdue,
    Io(io::Error),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Malformed(why) => write!(f, "no valid PROXY protocol header ({why})"),
            Refusal::Ended => f.write_str("it ended before a whole PROXY protocol header"),
            Refusal::Silent => f.write_str("it closed before sending a PROXY protocol header"),
            Refusal::Overdue => f.write_str("no whole PROXY protocol header within header_read_timeout"),
            Refusal::Io(error) => write!(f, "{error}"),
        }
    }
}

async fn read_header<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Header, Refusal> {
    let mut buffer = BytesMut::with_capacity(FIRST_READ);
    loop {
        if stream.read_buf(&mut buffer).await.map_err(Refusal::Io)? == 0 {
            return Err(if buffer.is_empty() { Refusal::Silent } else { Refusal::Ended });
        }
        if let Some(header) = parse(&mut buffer)? {
            return Ok(header);
        }
        // A version 2 header says how long it is: read the rest in one go.
        if let Err(v2::ParseError::Partial(_, length)) = v2::Header::try_from(&buffer[..]) {
            buffer.reserve((16 + length).saturating_sub(buffer.len()));
        }
    }
}

/// The header at the start of `buffer`, taken off it; None while it is
/// incomplete. Past the header, `buffer` is what the client sent next.
fn parse(buffer: &mut BytesMut) -> Result<Option<Header>, Refusal> {
    // By its first byte, so that a broken version 2 header is reported as
    // one (`HeaderResult::parse` tries version 1 after any version 2 error).
    let result: HeaderResult = if buffer.starts_with(b"\r") {
        v2::Header::try_from(&buffer[..]).into()
    } else {
        v1::Header::try_from(&buffer[..]).into()
    };
    let (client, length) = match result {
        result if result.is_incomplete() => return Ok(None),
        HeaderResult::V1(Ok(header)) => {
            let client = match header.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            };
            (client, header.header.len())
        }
        HeaderResult::V2(Ok(header)) => {
            // LOCAL: the proxy speaking for itself. Unix and unspecified
            // families carry no client address worth naming.
            let client = match (header.command, header.addresses) {
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                _ => None,
            };
            (client, header.len())
        }
        HeaderResult::V1(Err(error)) => return Err(Refusal::Malformed(error.to_string())),
        HeaderResult::V2(Err(error)) => return Err(Refusal::Malformed(error.to_string())),
    };
    buffer.advance(length);
    Ok(Some(Header { client, ahead: buffer.split().freeze() }))
}

/// The accepted socket, with the bytes read past the PROXY header put back
/// in front of it.
pub struct Rewound<S> {
    ahead: Bytes,
    inner: S,
}

impl<S> Rewound<S> {
    fn new(inner: S, ahead: Bytes) -> Self {
        Rewound { ahead, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewound<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.ahead.is_empty() {
            let n = self.ahead.len().min(buf.remaining());
            buf.put_slice(&self.ahead[..n]);
            self.ahead.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

write_through!(Rewound);

#[cfg(test)]
mod tests {
    use super::*;

    const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

    fn parsed(bytes: &[u8]) -> Result<Option<Header>, String> {
        parse(&mut BytesMut::from(bytes)).map_err(|refusal| refusal.to_string())
    }

    fn v2(command: u8, family: u8, payload: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.extend([0x20 | command, family]);
        header.extend((payload.len() as u16).to_be_bytes());
        header.extend(payload);
        header
    }

    fn client(header: &str) -> Option<SocketAddr> {
        Some(header.parse().unwrap())
    }

    #[test]
    fn version_1_names_the_client_and_keeps_what_follows() {
        let header = parsed(b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r\nGET / HTTP/1.1\r\n").unwrap().unwrap();
        assert_eq!(header.client, client("203.0.113.7:56324"));
        assert_eq!(&header.ahead[..], b"GET / HTTP/1.1\r\n");
        let header = parsed(b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 80\r\n").unwrap().unwrap();
        assert_eq!(header.client, client("[2001:db8::7]:4000"));
        assert_eq!(parsed(b"PROXY UNKNOWN\r\n").unwrap().unwrap().client, None);
    }

    #[test]
    fn version_1_waits_for_the_rest_then_refuses_what_is_wrong() {
        assert_eq!(parsed(b"PRO").unwrap(), None);
        assert_eq!(parsed(b"PROXY TCP4 203.0.113.7 192.0.2.1 56324").unwrap(), None);
        assert_eq!(parsed(b"PROXY TCP4 203.0.113.7 192.0.2.1 56324 443\r").unwrap(), None);
        for wrong in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 2001:db8::7 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 203.0.113.7 192.0.2.1 99999 2\r\n",
            b"PROXY TCP5 203.0.113.7 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 203.0.113.7 192.0.2.1 1 2 3\r\n",
            &[b'P'; 107],
        ] {
            assert!(parsed(wrong).unwrap_err().starts_with("no valid PROXY protocol header"), "{wrong:?}");
        }
    }

    #[test]
    fn version_2_names_the_client_skips_tlvs_and_keeps_what_follows() {
        let mut payload = vec![203, 0, 113, 7, 192, 0, 2, 1, 0xdc, 0x04, 0x01, 0xbb];
        payload.extend([0x01, 0x00, 0x02, b'h', b'2']); // an ALPN TLV
        let mut bytes = v2(1, 0x11, &payload);
        bytes.extend(b"\x16\x03\x01");
        let header = parsed(&bytes).unwrap().unwrap();
        assert_eq!(header.client, client("203.0.113.7:56324"));
        assert_eq!(&header.ahead[..], b"\x16\x03\x01");
        let mut payload = [0u8; 36];
        payload[15] = 7;
        payload[31] = 1;
        payload[32..].copy_from_slice(&[0x0f, 0xa0, 0, 80]);
        assert_eq!(parsed(&v2(1, 0x21, &payload)).unwrap().unwrap().client, client("[::7]:4000"));
    }

    #[test]
    fn version_2_local_and_unspecified_keep_the_real_peer() {
        assert_eq!(parsed(&v2(0, 0x00, &[])).unwrap().unwrap().client, None);
        let ipv4 = [203, 0, 113, 7, 192, 0, 2, 1, 0, 1, 0, 2];
        assert_eq!(parsed(&v2(0, 0x11, &ipv4)).unwrap().unwrap().client, None);
        assert_eq!(parsed(&v2(1, 0x00, &[])).unwrap().unwrap().client, None);
    }

    #[test]
    fn version_2_waits_for_its_length_then_refuses_what_is_wrong() {
        let whole = v2(1, 0x11, &[203, 0, 113, 7, 192, 0, 2, 1, 0, 1, 0, 2]);
        for cut in [1, 12, 15, 16, whole.len() - 1] {
            assert_eq!(parsed(&whole[..cut]).unwrap(), None, "cut at {cut}");
        }
        let mut wrong_version = whole.clone();
        wrong_version[12] = 0x31;
        let short_addresses = v2(1, 0x11, &[1, 2, 3]);
        let mut wrong_family = whole.clone();
        wrong_family[13] = 0x41;
        for wrong in [wrong_version, short_addresses, wrong_family] {
            assert!(parsed(&wrong).unwrap_err().starts_with("no valid PROXY protocol header"), "{wrong:?}");
        }
    }

    #[test]
    fn trusted_networks() {
        let trusted = Trusted::parse(&["127.0.0.1", "10.0.0.0/8", " ::1 ", "2001:db8::/32", ""]).unwrap();
        for yes in ["127.0.0.1", "10.200.3.4", "::1", "2001:db8:1::5", "::ffff:10.0.0.1"] {
            assert!(trusted.contains(yes.parse().unwrap()), "{yes}");
        }
        for no in ["127.0.0.2", "11.0.0.1", "::2", "2001:db9::1"] {
            assert!(!trusted.contains(no.parse().unwrap()), "{no}");
        }
        assert!(Trusted::parse(&["*"]).unwrap().contains("198.51.100.1".parse().unwrap()));
        assert!(Trusted::parse(&["0.0.0.0/0"]).unwrap().contains("198.51.100.1".parse().unwrap()));
        for wrong in ["10.0.0.0/33", "localhost", "10.0.0.0/x"] {
            assert!(Trusted::parse(&[wrong]).is_err(), "{wrong}");
        }
    }
}
