"""The asyncio side of the native boundary.

Tokio threads never touch Python. They queue events and write one byte to a
socket pair when the queue goes from empty to non-empty; the loop wakes once,
drains the whole batch with one native call, and dispatches it.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from ._loader import native

__all__ = ["EventPump", "body_chunks", "start_coroutine"]

NativeRequest = native.NativeRequest


class EventPump:
    """Wakes the loop for one native server's events and hands new requests
    to ``on_request``; parked futures are resolved in place."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_request: Callable[[Any], None]) -> None:
        self._loop = loop
        self._on_request = on_request
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        self._native: Any = None
        self._thread: threading.Thread | None = None

    @property
    def wake_fd(self) -> int:
        return self._write.fileno()

    def attach(self, native_server: Any) -> None:
        self._native = native_server
        try:
            self._loop.add_reader(self._read.fileno(), self._on_readable)
        except NotImplementedError:
            # Proactor loops (Windows) have no add_reader: a thread waits for
            # the byte instead and hops to the loop once per batch.
            self._read.setblocking(True)
            self._thread = threading.Thread(target=self._wait_in_thread, name="server-native-wake", daemon=True)
            self._thread.start()

    def _wait_in_thread(self) -> None:
        while True:
            try:
                data = self._read.recv(4096)
            except OSError:
                return
            if not data:
                return
            try:
                self._loop.call_soon_threadsafe(self.drain)
            except RuntimeError:  # loop closed
                return

    def _on_readable(self) -> None:
        try:
            self._read.recv(4096)
        except (BlockingIOError, InterruptedError):
            pass
        self.drain()

    def drain(self) -> None:
        native_server = self._native
        if native_server is None:
            return
        on_request = self._on_request
        for event in native_server.drain():
            if event.__class__ is NativeRequest:
                on_request(event)
            elif not event.done():
                event.set_result(None)

    def detach(self) -> None:
        """Stops watching; one last drain resolves whatever is still parked."""
        if self._thread is None:
            self._loop.remove_reader(self._read.fileno())
        self.drain()
        self._native = None
        self._read.close()
        self._write.close()


_EAGER = sys.version_info >= (3, 12)


def start_coroutine(
    loop: asyncio.AbstractEventLoop,
    coro: Coroutine[Any, Any, Any],
    on_error: Callable[[BaseException], None] | None,
) -> asyncio.Task[Any]:
    """Runs ``coro`` in its own Task. Always a real Task, since frameworks
    rely on ``asyncio.current_task()`` (anyio, ``asyncio.timeout``); from
    Python 3.12 it starts eagerly, so a handler that answers without
    awaiting finishes before this returns, without a loop iteration.
    ``on_error`` None: ``coro`` handles its own failures, and the task gets
    no done callback (one loop callback fewer per request)."""
    if _EAGER:
        task: asyncio.Task[Any] = asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg]
    else:
        task = loop.create_task(coro)
    if on_error is not None:
        task.add_done_callback(lambda t: _report(t, on_error))
    return task


def _report(task: asyncio.Task[Any], on_error: Callable[[BaseException], None]) -> None:
    if task.cancelled():
        on_error(asyncio.CancelledError())
        return
    exc = task.exception()
    if exc is not None:
        on_error(exc)


async def body_chunks(native_request: Any, create_future: Callable[[], Any]) -> AsyncIterator[bytes]:
    """A request body as it arrives, waiting on the native side's futures."""
    while True:
        step = native_request.read(create_future)
        if step.__class__ is bytes:
            if not step:
                return
            yield step
        else:
            await step
