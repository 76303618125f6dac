//! Server settings, read from the Python `ServerConfig` object by attribute.

use std::time::Duration;

use pyo3::prelude::*;

/// TLS material as given by the user; loaded and checked in `tls`.
#[derive(FromPyObject, Clone)]
pub struct TlsSettings {
    pub certificate_path: String,
    pub key_path: String,
    pub certificate_password: Option<String>,
    pub request_client_certificate: bool,
    pub require_client_certificate: bool,
    pub client_ca_path: Option<String>,
    pub http2: bool,
    /// Cipher suites by rustls, IANA or OpenSSL name; None: all of them.
    pub ciphers: Option<Vec<String>>,
    /// The oldest TLS version accepted: `tls1.2` or `tls1.3`.
    pub protocol_min: String,
    /// Certificate revocation lists (PEM or DER) for client certificates.
    pub crl_paths: Vec<String>,
}

#[derive(FromPyObject, Clone)]
pub struct ServerConfig {
    pub backlog: i32,
    pub v6_only: bool,
    pub shared: bool,
    /// Listening sockets (TCP or Unix) to serve on instead of binding:
    /// inherited (`--fd`), or a Unix socket the Python side bound.
    pub fd: Option<Vec<i32>>,
    /// The `fd` descriptors are the server's: closed once adopted, instead
    /// of left open beside its duplicates.
    pub close_fd: bool,
    pub http2: bool,
    pub http3: bool,
    /// Serve without HTTP/3 (instead of failing) when its UDP port is taken.
    pub http3_best_effort: bool,
    /// Accept 0-RTT requests (replayable: marked with `early-data: 1`).
    pub http3_early_data: bool,
    pub alt_svc_max_age: u64,
    pub tls: Option<TlsSettings>,
    pub max_header_size: usize,
    pub max_headers: usize,
    pub max_body_size: u64,
    pub max_connections: usize,
    pub max_pending_requests: usize,
    pub max_concurrent_streams: u32,
    /// HTTP/2 flow control windows (None: hyper's); `http2_adaptive_window`
    /// sizes them from the measured bandwidth-delay product instead.
    pub http2_initial_connection_window_size: Option<u32>,
    pub http2_initial_stream_window_size: Option<u32>,
    pub http2_adaptive_window: bool,
    /// Seconds between PINGs (0: none) and how long one may go unanswered.
    pub http2_keep_alive_interval: f64,
    pub http2_keep_alive_timeout: f64,
    pub http2_max_frame_size: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE; None: `max_header_size`.
    pub http2_max_headers_size: Option<u32>,
    /// The process-wide runtime's I/O threads, honoured when it starts.
    pub runtime_threads: Option<usize>,
    pub header_read_timeout: f64,
    pub tls_handshake_timeout: f64,
    pub body_read_timeout: f64,
    pub idle_timeout: f64,
    pub response_timeout: f64,
    pub auto_compress: bool,
    /// hyper's `Date` header (and HTTP/3's) on every response that has none.
    pub date_header: bool,
    /// Added to every response that does not carry a header of that name
    /// (`--header`, `--server-header`).
    pub response_headers: Vec<(String, String)>,
    pub websocket_max_message_size: usize,
    /// Every connection opens with a PROXY protocol header naming the client.
    pub proxy_protocol: bool,
    /// The peers trusted to send one.
    #[pyo3(from_py_with = crate::proxy_protocol::trusted_from_python)]
    pub forwarded_allow_ips: crate::proxy_protocol::Trusted,
    /// Negotiate permessage-deflate when a WebSocket client offers it.
    pub websocket_compression: bool,
    /// `(route, directory)` pairs whose files are served natively, the
    /// first route a path is under winning.
    pub static_files: Vec<crate::static_files::Mount>,
    /// `Cache-Control: max-age` of static files, in seconds; 0 sends none.
    pub static_files_expires: u64,
    /// The file served for a directory under a static route (else 404).
    pub static_files_index: Option<String>,
    /// Seconds between the server's WebSocket pings (0: none), and how long
    /// a pong may take before the socket is closed with 1011 (0: for ever).
    pub ws_ping_interval: f64,
    pub ws_ping_timeout: f64,
    /// Received WebSocket messages held for the application at most.
    pub ws_max_queue: usize,
    pub native_response: Option<Vec<u8>>,
    /// `native_callback=False`: where Python listens for the socket bridge
    /// (`unix:/path` or `tcp:127.0.0.1:port`), and the token that proves it
    /// is us connecting.
    pub bridge_address: Option<String>,
    pub bridge_token: Option<Vec<u8>>,
}

impl ServerConfig {
    /// The header list HTTP/2 requests may carry (431 beyond it).
    pub fn http2_header_list_limit(&self) -> usize {
        self.http2_max_headers_size.map_or(self.max_header_size, |size| size as usize)
    }
}

/// Seconds from Python to a `Duration`; zero or negative means "no limit".
pub fn seconds(value: f64) -> Option<Duration> {
    (value > 0.0 && value.is_finite()).then(|| Duration::from_secs_f64(value))
}
