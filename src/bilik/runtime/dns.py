"""A DNS forwarder on the bridge gateway, so sandboxes resolve names without reaching the host.

Sandboxes get ``nameserver <gateway>`` in their resolv.conf. The forwarder relays each query to
the host's own resolvers (or ``BILIK_DNS_UPSTREAM``) and the answer back; the nftables rules let
sandboxes reach the gateway on port 53 and nothing else of the host, and sandboxes with internet
off are not answered at all (DNS would otherwise be a way out), unless they allow some domain
names: then those names, and only those, are answered.

A sandbox that allows a domain may reach the addresses its answers hold, for their lifetime:
the forwarder adds them to the sandbox's rules before the answer goes back (``learn``).

Only what the policy judged is forwarded: a standard query with exactly one question (a
message with several would have the others pass unjudged), nothing else. Each sandbox (each
source address) has its own bound on what it can make the forwarder hold, so one sandbox
flooding it cannot keep the others from resolving.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import socket
import struct
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("bilik.dns")

QUERY_TIMEOUT_S = 4.0
# Sandboxes share one forwarder in the server's process: bound what each can make it hold.
MAX_PENDING_PER_SOURCE = 64
MAX_TCP_PER_SOURCE = 8
TCP_IDLE_S = 10.0
# How long an address learned from an answer stays reachable, whatever the answer's TTL says.
LEARN_TTL_S = (30, 3600)


@dataclasses.dataclass(frozen=True)
class DnsPolicy:
    """What one sandbox may ask: everything (internet on), and which names to learn from."""

    internet: bool
    domains: list[str]

    def allows(self, name: str) -> bool:
        return any(name.endswith(d[1:]) if d.startswith("*.") else name == d for d in self.domains)


@dataclasses.dataclass(frozen=True)
class Question:
    """The one question of a query: its name (lowercase, no trailing dot) and where it ends."""

    name: str
    end: int


def question(message: bytes) -> Question | None:
    """The question of a standard query (QR 0, opcode QUERY) that asks exactly one and carries
    no records but additional ones (EDNS); None for anything else, which is never forwarded."""
    if len(message) < 12:
        return None
    flags, questions, answers, authority = struct.unpack("!HHHH", message[2:10])
    if flags & 0xF800 or questions != 1 or answers or authority:
        return None
    labels, at = [], 12
    try:
        while message[at]:
            length = message[at]
            label = message[at + 1 : at + 1 + length]
            # (no compression in a question; a dot inside a label would read as two labels)
            if length > 63 or len(label) != length or b"." in label:
                return None
            labels.append(label.decode("ascii").lower())
            at += 1 + length
    except (IndexError, UnicodeDecodeError):
        return None
    end = at + 5  # the root label, type and class
    if end > len(message):
        return None
    return Question(".".join(labels), end)


def refused(query: bytes, asked: Question | None = None) -> bytes:
    """A REFUSED answer to ``query``: its header, and its question if it has one to echo."""
    ident, flags = struct.unpack("!HH", query[:4])
    count = 1 if asked else 0
    header = struct.pack("!HHHHHH", ident, 0x8000 | (flags & 0x7900) | 5, count, 0, 0, 0)
    return header + (query[12 : asked.end] if asked else b"")


def _skip_name(message: bytes, at: int) -> int:
    while True:
        length = message[at]
        if length >= 0xC0:
            return at + 2
        if length == 0:
            return at + 1
        at += 1 + length


def addresses(answer: bytes) -> tuple[list[str], int]:
    """The IPv4 addresses an answer holds, and the shortest TTL among them."""
    found: list[str] = []
    ttl = LEARN_TTL_S[1]
    try:
        questions, records = struct.unpack("!HH", answer[4:8])
        at = 12
        for _ in range(questions):
            at = _skip_name(answer, at) + 4
        for _ in range(records):
            at = _skip_name(answer, at)
            rtype, _rclass, rttl, length = struct.unpack("!HHIH", answer[at : at + 10])
            at += 10
            if rtype == 1 and length == 4:
                found.append(socket.inet_ntoa(answer[at : at + 4]))
                ttl = min(ttl, rttl)
            at += length
    except (IndexError, struct.error):
        pass
    return found, max(LEARN_TTL_S[0], min(ttl, LEARN_TTL_S[1]))


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
    """UDP and TCP port 53 on ``address``, relaying to ``upstreams``.

    ``policy(source address)`` says what a sandbox may ask (None: answer as asked);
    ``learn(source, addresses, ttl_s)`` lets it reach an allowed name's addresses (runs in a
    thread: it changes firewall rules)."""

    def __init__(
        self,
        address: str,
        upstreams: list[str],
        policy: Callable[[str], DnsPolicy | None] | None = None,
        learn: Callable[[str, list[str], int], None] | None = None,
    ) -> None:
        self.address = address
        self.upstreams = upstreams
        self.policy = policy
        self.learn = learn
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Queries being answered and TCP connections open, per source address (sandbox).
        self._pending: collections.Counter[str] = collections.Counter()
        self._tcp_clients: collections.Counter[str] = collections.Counter()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        forwarder = self

        class Server(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                source = addr[0]
                if forwarder._pending[source] >= MAX_PENDING_PER_SOURCE:
                    return  # dropped: the client retries, as it would on a lossy network
                forwarder._pending[source] += 1
                task = loop.create_task(forwarder._answer_udp(self.transport, data, addr))
                forwarder._tasks.add(task)
                task.add_done_callback(lambda done: forwarder._settled(done, source))

        transport, _ = await loop.create_datagram_endpoint(
            Server, local_addr=(self.address, 53), reuse_port=False
        )
        self._udp = transport
        self._tcp = await asyncio.start_server(self._answer_tcp, self.address, 53)
        log.info("DNS forwarder on %s:53 → %s", self.address, ", ".join(self.upstreams))

    def _settled(self, task: asyncio.Task[None], source: str) -> None:
        self._tasks.discard(task)
        self._pending[source] -= 1
        if self._pending[source] <= 0:
            del self._pending[source]

    async def _answer(self, source: str, query: bytes, *, tcp: bool) -> bytes | None:
        if len(query) < 12:
            return None  # not even a header to answer
        asked = question(query)
        if asked is None:
            return refused(query)
        policy = self.policy(source) if self.policy else None
        allowed = policy is not None and policy.allows(asked.name)
        if policy is not None and not policy.internet and not allowed:
            return refused(query, asked)
        answer = await _resolve(self.upstreams, query, tcp=tcp)
        if answer is not None and allowed and self.learn is not None:
            found, ttl = addresses(answer)
            if found:
                try:
                    await asyncio.to_thread(self.learn, source, found, ttl)
                except Exception as e:  # the name stays unreachable: say so, answer anyway
                    log.warning("could not allow %s for %s: %s", found, source, e)
        return answer

    async def _answer_udp(
        self, transport: asyncio.BaseTransport, query: bytes, addr: tuple[str, int]
    ) -> None:
        answer = await self._answer(addr[0], query, tcp=False)
        if answer is not None and not transport.is_closing():
            transport.sendto(answer, addr)  # type: ignore[attr-defined]

    async def _answer_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = writer.get_extra_info("peername")[0]
        if self._tcp_clients[source] >= MAX_TCP_PER_SOURCE:
            writer.close()
            return
        self._tcp_clients[source] += 1
        try:
            while True:
                header = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_S)
                (length,) = struct.unpack("!H", header)
                query = await asyncio.wait_for(reader.readexactly(length), TCP_IDLE_S)
                answer = await self._answer(source, query, tcp=True)
                if answer is None:
                    return
                writer.write(struct.pack("!H", len(answer)) + answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, OSError, TimeoutError):
            pass
        finally:
            self._tcp_clients[source] -= 1
            if self._tcp_clients[source] <= 0:
                del self._tcp_clients[source]
            writer.close()

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
        for task in list(self._tasks):
            task.cancel()
