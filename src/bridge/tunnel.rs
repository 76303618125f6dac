//! A WebSocket over the bridge: the accept, then the messages of an
//! upgraded connection carried both ways on its stream.

use super::*;

/// Python accepted a WebSocket: the accepting response goes to the client,
/// and the stream carries that socket's messages.
pub(super) async fn accept_websocket(
    mut stream: Stream,
    upgrade: OnUpgrade,
    request: &Parts,
    payload: Bytes,
    server: &Arc<ServerShared>,
) -> Result<Response<ResponseBody>, Failure> {
    let mut fields = Fields { payload };
    let subprotocol = fields.bytes()?;
    let count = fields.u32()?;
    let mut headers = HeaderMap::new();
    for _ in 0..count {
        let name =
            HeaderName::from_bytes(&fields.bytes()?).map_err(|_| BridgeError::Malformed("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(fields.bytes()?)
            .map_err(|_| BridgeError::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    if !subprotocol.is_empty() {
        let value =
            HeaderValue::from_maybe_shared(subprotocol).map_err(|_| BridgeError::Malformed("invalid subprotocol"))?;
        headers.insert(http::header::SEC_WEBSOCKET_PROTOCOL, value);
    }
    let (status, handshake) = websocket::accept_head(request.version, &request.headers, &mut headers, &server.config);
    // The request side is through before the socket starts (an upgrade
    // request has no body; should one come, it is sent first).
    if let Some(pump) = stream.pump.take() {
        if pump.task.await.is_err() || pump.signals.broke_off.is_cancelled() {
            return Err(BridgeError::Closed.into());
        }
    }
    // The tunnel holds no permit of the server's: a long-lived socket does
    // not count against the requests in flight. It is one of the server's
    // tasks all the same: the drain waits for it.
    websocket::spawn_tracked(server, tunnel(upgrade, stream, handshake, server.shutdown.clone()));
    let mut response = Response::new(ResponseBody::empty());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(response)
}

/// Sends a message as frames of at most `CHUNK` bytes, within the credit;
/// false when the connection failed.
pub(super) async fn send_ws_message(sender: &mut Sender, kind: u8, mut data: Bytes) -> bool {
    if data.is_empty() {
        sender.send_data(kind::WS_MESSAGE, Some(kind), data);
        return true;
    }
    while !data.is_empty() {
        let Some(size) = sender.reserve(data.len().min(CHUNK)).await else { return false };
        let piece = data.split_to(size);
        let flags = if data.is_empty() { kind } else { kind | WS_MORE };
        sender.send_data(kind::WS_MESSAGE, Some(flags), piece);
    }
    true
}

pub(super) fn ws_close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    payload
}

/// Fires a while after our close frame went out: the client's time to answer.
pub(super) async fn close_grace(we_closed: &CancellationToken) {
    we_closed.cancelled().await;
    tokio::time::sleep(websocket::CLOSE_ANSWER_TIMEOUT).await;
}

/// Carries one accepted WebSocket's messages between the client and Python
/// until either side closes, or the server shuts down: then the client gets
/// a close frame with 1012, and Python the same code at once, after the
/// messages that came before. The two directions run independently, so a
/// full buffer one way never stops the other.
pub(super) async fn tunnel(upgrade: OnUpgrade, mut stream: Stream, handshake: Handshake, shutdown: CancellationToken) {
    let max_message_size = handshake.max_message_size();
    let Some(socket) = handshake.open(upgrade).await else {
        stream.link.send(frame(kind::WS_CLOSE, stream.id, &ws_close_payload(WS_ABNORMAL, "")));
        stream.end = End::Complete;
        return;
    };
    let (mut sink, mut source) = socket.split();
    let mut sender = stream.sender();
    let client_done = CancellationToken::new();
    let we_closed = CancellationToken::new();
    let python_gone = AtomicBool::new(false);
    let from_client = async {
        let outcome = loop {
            let next = tokio::select! {
                biased;
                next = websocket::next_incoming(&mut source) => next,
                _ = close_grace(&we_closed) => break (WS_ABNORMAL, String::new()),
            };
            let (kind, data) = match next {
                Incoming::Message(Message::Text(text)) => (WS_TEXT, text),
                Incoming::Message(Message::Binary(data)) => (WS_BINARY, data),
                Incoming::Closed(code, reason) => break (code, reason),
            };
            if python_gone.load(Ordering::Relaxed) {
                continue;
            }
            let sent = tokio::select! {
                biased;
                sent = send_ws_message(&mut sender, kind, data) => sent,
                _ = close_grace(&we_closed) => break (WS_ABNORMAL, String::new()),
            };
            if !sent {
                python_gone.store(true, Ordering::Relaxed);
            }
        };
        client_done.cancel();
        outcome
    };
    let from_python = async {
        let mut message: Option<(u8, BytesMut)> = None;
        let limit = max_message_size.max(MAX_FRAME);
        // Shutting down: Python was told; what it sent before goes out, then
        // the close frame.
        let mut shutting = false;
        loop {
            let frame = if shutting {
                match futures_util::FutureExt::now_or_never(stream.next()) {
                    Some(frame) => frame,
                    None => Err(BridgeError::Closed),
                }
            } else {
                tokio::select! {
                    biased;
                    _ = client_done.cancelled() => return,
                    _ = shutdown.cancelled() => {
                        shutting = true;
                        python_gone.store(true, Ordering::Relaxed);
                        stream.link.send(frame(kind::WS_CLOSE, stream.id, &ws_close_payload(websocket::SERVICE_RESTART, "")));
                        stream.end = End::Complete;
                        continue;
                    }
                    frame = stream.next() => frame,
                }
            };
            let close = match frame {
                Ok(FrameIn { kind: kind::WS_MESSAGE, mut payload, .. }) if !payload.is_empty() => {
                    let flags = payload.get_u8();
                    let size = payload.len();
                    let (kind, data) = message.get_or_insert_with(|| (flags & (WS_TEXT | WS_BINARY), BytesMut::new()));
                    data.extend_from_slice(&payload);
                    if data.len() > limit {
                        Some((WS_SERVER_ERROR, "message too large"))
                    } else if flags & WS_MORE != 0 {
                        stream.consumed(size);
                        continue;
                    } else {
                        let (kind, data) = (*kind, std::mem::take(data).freeze());
                        message = None;
                        let outgoing = if kind == WS_TEXT {
                            match std::str::from_utf8(&data) {
                                Ok(_) => yawc::Frame::text(data),
                                Err(_) => {
                                    python_gone.store(true, Ordering::Relaxed);
                                    let _ = sink.send(websocket::close_frame(WS_SERVER_ERROR, "")).await;
                                    we_closed.cancel();
                                    return;
                                }
                            }
                        } else {
                            yawc::Frame::binary(data)
                        };
                        if sink.send(outgoing).await.is_err() {
                            return;
                        }
                        stream.consumed(size);
                        None
                    }
                }
                Ok(FrameIn { kind: kind::WS_CLOSE, payload, .. }) if payload.len() >= 2 => {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    let reason = String::from_utf8_lossy(&payload[2..]).into_owned();
                    let _ = sink.send(websocket::close_frame(code, &reason)).await;
                    we_closed.cancel();
                    return;
                }
                _ if shutting => Some((websocket::SERVICE_RESTART, "")),
                // Python went away, aborted or broke the protocol: the client is told.
                _ => Some((WS_SERVER_ERROR, "")),
            };
            if let Some((code, reason)) = close {
                python_gone.store(true, Ordering::Relaxed);
                let _ = sink.send(websocket::close_frame(code, reason)).await;
                we_closed.cancel();
                return;
            }
        }
    };
    let ((code, reason), ()) = tokio::join!(from_client, from_python);
    let _ = sink.close().await;
    if !python_gone.load(Ordering::Relaxed) {
        stream.link.send(frame(kind::WS_CLOSE, stream.id, &ws_close_payload(code, &reason)));
        stream.end = End::Complete;
    }
}
