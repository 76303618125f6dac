//! Static files answered natively (`static_files`), on every interface and
//! protocol, without entering Python: a request whose path is under a
//! mount's route is the server's to answer, whatever the file system says.
//!
//! - Only GET and HEAD: any other method is answered 405 (as nginx does).
//! - The path is split on `/` before it is percent-decoded; a segment that
//!   decodes to `.`, `..`, or holds `/`, `\`, NUL (or `:` on Windows) is
//!   refused with 404, and so is a file whose real path (symlinks followed)
//!   leaves the mount. A directory is 404 unless `static_files_index` names
//!   the file to serve for it; nothing is ever listed.
//! - Validators: `ETag` from the modification time and size, and
//!   `Last-Modified`; `If-None-Match` (or else `If-Modified-Since`) answers 304.
//! - One byte range (`Range`, within `If-Range`) answers 206, a range past the
//!   end 416. Several ranges are answered with the whole file, as RFC 9110
//!   allows: no multipart bodies, and no amplification by overlapping ranges.
//! - The file is found and opened on tokio's blocking threads, and read in
//!   chunks as hyper asks for them: on Linux, what the page cache holds is
//!   read on the I/O thread (`preadv2` with `RWF_NOWAIT`, which never waits
//!   for the disk), the rest on a blocking thread. Every chunk on the blocking
//!   pool cost a thread hop and, pinned to one core, grew the pool to its 512
//!   threads, each allocator heap with its own fresh pages (the static1m
//!   case of the benchmark). Not `sendfile`: hyper writes every body
//!   through its own buffers and has no way to hand a file to the socket,
//!   and TLS, HTTP/2 and HTTP/3 could not use it anyway.

use std::fs::File;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{
    ACCEPT_RANGES, ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG,
    IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_RANGE, LAST_MODIFIED, RANGE,
};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use pyo3::prelude::*;
use tokio::task::JoinHandle;

use crate::body::ResponseBody;
use crate::log::{Kind, Level, Source};
use crate::server::ServerShared;
use crate::service::error_response;

/// How much of a file one read takes, and so the most read ahead of the
/// socket per response (one chunk waiting, one being read).
const CHUNK: usize = 128 * 1024;

/// A route (`/static`) and the directory its paths name files in.
#[derive(Clone)]
pub struct Mount {
    /// Without its trailing `/`: the route `/` is the empty prefix.
    route: String,
    /// Canonical: a file is inside when its canonical path starts with it.
    directory: PathBuf,
}

impl<'a, 'py> FromPyObject<'a, 'py> for Mount {
    type Error = PyErr;

    fn extract(pair: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        let (route, directory): (String, PathBuf) = pair.extract()?;
        let directory = directory.canonicalize()?;
        Ok(Mount { route: route.trim_end_matches('/').to_owned(), directory })
    }
}

/// The mount whose route `path` is under, and the rest of the path.
pub fn route<'m, 'p>(mounts: &'m [Mount], path: &'p str) -> Option<(&'m Mount, &'p str)> {
    mounts.iter().find_map(|mount| {
        let rest = path.strip_prefix(mount.route.as_str())?;
        (rest.is_empty() || rest.starts_with('/')).then_some((mount, rest))
    })
}

/// The answer to a request under `mount`; `rest` is its path after the route.
pub async fn serve<B>(
    request: &Request<B>,
    mount: &Mount,
    rest: &str,
    server: &ServerShared,
) -> Response<ResponseBody> {
    let target = request.uri().path();
    let log = server.log;
    let head = match *request.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            log.report(
                Kind::StaticFile,
                Level::Info,
                format!("{} {target}: a static file is only read: answered 405", request.method()),
            );
            let mut response = answer(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
    };
    let Some(relative) = relative_path(rest) else {
        log.report(
            Kind::StaticFile,
            Level::Warning,
            format!("{target}: a path that leaves its static directory: answered 404"),
        );
        return answer(StatusCode::NOT_FOUND, "not found");
    };
    let wanted = Wanted::from_headers(request.headers(), head);
    let directory = mount.directory.clone();
    let index = server.config.static_files_index.clone();
    let trailing_slash = rest.ends_with('/');
    let opened =
        tokio::task::spawn_blocking(move || open(&directory, &relative, index.as_deref(), trailing_slash, &wanted))
            .await;
    match opened {
        Ok(Ok(file)) => respond(file, head, server.config.static_files_expires, log, target),
        Ok(Err(miss)) => missed(miss, log, target),
        Err(error) => missed(Miss::Failed(io::Error::other(error)), log, target),
    }
}

/// The path below the mount, segment by segment; None when a segment could
/// step out of the directory or name something other than a file in it.
fn relative_path(rest: &str) -> Option<PathBuf> {
    let mut path = PathBuf::new();
    for segment in rest.split('/').filter(|s| !s.is_empty()) {
        let decoded = percent_encoding::percent_decode_str(segment).decode_utf8().ok()?;
        let refused = |c: char| c == '/' || c == '\\' || c == '\0' || (cfg!(windows) && c == ':');
        if decoded == "." || decoded == ".." || decoded.contains(refused) {
            return None;
        }
        path.push(decoded.as_ref());
    }
    Some(path)
}

/// What the request asks of the file beyond its bytes.
struct Wanted {
    head: bool,
    if_none_match: Vec<HeaderValue>,
    if_modified_since: Option<HeaderValue>,
    range: Option<HeaderValue>,
    if_range: Option<HeaderValue>,
}

impl Wanted {
    fn from_headers(headers: &HeaderMap, head: bool) -> Self {
        Wanted {
            head,
            if_none_match: headers.get_all(IF_NONE_MATCH).iter().cloned().collect(),
            if_modified_since: headers.get(IF_MODIFIED_SINCE).cloned(),
            range: headers.get(RANGE).cloned(),
            if_range: headers.get(IF_RANGE).cloned(),
        }
    }
}

/// Why no file was served.
enum Miss {
    NotFound,
    /// A symlink (or the index) leads out of the mount.
    Outside,
    Forbidden,
    Failed(io::Error),
}

impl From<io::Error> for Miss {
    fn from(error: io::Error) -> Self {
        match error.kind() {
            io::ErrorKind::NotFound => Miss::NotFound,
            io::ErrorKind::PermissionDenied => Miss::Forbidden,
            _ if names_no_file(&error) => Miss::NotFound,
            _ => Miss::Failed(error),
        }
    }
}

/// A path through a file (`a.txt/b`), too long a name, or a symlink loop.
#[cfg(unix)]
fn names_no_file(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ENOTDIR | libc::ENAMETOOLONG | libc::ELOOP))
}

#[cfg(not(unix))]
fn names_no_file(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::InvalidInput
}

/// An open file, and what to send of it.
struct Opened {
    file: File,
    size: u64,
    modified: Option<SystemTime>,
    content_type: HeaderValue,
    plan: Plan,
}

/// Blocking: finds the file and opens it.
fn open(
    directory: &Path,
    relative: &Path,
    index: Option<&str>,
    trailing_slash: bool,
    wanted: &Wanted,
) -> Result<Opened, Miss> {
    let mut named = directory.join(relative);
    let mut real = inside(directory, &named)?;
    if real.is_dir() {
        let index = index.ok_or(Miss::NotFound)?;
        named.push(index);
        real = inside(directory, &named)?;
    } else if trailing_slash {
        return Err(Miss::NotFound);
    }
    let file = open_without_blocking(&real)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(Miss::NotFound);
    }
    let size = metadata.len();
    let modified = metadata.modified().ok().filter(|m| m.duration_since(UNIX_EPOCH).is_ok());
    let plan = plan(wanted, &Validators::new(size, modified), size);
    Ok(Opened { file, size, modified, content_type: content_type(&named), plan })
}

/// The canonical path of `named`, if it is inside `directory`.
fn inside(directory: &Path, named: &Path) -> Result<PathBuf, Miss> {
    let real = named.canonicalize()?;
    if real.starts_with(directory) {
        Ok(real)
    } else {
        Err(Miss::Outside)
    }
}

/// Opens for reading; a FIFO under the mount must not hang the thread.
fn open_without_blocking(path: &Path) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    options.open(path)
}

/// Blocking: `length` bytes at `offset` (at most `CHUNK`).
fn read_at(file: &File, offset: u64, length: usize) -> io::Result<Bytes> {
    let mut buffer = vec![0; length];
    let mut filled = 0;
    while filled < length {
        #[cfg(unix)]
        let read = std::os::unix::fs::FileExt::read_at(file, &mut buffer[filled..], offset + filled as u64);
        #[cfg(windows)]
        let read = std::os::windows::fs::FileExt::seek_read(file, &mut buffer[filled..], offset + filled as u64);
        match read {
            Ok(0) => {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file shrank while it was being sent"))
            }
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(Bytes::from(buffer))
}

/// Up to `length` bytes at `offset` that the page cache holds, read without
/// waiting for the disk: None when none are there (or the kernel cannot
/// tell), for a blocking thread to read.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn read_cached(file: &File, offset: u64, length: usize) -> Option<Bytes> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    /// Kernels before 4.14 refuse the flag: asked once, not per read.
    static UNSUPPORTED: AtomicBool = AtomicBool::new(false);
    if UNSUPPORTED.load(Ordering::Relaxed) {
        return None;
    }
    let mut buffer = Vec::<u8>::with_capacity(length);
    let vector = libc::iovec { iov_base: buffer.as_mut_ptr().cast(), iov_len: length };
    // The raw system call: libc's wrapper needs glibc 2.26. On 64-bit targets
    // the offset goes whole in the first of its two words.
    // SAFETY: the iovec covers `buffer`'s spare capacity, alive for the call.
    let read = unsafe { libc::syscall(libc::SYS_preadv2, file.as_raw_fd(), &vector, 1, offset, 0, libc::RWF_NOWAIT) };
    if read < 0 {
        if matches!(io::Error::last_os_error().raw_os_error(), Some(libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)) {
            UNSUPPORTED.store(true, Ordering::Relaxed);
        }
        return None;
    }
    if read == 0 {
        return None;
    }
    // SAFETY: the kernel wrote `read` (at most `length`) bytes into the buffer.
    unsafe { buffer.set_len(read as usize) };
    Some(Bytes::from(buffer))
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn read_cached(_: &File, _: u64, _: usize) -> Option<Bytes> {
    None
}

/// `text/*` and JavaScript with their charset; unknown extensions as bytes.
fn content_type(path: &Path) -> HeaderValue {
    let Some(essence) = mime_guess::from_path(path).first_raw() else {
        return HeaderValue::from_static("application/octet-stream");
    };
    if essence.starts_with("text/") || essence == "application/javascript" {
        HeaderValue::from_str(&format!("{essence}; charset=utf-8")).expect("a MIME type is a valid header value")
    } else {
        HeaderValue::from_static(essence)
    }
}

/// A file's `ETag` and `Last-Modified`, when it has a modification time.
struct Validators {
    etag: Option<String>,
    modified: Option<u64>,
}

impl Validators {
    fn new(size: u64, modified: Option<SystemTime>) -> Self {
        let since_epoch = modified.and_then(|m| m.duration_since(UNIX_EPOCH).ok());
        Validators {
            etag: since_epoch.map(|d| format!("\"{:x}-{size:x}\"", d.as_nanos())),
            modified: since_epoch.map(|d| d.as_secs()),
        }
    }

    /// `If-None-Match`: a weak comparison against any listed tag, or `*`.
    fn none_match_hit(&self, values: &[HeaderValue]) -> bool {
        values.iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim).any(|tag| {
            tag == "*" || self.etag.as_deref().is_some_and(|etag| tag.strip_prefix("W/").unwrap_or(tag) == etag)
        })
    }

    /// `If-Modified-Since` or a date in `If-Range`: not modified after it.
    fn unmodified_since(&self, value: &HeaderValue) -> bool {
        let since = value.to_str().ok().and_then(|v| httpdate::parse_http_date(v).ok());
        let since = since.and_then(|s| s.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs());
        matches!((self.modified, since), (Some(modified), Some(since)) if modified <= since)
    }

    /// `If-Range`: the same strong tag, or exactly the `Last-Modified` date.
    fn range_still_valid(&self, value: &HeaderValue) -> bool {
        let Ok(text) = value.to_str() else { return false };
        if text.starts_with('"') || text.starts_with("W/") {
            return self.etag.as_deref() == Some(text);
        }
        let date = httpdate::parse_http_date(text).ok().and_then(|d| d.duration_since(UNIX_EPOCH).ok());
        matches!((self.modified, date), (Some(modified), Some(date)) if modified == date.as_secs())
    }
}

/// What the response sends of the file.
#[derive(Debug, PartialEq)]
enum Plan {
    NotModified,
    Whole,
    /// Bytes `start..=end`.
    Part {
        start: u64,
        end: u64,
    },
    Unsatisfiable,
}

/// RFC 9110 section 13.2.2's order: `If-None-Match` (or else
/// `If-Modified-Since`), then `If-Range` and `Range` (GET only).
fn plan(wanted: &Wanted, validators: &Validators, size: u64) -> Plan {
    let not_modified = if wanted.if_none_match.is_empty() {
        wanted.if_modified_since.as_ref().is_some_and(|v| validators.unmodified_since(v))
    } else {
        validators.none_match_hit(&wanted.if_none_match)
    };
    if not_modified {
        return Plan::NotModified;
    }
    let Some(range) = wanted.range.as_ref().filter(|_| !wanted.head) else { return Plan::Whole };
    if wanted.if_range.as_ref().is_some_and(|v| !validators.range_still_valid(v)) {
        return Plan::Whole;
    }
    match range.to_str().ok().and_then(|r| byte_range(r, size)) {
        None => Plan::Whole,
        Some(Some((start, end))) => Plan::Part { start, end },
        Some(None) => Plan::Unsatisfiable,
    }
}

/// One `bytes=` range of a file of `size` bytes: None to ignore the header
/// (another unit, bad syntax, several ranges), Some(None) when it starts
/// past the end, else the first and last byte.
fn byte_range(value: &str, size: u64) -> Option<Option<(u64, u64)>> {
    let (unit, set) = value.split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut specs = set.split(',').map(str::trim).filter(|s| !s.is_empty());
    let spec = specs.next()?;
    if specs.next().is_some() {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let number = |text: &str| {
        (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())).then(|| text.parse::<u64>().unwrap_or(u64::MAX))
    };
    if first.is_empty() {
        let suffix = number(last)?;
        return Some((suffix > 0 && size > 0).then(|| (size - suffix.min(size), size - 1)));
    }
    let first = number(first)?;
    let last = if last.is_empty() { u64::MAX } else { number(last)? };
    if last < first {
        return None;
    }
    Some((first < size).then(|| (first, last.min(size - 1))))
}

fn respond(opened: Opened, head: bool, expires: u64, log: Source, target: &str) -> Response<ResponseBody> {
    let Opened { file, size, modified, content_type, plan } = opened;
    let validators = Validators::new(size, modified);
    let mut headers = HeaderMap::new();
    if let Some(etag) = &validators.etag {
        headers.insert(ETAG, HeaderValue::from_str(etag).expect("an ETag of hex digits is a valid header value"));
    }
    if let Some(modified) = modified {
        let date = httpdate::fmt_http_date(modified);
        headers.insert(LAST_MODIFIED, HeaderValue::from_str(&date).expect("an HTTP date is a valid header value"));
    }
    if expires > 0 {
        let max_age = format!("max-age={expires}");
        headers.insert(CACHE_CONTROL, HeaderValue::from_str(&max_age).expect("max-age=digits is a valid header value"));
    }
    let (status, start, length) = match plan {
        Plan::NotModified => return with_headers(StatusCode::NOT_MODIFIED, headers, ResponseBody::empty()),
        Plan::Unsatisfiable => {
            log.report(
                Kind::StaticFile,
                Level::Debug,
                format!("{target}: a range past the end of its {size} bytes: answered 416"),
            );
            let mut response = answer(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
            response.headers_mut().insert(CONTENT_RANGE, header_value(format!("bytes */{size}")));
            return response;
        }
        Plan::Whole => (StatusCode::OK, 0, size),
        Plan::Part { start, end } => {
            headers.insert(CONTENT_RANGE, header_value(format!("bytes {start}-{end}/{size}")));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
    };
    headers.insert(CONTENT_TYPE, content_type);
    headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let body = if head || length == 0 {
        ResponseBody::empty()
    } else {
        let first = read_cached(&file, start, length.min(CHUNK as u64) as usize);
        match first {
            // Whole at once: hyper writes it with the head.
            Some(whole) if whole.len() as u64 == length => ResponseBody::full(whole),
            first => {
                let file = Arc::new(file);
                let next = start + first.as_ref().map_or(0, |chunk| chunk.len() as u64);
                ResponseBody::Boxed(
                    FileBody { file, ready: first, reading: None, next, unsent: length, target: target.into(), log }
                        .boxed(),
                )
            }
        }
    };
    with_headers(status, headers, body)
}

fn with_headers(status: StatusCode, headers: HeaderMap, body: ResponseBody) -> Response<ResponseBody> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn header_value(text: String) -> HeaderValue {
    HeaderValue::from_str(&text).expect("digits and ASCII are a valid header value")
}

/// A short text answer; unlike a refused request, the connection stays open.
fn answer(status: StatusCode, message: &'static str) -> Response<ResponseBody> {
    let mut response = error_response(status, message);
    response.headers_mut().remove(CONNECTION);
    response
}

fn missed(miss: Miss, log: Source, target: &str) -> Response<ResponseBody> {
    let (level, why, status) = match &miss {
        Miss::NotFound => (Level::Debug, "no such file".to_owned(), StatusCode::NOT_FOUND),
        Miss::Outside => (Level::Warning, "a link out of its static directory".to_owned(), StatusCode::NOT_FOUND),
        Miss::Forbidden => (Level::Info, "not readable".to_owned(), StatusCode::FORBIDDEN),
        Miss::Failed(error) => {
            (Level::Error, format!("could not be read ({error})"), StatusCode::INTERNAL_SERVER_ERROR)
        }
    };
    log.report(Kind::StaticFile, level, format!("{target}: {why}: answered {}", status.as_u16()));
    let message = match miss {
        Miss::NotFound | Miss::Outside => "not found",
        Miss::Forbidden => "forbidden",
        Miss::Failed(_) => "Internal Server Error",
    };
    answer(status, message)
}

/// A file's bytes, a chunk at a time as hyper asks for them.
struct FileBody {
    file: Arc<File>,
    /// A chunk read and not yet given out.
    ready: Option<Bytes>,
    /// A chunk being read on a blocking thread.
    reading: Option<JoinHandle<io::Result<Bytes>>>,
    /// Where the next read starts.
    next: u64,
    /// Bytes not yet given out.
    unsent: u64,
    target: Box<str>,
    log: Source,
}

impl FileBody {
    /// The next chunk: at once from the page cache, else from a blocking thread.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        if let Some(chunk) = self.ready.take() {
            return Poll::Ready(Ok(chunk));
        }
        let length = self.unsent.min(CHUNK as u64) as usize;
        if self.reading.is_none() {
            if let Some(chunk) = read_cached(&self.file, self.next, length) {
                self.next += chunk.len() as u64;
                return Poll::Ready(Ok(chunk));
            }
            let (file, offset) = (self.file.clone(), self.next);
            self.reading = Some(tokio::task::spawn_blocking(move || read_at(&file, offset, length)));
        }
        let reading = self.reading.as_mut().expect("started above");
        let read = ready!(Pin::new(reading).poll(cx));
        self.reading = None;
        let chunk = read.unwrap_or_else(|_| Err(io::Error::other("the server is closing")))?;
        self.next += chunk.len() as u64;
        Poll::Ready(Ok(chunk))
    }
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if this.unsent == 0 {
            return Poll::Ready(None);
        }
        match ready!(this.poll_chunk(cx)) {
            Ok(chunk) => {
                this.unsent -= chunk.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Err(error) => {
                this.log.report(
                    Kind::StaticFile,
                    Level::Error,
                    format!("{}: {error}: the response was cut off", this.target),
                );
                Poll::Ready(Some(Err(error)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.unsent == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.unsent)
    }
}
