"""The sandboxes' DNS forwarder forwards only what it judged, and no sandbox can starve the
others' resolution (issue 14).

The server's forwarder asks a recording resolver on the host's loopback: it notes every name in
every question it gets, answers ``.test`` names, and never answers names under ``hang.test``
(a query for one holds the forwarder until it gives up).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from e2b import Sandbox

from server import BilikServer

UPSTREAM = "127.83.53.1"  # (a loopback address of its own: port 53 is free there)


class RecordingResolver:
    """UDP and TCP port 53 on ``UPSTREAM``: notes every question's name, and answers each
    query with an empty NOERROR, except those for ``hang.test`` names."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((UPSTREAM, 53))
        self.tcp = socket.create_server((UPSTREAM, 53))
        for target in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    def _answer(self, query: bytes) -> bytes | None:
        (count,) = struct.unpack("!H", query[4:6])
        at, names = 12, []
        for _ in range(count):
            labels = []
            while query[at]:
                labels.append(query[at + 1 : at + 1 + query[at]].decode("latin-1").lower())
                at += 1 + query[at]
            at += 5
            names.append(".".join(labels))
        self.names.extend(names)
        if any(n.endswith("hang.test") for n in names):
            return None
        return query[:2] + struct.pack("!HHHHH", 0x8180, count, 0, 0, 0) + query[12:at]

    def _serve_udp(self) -> None:
        while True:
            try:
                query, peer = self.udp.recvfrom(4096)
            except OSError:
                return
            try:
                answer = self._answer(query)
            except (IndexError, struct.error):
                continue
            if answer is not None:
                self.udp.sendto(answer, peer)

    def _serve_tcp(self) -> None:
        while True:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                try:
                    (length,) = struct.unpack("!H", conn.recv(2))
                    answer = self._answer(conn.recv(length))
                    if answer is not None:
                        conn.sendall(struct.pack("!H", len(answer)) + answer)
                except (OSError, IndexError, struct.error):
                    continue

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


class DnsServer(BilikServer):
    """A server whose sandboxes' DNS forwarder asks the recording resolver."""

    def env(self) -> dict[str, str]:
        return {**super().env(), "BILIK_DNS_UPSTREAM": UPSTREAM}


@pytest.fixture(scope="module")
def resolver() -> Iterator[RecordingResolver]:
    recorder = RecordingResolver()
    yield recorder
    recorder.close()


@pytest.fixture(scope="module")
def served(resolver: RecordingResolver) -> Iterator[BilikServer]:
    server = DnsServer()
    server.start()
    yield server
    server.finish()


def _params(server: BilikServer) -> dict[str, Any]:
    return {"api_key": server.key, "api_url": server.url, "sandbox_url": server.url}


# In a sandbox: send DNS queries to its nameserver; print, for each, the answer's RCODE and
# question count (None: no answer).
ASK = r"""
import json, socket, struct, sys
server = open("/etc/resolv.conf").read().split()[1]
def question(name):
    return b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0\0\1\0\1"
def ask(names, tcp):
    query = struct.pack("!HHHHHH", 0x1234, 0x0100, len(names), 0, 0, 0)
    query += b"".join(question(n) for n in names)
    try:
        if tcp:
            s = socket.create_connection((server, 53), timeout=3)
            s.sendall(struct.pack("!H", len(query)) + query)
            n = struct.unpack("!H", s.recv(2))[0]
            answer = s.recv(n)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(3)
            s.sendto(query, (server, 53))
            answer = s.recv(4096)
    except (OSError, struct.error):
        return None
    return [answer[3] & 15, struct.unpack("!H", answer[4:6])[0]]
asks = json.loads(sys.argv[1])
print(json.dumps([ask(names, tcp) for names, tcp in asks]))
"""


def _ask(sbx: Sandbox, *asks: tuple[list[str], bool]) -> list[Any]:
    sbx.files.write("/tmp/ask.py", ASK)
    out = sbx.commands.run(f"python3 /tmp/ask.py '{json.dumps(asks)}'", timeout=60).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def test_a_second_question_is_never_forwarded(
    served: BilikServer, resolver: RecordingResolver
) -> None:
    with Sandbox.create(
        "base",
        timeout=120,
        allow_internet_access=False,
        network={"allow_out": ["allowed.test"]},
        **_params(served),
    ) as sbx:
        results = _ask(
            sbx,
            (["allowed.test"], False),
            (["secret-one.test"], False),
            (["allowed.test", "secret-two.test"], False),
            (["allowed.test", "secret-three.test"], True),
            (["secret-four.test", "allowed.test"], False),
        )
    allowed, denied, *several = results
    assert allowed == [0, 1]  # (the resolver answers what the sandbox may ask)
    assert denied == [5, 1]  # REFUSED
    for result in several:
        assert result is None or result[0] != 0, results  # never a forwarded answer
    assert "allowed.test" in resolver.names
    assert not [n for n in resolver.names if n.startswith("secret-")], resolver.names


# A sandbox that floods the forwarder with queries the resolver never answers, for a while.
FLOOD = r"""
import socket, struct, time
server = open("/etc/resolv.conf").read().split()[1]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
end, i = time.monotonic() + 12, 0
while time.monotonic() < end:
    name = b"\x04q%03d\x04hang\x04test\x00" % (i % 1000)
    header = struct.pack("!HHHHHH", i % 65536, 0x0100, 1, 0, 0, 0)
    s.sendto(header + name + b"\0\1\0\1", (server, 53))
    i += 1
    time.sleep(0.0005)
"""


def test_one_sandbox_cannot_starve_the_others(served: BilikServer) -> None:
    with (
        Sandbox.create("base", timeout=120, **_params(served)) as flooder,
        Sandbox.create("base", timeout=120, **_params(served)) as victim,
    ):
        flooder.files.write("/tmp/flood.py", FLOOD)
        flooder.commands.run("python3 /tmp/flood.py", background=True)
        victim.commands.run("sleep 3")  # (the flood holds the forwarder by now)
        answers = _ask(victim, *[(["victim.test"], False)] * 3)
        assert answers == [[0, 1]] * 3, answers
