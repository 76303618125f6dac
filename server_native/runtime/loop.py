"""The asyncio side of the native boundary.

Tokio threads never touch Python. They queue events and write one byte to a
socket pair when the queue goes from empty to non-empty; the loop wakes once,
drains the whole batch with one native call, and dispatches it.
"""

from __future__ import annotations

import asyncio
import contextvars
import operator
import socket
import sys
import threading
import types
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from typing import Any

from .._dist.loader import native
from .contract import Request

__all__ = ["CoroutineRunner", "EventPump", "body_chunks"]

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


class CoroutineRunner:
    """Runs request coroutines the way a Task per request would, for about
    the cost of one Task per batch.

    The coroutines started before the runner's Task first runs are one
    batch. The Task steps each of them in turn, each in its own copy of the
    context. One that finishes without waiting costs no Task of its own.
    The first one that waits keeps this Task for the rest of its life, and a
    new Task takes the rest of the batch. So ``asyncio.current_task()`` is
    always the real Task that drives the coroutine from its first step to
    its end (``asyncio.timeout`` and anyio rely on that); coroutines that
    finish without waiting may share one, but a cancellation one of them
    asks for ends that Task and reaches no other. A coroutine's own
    exceptions go to ``on_error``.

    The runner counts the coroutines it started that have not finished, so
    that a server can wait for them when it closes (:meth:`wait`), and
    knows the Tasks of those that wait, to cancel the ones that outlive its
    shutdown timeout (:meth:`cancel`)."""

    __slots__ = ("_loop", "_on_error", "_batch", "_live", "_idle", "_waiting", "_cancelling")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_error: Callable[[BaseException], None]) -> None:
        self._loop = loop
        self._on_error = on_error
        self._batch: list[Coroutine[Any, Any, Any]] | None = None
        #: Coroutines started and not finished, and a future resolved when
        #: none is left (made only while someone waits for that).
        self._live = 0
        self._idle: asyncio.Future[None] | None = None
        #: The Tasks driving a coroutine that waits: the ones to cancel.
        self._waiting: set[asyncio.Task[Any]] = set()
        #: Cancelled: coroutines not started yet are closed unstarted.
        self._cancelling = False

    def start(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._live += 1
        batch = self._batch
        if batch is None:
            self._batch = [coro]
            self._loop.create_task(self._run_batch())
        else:
            batch.append(coro)

    def _finished(self) -> None:
        self._live -= 1
        if not self._live:
            self._finished_all()

    def _finished_all(self) -> None:
        idle = self._idle
        if idle is not None and not idle.done():
            idle.set_result(None)

    @property
    def running(self) -> int:
        """How many coroutines it started have not finished."""
        return self._live

    async def wait(self, timeout: float) -> bool:
        """Waits (at most ``timeout`` seconds) until every coroutine started
        has finished, those started meanwhile too; True if they have."""
        deadline = self._loop.time() + timeout
        while self._live:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                return False
            if self._idle is None or self._idle.done():
                self._idle = self._loop.create_future()
            await asyncio.wait([self._idle], timeout=remaining)
        return True

    def cancel(self) -> int:
        """Cancels every coroutine that is waiting; those not started yet
        will be closed unstarted. Returns how many were cancelled."""
        self._cancelling = True
        waiting = [task for task in self._waiting if not task.done()]
        for task in waiting:
            task.cancel()
        return len(waiting)

    async def _run_batch(self) -> None:
        batch, self._batch = self._batch, None
        await self._run(batch or [], 0)

    async def _run(self, batch: list[Coroutine[Any, Any, Any]], first: int) -> None:
        task = asyncio.current_task()
        for index in range(first, len(batch)):
            coro = batch[index]
            if self._cancelling:
                coro.close()
                self._finished()
                continue
            context = contextvars.copy_context()
            try:
                awaited = context.run(coro.send, None)
            except StopIteration:
                # _finished(), without the call: the common case.
                self._live -= 1
                if self._idle is not None and not self._live:
                    self._finished_all()
            except BaseException as exc:  # noqa: BLE001 - one request's failure
                self._finished()
                self._on_error(exc)
            else:
                self._go_on(batch, index + 1)
                if task is not None:
                    self._waiting.add(task)
                try:
                    await _resumed(coro, context, awaited)
                except GeneratorExit:  # the Task is destroyed (the loop went away)
                    raise
                except BaseException as exc:  # noqa: BLE001
                    self._on_error(exc)
                finally:
                    self._waiting.discard(task)
                self._finished()
                return
            if task is not None and _cancel_requested(task):
                # The coroutine asked its Task to cancel, and nothing but it
                # ran meanwhile: the cancellation ends this Task, as it would
                # have ended a Task of the coroutine's own.
                self._go_on(batch, index + 1)
                return

    def _go_on(self, batch: list[Coroutine[Any, Any, Any]], first: int) -> None:
        """Hands the rest of the batch to a new Task."""
        if first < len(batch):
            self._loop.create_task(self._run(batch, first))


#: Whether a Task was asked to cancel: ``cancelling()`` from Python 3.11;
#: before it, only the Task's private flag says.
_cancel_requested: Callable[[asyncio.Task[Any]], Any] = (
    operator.methodcaller("cancelling") if sys.version_info >= (3, 11) else operator.attrgetter("_must_cancel")
)


@types.coroutine
def _resumed(coro: Coroutine[Any, Any, Any], context: contextvars.Context, awaited: Any) -> Generator[Any, Any, Any]:
    """Goes on with a started coroutine inside the current Task, as
    ``await`` would had the Task started it."""
    step: Callable[[Any], Any]
    while True:
        try:
            sent = yield awaited
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # noqa: BLE001 - thrown in by the Task, e.g. cancellation
            step, value = coro.throw, exc
        else:
            step, value = coro.send, sent
        try:
            awaited = context.run(step, value)
        except StopIteration as stop:
            return stop.value


async def body_chunks(native_request: Request, create_future: Callable[[], Any]) -> AsyncIterator[bytes]:
    """A request body as it arrives, waiting on the native side's futures."""
    while True:
        step = native_request.read(create_future)
        if step.__class__ is bytes:
            if not step:
                return
            yield step
        else:
            await step
