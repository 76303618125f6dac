//! Bodies across the bridge: the request body pumped into a stream's
//! frames, and the response body read out of them.

use super::*;

/// A request body with the frame already taken from it put back in front.
pub(super) struct Prefixed<B> {
    pub(super) first: Option<Bytes>,
    pub(super) body: B,
}

impl<B: RequestBodySource> Body for Prefixed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.first.take() {
            Some(first) => Poll::Ready(Some(Ok(Frame::data(first)))),
            None => Pin::new(&mut self.body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.body.is_end_stream()
    }
}

/// The request body's pump, steered by its exchange.
pub(super) struct Pump {
    pub(super) task: JoinHandle<()>,
    pub(super) signals: PumpSignals,
}

#[derive(Clone)]
pub(super) struct PumpSignals {
    /// Fired by the pump: the body was refused (too large, malformed, stalled).
    pub(super) refused: RefusalSignal,
    /// Fired by the pump: the body failed (the client is gone).
    pub(super) broke_off: CancellationToken,
    /// The exchange failed: stop at once.
    pub(super) stop: CancellationToken,
    /// The response is complete: read the rest of the body and drop it.
    pub(super) discard: CancellationToken,
}

/// Moves the request body to Python as chunk frames, within the stream's
/// credit, enforcing `limits`; ends with the request end, or an abort.
pub(super) async fn pump<B: RequestBodySource>(
    mut body: B,
    mut sender: Sender,
    limits: PumpLimits,
    signals: PumpSignals,
) {
    let PumpSignals { refused, broke_off, stop, discard } = signals;
    let mut total: u64 = 0;
    let mut discarded = false;
    loop {
        let stalled = async {
            match limits.stall {
                Some(stall) => tokio::time::sleep(stall).await,
                None => std::future::pending().await,
            }
        };
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = sender.link.dead.cancelled() => return,
            frame = body.frame() => frame,
            _ = stalled => {
                refused.fire(Refusal::Stalled);
                return sender.send(kind::ABORT, &[ABORT_CLIENT_GONE]);
            }
        };
        // (the body's error type need not be Send: judge it before awaiting)
        match next.map(|frame| frame.map_err(|error| malformed(&error))) {
            None if discarded => return sender.send(kind::ABORT, &[ABORT_DISCARDED]),
            None => return sender.send(kind::REQUEST_END, &[]),
            Some(Err(true)) => {
                refused.fire(Refusal::Malformed);
                return sender.send(kind::ABORT, &[ABORT_CLIENT_GONE]);
            }
            Some(Err(false)) => {
                sender.send(kind::ABORT, &[ABORT_CLIENT_GONE]);
                broke_off.cancel();
                return;
            }
            Some(Ok(frame)) => {
                let Ok(mut data) = frame.into_data() else { continue };
                total += data.len() as u64;
                if total > limits.max_size {
                    refused.fire(Refusal::TooLarge);
                    // Python learns why (BodyTooLarge) even though the
                    // exchange is over for the client.
                    return sender.send(kind::ABORT, &[ABORT_TOO_LARGE]);
                }
                while !data.is_empty() && !discard.is_cancelled() {
                    let size = tokio::select! {
                        biased;
                        _ = stop.cancelled() => return,
                        _ = discard.cancelled() => break,
                        size = sender.reserve(data.len().min(CHUNK)) => size,
                    };
                    let Some(size) = size else { return };
                    sender.send_data(kind::REQUEST_CHUNK, None, data.split_to(size));
                }
                discarded |= !data.is_empty();
            }
        }
    }
}

// ------------------------------------------------------------------ response body

/// A streamed response body read from the bridge: each chunk is granted back
/// to Python only when hyper takes it, so a slow client slows Python.
pub(super) struct BridgeBody {
    pub(super) stream: Option<Stream>,
    /// The stream broke; hyper gets one turn to flush what it has before the
    /// error cuts the connection.
    pub(super) failing: Option<&'static str>,
}

impl Body for BridgeBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if let Some(message) = this.failing {
            return Poll::Ready(Some(Err(io::Error::other(message))));
        }
        let Some(stream) = this.stream.as_mut() else { return Poll::Ready(None) };
        loop {
            let failure = match ready!(stream.poll_next(cx)) {
                Ok(FrameIn { kind: kind::RESPONSE_CHUNK, payload, .. }) => {
                    if payload.is_empty() {
                        continue;
                    }
                    stream.consumed(payload.len());
                    return Poll::Ready(Some(Ok(Frame::data(payload))));
                }
                Ok(FrameIn { kind: kind::RESPONSE_END, .. }) => {
                    stream.end = End::Complete;
                    this.stream = None;
                    return Poll::Ready(None);
                }
                Ok(FrameIn { kind: kind::ABORT, .. }) => {
                    stream.end = End::Aborted;
                    "response aborted by the application"
                }
                Ok(_) => "unexpected frame on the bridge",
                Err(_) => "the bridge failed mid-response",
            };
            // Drop the stream now; error on the next poll, after hyper has
            // flushed what the client should still get.
            this.stream = None;
            this.failing = Some(failure);
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_none() && self.failing.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

// ------------------------------------------------------------------ WebSocket
