"""Worker processes for ``--workers N``, ``--reload`` and recycling: each
worker is the same command line, serving listening sockets the supervisor
holds (``--fd``): over TCP one per worker, side by side on the port
(SO_REUSEPORT), so the kernel spreads connections over the workers; a Unix
socket (which cannot be shared by path) or inherited sockets (``--fd``,
systemd's socket activation) are served by every worker. A socket outlives
the worker serving it: while a worker is replaced, its clients wait in the
listen backlog instead of being refused.

A worker is replaced by a successor started beside it: once the successor
serves, the old one drains (SIGTERM). That happens to every worker on SIGHUP
(and, with ``--reload``, when a Python file changes), and to one worker past
its request limit (``--limit-max-requests``), its lifetime
(``--workers-lifetime``) or its memory limit (``--workers-max-rss``). From
the moment its successor starts, the old worker's HTTP/1 responses close
their connections, so that its drain closes no keep-alive connection under a
client's next request. A worker that does not answer a health check within
``--timeout-worker-healthcheck`` seconds (its event loop is blocked) is
replaced at once, sent SIGTERM, and killed if it still does not answer as
long again. A worker that dies is replaced; SIGTERM or SIGINT closes the
sockets and drains every worker, and a second signal stops them at once.

Each worker has a channel to the supervisor, a Unix socket pair carrying
one JSON object per line (``worker.py``): readiness, pings and pongs (which
carry the worker's figures), retirement, and a worker's last figures as it
exits. With ``--metrics`` the supervisor serves the workers' figures, added
up (``metrics.py``), and pings the workers for fresh ones every second even
without health checks."""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..runtime.addresses import resolve_bind_hosts
from ..runtime.metrics import add_figures, total
from ..runtime.unix_socket import bind_unix_socket

if TYPE_CHECKING:
    from .metrics import MetricsListener

__all__ = ["Recycling", "supervise"]

logger = logging.getLogger("server_native.supervisor")

_POLL = 0.2
#: How long past their shutdown_timeout workers have to exit (lifespan
#: shutdown, closing) before they are killed.
_EXIT_GRACE = 10.0
#: How often port 0 on several addresses is retried when the port the first
#: address got is taken on another.
_PORT_ATTEMPTS = 16
#: How long a slot waits before another successor is started after one
#: exited before it served.
_RETRY_AFTER = 5.0
#: The most seconds between two health checks of a worker.
_PING_INTERVAL = 1.0
#: How often the workers' resident memory is read (``--workers-max-rss``).
_RSS_INTERVAL = 1.0
#: Workers talk to the supervisor over an inherited Unix socket pair.
CHANNELS = os.name == "posix"

#: Options with a value that the supervisor decides for its workers.
_SUPERVISOR_OPTIONS = (
    "--workers", "--reload-dir", "--pid-file", "--env-file",
    "--workers-lifetime", "--workers-max-rss", "--timeout-worker-healthcheck",
    "--metrics-address", "--metrics-port",
)  # fmt: skip
#: Flags that the supervisor decides for its workers.
_SUPERVISOR_FLAGS = ("--reload", "--metrics")
#: Where to listen: replaced by ``--fd`` when the supervisor holds the sockets.
_LISTEN_OPTIONS = ("--host", "--port", "--uds", "--uds-mode", "--fd")


@dataclass(frozen=True)
class Recycling:
    """When a worker that still runs is replaced: past ``lifetime`` seconds,
    above ``max_rss_mib`` MiB of resident memory, or when it has not
    answered a health check within ``healthcheck_timeout`` seconds (None:
    no health checks)."""

    lifetime: float | None = None
    max_rss_mib: int | None = None
    healthcheck_timeout: float | None = None


def encode(message: dict[str, Any]) -> bytes:
    """One message of the channel between supervisor and worker: a line of JSON."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any] | None:
    """A message, or None for a line that is not a JSON object."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _worker_command(argv: Sequence[str], *, listening_fds: Sequence[int] = ()) -> list[str]:
    """The same serve command for one worker: no --workers, no --reload, no
    option the supervisor handles; with ``listening_fds`` (the supervisor's
    sockets), ``--fd`` for each in place of --host/--port/--uds/--fd."""
    dropped = _SUPERVISOR_OPTIONS + (_LISTEN_OPTIONS if listening_fds else ())
    command: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in dropped:
            skip = True
            continue
        if arg.startswith(tuple(f"{option}=" for option in dropped)) or arg in _SUPERVISOR_FLAGS:
            continue
        command.append(arg)
    for fd in listening_fds:
        command += ["--fd", str(fd)]
    return [sys.executable, "-m", "server_native", *command, "--workers", "1", "--shared"]


class _Worker:
    """A worker process in a slot, and the supervisor's end of its channel."""

    def __init__(self, slot: int, command: list[str], fds: tuple[int, ...]) -> None:
        self.slot = slot
        self.started = time.monotonic()
        self.channel: socket.socket | None = None
        if CHANNELS:
            ours, theirs = socket.socketpair()
            try:
                with theirs:
                    command = [*command, "--supervisor-fd", str(theirs.fileno())]
                    # A session of its own: a signal to the supervisor's
                    # process group (Ctrl-C in a terminal, kill -- -PGID)
                    # reaches the worker once, through the supervisor, not
                    # twice (which would stop it at once). An orphan learns
                    # of it from the channel.
                    self.process = subprocess.Popen(command, pass_fds=(*fds, theirs.fileno()), start_new_session=True)
            except BaseException:
                ours.close()
                raise
            ours.setblocking(False)
            self.channel = ours
        else:
            self.process = subprocess.Popen(command, pass_fds=fds)
        #: Serving; without a channel, taken for granted.
        self.ready = self.channel is None
        self.received = b""
        #: The health check awaiting an answer: its id and when it was sent.
        self.ping: tuple[int, float] | None = None
        self.pinged_at = self.started
        #: The worker's figures, from its last pong.
        self.figures: dict[str, Any] = {}
        #: Why the worker is to be replaced, once it is.
        self.retire_reason: str | None = None
        #: When it was told to drain (or to stop).
        self.terminated_at: float | None = None
        self.killed = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, message: dict[str, Any]) -> None:
        if self.channel is None:
            return
        try:
            self.channel.send(encode(message))
        except OSError:
            pass  # Gone, or not reading: the health check will tell.

    def receive(self) -> list[dict[str, Any]] | None:
        """The messages that arrived; None at the end of the channel."""
        assert self.channel is not None
        try:
            data = self.channel.recv(65536)
        except BlockingIOError:
            return []
        except OSError:
            data = b""
        if not data:
            return None
        *lines, self.received = (self.received + data).split(b"\n")
        return [message for line in lines if (message := decode(line)) is not None]

    def terminate(self, signum: int = signal.SIGTERM) -> None:
        self.terminated_at = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signum)


class _Supervisor:
    """``slots``: each worker's command and the descriptors it inherits;
    ``listeners``: the sockets held for them, closed on the final stop."""

    def __init__(
        self,
        slots: list[tuple[list[str], tuple[int, ...]]],
        drain_limit: float,
        listeners: Sequence[socket.socket] = (),
        recycling: Recycling = Recycling(),
    ) -> None:
        self.slots = slots
        self.drain_limit = drain_limit
        self.listeners = list(listeners)
        self.recycling = recycling
        self.selector = selectors.DefaultSelector()
        self.workers: list[_Worker] = []
        #: Per slot: the worker started to replace the slot's, until it serves.
        self.successors: list[_Worker | None] = [None] * len(slots)
        #: Per slot: no successor is started before this time.
        self.retry_at = [0.0] * len(slots)
        #: Replaced and draining.
        self.retiring: list[_Worker] = []
        self.stopping = False
        self.stop_signal: int = signal.SIGTERM
        #: SIGHUP came: replace the workers on the next turn of the loop.
        self.reload_asked = False
        #: The signal that stopped the workers at once, if one did.
        self.forced: int | None = None
        self.ping_ids = itertools.count(1)
        self.next_rss_check = 0.0
        #: Ping workers for their figures even without health checks.
        self.collect_figures = False
        self.spawns = 0
        #: Counted by the workers that exited, from their last figures.
        self.exited_figures: dict[str, Any] = {}
        #: Held while figures move from a worker to ``exited_figures``: the
        #: metrics listener's thread adds them up meanwhile.
        self.figures_lock = threading.Lock()

    def spawn(self, slot: int) -> _Worker:
        command, fds = self.slots[slot]
        worker = _Worker(slot, command, fds)
        self.spawns += 1
        if worker.channel is not None:
            self.selector.register(worker.channel, selectors.EVENT_READ, worker)
        return worker

    def forget(self, worker: _Worker) -> None:
        """Closes the channel of a worker that exited, and keeps what it counted."""
        if worker.channel is not None:
            # Its last figures, sent as it exited, may be unread yet.
            while messages := worker.receive():
                for message in messages:
                    if isinstance(message.get("figures"), dict):
                        worker.figures = message["figures"]
        with self.figures_lock:
            self.exited_figures = add_figures(
                self.exited_figures, worker.figures.get("metrics") or {}, counters_only=True
            )
            worker.figures = {}
        if worker.channel is not None:
            self.selector.unregister(worker.channel)
            worker.channel.close()
            worker.channel = None

    def start(self) -> None:
        self.workers = [self.spawn(slot) for slot in range(len(self.slots))]

    def everyone(self) -> list[_Worker]:
        return self.workers + [worker for worker in self.successors if worker is not None] + self.retiring

    def on_signal(self, signum: int, _frame: object) -> None:
        if self.stopping:
            logger.warning("%s again: stopping the workers at once", signal.Signals(signum).name)
            self.forced = signum
            for worker in self.everyone():
                worker.process.kill()
            return
        logger.info("%s: draining the workers (a second signal stops them at once)", signal.Signals(signum).name)
        self.stopping = True
        self.stop_signal = signum
        for worker in self.everyone():
            # Those already draining are left to it: a second signal would cut them.
            if worker.terminated_at is None:
                worker.terminate(signum)
        # New clients are refused at once, as by a single server: the
        # workers close their copies as they stop accepting.
        for listener in self.listeners:
            listener.close()

    def on_reload(self, _signum: int, _frame: object) -> None:
        self.reload_asked = True

    def restart_all(self, reason: str) -> None:
        """Every worker (and successor) is to be replaced: new ones first,
        then the old ones drain."""
        for worker in self.workers + self.successors:
            if worker is not None:
                worker.retire_reason = reason
        self.retry_at = [0.0] * len(self.slots)

    def tend(self, timeout: float) -> None:
        """One turn: the workers' messages (waiting up to ``timeout`` for
        them), then exits, health checks and recycling."""
        if self.selector.get_map():
            for key, _ in self.selector.select(timeout):
                self.read(key.data)
        else:
            time.sleep(timeout)
        now = time.monotonic()
        for step in (self.reap, self.check_health, self.recycle):
            if self.stopping:
                return
            step(now)

    def read(self, worker: _Worker) -> None:
        messages = worker.receive()
        if messages is None:
            self.forget(worker)
            return
        for message in messages:
            kind = message.get("type")
            if kind == "ready":
                worker.ready = True
                if self.successors[worker.slot] is worker:
                    self.promote(worker.slot)
            elif kind == "pong":
                if worker.ping is not None and message.get("id") == worker.ping[0]:
                    worker.ping = None
                worker.figures = message.get("figures") or {}
            elif kind == "figures":
                worker.figures = message.get("figures") or {}
            elif kind == "retire" and worker.retire_reason is None:
                worker.retire_reason = str(message.get("reason"))

    def promote(self, slot: int) -> None:
        """The slot's successor serves: the old worker drains."""
        new, old = self.successors[slot], self.workers[slot]
        assert new is not None
        self.successors[slot] = None
        self.workers[slot] = new
        logger.info("worker %d serves in place of worker %d, which drains", new.pid, old.pid)
        self.retire(old)

    def retire(self, worker: _Worker) -> None:
        worker.terminate()
        self.retiring.append(worker)

    def reap(self, now: float) -> None:
        """Replaces the workers that exited, and forgets the successors and
        retired workers that did; kills the retired ones that overstay."""
        for slot, worker in enumerate(self.workers):
            code = worker.process.poll()
            if code is None:
                continue
            self.forget(worker)
            successor = self.successors[slot]
            if successor is not None:
                self.successors[slot] = None
                self.workers[slot] = successor
                logger.warning("worker %d exited with %s; its successor %d takes over", worker.pid, code, successor.pid)
            else:
                logger.warning("worker %d exited with %s; starting another", worker.pid, code)
                self.workers[slot] = self.spawn(slot)
        for slot, successor in enumerate(self.successors):
            if successor is not None and (code := successor.process.poll()) is not None:
                self.forget(successor)
                self.successors[slot] = None
                self.retry_at[slot] = now + _RETRY_AFTER
                logger.error(
                    "worker %d, started to replace worker %d, exited with %s before it served; "
                    "worker %d serves on, another successor in %gs",
                    successor.pid, self.workers[slot].pid, code, self.workers[slot].pid, _RETRY_AFTER,
                )  # fmt: skip
        draining = []
        for worker in self.retiring:
            if worker.process.poll() is not None:
                self.forget(worker)
                continue
            draining.append(worker)
            assert worker.terminated_at is not None
            if not worker.killed and now - worker.terminated_at > self.drain_limit:
                logger.warning(
                    "worker %d still running %gs after it was told to drain: killed", worker.pid, self.drain_limit
                )
                worker.process.kill()
                worker.killed = True
        self.retiring = draining

    def figures(self) -> dict[str, Any]:
        """The workers' figures for monitoring, added up: the last each
        running worker sent, and what the exited ones counted."""
        with self.figures_lock:
            running = [worker.figures.get("metrics") or {} for worker in self.everyone()]
            return dict(total([self.exited_figures, *running]))

    def check_health(self, now: float) -> None:
        """Pings every serving worker; replaces one that leaves a ping
        unanswered past the timeout, and kills it (SIGKILL) once twice the
        timeout has passed."""
        timeout = self.recycling.healthcheck_timeout
        if not timeout and not self.collect_figures:
            return
        interval = min(_PING_INTERVAL, timeout / 2) if timeout else _PING_INTERVAL
        for worker in self.everyone():
            if not worker.ready or worker.channel is None or worker.killed:
                continue
            if worker.ping is None:
                if now - worker.pinged_at >= interval:
                    worker.ping = (next(self.ping_ids), now)
                    worker.pinged_at = now
                    worker.send({"type": "ping", "id": worker.ping[0]})
                continue
            silent = now - worker.ping[1]
            if not timeout:
                continue
            if silent > 2 * timeout:
                logger.error("worker %d has not answered a health check for %.1fs: killed", worker.pid, silent)
                worker.process.kill()
                worker.killed = True
            elif silent > timeout and self.workers[worker.slot] is worker:
                logger.error(
                    "worker %d did not answer a health check within %gs (is its event loop blocked?): "
                    "replacing it; it is killed if it does not answer within %gs more",
                    worker.pid, timeout, timeout,
                )  # fmt: skip
                successor = self.successors[worker.slot] or self.spawn(worker.slot)
                self.successors[worker.slot] = None
                self.workers[worker.slot] = successor
                self.retire(worker)

    def recycle(self, now: float) -> None:
        """Starts a successor for each worker that is to be replaced."""
        check_rss = self.recycling.max_rss_mib is not None and now >= self.next_rss_check
        if check_rss:
            self.next_rss_check = now + _RSS_INTERVAL
        for slot, worker in enumerate(self.workers):
            if self.successors[slot] is not None or now < self.retry_at[slot]:
                continue
            if worker.retire_reason is None:
                worker.retire_reason = self.reason_to_recycle(worker, now, check_rss)
            if worker.retire_reason is None:
                continue
            logger.info("worker %d: %s; starting its successor", worker.pid, worker.retire_reason)
            successor = self.successors[slot] = self.spawn(slot)
            worker.send({"type": "retire", "reason": worker.retire_reason})
            if successor.ready:
                self.promote(slot)

    def reason_to_recycle(self, worker: _Worker, now: float, check_rss: bool) -> str | None:
        lifetime, max_rss = self.recycling.lifetime, self.recycling.max_rss_mib
        if lifetime is not None and now - worker.started >= lifetime:
            return f"its lifetime of {lifetime:g}s (--workers-lifetime) is over"
        if check_rss and max_rss is not None:
            rss = resident_mib(worker.pid)
            if rss is not None and rss > max_rss:
                return f"{rss} MiB resident, above --workers-max-rss {max_rss}"
        return None

    def wait_all(self) -> int:
        for worker in self.everyone():
            # Started as the stop came: told now.
            if worker.terminated_at is None:
                worker.terminate(self.stop_signal)
        deadline = time.monotonic() + self.drain_limit
        codes = []
        for worker in self.everyone():
            try:
                codes.append(worker.process.wait(max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                logger.warning("worker %d still running %gs after the signal: killed", worker.pid, self.drain_limit)
                worker.process.kill()
                codes.append(worker.process.wait())
            self.forget(worker)
        if self.forced is not None:
            return 128 + self.forced
        return 0 if all(code in (0, -signal.SIGTERM, -signal.SIGINT) for code in codes) else 1


def resident_mib(pid: int) -> int | None:
    """A process's resident memory (``VmRSS``), in MiB; None when it is gone
    or the system has no ``/proc``."""
    kib = resident_kib(pid)
    return None if kib is None else kib // 1024


def resident_kib(pid: int) -> int | None:
    """A process's resident memory (``VmRSS``), in KiB; None when it is gone
    or the system has no ``/proc``."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def supervise(
    argv: Sequence[str],
    *,
    workers: int,
    reload: bool,
    reload_dirs: Sequence[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    uds: str | None = None,
    uds_mode: int | None = None,
    fds: Sequence[int] | None = None,
    backlog: int = 0,
    shutdown_timeout: float = 30.0,
    recycling: Recycling = Recycling(),
    metrics: tuple[str, int] | None = None,
) -> int:
    """Runs ``workers`` workers of the serve command ``argv`` until SIGTERM
    or SIGINT; the server's logging is configured already. ``metrics``: the
    address and port to serve the workers' figures on."""
    drain_limit = shutdown_timeout + _EXIT_GRACE
    if fds:
        command = _worker_command(argv, listening_fds=fds)
        supervisor = _Supervisor([(command, tuple(fds))] * workers, drain_limit, recycling=recycling)
        return _supervise(supervisor, reload, reload_dirs, metrics)
    if uds is None and not hasattr(socket, "SO_REUSEPORT"):
        # No SO_REUSEPORT (Windows): every worker binds the port itself.
        slots: list[tuple[list[str], tuple[int, ...]]] = [(_worker_command(argv), ())] * workers
        return _supervise(_Supervisor(slots, drain_limit, recycling=recycling), reload, reload_dirs, metrics)
    with ExitStack() as held:
        try:
            if uds is not None:
                sock, socket_file = bind_unix_socket(uds, backlog=backlog, mode=uds_mode)
                held.callback(socket_file.remove)
                per_slot = [[held.enter_context(sock)]] * workers
            else:
                per_slot = [
                    [held.enter_context(sock) for sock in group]
                    for group in _bind_tcp_slots(host, port, backlog, workers)
                ]
        except OSError as exc:
            print(f"server-native: error: {exc}", file=sys.stderr)
            return 1
        slots = []
        for sockets in per_slot:
            listening = tuple(sock.fileno() for sock in sockets)
            slots.append((_worker_command(argv, listening_fds=listening), listening))
        listeners = list({id(sock): sock for group in per_slot for sock in group}.values())
        return _supervise(_Supervisor(slots, drain_limit, listeners, recycling), reload, reload_dirs, metrics)


def _bind_tcp_slots(host: str, port: int, backlog: int, workers: int) -> list[list[socket.socket]]:
    """The listening sockets of each worker: every address ``host`` names on
    one port, once per worker; side by side (SO_REUSEPORT) when there are
    several workers."""
    reuse_port = workers > 1
    slots = [_bind_tcp(host, port, backlog, reuse_port=reuse_port)]
    try:
        chosen = slots[0][0].getsockname()[1]
        while len(slots) < workers:
            slots.append(_bind_tcp(host, chosen, backlog, reuse_port=reuse_port))
    except OSError:
        for group in slots:
            for sock in group:
                sock.close()
        raise
    return slots


def _bind_tcp(host: str, port: int, backlog: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Listening sockets on every address ``host`` names, all on one port
    (``port``, or one picked for the first address when it is 0)."""
    addresses = resolve_bind_hosts(host)
    attempts = 0
    while True:
        attempts += 1
        sockets: list[socket.socket] = []
        chosen = port
        try:
            for address in addresses:
                sockets.append(_listen_tcp(address, chosen, backlog, reuse_port))
                chosen = sockets[-1].getsockname()[1]
            return sockets
        except OSError as exc:
            for sock in sockets:
                sock.close()
            taken_elsewhere = port == 0 and sockets and exc.errno == errno.EADDRINUSE
            if not taken_elsewhere or attempts == _PORT_ATTEMPTS:
                raise OSError(exc.errno, f"cannot bind {address} port {chosen}: {exc.strerror or exc}") from None


def _listen_tcp(address: str, port: int, backlog: int, reuse_port: bool) -> socket.socket:
    """As the native side binds: SO_REUSEADDR (and SO_REUSEPORT when
    ``reuse_port``, as ``shared``), dual-stack ``::``."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((address, port))
        sock.listen(backlog if backlog > 0 else 1024)
    except BaseException:
        sock.close()
        raise
    return sock


def _supervise(
    supervisor: _Supervisor, reload: bool, reload_dirs: Sequence[str], metrics: tuple[str, int] | None
) -> int:
    """Runs the supervisor, with ``metrics`` (address, port) serving its figures."""
    listener = None
    if metrics is not None:
        try:
            listener = _serve_metrics(supervisor, *metrics)
        except OSError as exc:
            print(
                f"server-native: error: --metrics: cannot listen on {metrics[0]} port {metrics[1]}: {exc}",
                file=sys.stderr,
            )
            return 1
    try:
        return _run(supervisor, reload, reload_dirs)
    finally:
        if listener is not None:
            listener.close()


def _serve_metrics(supervisor: _Supervisor, address: str, port: int) -> MetricsListener:
    """The workers' figures, added up, and the supervisor's own, served from
    a thread (its collector reads what the supervisor's loop writes)."""
    from ..runtime.prometheus import FiguresCollector, WorkerFigures
    from .metrics import MetricsListener

    def workers() -> WorkerFigures:
        running = supervisor.everyone()
        resident = [
            (worker.slot, worker.pid, 1024 * kib) for worker in running if (kib := resident_kib(worker.pid)) is not None
        ]
        return WorkerFigures(supervisor.spawns, max(supervisor.spawns - len(supervisor.slots), 0), resident)

    supervisor.collect_figures = True
    return MetricsListener(address, port, FiguresCollector(supervisor.figures, workers))


def _run(supervisor: _Supervisor, reload: bool, reload_dirs: Sequence[str]) -> int:
    signal.signal(signal.SIGTERM, supervisor.on_signal)
    signal.signal(signal.SIGINT, supervisor.on_signal)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, supervisor.on_reload)
    supervisor.start()
    changes = _watch(reload_dirs) if reload else None
    while not supervisor.stopping:
        if supervisor.reload_asked:
            supervisor.reload_asked = False
            logger.info("SIGHUP: starting new workers, then draining the old ones")
            supervisor.restart_all("SIGHUP")
        elif changes is not None and next(changes):
            logger.info("files changed: restarting the workers")
            supervisor.restart_all("files changed")
        if not supervisor.stopping:
            supervisor.tend(_POLL if changes is None else 0)
    return supervisor.wait_all()


def _watch(directories: Sequence[str]) -> Iterator[bool]:
    """Yields True after Python files changed, False every ~0.2 s otherwise."""
    try:
        from watchfiles import PythonFilter, watch
    except ImportError:
        sys.exit("server-native: error: --reload needs watchfiles (pip install watchfiles)")
    for changes in watch(
        *directories, watch_filter=PythonFilter(), rust_timeout=int(_POLL * 1000), yield_on_timeout=True
    ):
        yield bool(changes)
