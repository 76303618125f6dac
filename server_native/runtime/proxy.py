"""Trusted proxy headers: the client address and scheme a reverse proxy
reports in ``X-Forwarded-For`` / ``X-Forwarded-Proto`` or ``Forwarded``,
believed only when the connection comes from an address we trust."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["ProxyHeaders"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The headers a proxy reports the client with.
PROXY_HEADER_NAMES = frozenset((b"x-forwarded-for", b"x-forwarded-proto", b"forwarded"))
#: Addresses whose trust is remembered; past this the memory starts afresh.
_CACHE_SIZE = 4096


class ProxyHeaders:
    """``trusted``: addresses or networks (``"127.0.0.1"``, ``"10.0.0.0/8"``),
    or ``"*"`` for any peer."""

    def __init__(self, trusted: Iterable[str] = ("127.0.0.1", "::1")) -> None:
        self._any = False
        self._networks: list[Network] = []
        for item in trusted:
            item = item.strip()
            if not item:
                continue
            if item == "*":
                self._any = True
            else:
                self._networks.append(ipaddress.ip_network(item, strict=False))
        # Parsing an address costs more than the rest of a request's Python
        # work; the same few peers (the proxies) come back every request.
        self._known: dict[str, bool] = {}

    def trusts(self, host: str) -> bool:
        if self._any:
            return True
        known = self._known.get(host)
        if known is None:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                known = False
            else:
                known = any(address in network for network in self._networks)
            if len(self._known) >= _CACHE_SIZE:
                self._known.clear()
            self._known[host] = known
        return known

    def resolve(
        self, client: tuple[str, int] | None, scheme: str, headers: Iterable[tuple[bytes, bytes]]
    ) -> tuple[tuple[str, int] | None, str]:
        """The client and scheme after believing a trusted proxy's headers.
        With a chain of proxies, the nearest untrusted hop is the client.
        A Unix socket peer (``client`` None) is trusted, as gunicorn does:
        the socket file's permissions say who may connect."""
        reported = [(name, value) for name, value in headers if name in PROXY_HEADER_NAMES]
        if not reported or (client is not None and not self.trusts(client[0])):
            return client, scheme
        forwarded_for: list[str] = []
        proto = None
        for name, value in reported:
            if name == b"x-forwarded-for":
                forwarded_for += [part.strip() for part in value.decode("latin-1").split(",")]
            elif name == b"x-forwarded-proto":
                proto = value.decode("latin-1").split(",")[-1].strip().lower()
            elif name == b"forwarded":
                for element in value.decode("latin-1").split(","):
                    for pair in element.split(";"):
                        key, _, item = pair.strip().partition("=")
                        item = item.strip().strip('"')
                        if key.lower() == "for":
                            forwarded_for.append(
                                item[1 : item.index("]")] if item.startswith("[") else item.split(":")[0]
                            )
                        elif key.lower() == "proto":
                            proto = item.lower()
        host = None if client is None else client[0]
        for hop in reversed(forwarded_for):
            host = hop
            if not self.trusts(hop):
                break
        if host is not None and (client is None or host != client[0]):
            client = (host, 0)
        if proto in ("http", "https"):
            scheme = proto
        return client, scheme
