//! The HTTP/3 guard: h3 reads a request's `:path` with the `http` crate too,
//! which drops a `#` fragment. Each request stream's first HEADERS frame is
//! held until whole and read ([`qpack`](super::qpack)); when its `:path`
//! holds a `#`, a second, invalid `:path` is added to the frame, and h3 then
//! refuses the request with H3_MESSAGE_ERROR (RFC 9114 4.1.2) before we see
//! it. h3 takes any [`quic::Connection`], so the guard is one around
//! h3-quinn's.

use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};

use super::qpack;

/// RFC 9114 7.2: the frame types.
const HEADERS: u64 = 0x1;
/// Types below this are HTTP/3's own or reserved from HTTP/2, and h3 refuses
/// any but HEADERS first on a request stream. Types from here on are
/// extensions or grease, which h3 skips, so they may come before HEADERS.
const FIRST_EXTENSION: u64 = 0xe;

/// A QUIC connection whose incoming request streams are guarded.
pub struct Guarded<C> {
    inner: C,
    /// The largest HEADERS frame held to be read. A longer one is let
    /// through unread: even at the Huffman code's worst (30 bits a byte) its
    /// fields are past h3's `max_field_section_size`, and h3 refuses it.
    max_frame: usize,
}

impl<C> Guarded<C> {
    pub fn new(inner: C, max_field_section_size: usize) -> Self {
        Guarded { inner, max_frame: max_field_section_size.saturating_mul(4).saturating_add(64) }
    }
}

impl<C: quic::Connection<B>, B: Buf> quic::Connection<B> for Guarded<C>
where
    C::BidiStream: quic::RecvStream<Buf = Bytes>,
{
    type RecvStream = C::RecvStream;
    type OpenStreams = Guarded<C::OpenStreams>;

    fn poll_accept_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Self::RecvStream, ConnectionErrorIncoming>> {
        self.inner.poll_accept_recv(cx)
    }

    fn poll_accept_bidi(&mut self, cx: &mut Context<'_>) -> Poll<Result<Self::BidiStream, ConnectionErrorIncoming>> {
        self.inner.poll_accept_bidi(cx).map_ok(|stream| RequestStream::watching(stream, self.max_frame))
    }

    fn opener(&self) -> Self::OpenStreams {
        Guarded { inner: self.inner.opener(), max_frame: self.max_frame }
    }
}

impl<C: quic::OpenStreams<B>, B: Buf> quic::OpenStreams<B> for Guarded<C>
where
    C::BidiStream: quic::RecvStream<Buf = Bytes>,
{
    type BidiStream = RequestStream<C::BidiStream>;
    type SendStream = C::SendStream;

    fn poll_open_bidi(&mut self, cx: &mut Context<'_>) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        self.inner.poll_open_bidi(cx).map_ok(RequestStream::unwatched)
    }

    fn poll_open_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        self.inner.poll_open_send(cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        self.inner.close(code, reason)
    }
}

/// A bidirectional stream (or its receiving half) that hands its bytes on
/// only once the first HEADERS frame has been read, and spoiled if need be.
pub struct RequestStream<S> {
    inner: S,
    /// Read and not yet handed on.
    held: BytesMut,
    /// Bytes of the extension frame being skipped that are still to come.
    skipping: usize,
    /// Until the first HEADERS frame is through; 0 once it is.
    max_frame: usize,
    ended: bool,
    scratch: Vec<u8>,
}

impl<S> RequestStream<S> {
    fn watching(inner: S, max_frame: usize) -> Self {
        RequestStream { inner, held: BytesMut::new(), skipping: 0, max_frame, ended: false, scratch: Vec::new() }
    }

    fn unwatched(inner: S) -> Self {
        Self::watching(inner, 0)
    }

    /// How many held bytes may go on now; None until more have arrived.
    fn passable(&mut self) -> Option<usize> {
        loop {
            if self.max_frame == 0 || self.ended {
                self.max_frame = 0;
                return Some(self.held.len());
            }
            if self.skipping > 0 {
                let skipped = self.skipping.min(self.held.len());
                self.skipping -= skipped;
                return (skipped > 0).then_some(skipped);
            }
            let mut rest = &self.held[..];
            let kind = varint(&mut rest)?;
            let len = usize::try_from(varint(&mut rest)?).unwrap_or(usize::MAX);
            let head_len = self.held.len() - rest.len();
            if kind >= FIRST_EXTENSION {
                self.skipping = head_len.saturating_add(len);
                continue;
            }
            // Any other frame, or a section too large, h3 refuses itself.
            if kind == HEADERS && len <= self.max_frame {
                let section = rest.get(..len)?;
                if qpack::fragment_in_path(section, &mut self.scratch) == Some(true) {
                    self.spoil(head_len, len);
                }
            }
            self.max_frame = 0;
        }
    }

    /// Rewrites the HEADERS frame at the front of `held` with
    /// [`qpack::SPOILER`] added to its field section.
    fn spoil(&mut self, head_len: usize, len: usize) {
        let rest = self.held.split_off(head_len + len);
        let mut frame = BytesMut::with_capacity(head_len + len + qpack::SPOILER.len() + 8 + rest.len());
        put_varint(&mut frame, HEADERS);
        put_varint(&mut frame, (len + qpack::SPOILER.len()) as u64);
        frame.extend_from_slice(&self.held[head_len..]);
        frame.extend_from_slice(&qpack::SPOILER);
        frame.extend_from_slice(&rest);
        self.held = frame;
    }
}

impl<S: quic::RecvStream<Buf = Bytes>> quic::RecvStream for RequestStream<S> {
    type Buf = Bytes;

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        loop {
            if self.max_frame == 0 && self.held.is_empty() {
                return if self.ended { Poll::Ready(Ok(None)) } else { self.inner.poll_data(cx) };
            }
            match self.passable() {
                Some(0) => {} // the watch ended with nothing held
                Some(ready) => return Poll::Ready(Ok(Some(self.held.split_to(ready).freeze()))),
                None => match std::task::ready!(self.inner.poll_data(cx))? {
                    // The first chunk is held without a copy when it is ours alone.
                    Some(chunk) if self.held.is_empty() => {
                        self.held = chunk.try_into_mut().unwrap_or_else(|shared| BytesMut::from(&shared[..]))
                    }
                    Some(chunk) => self.held.extend_from_slice(&chunk),
                    None => self.ended = true,
                },
            }
        }
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.inner.stop_sending(error_code)
    }

    fn recv_id(&self) -> StreamId {
        self.inner.recv_id()
    }
}

impl<S: quic::SendStream<B>, B: Buf> quic::SendStream<B> for RequestStream<S> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.inner.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.inner.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.inner.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.inner.reset(reset_code)
    }

    fn send_id(&self) -> StreamId {
        self.inner.send_id()
    }
}

impl<S, B: Buf> quic::BidiStream<B> for RequestStream<S>
where
    S: quic::BidiStream<B> + quic::RecvStream<Buf = Bytes>,
    S::RecvStream: quic::RecvStream<Buf = Bytes>,
{
    type SendStream = S::SendStream;
    type RecvStream = RequestStream<S::RecvStream>;

    fn split(self) -> (Self::SendStream, Self::RecvStream) {
        let RequestStream { inner, held, skipping, max_frame, ended, scratch } = self;
        let (send, recv) = inner.split();
        (send, RequestStream { inner: recv, held, skipping, max_frame, ended, scratch })
    }
}

/// A QUIC variable-length integer (RFC 9000 16), taken from the front.
fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let first = *bytes.first()?;
    let len = 1usize << (first >> 6);
    let raw = bytes.get(..len)?;
    let value = raw[1..].iter().fold(u64::from(first & 0x3f), |value, &byte| value << 8 | u64::from(byte));
    *bytes = &bytes[len..];
    Some(value)
}

fn put_varint(out: &mut BytesMut, value: u64) {
    match value {
        0..=0x3f => out.extend_from_slice(&[value as u8]),
        0x40..=0x3fff => out.extend_from_slice(&(value as u16 | 0x4000).to_be_bytes()),
        0x4000..=0x3fff_ffff => out.extend_from_slice(&(value as u32 | 0x8000_0000).to_be_bytes()),
        _ => out.extend_from_slice(&(value | 0xc000_0000_0000_0000).to_be_bytes()),
    }
}
