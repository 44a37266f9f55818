"""A DNS forwarder on the bridge gateway, so sandboxes resolve names without reaching the host.

Sandboxes get ``nameserver <gateway>`` in their resolv.conf. The forwarder relays each query to
the host's own resolvers (or ``BILIK_DNS_UPSTREAM``) and the answer back; the nftables rules let
sandboxes reach the gateway on port 53 and nothing else of the host, and sandboxes with internet
off are not answered at all (DNS would otherwise be a way out).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from pathlib import Path

log = logging.getLogger("bilik.dns")

QUERY_TIMEOUT_S = 4.0
# Sandboxes share one forwarder in the server's process: bound what they can make it hold.
MAX_PENDING_QUERIES = 256
MAX_TCP_CLIENTS = 64
TCP_IDLE_S = 10.0


def host_resolvers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    servers = []
    with contextlib.suppress(OSError):
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver" and ":" not in parts[1]:
                servers.append(parts[1])
    return servers or ["127.0.0.1"]


async def _ask_udp(upstream: str, query: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            if not answer.done():
                answer.set_result(data)

        def error_received(self, exc: Exception) -> None:
            if not answer.done():
                answer.set_exception(exc)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=(upstream, 53))
    try:
        transport.sendto(query)
        return await asyncio.wait_for(answer, QUERY_TIMEOUT_S)
    finally:
        transport.close()


async def _ask_tcp(upstream: str, query: bytes) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(upstream, 53), QUERY_TIMEOUT_S)
    try:
        writer.write(struct.pack("!H", len(query)) + query)
        await writer.drain()
        (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 4))
        return await asyncio.wait_for(reader.readexactly(length), QUERY_TIMEOUT_S)
    finally:
        writer.close()


async def _resolve(upstreams: list[str], query: bytes, *, tcp: bool) -> bytes | None:
    for upstream in upstreams:
        try:
            return await (_ask_tcp if tcp else _ask_udp)(upstream, query)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            continue
    return None


class DnsForwarder:
    """UDP and TCP port 53 on ``address``, relaying to ``upstreams``."""

    def __init__(self, address: str, upstreams: list[str]) -> None:
        self.address = address
        self.upstreams = upstreams
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tcp_clients = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        forwarder = self

        class Server(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                if len(forwarder._tasks) >= MAX_PENDING_QUERIES:
                    return  # dropped: the client retries, as it would on a lossy network
                task = loop.create_task(forwarder._answer_udp(self.transport, data, addr))
                forwarder._tasks.add(task)
                task.add_done_callback(forwarder._tasks.discard)

        transport, _ = await loop.create_datagram_endpoint(
            Server, local_addr=(self.address, 53), reuse_port=False
        )
        self._udp = transport
        self._tcp = await asyncio.start_server(self._answer_tcp, self.address, 53)
        log.info("DNS forwarder on %s:53 → %s", self.address, ", ".join(self.upstreams))

    async def _answer_udp(
        self, transport: asyncio.BaseTransport, query: bytes, addr: tuple[str, int]
    ) -> None:
        answer = await _resolve(self.upstreams, query, tcp=False)
        if answer is not None and not transport.is_closing():
            transport.sendto(answer, addr)  # type: ignore[attr-defined]

    async def _answer_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._tcp_clients >= MAX_TCP_CLIENTS:
            writer.close()
            return
        self._tcp_clients += 1
        try:
            while True:
                header = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_S)
                (length,) = struct.unpack("!H", header)
                query = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_S)
                answer = await _resolve(self.upstreams, query, tcp=True)
                if answer is None:
                    return
                writer.write(struct.pack("!H", len(answer)) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, OSError, TimeoutError):
            pass
        finally:
            self._tcp_clients -= 1
            writer.close()

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
        for task in list(self._tasks):
            task.cancel()
