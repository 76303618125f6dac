"""Worker processes for ``--workers N`` and ``--reload``: each worker is the
same command line, serving listening sockets the supervisor holds (``--fd``):
over TCP one per worker, side by side on the port (SO_REUSEPORT), so the
kernel spreads connections over the workers; a Unix socket (which cannot be
shared by path) or inherited sockets (``--fd``, systemd's socket activation)
are served by every worker. A socket outlives the worker serving it: while a
worker is replaced, its clients wait in the listen backlog instead of being
refused. SIGHUP (and, with ``--reload``, a change to a Python file) replaces
every worker: the new ones start first, then the old ones drain. A worker
that dies is replaced; SIGTERM or SIGINT closes the sockets and drains every
worker, and a second signal stops them at once."""

from __future__ import annotations

import errno
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack

from ..runtime.addresses import resolve_bind_hosts
from ..runtime.logs import configure_logging
from ..runtime.unix_socket import bind_unix_socket

__all__ = ["supervise"]

logger = logging.getLogger("server_native.supervisor")

_POLL = 0.2
#: How long past their shutdown_timeout workers have to exit (lifespan
#: shutdown, closing) before they are killed.
_EXIT_GRACE = 10.0
#: How often port 0 on several addresses is retried when the port the first
#: address got is taken on another.
_PORT_ATTEMPTS = 16

#: Options with a value that the supervisor decides for its workers.
_SUPERVISOR_OPTIONS = ("--workers", "--reload-dir")
#: Where to listen: replaced by ``--fd`` when the supervisor holds the sockets.
_LISTEN_OPTIONS = ("--host", "--port", "--uds", "--uds-mode", "--fd")


def _worker_command(argv: Sequence[str], *, listening_fds: Sequence[int] = ()) -> list[str]:
    """The same serve command for one worker: no --workers, no --reload;
    with ``listening_fds`` (the supervisor's sockets), ``--fd`` for each in
    place of --host/--port/--uds/--fd."""
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
        if arg.startswith(tuple(f"{option}=" for option in dropped)) or arg == "--reload":
            continue
        command.append(arg)
    for fd in listening_fds:
        command += ["--fd", str(fd)]
    return [sys.executable, "-m", "server_native", *command, "--workers", "1", "--shared"]


class _Supervisor:
    """``slots``: each worker's command and the descriptors it inherits;
    ``listeners``: the sockets held for them, closed on the final stop."""

    def __init__(
        self, slots: list[tuple[list[str], tuple[int, ...]]], drain_limit: float, listeners: Sequence[socket.socket] = ()
    ) -> None:
        self.slots = slots
        self.drain_limit = drain_limit
        self.listeners = list(listeners)
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * len(slots)
        #: Replaced by a reload and still draining.
        self.retiring: list[subprocess.Popen[bytes]] = []
        self.stopping = False
        #: SIGHUP came: replace the workers on the next turn of the loop.
        self.reload_asked = False
        #: The signal that stopped the workers at once, if one did.
        self.forced: int | None = None

    def start(self) -> None:
        for slot, worker in enumerate(self.workers):
            if worker is None:
                command, fds = self.slots[slot]
                self.workers[slot] = subprocess.Popen(command, pass_fds=fds)

    def everyone(self) -> list[subprocess.Popen[bytes]]:
        return [worker for worker in self.workers if worker is not None] + self.retiring

    def on_signal(self, signum: int, _frame: object) -> None:
        if self.stopping:
            logger.warning("%s again: stopping the workers at once", signal.Signals(signum).name)
            self.forced = signum
            for worker in self.everyone():
                worker.kill()
            return
        logger.info("%s: draining the workers (a second signal stops them at once)", signal.Signals(signum).name)
        self.stopping = True
        for worker in self.everyone():
            if worker.poll() is None:
                worker.send_signal(signum)
        # New clients are refused at once, as by a single server: the
        # workers close their copies as they stop accepting.
        for listener in self.listeners:
            listener.close()

    def on_reload(self, _signum: int, _frame: object) -> None:
        self.reload_asked = True

    def replace_dead(self) -> None:
        for slot, worker in enumerate(self.workers):
            code = None if worker is None else worker.poll()
            if worker is not None and code is not None:
                self.workers[slot] = None
                logger.warning("worker %d exited with %s; starting another", worker.pid, code)
        self.retiring = [worker for worker in self.retiring if worker.poll() is None]
        self.start()

    def restart_all(self) -> None:
        """New workers first, then the old ones drain (SIGTERM) beside them."""
        old = [worker for worker in self.workers if worker is not None]
        self.workers = [None] * len(self.slots)
        self.start()
        for worker in old:
            if worker.poll() is None:
                worker.terminate()
        self.retiring += old

    def wait_all(self) -> int:
        deadline = time.monotonic() + self.drain_limit
        codes = []
        for worker in self.everyone():
            try:
                codes.append(worker.wait(max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                logger.warning("worker %d still running %gs after the signal: killed", worker.pid, self.drain_limit)
                worker.kill()
                codes.append(worker.wait())
        if self.forced is not None:
            return 128 + self.forced
        return 0 if all(code in (0, -signal.SIGTERM, -signal.SIGINT) for code in codes) else 1


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
    log_level: str = "info",
    shutdown_timeout: float = 30.0,
) -> int:
    configure_logging(log_level)
    drain_limit = shutdown_timeout + _EXIT_GRACE
    if fds:
        command = _worker_command(argv, listening_fds=fds)
        return _supervise(_Supervisor([(command, tuple(fds))] * workers, drain_limit), reload, reload_dirs)
    if uds is None and not hasattr(socket, "SO_REUSEPORT"):
        # No SO_REUSEPORT (Windows): every worker binds the port itself.
        slots: list[tuple[list[str], tuple[int, ...]]] = [(_worker_command(argv), ())] * workers
        return _supervise(_Supervisor(slots, drain_limit), reload, reload_dirs)
    with ExitStack() as held:
        try:
            if uds is not None:
                sock, socket_file = bind_unix_socket(uds, backlog=backlog, mode=uds_mode)
                held.callback(socket_file.remove)
                per_slot = [[held.enter_context(sock)]] * workers
            else:
                per_slot = [[held.enter_context(sock) for sock in group] for group in _bind_tcp_slots(host, port, backlog, workers)]
        except OSError as exc:
            print(f"server-native: error: {exc}", file=sys.stderr)
            return 1
        slots = []
        for sockets in per_slot:
            listening = tuple(sock.fileno() for sock in sockets)
            slots.append((_worker_command(argv, listening_fds=listening), listening))
        listeners = list({id(sock): sock for group in per_slot for sock in group}.values())
        return _supervise(_Supervisor(slots, drain_limit, listeners), reload, reload_dirs)


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


def _supervise(supervisor: _Supervisor, reload: bool, reload_dirs: Sequence[str]) -> int:
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
            supervisor.restart_all()
        elif changes is not None and next(changes):
            logger.info("files changed: restarting the workers")
            supervisor.restart_all()
        else:
            time.sleep(_POLL if changes is None else 0)
        if not supervisor.stopping:
            supervisor.replace_dead()
    return supervisor.wait_all()


def _watch(directories: Sequence[str]) -> Iterator[bool]:
    """Yields True after Python files changed, False every ~0.2 s otherwise."""
    try:
        from watchfiles import PythonFilter, watch
    except ImportError:
        sys.exit("server-native: error: --reload needs watchfiles (pip install watchfiles)")
    for changes in watch(*directories, watch_filter=PythonFilter(), rust_timeout=int(_POLL * 1000), yield_on_timeout=True):
        yield bool(changes)
