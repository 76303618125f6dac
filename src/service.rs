//! One request through the native side: refuse what must never reach Python,
//! then hand the exchange to the application and wait for its response.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{ALT_SVC, CONNECTION, CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Body;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::body::{pump, BodyEnd, PumpLimits, Refusal, RefusalSignal, RequestBody, ResponseBody};
use crate::compress;
use crate::config::seconds;
use crate::connection::Connection;
use crate::exchange::Exchange;
use crate::framing::{self, Answering};
use crate::log::{Kind, Level};
use crate::metrics::Refused;
use crate::server::{Handoff, ServerShared};
use crate::static_files;
use crate::websocket;

/// A request body from any protocol (hyper's `Incoming`, HTTP/3 streams).
pub trait RequestBodySource:
    Body<Data = Bytes, Error: std::error::Error + Send + Sync + 'static> + Send + Unpin + 'static
{
}

impl<B> RequestBodySource for B where
    B: Body<Data = Bytes, Error: std::error::Error + Send + Sync + 'static> + Send + Unpin + 'static
{
}

pub async fn handle<B: RequestBodySource>(
    request: Request<B>,
    conn: Arc<Connection>,
) -> Result<Response<ResponseBody>, Infallible> {
    let started = std::time::Instant::now();
    let server = &conn.server;
    conn.head.finish();
    let version = request.version();
    let over_tcp = version != Version::HTTP_3;
    let head = request.method() == Method::HEAD;
    if version == Version::HTTP_2 {
        conn.set_multiplexed();
    }
    let mut response = if let Some(refusal) = refuse(&request, server.config.max_body_size) {
        server.metrics.refused(Refused::of_status(refusal.status()));
        refusal
    } else if let Some(refusal) = refuse_handshake(&request, server) {
        server.metrics.refused(Refused::of_status(refusal.status()));
        refusal
    } else if let Some((mount, rest)) = static_files::route(&server.config.static_files, request.uri().path()) {
        let _in_flight = conn.begin_request();
        static_files::serve(&request, mount, rest, server).await
    } else if let Some(body) = &server.native_response {
        canned(body.clone())
    } else {
        let _in_flight = conn.begin_request();
        let gzip = server.config.auto_compress && compress::accepts_gzip(request.headers());
        let answering = Answering { method: request.method().clone(), uri: request.uri().clone() };
        // Boxed: hyper moves this future into a task of its own per HTTP/2
        // stream, and inline the dispatch state made it 3.4 KB to copy. The
        // bridge's and the whole-body pump's futures are boxed within it, so
        // that the box is 1 KB rather than 2.6 KB to fill.
        let response = framing::frame(Box::pin(dispatch(request, &conn)).await, &answering, server.log);
        if gzip {
            compress::gzip(response)
        } else {
            response
        }
    };
    if let Some(alt_svc) = server.alt_svc.get().filter(|_| over_tcp) {
        response.headers_mut().entry(ALT_SVC).or_insert_with(|| alt_svc.clone());
    }
    server.add_response_headers(response.headers_mut());
    // While the server drains, an HTTP/1 client learns that this connection
    // ends with this response (HTTP/2 gets a GOAWAY).
    if server.shutdown.is_cancelled() && version < Version::HTTP_2 {
        response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    server.answered(version, started, &mut response);
    Ok(if head { framing::without_body(response) } else { response })
}

/// Requests answered natively with 400 or 413, never reaching Python.
fn refuse<B: Body>(request: &Request<B>, max_body_size: u64) -> Option<Response<ResponseBody>> {
    let mut hosts = request.headers().get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Some(error_response(StatusCode::BAD_REQUEST, "more than one Host header"));
    }
    match host {
        Some(value) if !valid_host(value) => {
            return Some(error_response(StatusCode::BAD_REQUEST, "invalid Host header"));
        }
        None if request.version() == Version::HTTP_11 && request.uri().authority().is_none() => {
            return Some(error_response(StatusCode::BAD_REQUEST, "missing Host header"));
        }
        _ => {}
    }
    if request.uri().authority().is_some_and(|a| a.as_str().contains('@')) {
        return Some(error_response(StatusCode::BAD_REQUEST, "user info in the request authority"));
    }
    if request.body().size_hint().lower() > max_body_size {
        return Some(error_response(StatusCode::PAYLOAD_TOO_LARGE, "request body too large"));
    }
    None
}

/// A request that asks for a WebSocket but is no valid handshake is
/// answered here (400, or 426 naming the version spoken), logged, and never
/// reaches the application: as a plain request it would be answered as one.
fn refuse_handshake<B: Body>(request: &Request<B>, server: &ServerShared) -> Option<Response<ResponseBody>> {
    if !websocket::requested(request) {
        return None;
    }
    let invalid = websocket::invalid(request)?;
    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let (why, status) = (invalid.why, invalid.status.as_u16());
    let report = format!("{} {target}: not a valid WebSocket handshake ({why}): answered {status}", request.method());
    server.log.report(Kind::Request, Level::Info, report);
    let mut response = error_response(invalid.status, why);
    if invalid.version {
        response.headers_mut().insert(http::header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    }
    Some(response)
}

/// A Host value is an authority without user info: `name[:port]` or
/// `[v6]:port`, the port a number that fits 16 bits.
fn valid_host(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    if is_plain_host(bytes) {
        return true;
    }
    if bytes.is_empty() || bytes.contains(&b'@') {
        return false;
    }
    let Ok(authority) = http::uri::Authority::try_from(bytes) else { return false };
    let host = authority.host();
    let rest = &authority.as_str()[authority.as_str().find(host).map_or(0, |at| at + host.len())..];
    let port_ok = match rest.strip_prefix(']').unwrap_or(rest).strip_prefix(':') {
        None => rest.is_empty() || rest == "]",
        Some(port) => port.is_empty() || port.parse::<u16>().is_ok(),
    };
    !host.is_empty() && port_ok
}

/// The common case, checked without parsing: a name of letters, digits, dots
/// and hyphens, then maybe `:port`.
fn is_plain_host(bytes: &[u8]) -> bool {
    let name_end = bytes.iter().position(|&b| b == b':').unwrap_or(bytes.len());
    let (name, port) = bytes.split_at(name_end);
    let port = port.get(1..).unwrap_or_default();
    !name.is_empty()
        && name.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && port.len() <= 5
        && port.iter().all(u8::is_ascii_digit)
        && (port.len() < 5 || port <= b"65535".as_slice())
}

async fn dispatch<B: RequestBodySource>(request: Request<B>, conn: &Arc<Connection>) -> Response<ResponseBody> {
    let server = &conn.server;
    let Ok(_permit) = server.pending.clone().acquire_owned().await else {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "server is closing");
    };
    match &server.handoff {
        Handoff::Bridge(bridge) => Box::pin(bridge.dispatch(request, conn)).await,
        Handoff::Queue => to_queue(request, conn).await,
    }
}

/// The request, as an exchange on the event queue, and its response.
async fn to_queue<B: RequestBodySource>(mut request: Request<B>, conn: &Arc<Connection>) -> Response<ResponseBody> {
    let server = &conn.server;
    let upgrade = websocket::requested(&request).then(|| hyper::upgrade::on(&mut request));
    let (head, mut body) = request.into_parts();
    let mut complete = body.is_end_stream().then_some(BodyEnd::Complete);
    let request_body = Arc::new(RequestBody::new(server.events.clone(), complete.clone()));
    let limits = PumpLimits {
        max_size: server.config.max_body_size,
        high_water: crate::body::REQUEST_HIGH_WATER as u64,
        stall: seconds(server.config.body_read_timeout),
    };
    if complete.is_none() && server.whole_body {
        let stop = CancellationToken::new();
        let whole = PumpLimits { high_water: u64::MAX, ..limits };
        if let Some(refusal) = Box::pin(pump(&mut body, request_body.clone(), whole, stop)).await {
            return refused(server, refusal, &head);
        }
        complete = Some(BodyEnd::Complete);
    }
    let (responder, response) = oneshot::channel();
    let exchange =
        Arc::new(Exchange::new(head, conn.info.clone(), request_body.clone(), responder, server.events.clone()));
    // Only a body still arriving can be refused.
    let refusal = complete.is_none().then(RefusalSignal::default);
    if let Some(refusal) = &refusal {
        let signal = refusal.clone();
        let stop = exchange.over.clone();
        let answered = Arc::downgrade(&exchange);
        let mut pumping = Box::pin(async move {
            if let Some(why) = pump(&mut body, request_body.clone(), limits, stop).await {
                signal.fire(why);
                request_body.refuse(why);
                // Too late for a refusal status: the response is cut off.
                if let Some(stream) = answered.upgrade().and_then(|exchange| exchange.stream()) {
                    stream.end(true);
                }
            }
        });
        // What has already arrived goes along with the request: a small body
        // is then whole before the application asks, and nobody waits.
        if futures_util::FutureExt::now_or_never(pumping.as_mut()).is_none() {
            tokio::spawn(pumping);
        }
        if let Some(why) = refusal.get() {
            return refused(server, why, &exchange.head);
        }
    }
    if let Some(upgrade) = upgrade {
        exchange.set_upgrade(upgrade);
    }
    server.events.push_request(exchange.clone());
    // An exchange answered here (504, or the application gone) is abandoned,
    // so that nobody goes on waiting on it (a body, a drain, a disconnect).
    let mut guard = AbandonOnDrop(Some(exchange));
    let timeout = async {
        match seconds(server.config.response_timeout) {
            Some(limit) => tokio::time::sleep(limit).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        // Before the response: an application woken by the refused body may
        // already have answered when this task runs. The pump tells the
        // application why the body stopped (not abandoned: that would say
        // the client left).
        why = fired(refusal.as_ref()) => {
            let exchange = guard.0.take().expect("taken only here");
            refused(server, why, &exchange.head)
        }
        response = response => match response {
            Ok(response) => {
                guard.0.take();
                response
            }
            Err(_) => error_response(StatusCode::INTERNAL_SERVER_ERROR, "the application dropped the request"),
        },
        _ = timeout => error_response(StatusCode::GATEWAY_TIMEOUT, "the application did not answer in time"),
    }
}

/// Resolves with the refusal once one is made; never without a signal.
pub async fn fired(refusal: Option<&RefusalSignal>) -> Refusal {
    match refusal {
        Some(refusal) => refusal.fired().await,
        None => std::future::pending().await,
    }
}

/// The answer to a request whose body was refused, logged.
pub fn refused(server: &ServerShared, refusal: Refusal, head: &http::request::Parts) -> Response<ResponseBody> {
    let target = head.uri.path_and_query().map_or("/", |p| p.as_str());
    let level = if refusal == Refusal::Malformed { Level::Warning } else { Level::Info };
    server.metrics.refused(Refused::of_status(refusal.status()));
    server.log.report(
        Kind::Request,
        level,
        format!("{} {target}: {}: answered {}", head.method, refusal.reason(), refusal.status().as_u16()),
    );
    error_response(refusal.status(), refusal.reason())
}

/// When hyper drops a request future early, the client went away; when the
/// request was answered natively (504), the exchange is over too: either
/// way, tell the application instead of leaving it waiting on a body that
/// will not come.
struct AbandonOnDrop(Option<Arc<Exchange>>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if let Some(exchange) = self.0.take() {
            exchange.abandon();
        }
    }
}

pub fn error_response(status: StatusCode, message: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(Bytes::from_static(message.as_bytes())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    if status.is_client_error() {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn canned(body: Bytes) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(body));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(value: &str) -> bool {
        valid_host(&HeaderValue::from_str(value).unwrap())
    }

    #[test]
    fn host_values_are_authorities_without_user_info() {
        for good in ["example.com", "example.com:8080", "a-b.c", "127.0.0.1:65535", "[::1]", "[::1]:8443", "localhost:"]
        {
            assert!(host(good), "{good}");
        }
        for bad in
            ["", "user@example.com", "example.com:65536", "example.com:http", "[::1]:99999", "exa mple.com", ":80"]
        {
            assert!(!host(bad), "{bad}");
        }
    }

    #[test]
    fn the_plain_host_shortcut_agrees_with_the_parser() {
        for value in ["example.com", "example.com:80", "example.com:65535", "example.com:65536", "ex_ample.com", "a:b"]
        {
            let parsed = http::uri::Authority::try_from(value)
                .is_ok_and(|a| a.port().is_none_or(|p| p.as_str().parse::<u16>().is_ok()));
            if is_plain_host(value.as_bytes()) {
                assert!(parsed, "{value} passes the shortcut but not the parser");
            }
        }
        assert!(!is_plain_host(b"example.com:65536"));
        assert!(!is_plain_host(b""));
    }
}
