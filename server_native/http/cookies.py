"""HTTP cookies after dart:io's Cookie: Set-Cookie values and request Cookie headers."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from enum import Enum

from .headers import _TOKEN, format_http_date, parse_http_date

__all__ = ["Cookie", "SameSite", "parse_cookie_header"]

# RFC 6265 section 4.1.1: *cookie-octet, or the same wrapped in one pair of DQUOTEs.
_OCTETS = r"[\x21\x23-\x2B\x2D-\x3A\x3C-\x5B\x5D-\x7E]*"
_COOKIE_VALUE = re.compile(f'"{_OCTETS}"|{_OCTETS}')
# RFC 6265 av-value: no control characters and no ";" (which would start another attribute).
_ATTRIBUTE_VALUE = re.compile(r"[^\x00-\x1F\x7F;]*")


class SameSite(str, Enum):
    """The SameSite attribute; values are spelled as they go on the wire."""

    LAX = "Lax"
    STRICT = "Strict"
    NONE = "None"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise ValueError(f"Invalid cookie name: {name!r} (must be a non-empty token)")
    return name


def _check_value(value: str) -> str:
    if not isinstance(value, str) or not _COOKIE_VALUE.fullmatch(value):
        raise ValueError(f"Invalid cookie value: {value!r}")
    return value


def _check_attribute(name: str, value: str | None) -> str | None:
    if value is not None and not _ATTRIBUTE_VALUE.fullmatch(value):
        raise ValueError(f"Invalid cookie {name}: {value!r} (no ';' or control characters)")
    return value


def _to_same_site(value: SameSite | str | None) -> SameSite | None:
    if value is None or isinstance(value, SameSite):
        return value
    for member in SameSite:
        if member.value.lower() == value.lower():
            return member
    raise ValueError(f"Invalid SameSite value: {value!r} (expected Lax, Strict or None)")


class Cookie:
    """One cookie. ``str(cookie)`` is its Set-Cookie header value.

    The value is kept verbatim, double quotes included, as dart:io does.
    """

    __slots__ = (
        "_name",
        "_value",
        "_expires",
        "_max_age",
        "_domain",
        "_path",
        "secure",
        "http_only",
        "_same_site",
    )

    def __init__(
        self,
        name: str,
        value: str,
        *,
        expires: datetime | None = None,
        max_age: int | None = None,
        domain: str | None = None,
        path: str | None = None,
        secure: bool = False,
        http_only: bool = False,
        same_site: SameSite | str | None = None,
    ) -> None:
        self._name = _check_name(name)
        self._value = _check_value(value)
        self.expires = expires
        self.max_age = max_age
        self.domain = domain
        self.path = path
        self.secure = secure
        self.http_only = http_only
        self.same_site = same_site

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, name: str) -> None:
        self._name = _check_name(name)

    @property
    def value(self) -> str:
        return self._value

    @value.setter
    def value(self, value: str) -> None:
        self._value = _check_value(value)

    @property
    def expires(self) -> datetime | None:
        """An aware UTC datetime; a naive one assigned here is taken as UTC."""
        return self._expires

    @expires.setter
    def expires(self, expires: datetime | None) -> None:
        if expires is not None:
            expires = (
                expires.replace(tzinfo=timezone.utc) if expires.tzinfo is None else expires.astimezone(timezone.utc)
            )
        self._expires = expires

    @property
    def max_age(self) -> int | None:
        """Seconds until expiry; zero or negative expires the cookie at once."""
        return self._max_age

    @max_age.setter
    def max_age(self, max_age: int | None) -> None:
        if max_age is not None and (isinstance(max_age, bool) or not isinstance(max_age, int)):
            raise ValueError(f"Invalid cookie max_age: {max_age!r} (must be an int or None)")
        self._max_age = max_age

    @property
    def domain(self) -> str | None:
        return self._domain

    @domain.setter
    def domain(self, domain: str | None) -> None:
        self._domain = _check_attribute("domain", domain)

    @property
    def path(self) -> str | None:
        return self._path

    @path.setter
    def path(self, path: str | None) -> None:
        self._path = _check_attribute("path", path)

    @property
    def same_site(self) -> SameSite | None:
        return self._same_site

    @same_site.setter
    def same_site(self, same_site: SameSite | str | None) -> None:
        """Accepts a SameSite or its name in any case (``"lax"``)."""
        self._same_site = _to_same_site(same_site)

    @classmethod
    def from_set_cookie_value(cls, value: str) -> Cookie:
        """Parse a Set-Cookie header value.

        The name and value must be valid (ValueError otherwise); attributes are
        read leniently as RFC 6265 section 5.2 says: unknown or malformed ones
        (a bad date or Max-Age, an unknown SameSite, control characters in
        Domain or Path) are ignored.
        """
        pair, *attributes = value.split(";")
        if "=" not in pair:
            raise ValueError(f"Failed to parse Set-Cookie value {value!r}: no '='")
        name, _, cookie_value = pair.partition("=")
        cookie = cls(name.strip(), cookie_value.strip())
        for attribute in attributes:
            key, _, argument = attribute.partition("=")
            key = key.strip().lower()
            argument = argument.strip()
            try:
                if key == "expires":
                    expires = parse_http_date(argument)
                    if expires is not None:
                        cookie.expires = expires
                elif key == "max-age":
                    digits = argument[1:] if argument.startswith("-") else argument
                    if digits.isascii() and digits.isdigit():
                        cookie.max_age = int(argument)
                elif key == "domain":
                    cookie.domain = argument
                elif key == "path":
                    cookie.path = argument
                elif key == "secure":
                    cookie.secure = True
                elif key == "httponly":
                    cookie.http_only = True
                elif key == "samesite":
                    cookie.same_site = argument
            except ValueError:
                continue
        return cookie

    def __str__(self) -> str:
        parts = [f"{self._name}={self._value}"]
        if self._expires is not None:
            parts.append(f"Expires={format_http_date(self._expires)}")
        if self._max_age is not None:
            parts.append(f"Max-Age={self._max_age}")
        if self._domain is not None:
            parts.append(f"Domain={self._domain}")
        if self._path is not None:
            parts.append(f"Path={self._path}")
        if self.secure:
            parts.append("Secure")
        if self.http_only:
            parts.append("HttpOnly")
        if self._same_site is not None:
            parts.append(f"SameSite={self._same_site.value}")
        return "; ".join(parts)

    def __repr__(self) -> str:
        return f"Cookie.from_set_cookie_value({str(self)!r})"


def parse_cookie_header(value: str) -> list[Cookie]:
    """The cookies of a request Cookie header, in order, repeats kept.

    Malformed pairs are skipped rather than failing the whole header.
    """
    cookies: list[Cookie] = []
    for pair in value.split(";"):
        name, equals, cookie_value = pair.partition("=")
        if not equals:
            continue
        try:
            cookies.append(Cookie(name.strip(), cookie_value.strip()))
        except ValueError:
            continue
    return cookies
