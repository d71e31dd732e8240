"""Outgoing HTTP to URLs that users supply (webhooks, external calendars): one guard against
reaching the server's own network.

A provider's URL must not make the server probe loopback, private, link-local or reserved
addresses (cloud metadata, the database, admin ports) unless `[server] allow_private_networks`
says so. IP literals are refused before connecting; names are refused when they resolve to such an
address, both when a URL is accepted (`check_url`) and on every connection (`PublicAddressesOnly`),
because a name may resolve differently later.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

HINT = "set [server] allow_private_networks = true to allow it"
RESOLVE_TIMEOUT_SECONDS = 5.0


class PrivateAddress(Exception):
    """A URL's host is, or resolves to, a non-public address; the message names it."""


# NAT64 (RFC 6052) carries an IPv4 address in its last 32 bits, as 6to4 does in bits 16-48.
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not embedded.is_global:
            return False
    return ip.is_global


def refuse_private_literal(url: str) -> None:
    """Raise `PrivateAddress` when the URL's host is a non-public IP literal (names are checked
    when resolved)."""
    host = urlsplit(url).hostname or ""
    try:
        public = _is_public(host)
    except ValueError:
        return
    if not public:
        raise PrivateAddress(f"{host} is a non-public address; {HINT}")


async def check_url(url: str, *, allow_private_networks: bool) -> None:
    """Raise `PrivateAddress` when the URL's host is, or now resolves to, a non-public address.
    A name that does not resolve (yet) passes: each connection is checked again."""
    if allow_private_networks:
        return
    refuse_private_literal(url)
    host = urlsplit(url).hostname or ""
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM),
            RESOLVE_TIMEOUT_SECONDS,
        )
    except (OSError, TimeoutError, UnicodeError):
        return
    for info in infos:
        address = str(info[4][0])
        if not _is_public(address):
            raise PrivateAddress(f"{host} resolves to the non-public address {address}; {HINT}")


class PublicAddressesOnly(AbstractResolver):
    """A resolver that refuses hosts resolving to non-public addresses."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        for info in found:
            if not _is_public(info["host"]):
                raise OSError(
                    errno.EACCES,
                    f"{host} resolves to the non-public address {info['host']}; {HINT}",
                )
        return found

    async def close(self) -> None:
        await self._inner.close()


def client_session(
    *, allow_private_networks: bool, timeout: aiohttp.ClientTimeout
) -> aiohttp.ClientSession:
    """A session for user-supplied URLs; unless allowed, only public addresses are reached
    (callers also call `refuse_private_literal` per URL: IP literals are never resolved)."""
    connector = (
        None if allow_private_networks else aiohttp.TCPConnector(resolver=PublicAddressesOnly())
    )
    return aiohttp.ClientSession(timeout=timeout, connector=connector)
