"""Exceptions shared across server_native (mirroring dart:io's HttpException)."""

from __future__ import annotations

__all__ = ["HttpBodyError", "HttpException"]


class HttpException(Exception):
    """An HTTP-level error, optionally tied to the URI it happened on."""

    def __init__(self, message: str, uri: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.uri = uri

    def __str__(self) -> str:
        if self.uri is None:
            return self.message
        return f"{self.message}, uri = {self.uri}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, uri={self.uri!r})"


class HttpBodyError(HttpException):
    """A message body that is malformed or does not match its declared framing,
    e.g. fewer or more bytes than the Content-Length announced."""
