"""WebSockets for the HttpServer-style API: dart:io's
``WebSocketTransformer.upgrade`` as ``await upgrade_websocket(request)``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from .._dist.loader import native
from ..runtime.contract import Request
from .errors import HttpException

if TYPE_CHECKING:
    from .request import HttpRequest

__all__ = ["WebSocket", "is_upgrade_request", "upgrade_websocket"]

_ClientDisconnected = native.ClientDisconnected


def is_upgrade_request(request: HttpRequest) -> bool:
    """Whether the request asks for a WebSocket (HTTP/1.1 or HTTP/2)."""
    return bool(request._native.websocket)


async def upgrade_websocket(
    request: HttpRequest,
    *,
    protocol_selector: Callable[[list[str]], str | None] | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> WebSocket:
    """Accepts the WebSocket the request asks for. ``protocol_selector``
    picks one of the client's subprotocols (or None)."""
    native_request = request._native
    if not native_request.websocket:
        raise HttpException("not a WebSocket upgrade request", uri=request.uri.path)
    offered = [
        p.strip() for value in request.headers.get_all("sec-websocket-protocol") for p in value.split(",") if p.strip()
    ]
    chosen = protocol_selector(offered) if protocol_selector is not None and offered else None
    if not native_request.accept_websocket(chosen, list(headers)):
        raise _ClientDisconnected("the client left before the WebSocket was accepted")
    request.response._state = 2  # the 101 is the response
    return WebSocket(native_request, request._loop.create_future, chosen)


class WebSocket:
    """An accepted WebSocket: ``await send(text_or_bytes)``, ``async for
    message in ws`` (str or bytes), ``await close(code, reason)``."""

    def __init__(self, native_request: Request, create_future: Callable[[], Any], protocol: str | None) -> None:
        self._native = native_request
        self._create_future = create_future
        self.protocol = protocol
        self.close_code: int | None = None
        self.close_reason = ""

    async def send(self, data: str | bytes) -> None:
        """Raises ``ClientDisconnected`` once the socket is closed."""
        backlog = self._native.ws_send(data, self._create_future)
        if backlog is not None:
            await backlog

    async def receive(self) -> str | bytes | None:
        """The next message, or None once the socket is closed."""
        while True:
            item = self._native.ws_receive(self._create_future)
            if item.__class__ is tuple:
                break
            await item
        kind, payload = item
        if kind == "close":
            self.close_code, self.close_reason = payload
            return None
        return payload  # type: ignore[no-any-return]

    async def __aiter__(self) -> AsyncIterator[str | bytes]:
        while (message := await self.receive()) is not None:
            yield message

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Sends a close frame and waits for the client's answer."""
        self._native.ws_close(code, reason)
        while await self.receive() is not None:
            pass
