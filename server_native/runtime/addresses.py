"""Turns the addresses users write (`"localhost"`, `"any"`, a name or an IP)
into the IP addresses a server binds."""

from __future__ import annotations

import functools
import ipaddress
import socket

__all__ = ["resolve_bind_hosts", "split_host"]


@functools.lru_cache(maxsize=1)
def ipv6_available() -> bool:
    """Whether this host can bind IPv6 loopback (containers often cannot)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def resolve_bind_hosts(address: str, *, v6_only: bool = False) -> list[str]:
    """IP addresses to bind for `address`, in the order they are bound.

    ``localhost`` is every loopback interface; ``any`` is every interface
    (``::`` dual-stack where IPv6 works); an IP literal is itself; any other
    name is its first resolved address.
    """
    if not isinstance(address, str) or not address:
        raise ValueError(f"address must be a non-empty string, not {address!r}")
    name = address.strip()
    lowered = name.lower()
    if lowered == "localhost":
        return ["127.0.0.1", "::1"] if ipv6_available() else ["127.0.0.1"]
    if lowered == "any":
        if not ipv6_available():
            return ["0.0.0.0"]
        return ["::", "0.0.0.0"] if v6_only else ["::"]
    literal = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        return [str(ipaddress.ip_address(literal))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve {name!r}: {exc}") from exc
    return [str(infos[0][4][0])]


def split_host(value: str) -> tuple[str | None, int | None]:
    """A Host value (or an authority) as (host, port); brackets around an IPv6
    literal are dropped, and a port that is not a number up to 65535 is None."""
    value = value.strip()
    port = ""
    if value.startswith("["):
        end = value.find("]")
        if end == -1:
            return value, None
        host = value[1:end]
        rest = value[end + 1 :]
        if rest.startswith(":"):
            port = rest[1:]
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:  # no port, or a bare (invalid but seen) IPv6 literal
        host = value
    if not (port.isascii() and port.isdigit() and int(port) <= 65535):
        return host or None, None
    return host or None, int(port)
