//! h3load: a small HTTP/3 load client on quinn + h3.
//!
//! Opens C QUIC connections, runs M request loops (concurrent streams) on
//! each for a warm-up and then D measured seconds, and prints one JSON object:
//! requests, errors, req/s, p50 and p99 latency, and the first response for
//! a sanity check.

use std::error::Error;
use std::future::poll_fn;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use h3::client::SendRequest;
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;
type Sender = SendRequest<h3_quinn::OpenStreams, Bytes>;

const USAGE: &str = "usage: h3load [options] https://HOST:PORT/PATH
  -c N               connections [10]
  -m N               concurrent streams (request loops) per connection [10]
  -d SECONDS         measured duration [10]
  -w SECONDS         warm-up before measuring, not counted [1]
  -t N               client threads [1]
  --method METHOD    request method [GET]
  --body-size N      request body of N bytes (POST) [0]
  -H 'name: value'   extra request header (repeatable)
  --ca FILE          PEM file of the CA to trust (required)
  --server-name NAME TLS server name [the URL's host]";

struct Args {
    url: Uri,
    connections: usize,
    streams: usize,
    duration: f64,
    warmup: f64,
    threads: usize,
    method: Method,
    body_size: usize,
    headers: Vec<(HeaderName, HeaderValue)>,
    ca: String,
    server_name: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = std::env::args().skip(1);
    let mut url = None;
    let mut parsed = Args {
        url: Uri::from_static("/"),
        connections: 10,
        streams: 10,
        duration: 10.0,
        warmup: 1.0,
        threads: 1,
        method: Method::GET,
        body_size: 0,
        headers: Vec::new(),
        ca: String::new(),
        server_name: None,
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "-c" => parsed.connections = value()?.parse()?,
            "-m" => parsed.streams = value()?.parse()?,
            "-d" => parsed.duration = value()?.parse()?,
            "-w" => parsed.warmup = value()?.parse()?,
            "-t" => parsed.threads = value()?.parse()?,
            "--method" => parsed.method = value()?.to_uppercase().parse()?,
            "--body-size" => parsed.body_size = value()?.parse()?,
            "-H" => {
                let header = value()?;
                let (name, val) = header.split_once(':').ok_or("-H takes 'name: value'")?;
                parsed.headers.push((name.trim().to_lowercase().parse()?, val.trim().parse()?));
            }
            "--ca" => parsed.ca = value()?,
            "--server-name" => parsed.server_name = Some(value()?),
            "-h" | "--help" => return Err(USAGE.into()),
            other if other.starts_with('-') => return Err(format!("unknown option {other}\n{USAGE}").into()),
            other => url = Some(other.parse::<Uri>()?),
        }
    }
    parsed.url = url.ok_or(USAGE)?;
    if parsed.url.scheme_str() != Some("https") || parsed.url.host().is_none() {
        return Err("the URL must be https://HOST:PORT/PATH".into());
    }
    if parsed.ca.is_empty() {
        return Err(format!("--ca is required\n{USAGE}").into());
    }
    if parsed.connections == 0 || parsed.streams == 0 || parsed.threads == 0 {
        return Err("-c, -m and -t must be at least 1".into());
    }
    Ok(parsed)
}

fn client_config(ca: &str) -> Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| format!("cannot read {ca}: {e}"))? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    Ok(quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?)))
}

/// What one request loop saw.
#[derive(Default)]
struct Stats {
    ok: u64,
    errors: u64,
    /// Microseconds per counted request.
    latencies: Vec<u32>,
    first: Option<(u16, Vec<u8>)>,
    last_error: Option<String>,
}

struct Template {
    method: Method,
    uri: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Option<Bytes>,
}

async fn one(send: &mut Sender, template: &Template, keep_body: bool) -> Result<(u16, Vec<u8>)> {
    let mut request = Request::builder().method(template.method.clone()).uri(template.uri.clone());
    for (name, value) in &template.headers {
        request = request.header(name, value);
    }
    if let Some(body) = &template.body {
        request = request.header(http::header::CONTENT_LENGTH, body.len());
    }
    let mut stream = send.send_request(request.body(())?).await?;
    if let Some(body) = &template.body {
        stream.send_data(body.clone()).await?;
    }
    stream.finish().await?;
    let response = stream.recv_response().await?;
    let mut kept = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await? {
        if keep_body {
            kept.extend_from_slice(chunk.chunk());
        }
        chunk.advance(chunk.remaining());
    }
    Ok((response.status().as_u16(), kept))
}

async fn request_loop(mut send: Sender, template: Arc<Template>, measure_from: Instant, end: Instant, first: bool) -> Stats {
    let mut stats = Stats::default();
    let mut failures_in_a_row = 0;
    loop {
        let begin = Instant::now();
        if begin >= end {
            break;
        }
        match one(&mut send, &template, first && stats.first.is_none()).await {
            Ok((status, body)) => {
                failures_in_a_row = 0;
                if stats.first.is_none() && first {
                    stats.first = Some((status, body));
                }
                if begin < measure_from {
                    continue;
                }
                if (200..300).contains(&status) {
                    stats.ok += 1;
                    stats.latencies.push(begin.elapsed().as_micros().min(u32::MAX as u128) as u32);
                } else {
                    stats.errors += 1;
                }
            }
            Err(error) => {
                stats.errors += 1;
                stats.last_error = Some(error.to_string());
                failures_in_a_row += 1;
                if failures_in_a_row >= 10 {
                    break; // the connection is gone
                }
            }
        }
    }
    stats
}

struct Client {
    endpoint: quinn::Endpoint,
    send: Sender,
}

async fn connect(addr: SocketAddr, server_name: &str, config: quinn::ClientConfig) -> Result<Client> {
    let local: SocketAddr = if addr.is_ipv6() { "[::]:0".parse()? } else { "0.0.0.0:0".parse()? };
    let mut endpoint = quinn::Endpoint::client(local)?;
    endpoint.set_default_client_config(config);
    let quic = tokio::time::timeout(Duration::from_secs(10), endpoint.connect(addr, server_name)?)
        .await
        .map_err(|_| "QUIC handshake timed out")??;
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(quic)).await?;
    tokio::spawn(async move {
        let _ = poll_fn(|cx| driver.poll_close(cx)).await;
    });
    Ok(Client { endpoint, send })
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)] as f64 / 1000.0
}

fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

async fn run(args: Args) -> Result<String> {
    let host = args.url.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = args.url.port_u16().unwrap_or(443);
    let addr = (host.as_str(), port).to_socket_addrs()?.next().ok_or("the host does not resolve")?;
    let server_name = args.server_name.clone().unwrap_or_else(|| host.clone());
    let config = client_config(&args.ca)?;

    let mut clients = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        clients.push(connect(addr, &server_name, config.clone()).await?);
    }
    let body = (args.body_size > 0).then(|| {
        let mut body = BytesMut::with_capacity(args.body_size);
        body.resize(args.body_size, b'x');
        body.freeze()
    });
    let template = Arc::new(Template { method: args.method.clone(), uri: args.url.clone(), headers: args.headers.clone(), body });

    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let mut loops = tokio::task::JoinSet::new();
    for (c, client) in clients.iter().enumerate() {
        for s in 0..args.streams {
            loops.spawn(request_loop(client.send.clone(), template.clone(), measure_from, end, c == 0 && s == 0));
        }
    }
    let mut total = Stats::default();
    while let Some(stats) = loops.join_next().await {
        let stats = stats?;
        total.ok += stats.ok;
        total.errors += stats.errors;
        total.latencies.extend(stats.latencies);
        total.first = total.first.or(stats.first);
        total.last_error = stats.last_error.or(total.last_error);
    }
    let elapsed = Instant::now().saturating_duration_since(measure_from).as_secs_f64().max(1e-9);
    for client in clients {
        drop(client.send);
        client.endpoint.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(1), client.endpoint.wait_idle()).await;
    }
    total.latencies.sort_unstable();
    let (first_status, first_body) = total.first.unwrap_or((0, Vec::new()));
    let shown = String::from_utf8_lossy(&first_body[..first_body.len().min(200)]).into_owned();
    Ok(format!(
        concat!(
            "{{\"url\": {}, \"method\": {}, \"connections\": {}, \"streams\": {}, \"body_size\": {}, ",
            "\"duration_s\": {:.3}, \"requests\": {}, \"errors\": {}, \"rps\": {:.1}, ",
            "\"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"first_status\": {}, \"first_body_bytes\": {}, \"first_body\": {}, ",
            "\"last_error\": {}}}"
        ),
        json_string(&args.url.to_string()),
        json_string(args.method.as_str()),
        args.connections,
        args.streams,
        args.body_size,
        elapsed,
        total.ok,
        total.errors,
        total.ok as f64 / elapsed,
        percentile(&total.latencies, 50.0),
        percentile(&total.latencies, 99.0),
        first_status,
        first_body.len(),
        json_string(&shown),
        total.last_error.as_deref().map_or_else(|| "null".to_owned(), json_string),
    ))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(error) => {
            eprintln!("h3load: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads).enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("h3load: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("h3load: {error}");
            ExitCode::FAILURE
        }
    }
}
