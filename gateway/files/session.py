"""The HTTP client that takes files up to the parent (gateway.files.forward): aiohttp, imported
with the first file to go up, not by an idle hub (footprint)."""

from __future__ import annotations

import ipaddress
import socket
import ssl

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver


class _PinnedResolver(AbstractResolver):
    """The parent's host name resolves to the address the upstream link dials (a parent known
    by IP, or a name the gateway's DNS does not know); other names as usual."""

    def __init__(self, pins: dict[str, str]) -> None:
        self.pins = pins
        self.default = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        target = self.pins.get(host)
        if target is None:
            return await self.default.resolve(host, port, family)
        try:
            ip = ipaddress.ip_address(target)
        except ValueError:
            return [dict(r, hostname=host) for r in  # type: ignore[misc]
                    await self.default.resolve(target, port, family)]
        return [{"hostname": host, "host": str(ip), "port": port,
                 "family": socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        await self.default.close()


def client_session(ctx: ssl.SSLContext, pins: dict[str, str],
                   read_timeout: float) -> aiohttp.ClientSession:
    """At most 4 connections, TLS with ``ctx``, host names in ``pins`` dialled at their pinned
    address; no total deadline (a file takes as long as the link needs), ``read_timeout`` for
    every read."""
    connector = aiohttp.TCPConnector(ssl=ctx, resolver=_PinnedResolver(pins), limit=4)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=read_timeout)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)
