"""HTTP header collection and Content-Type value, after dart:io's HttpHeaders/ContentType."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from email.utils import format_datetime, parsedate_to_datetime
from functools import lru_cache
from typing import Any, ClassVar, Union

from ..runtime.addresses import split_host
from .errors import HttpException

__all__ = ["ContentType", "HttpHeaders", "format_http_date", "parse_http_date", "wire_headers"]

# RFC 9110 section 5.6.2: token = 1*tchar.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# Headers that hold one value: add() replaces instead of appending, as in dart:io.
_SINGLE_VALUED = frozenset({"content-length", "content-type", "date", "expires", "host", "if-modified-since"})

HeaderValue = Union[str, int, datetime, "ContentType"]


def format_http_date(moment: datetime) -> str:
    """Format as an IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``).

    A naive datetime is taken to be UTC, since HTTP dates always are.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    else:
        moment = moment.astimezone(timezone.utc)
    return format_datetime(moment, usegmt=True)


def parse_http_date(value: str) -> datetime | None:
    """Parse any HTTP-date form (IMF-fixdate, RFC 850, asctime) to an aware UTC
    datetime; None when the value is not a date (dart:io returns null too)."""
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:  # "-0000": UTC with no claimed local zone
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _to_str(value: HeaderValue) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):  # an int subclass, but "True" is never a header value
        raise TypeError("HTTP header value must be str, int, datetime or ContentType, not bool")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, datetime):
        return format_http_date(value)
    if isinstance(value, ContentType):
        return value.value
    raise TypeError(f"HTTP header value must be str, int, datetime or ContentType, not {type(value).__name__}")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise ValueError(f"Invalid HTTP header field name: {name!r}")
    return name.lower()


def _check_value(name: str, value: str) -> None:
    if "\r" in value or "\n" in value or "\0" in value:
        raise ValueError(f"Invalid HTTP header field value for {name!r}: {value!r} (CR, LF and NUL are not allowed)")
    if name == "content-length" and not (value.isascii() and value.isdigit()):
        raise ValueError(f"Content-Length must contain only digits, got {value!r}")


def _join_host(host: str, port: int | None) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"


class HttpHeaders:
    """Case-insensitive, multi-valued, insertion-ordered HTTP headers.

    Names are stored lowercased. Iteration, ``len`` and ``in`` work on distinct
    names; ``items()`` gives every (name, value) pair in order, repeats included.
    """

    __slots__ = ("_list", "_index", "_version", "_immutable", "protocol_version")

    def __init__(
        self,
        pairs: Iterable[tuple[str, str]] = (),
        *,
        immutable: bool = False,
        protocol_version: str = "1.1",
        _trusted: bool = False,
    ) -> None:
        """``_trusted=True`` is for wire headers the native side already validated
        and lowercased: the pairs are taken as is (a list is adopted, not copied).
        Otherwise each pair goes through ``add``."""
        self._index: dict[str, list[str]] | None = None
        self._version = 0
        self._immutable = False
        #: "1.0", "1.1", "2" or "3"; drives persistent_connection and chunked rules.
        self.protocol_version = protocol_version
        if _trusted:
            self._list: list[tuple[str, str]] = pairs if isinstance(pairs, list) else list(pairs)
        else:
            self._list = []
            for name, value in pairs:
                self.add(name, value)
        self._immutable = immutable

    # ------------------------------------------------------------ internals

    def _pairs(self) -> list[tuple[str, str]]:
        """Every (lowercased name, value) pair in order, as a new list."""
        return self._list[:]

    def _lookup(self) -> dict[str, list[str]]:
        index = self._index
        if index is None:
            index = {}
            for name, value in self._list:
                values = index.get(name)
                if values is None:
                    index[name] = [value]
                else:
                    values.append(value)
            self._index = index
        return index

    def _check_mutable(self) -> None:
        if self._immutable:
            raise HttpException("HTTP headers are not mutable")

    def _changed(self) -> None:
        self._index = None
        self._version += 1

    def _append(self, name: str, value: str) -> None:
        self._list.append((name, value))
        index = self._index
        if index is not None:
            index.setdefault(name, []).append(value)
        self._version += 1

    def _replace(self, name: str, value: str) -> None:
        """Make ``value`` the only one for ``name``, where the first old one was."""
        result: list[tuple[str, str]] = []
        placed = False
        for pair in self._list:
            if pair[0] != name:
                result.append(pair)
            elif not placed:
                result.append((name, value))
                placed = True
        if not placed:
            result.append((name, value))
        self._list = result
        self._changed()

    def _delete(self, name: str) -> None:
        kept = [pair for pair in self._list if pair[0] != name]
        if len(kept) != len(self._list):
            self._list = kept
            self._changed()

    def _tokens(self, name: str) -> list[str]:
        """The comma-separated, lowercased tokens of every value of ``name``."""
        return [token.strip().lower() for value in self._lookup().get(name, ()) for token in value.split(",")]

    def _remove_token(self, name: str, token: str) -> None:
        """Drop ``token`` from list-valued header ``name``, and values left empty."""
        result: list[tuple[str, str]] = []
        changed = False
        for pair in self._list:
            if pair[0] == name:
                parts = [part.strip() for part in pair[1].split(",")]
                kept = [part for part in parts if part.lower() != token]
                if len(kept) != len(parts):
                    changed = True
                    if kept:
                        result.append((name, ", ".join(kept)))
                    continue
            result.append(pair)
        if changed:
            self._list = result
            self._changed()

    # ------------------------------------------------------------ collection API

    def add(self, name: str, value: HeaderValue) -> None:
        """Add a value. For single-valued headers (content-length, content-type,
        date, expires, host, if-modified-since) this replaces, as in dart:io."""
        self._check_mutable()
        key = _check_name(name)
        text = _to_str(value)
        _check_value(key, text)
        if key in _SINGLE_VALUED:
            self._replace(key, text)
        else:
            self._append(key, text)

    def set(self, name: str, value: HeaderValue) -> None:
        """Replace every value of ``name`` with ``value``."""
        self._check_mutable()
        key = _check_name(name)
        text = _to_str(value)
        _check_value(key, text)
        self._replace(key, text)

    def remove(self, name: str, value: HeaderValue) -> None:
        """Remove every occurrence of ``value`` from header ``name``."""
        self._check_mutable()
        key = name.lower()
        text = _to_str(value)
        kept = [pair for pair in self._list if pair[0] != key or pair[1] != text]
        if len(kept) != len(self._list):
            self._list = kept
            self._changed()

    def remove_all(self, name: str) -> None:
        self._check_mutable()
        self._delete(name.lower())

    def clear(self) -> None:
        self._check_mutable()
        if self._list:
            self._list = []
            self._changed()

    def value(self, name: str) -> str | None:
        """The single value of ``name``, or None when absent.

        Raises HttpException when the header has several values.
        """
        values = self._lookup().get(name.lower())
        if values is None:
            return None
        if len(values) > 1:
            raise HttpException(f"More than one value for header {name}")
        return values[0]

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name``, or ``default``."""
        values = self._lookup().get(name.lower())
        return default if values is None else values[0]

    def get_all(self, name: str) -> list[str]:
        return list(self._lookup().get(name.lower(), ()))

    def __getitem__(self, name: str) -> list[str]:
        return list(self._lookup()[name.lower()])

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lookup()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._lookup()))

    def __len__(self) -> int:
        return len(self._lookup())

    def items(self) -> list[tuple[str, str]]:
        return self._list[:]

    def for_each(self, action: Callable[[str, list[str]], object]) -> None:
        for name, values in list(self._lookup().items()):
            action(name, list(values))

    def copy(self) -> HttpHeaders:
        """A mutable copy (also of immutable request headers)."""
        return HttpHeaders(self._list[:], protocol_version=self.protocol_version, _trusted=True)

    def __repr__(self) -> str:
        return f"HttpHeaders({self._list!r})"

    # ------------------------------------------------------------ typed accessors

    @property
    def content_type(self) -> ContentType | None:
        value = self.get("content-type")
        return None if value is None else ContentType.parse(value)

    @content_type.setter
    def content_type(self, content_type: ContentType | None) -> None:
        if content_type is None:
            self.remove_all("content-type")
        else:
            self.set("content-type", content_type)

    @property
    def content_length(self) -> int:
        """The Content-Length, or -1 when absent or malformed."""
        value = self.get("content-length")
        if value is None:
            return -1
        value = value.strip()
        return int(value) if value.isascii() and value.isdigit() else -1

    @content_length.setter
    def content_length(self, length: int) -> None:
        """-1 removes the header; a length turns chunked transfer encoding off,
        since a message must not carry both (RFC 9112 section 6.3)."""
        self._check_mutable()
        if isinstance(length, bool) or not isinstance(length, int) or length < -1:
            raise ValueError(f"content_length must be an int >= -1, got {length!r}")
        if length == -1:
            self._delete("content-length")
            return
        self._remove_token("transfer-encoding", "chunked")
        self._replace("content-length", str(length))

    @property
    def chunked_transfer_encoding(self) -> bool:
        return "chunked" in self._tokens("transfer-encoding")

    @chunked_transfer_encoding.setter
    def chunked_transfer_encoding(self, chunked: bool) -> None:
        self._check_mutable()
        if not chunked:
            self._remove_token("transfer-encoding", "chunked")
            return
        if self.protocol_version == "1.0":
            raise HttpException("Trying to set 'Transfer-Encoding: Chunked' on HTTP 1.0 headers")
        if not self.chunked_transfer_encoding:
            self._append("transfer-encoding", "chunked")
        self._delete("content-length")

    @property
    def persistent_connection(self) -> bool:
        """HTTP/1.0 keeps the connection only with ``connection: keep-alive``;
        later versions keep it unless ``connection: close``."""
        tokens = self._tokens("connection")
        if "close" in tokens:
            return False
        return self.protocol_version != "1.0" or "keep-alive" in tokens

    @persistent_connection.setter
    def persistent_connection(self, persistent: bool) -> None:
        self._check_mutable()
        http10 = self.protocol_version == "1.0"
        if persistent:
            self._remove_token("connection", "close")
            if http10 and "keep-alive" not in self._tokens("connection"):
                self._append("connection", "keep-alive")
        else:
            self._remove_token("connection", "keep-alive")
            if not http10 and "close" not in self._tokens("connection"):
                self._append("connection", "close")

    @property
    def host(self) -> str | None:
        """The host part of the Host header (IPv6 literals without brackets)."""
        value = self.get("host")
        return None if value is None else split_host(value)[0]

    @host.setter
    def host(self, host: str | None) -> None:
        """Set the host, keeping the current port; None removes the Host header."""
        self._check_mutable()
        if host is None:
            self._delete("host")
            return
        if not host:
            raise ValueError("host must not be empty")
        current = self.get("host")
        self.set("host", _join_host(host, None if current is None else split_host(current)[1]))

    @property
    def port(self) -> int | None:
        """The port of the Host header; None when it names none (the default
        port depends on the scheme, which headers do not know)."""
        value = self.get("host")
        return None if value is None else split_host(value)[1]

    @port.setter
    def port(self, port: int | None) -> None:
        self._check_mutable()
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535):
            raise ValueError(f"port must be an int in 0..65535 or None, got {port!r}")
        current = self.get("host")
        host = None if current is None else split_host(current)[0]
        if host is None:
            raise ValueError("Cannot set a port without a host")
        self.set("host", _join_host(host, port))

    def _get_date(self, name: str) -> datetime | None:
        value = self.get(name)
        return None if value is None else parse_http_date(value)

    def _set_date(self, name: str, moment: datetime | None) -> None:
        if moment is None:
            self.remove_all(name)
        else:
            self.set(name, moment)

    @property
    def date(self) -> datetime | None:
        return self._get_date("date")

    @date.setter
    def date(self, moment: datetime | None) -> None:
        self._set_date("date", moment)

    @property
    def expires(self) -> datetime | None:
        return self._get_date("expires")

    @expires.setter
    def expires(self, moment: datetime | None) -> None:
        self._set_date("expires", moment)

    @property
    def if_modified_since(self) -> datetime | None:
        return self._get_date("if-modified-since")

    @if_modified_since.setter
    def if_modified_since(self, moment: datetime | None) -> None:
        self._set_date("if-modified-since", moment)


def wire_headers(native_request: Any) -> HttpHeaders:
    """A request's headers as it sent them (immutable), from its native exchange."""
    return HttpHeaders(
        native_request.headers(), immutable=True, protocol_version=native_request.http_version, _trusted=True
    )


def _quote(value: str) -> str:
    if _TOKEN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parse_parameters(text: str) -> dict[str, str]:
    """Parse ``; name=value; name="quoted \\" value"`` leniently: malformed or
    valueless parameters are skipped."""
    parameters: dict[str, str] = {}
    length = len(text)
    i = 0
    while i < length:
        equals = text.find("=", i)
        semicolon = text.find(";", i)
        if equals == -1 or (semicolon != -1 and semicolon < equals):
            if semicolon == -1:
                break
            i = semicolon + 1  # valueless parameter
            continue
        name = text[i:equals].strip().lower()
        i = equals + 1
        while i < length and text[i] in " \t":
            i += 1
        if i < length and text[i] == '"':
            chars: list[str] = []
            i += 1
            while i < length and text[i] != '"':
                if text[i] == "\\" and i + 1 < length:
                    i += 1
                chars.append(text[i])
                i += 1
            value = "".join(chars)
            semicolon = text.find(";", i)
        else:
            semicolon = text.find(";", i)
            value = text[i : length if semicolon == -1 else semicolon].strip()
        if name:
            parameters[name] = value.lower() if name == "charset" else value
        if semicolon == -1:
            break
        i = semicolon + 1
    return parameters


@lru_cache(maxsize=256)
def _parse_content_type(value: str) -> ContentType:
    """Cached because the same few content types are read on every response."""
    media_type, _, rest = value.partition(";")
    primary, _, sub = media_type.partition("/")
    return ContentType._build(primary.strip().lower(), sub.strip().lower(), _parse_parameters(rest))


class ContentType:
    """An immutable media type with parameters, e.g. ``text/plain; charset=utf-8``."""

    __slots__ = ("_primary_type", "_sub_type", "_parameters", "_value")

    text: ClassVar[ContentType]
    html: ClassVar[ContentType]
    json: ClassVar[ContentType]
    binary: ClassVar[ContentType]

    def __init__(
        self,
        primary_type: str,
        sub_type: str,
        *,
        charset: str | None = None,
        parameters: dict[str, str] | None = None,
    ) -> None:
        """Types and parameter names are lowercased, as is the charset."""
        primary = primary_type.strip().lower()
        sub = sub_type.strip().lower()
        if not _TOKEN.fullmatch(primary) or not _TOKEN.fullmatch(sub):
            raise ValueError(f"Invalid media type: {primary_type!r}/{sub_type!r}")
        checked: dict[str, str] = {}
        for key, value in (parameters or {}).items():
            checked[self._check_parameter(key, value)] = value
        if charset is not None:
            checked[self._check_parameter("charset", charset)] = charset
        if "charset" in checked:
            checked["charset"] = checked["charset"].strip().lower()
        self._init(primary, sub, checked)

    @staticmethod
    def _check_parameter(name: str, value: str) -> str:
        key = name.strip().lower()
        if not _TOKEN.fullmatch(key):
            raise ValueError(f"Invalid media type parameter name: {name!r}")
        if "\r" in value or "\n" in value or "\0" in value:
            raise ValueError(f"Invalid media type parameter value for {name!r}: {value!r}")
        return key

    @classmethod
    def _build(cls, primary: str, sub: str, parameters: dict[str, str]) -> ContentType:
        """Construct without validation (for already-normalized parsed values)."""
        instance = cls.__new__(cls)
        instance._init(primary, sub, parameters)
        return instance

    def _init(self, primary: str, sub: str, parameters: dict[str, str]) -> None:
        self._primary_type = primary
        self._sub_type = sub
        self._parameters = parameters
        self._value = f"{primary}/{sub}" + "".join(f"; {key}={_quote(value)}" for key, value in parameters.items())

    @classmethod
    def parse(cls, value: str) -> ContentType:
        """Parse a Content-Type header value; never raises for a str (like dart:io,
        ``"garbage"`` gives primary type ``garbage`` and an empty sub type)."""
        return _parse_content_type(value)

    @property
    def primary_type(self) -> str:
        return self._primary_type

    @property
    def sub_type(self) -> str:
        return self._sub_type

    @property
    def mime_type(self) -> str:
        return f"{self._primary_type}/{self._sub_type}"

    @property
    def charset(self) -> str | None:
        return self._parameters.get("charset")

    @property
    def parameters(self) -> dict[str, str]:
        return dict(self._parameters)

    @property
    def value(self) -> str:
        return self._value

    def __str__(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"ContentType.parse({self._value!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ContentType):
            return NotImplemented
        return (
            self._primary_type == other._primary_type
            and self._sub_type == other._sub_type
            and self._parameters == other._parameters
        )

    def __hash__(self) -> int:
        return hash((self._primary_type, self._sub_type, frozenset(self._parameters.items())))


ContentType.text = ContentType("text", "plain", charset="utf-8")
ContentType.html = ContentType("text", "html", charset="utf-8")
ContentType.json = ContentType("application", "json", charset="utf-8")
ContentType.binary = ContentType("application", "octet-stream")
