"""Unix domain sockets (``uds=``, ``--uds``): bound here with the rules a
uvicorn or gunicorn user expects, then served by the native side as a
listening file descriptor. A stale socket file is replaced; a live one, or
any other kind of file, is an error."""

from __future__ import annotations

import errno
import os
import socket
import stat

__all__ = ["UnixSocketFile", "bind_unix_socket"]


class UnixSocketFile:
    """The socket file a server made, removed on close only while it is
    still that file (another server may have replaced it since)."""

    def __init__(self, path: str) -> None:
        self.path = path
        info = os.lstat(path)
        self._identity = (info.st_dev, info.st_ino)

    def remove(self) -> None:
        try:
            info = os.lstat(self.path)
            if (info.st_dev, info.st_ino) == self._identity:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def bind_unix_socket(
    path: str | os.PathLike[str], *, backlog: int = 0, mode: int | None = None
) -> tuple[socket.socket, UnixSocketFile]:
    """A listening Unix socket at ``path``, and its file. ``mode`` (e.g.
    ``0o660``) is set before the socket listens; None leaves the umask's."""
    text = os.fspath(path)
    if not text:
        raise ValueError("uds must name a socket file path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _remove_stale(text)
        sock.bind(text)
        socket_file = UnixSocketFile(text)
        try:
            if mode is not None:
                os.chmod(text, mode)
            sock.listen(backlog if backlog > 0 else 1024)
        except BaseException:
            socket_file.remove()
            raise
    except BaseException as exc:
        sock.close()
        if isinstance(exc, OSError):
            # One errno-typed error naming the path, whatever step failed.
            raise OSError(exc.errno, f"cannot bind unix socket {text}: {exc.strerror or exc}") from None
        raise
    return sock, socket_file


def _remove_stale(path: str) -> None:
    """Removes a socket file nobody listens on; refuses anything else."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise FileExistsError(errno.EEXIST, "a file that is not a socket is in the way")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # Stale: left behind by a server that is gone.
            return
    raise OSError(errno.EADDRINUSE, "another server is listening on it")
