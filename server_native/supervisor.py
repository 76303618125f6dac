"""Worker processes for ``--workers N`` and ``--reload``: each worker is the
same command line serving on one shared port (SO_REUSEPORT). A Unix socket
cannot be shared by path: the supervisor binds it once, every worker serves
its listening descriptor (``--fd``), and the file goes when the supervisor
does. A worker that
dies is replaced; SIGTERM drains every worker; SIGINT drains, and a second
SIGINT stops them at once; with ``--reload`` a change to a Python file
replaces the workers."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from .unix_socket import bind_unix_socket

__all__ = ["supervise"]

logger = logging.getLogger("server_native.supervisor")

_POLL = 0.2
_DRAIN_LIMIT = 30.0


def _worker_command(argv: Sequence[str], *, listening_fd: int | None = None) -> list[str]:
    """The same serve command for one worker: no --workers, no --reload;
    with ``listening_fd`` (the supervisor's Unix socket), ``--fd`` in place of
    ``--uds``."""
    dropped = ("--workers", "--reload-dir") + (("--uds", "--uds-mode") if listening_fd is not None else ())
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
    if listening_fd is not None:
        command += ["--fd", str(listening_fd)]
    return [sys.executable, "-m", "server_native", *command, "--workers", "1", "--shared"]


class _Supervisor:
    def __init__(self, command: list[str], workers: int, pass_fds: tuple[int, ...] = ()) -> None:
        self.command = command
        self.pass_fds = pass_fds
        self.count = workers
        self.workers: list[subprocess.Popen[bytes]] = []
        self.stopping = False
        self.interrupts = 0

    def start(self) -> None:
        while len(self.workers) < self.count:
            self.workers.append(subprocess.Popen(self.command, pass_fds=self.pass_fds))

    def on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
        if self.stopping and self.interrupts >= 2:
            for worker in self.workers:
                worker.kill()
            return
        self.stopping = True
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    def replace_dead(self) -> None:
        for worker in list(self.workers):
            code = worker.poll()
            if code is not None:
                self.workers.remove(worker)
                logger.warning("worker %d exited with %s; starting another", worker.pid, code)
        self.start()

    def restart_all(self) -> None:
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            try:
                worker.wait(_DRAIN_LIMIT)
            except subprocess.TimeoutExpired:
                worker.kill()
        self.workers.clear()
        self.start()

    def wait_all(self) -> int:
        deadline = time.monotonic() + _DRAIN_LIMIT
        codes = []
        for worker in self.workers:
            try:
                codes.append(worker.wait(max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                worker.kill()
                codes.append(worker.wait())
        if self.interrupts >= 2:
            return 130
        return 0 if all(code in (0, -signal.SIGTERM, -signal.SIGINT) for code in codes) else 1


def supervise(
    argv: Sequence[str],
    *,
    workers: int,
    reload: bool,
    reload_dirs: Sequence[str],
    uds: str | None = None,
    uds_mode: int | None = None,
    fd: int | None = None,
    backlog: int = 0,
) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if uds is None:
        passed = () if fd is None else (fd,)
        return _supervise(_Supervisor(_worker_command(argv), workers, passed), reload, reload_dirs)
    try:
        sock, socket_file = bind_unix_socket(uds, backlog=backlog, mode=uds_mode)
    except OSError as exc:
        print(f"server-native: error: {exc}", file=sys.stderr)
        return 1
    try:
        with sock:
            command = _worker_command(argv, listening_fd=sock.fileno())
            return _supervise(_Supervisor(command, workers, (sock.fileno(),)), reload, reload_dirs)
    finally:
        socket_file.remove()


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


def _watch(directories: Sequence[str]):  # type: ignore[no-untyped-def]
    """Yields True after Python files changed, False every ~0.2 s otherwise."""
    try:
        from watchfiles import PythonFilter, watch
    except ImportError:
        sys.exit("server-native: error: --reload needs watchfiles (pip install watchfiles)")
    for changes in watch(*directories, watch_filter=PythonFilter(), rust_timeout=int(_POLL * 1000), yield_on_timeout=True):
        yield bool(changes)
