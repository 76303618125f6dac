"""Worker processes for ``--workers N`` and ``--reload``: each worker is the
same command line. Over TCP, workers bind the same port side by side
(SO_REUSEPORT). A Unix socket cannot be shared by path, so the supervisor
binds it once and every worker serves its listening descriptor (``--fd``);
the file goes when the supervisor does. With ``--reload`` the supervisor
holds the TCP listening sockets the same way, so that while the workers are
replaced after a change to a Python file, clients wait in the listen
backlog instead of being refused: the new workers start first, then the old
ones drain. A worker that dies is replaced; SIGTERM or SIGINT drains every
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

from .addresses import resolve_bind_hosts
from .logs import configure_logging
from .unix_socket import bind_unix_socket

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
_LISTEN_OPTIONS = ("--host", "--port", "--uds", "--uds-mode")


def _worker_command(argv: Sequence[str], *, listening_fds: Sequence[int] = ()) -> list[str]:
    """The same serve command for one worker: no --workers, no --reload;
    with ``listening_fds`` (the supervisor's sockets), ``--fd`` for each in
    place of --host/--port/--uds."""
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
    def __init__(self, command: list[str], workers: int, pass_fds: tuple[int, ...], drain_limit: float) -> None:
        self.command = command
        self.pass_fds = pass_fds
        self.count = workers
        self.drain_limit = drain_limit
        self.workers: list[subprocess.Popen[bytes]] = []
        #: Replaced by a reload and still draining.
        self.retiring: list[subprocess.Popen[bytes]] = []
        self.stopping = False
        #: The signal that stopped the workers at once, if one did.
        self.forced: int | None = None

    def start(self) -> None:
        while len(self.workers) < self.count:
            self.workers.append(subprocess.Popen(self.command, pass_fds=self.pass_fds))

    def everyone(self) -> list[subprocess.Popen[bytes]]:
        return self.workers + self.retiring

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

    def replace_dead(self) -> None:
        for worker in list(self.workers):
            code = worker.poll()
            if code is not None:
                self.workers.remove(worker)
                logger.warning("worker %d exited with %s; starting another", worker.pid, code)
        self.retiring = [worker for worker in self.retiring if worker.poll() is None]
        self.start()

    def restart_all(self) -> None:
        """New workers first, then the old ones drain (SIGTERM) beside them."""
        old, self.workers = self.workers, []
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
        return _supervise(_Supervisor(_worker_command(argv), workers, tuple(fds), drain_limit), reload, reload_dirs)
    if uds is None and not reload:
        return _supervise(_Supervisor(_worker_command(argv), workers, (), drain_limit), reload, reload_dirs)
    with ExitStack() as held:
        try:
            if uds is not None:
                sock, socket_file = bind_unix_socket(uds, backlog=backlog, mode=uds_mode)
                held.callback(socket_file.remove)
                sockets = [held.enter_context(sock)]
            else:
                sockets = [held.enter_context(sock) for sock in _bind_tcp(host, port, backlog)]
        except OSError as exc:
            print(f"server-native: error: {exc}", file=sys.stderr)
            return 1
        listening = tuple(sock.fileno() for sock in sockets)
        command = _worker_command(argv, listening_fds=listening)
        return _supervise(_Supervisor(command, workers, listening, drain_limit), reload, reload_dirs)


def _bind_tcp(host: str, port: int, backlog: int) -> list[socket.socket]:
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
                sockets.append(_listen_tcp(address, chosen, backlog))
                chosen = sockets[-1].getsockname()[1]
            return sockets
        except OSError as exc:
            for sock in sockets:
                sock.close()
            taken_elsewhere = port == 0 and sockets and exc.errno == errno.EADDRINUSE
            if not taken_elsewhere or attempts == _PORT_ATTEMPTS:
                raise OSError(exc.errno, f"cannot bind {address} port {chosen}: {exc.strerror or exc}") from None


def _listen_tcp(address: str, port: int, backlog: int) -> socket.socket:
    """As the native side binds: SO_REUSEADDR, dual-stack ``::``."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
    supervisor.start()
    changes = _watch(reload_dirs) if reload else None
    while not supervisor.stopping:
        if changes is not None and next(changes):
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
