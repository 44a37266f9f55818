"""The sandbox plane: sandbox ports on the server's one port, by header or by Host."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator

import httpx
import pytest
from e2b import Sandbox

from server import BilikServer

# The cap on requests through the server to one key's sandboxes, for this module's server.
STREAMS_PER_KEY = 16


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[BilikServer, str, str]]:
    """A server and a sandbox running a web server on port 8000, with a 64 MiB file to fetch."""
    server = BilikServer(env={"BILIK_MAX_STREAMS_PER_KEY": str(STREAMS_PER_KEY)})
    server.start()
    sbx = Sandbox.create("base", timeout=300, api_key=server.key, api_url=server.url)
    script = (
        "head -c 67108864 /dev/urandom > /tmp/big && sha256sum /tmp/big | cut -c1-64 && "
        "cd /tmp && (nohup python3 -m http.server 8000 >/dev/null 2>&1 &)"
    )
    digest = server.cli("sandbox", "exec", sbx.sandbox_id, "--", "sh", "-c", script).stdout
    try:
        yield server, sbx.sandbox_id, digest.strip()
    finally:
        sbx.kill()
        server.finish()


def _get(server: BilikServer, path: str, headers: dict[str, str]) -> httpx.Response:
    deadline = time.monotonic() + 10
    while True:
        response = httpx.get(server.url + path, headers=headers, timeout=30)
        if response.status_code != 502 or time.monotonic() > deadline:
            return response
        time.sleep(0.2)  # the web server may still be starting


def test_headers_route_to_the_sandbox_port(served: tuple[BilikServer, str, str]) -> None:
    server, sandbox_id, _ = served
    response = _get(server, "/", {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "8000"})
    assert response.status_code == 200 and "big" in response.text


def test_host_routes_to_the_sandbox_port(served: tuple[BilikServer, str, str]) -> None:
    server, sandbox_id, _ = served
    response = _get(server, "/", {"Host": f"8000-{sandbox_id}.localhost"})
    assert response.status_code == 200 and "big" in response.text


def test_large_responses_stream_through_intact(served: tuple[BilikServer, str, str]) -> None:
    server, sandbox_id, digest = served
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "8000"}
    sha = hashlib.sha256()
    with httpx.stream("GET", server.url + "/big", headers=headers, timeout=60) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            sha.update(chunk)
    assert sha.hexdigest() == digest


def test_unknown_sandbox_and_closed_port_are_502_json(served: tuple[BilikServer, str, str]) -> None:
    server, sandbox_id, _ = served
    missing = httpx.get(server.url + "/", headers={"E2b-Sandbox-Id": "nosuchsandbox1"})
    assert missing.status_code == 502
    assert missing.json() == {
        "sandboxId": "nosuchsandbox1",
        "message": "The sandbox was not found",
        "code": 502,
    }
    closed = httpx.get(
        server.url + "/", headers={"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "8001"}
    )
    assert closed.status_code == 502
    assert "port is not open" in closed.json()["message"]
    # The control plane is still the control plane.
    assert httpx.get(server.url + "/health").status_code == 200


# A websocket echo server from the standard library alone (the sandbox has no websocket package).
WS_ECHO = r"""
import base64, hashlib, socket, struct, threading
def serve(conn):
    request = b""
    while b"\r\n\r\n" not in request:
        request += conn.recv(4096)
    lines = request.split(b"\r\n")
    key = [l.split(b":", 1)[1].strip() for l in lines if l.lower().startswith(b"sec-websocket-key")]
    magic = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    accept = base64.b64encode(hashlib.sha1(key[0] + magic).digest())
    conn.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    f = conn.makefile("rb")
    while True:
        head = f.read(2)
        if len(head) < 2:
            return
        opcode, size = head[0] & 15, head[1] & 127
        if size == 126:
            size = struct.unpack(">H", f.read(2))[0]
        elif size == 127:
            size = struct.unpack(">Q", f.read(8))[0]
        mask = f.read(4)
        data = bytes(b ^ mask[i % 4] for i, b in enumerate(f.read(size)))
        if opcode == 8:
            conn.sendall(b"\x88\x00")
            return
        reply = data[::-1] if opcode == 1 else data
        length = struct.pack(">BH", 126, len(reply)) if len(reply) > 125 else bytes([len(reply)])
        conn.sendall(bytes([0x80 | opcode]) + length + reply)
listener = socket.create_server(("0.0.0.0", 8765))
while True:
    threading.Thread(target=serve, args=(listener.accept()[0],), daemon=True).start()
"""


def test_websockets_pass_through(served: tuple[BilikServer, str, str]) -> None:
    from websockets.sync.client import connect

    server, sandbox_id, _ = served
    server.cli(
        "sandbox",
        "exec",
        sandbox_id,
        "--",
        "sh",
        "-c",
        f"cat > /tmp/ws.py <<'EOF'\n{WS_ECHO}\nEOF\n(nohup python3 /tmp/ws.py >/dev/null 2>&1 &)",
    )
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "8765"}
    url = server.url.replace("http://", "ws://") + "/echo"
    deadline = time.monotonic() + 10
    while True:
        try:
            ws = connect(url, additional_headers=headers, open_timeout=5)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "olleh"
        blob = bytes(range(256)) * 100
        ws.send(blob)
        assert ws.recv(timeout=5) == blob
    # A port nobody listens on closes the websocket instead of hanging.
    closed = {**headers, "E2b-Sandbox-Port": "8766"}
    with (
        pytest.raises(Exception),  # noqa: B017 (refused, whatever form the refusal takes)
        connect(url, additional_headers=closed, open_timeout=5) as bad,
    ):
        bad.recv(timeout=5)


def test_streams_to_one_keys_sandboxes_are_capped(served: tuple[BilikServer, str, str]) -> None:
    """Sandbox ports take no key: one key's sandboxes cannot hold unbounded connections of the
    server (here websockets held open; a port that never answers holds them alike). The echo
    server of the test above still runs."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    server, sandbox_id, _ = served
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "8765"}
    url = server.url.replace("http://", "ws://") + "/echo"
    with contextlib.ExitStack() as held:
        for _ in range(STREAMS_PER_KEY):
            held.enter_context(connect(url, additional_headers=headers, open_timeout=5))
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers=headers, open_timeout=5)
        assert refused.value.response.status_code == 429
        plain = httpx.get(server.url + "/", headers={**headers, "E2b-Sandbox-Port": "8000"})
        assert plain.status_code == 429 and plain.json()["code"] == 429
        # The control plane is not the sandboxes': it still answers.
        assert httpx.get(server.url + "/health").status_code == 200
    # Once they close, the sandbox takes requests again.
    deadline = time.monotonic() + 10
    while True:
        try:
            with connect(url, additional_headers=headers, open_timeout=5) as ws:
                ws.send("again")
                assert ws.recv(timeout=5) == "niaga"
            break
        except InvalidStatus:
            assert time.monotonic() < deadline
            time.sleep(0.2)
