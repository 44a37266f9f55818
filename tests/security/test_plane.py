"""The sandbox plane reaches only the sandboxes keys own, at their own address (issue 14).

Nothing the plane serves needs a key, so each test sends what any client could: a request
target that is not a path (``GET @127.0.0.1:PORT/secret``), a sandbox id that is a path into a
sandbox's own files (where it planted a ``record.json``), a websocket redirected to the host,
the ids of sandboxes no one owns yet (the warm pool's, a template build's), and ports that are
digits only to ``str.isdigit``. A server on the host's loopback holds a secret and counts
every request it gets: none may ever reach it.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import pytest
from e2b import Sandbox, Template
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from bilik.runtime import SandboxNotFound
from bilik.runtime.records import RecordStore
from server import SERVER_SETTINGS, BilikServer

RECORDS = RecordStore(SERVER_SETTINGS.data_dir / "sandboxes")
SECRET = b"host-loopback-secret-" + uuid.uuid4().hex.encode()
MISSING = "nosuchsandbox1"


class LoopbackSecret:
    """An HTTP server on 127.0.0.1 that answers every request with ``SECRET`` and counts them."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        hits = self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # (websocket handshakes are GETs too)
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(SECRET)))
                self.end_headers()
                self.wfile.write(SECRET)

            do_POST = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# In the sandbox: a websocket port that redirects every handshake to the host's loopback.
REDIRECT = r"""
import socket, sys
listener = socket.create_server(("0.0.0.0", 8766))
while True:
    conn, _ = listener.accept()
    conn.recv(65536)
    conn.sendall(
        b"HTTP/1.1 302 Found\r\nLocation: ws://127.0.0.1:%d/redirected\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n" % int(sys.argv[1])
    )
    conn.close()
"""


@pytest.fixture(scope="module")
def secret() -> Iterator[LoopbackSecret]:
    server = LoopbackSecret()
    yield server
    server.close()


@pytest.fixture(scope="module")
def served() -> Iterator[BilikServer]:
    """A server that keeps one ``base`` sandbox waiting in its warm pool."""
    server = BilikServer(warm_pool="base=1")
    server.start()
    yield server
    server.finish()


@pytest.fixture(scope="module")
def sbx(served: BilikServer, secret: LoopbackSecret) -> Iterator[Sandbox]:
    """The attacker's own sandbox: a web server on port 8000, the redirecting one on 8766."""
    sandbox = Sandbox.create("base", timeout=600, **_params(served))
    sandbox.files.write("/tmp/redirect.py", REDIRECT)
    sandbox.commands.run("cd /tmp && exec python3 -m http.server 8000", background=True)
    sandbox.commands.run(f"exec python3 /tmp/redirect.py {secret.port}", background=True)
    sandbox.commands.run(
        "for i in $(seq 100); do curl -s localhost:8000 >/dev/null && break; sleep 0.1; done"
    )
    try:
        yield sandbox
    finally:
        sandbox.kill()


@pytest.fixture(autouse=True)
def no_hits(secret: LoopbackSecret) -> Iterator[None]:
    """Whatever a test tries, nothing reaches the host's loopback server."""
    secret.hits.clear()
    yield
    assert secret.hits == [], f"requests reached the host's loopback: {secret.hits}"


def _params(server: BilikServer) -> dict[str, Any]:
    return {"api_key": server.key, "api_url": server.url, "sandbox_url": server.url}


def _raw(
    server: BilikServer, request_line: str, headers: Mapping[str, str | bytes]
) -> httpx.Response:
    """Send a request exactly as written (no client would send such a target) and read its
    answer."""
    headers = {"Host": "127.0.0.1", **headers}
    head = [request_line.encode("latin-1"), b"Connection: close"]
    head += [
        k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()) for k, v in headers.items()
    ]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(b"\r\n".join(head) + b"\r\n\r\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    raw_headers, _, body = rest.partition(b"\r\n\r\n")
    fields = [line.split(b":", 1) for line in raw_headers.split(b"\r\n") if b":" in line]
    return httpx.Response(
        int(status_line.split()[1]),
        headers=[(k.strip(), v.strip()) for k, v in fields],
        content=body,
    )


def _is_json_error(response: httpx.Response, status: int) -> bool:
    body = response.json()
    return response.status_code == status and body["code"] == status and bool(body["message"])


def _not_found(response: httpx.Response, sandbox_id: str) -> None:
    """The one answer for every sandbox that is not there to route to."""
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "sandboxId": sandbox_id,
        "message": "The sandbox was not found",
        "code": 502,
    }


def _ws_refusal(server: BilikServer, headers: dict[str, str], path: str = "/") -> httpx.Response:
    """The HTTP answer a websocket handshake through the plane gets instead of a websocket."""
    url = server.url.replace("http://", "ws://") + path
    with (
        pytest.raises(InvalidStatus) as refused,
        connect(url, additional_headers=headers, open_timeout=10) as ws,
    ):
        ws.recv(timeout=5)
    answer = refused.value.response
    return httpx.Response(
        answer.status_code, headers=list(answer.headers.raw_items()), content=bytes(answer.body)
    )


# -- a request target that is not a path --------------------------------------------------------


def test_a_target_that_is_not_a_path_is_refused(
    served: BilikServer, sbx: Sandbox, secret: LoopbackSecret
) -> None:
    loopback = f"127.0.0.1:{secret.port}"
    for target in (
        f"@{loopback}/secret.txt",
        f"@{loopback}",
        f"http://{loopback}/secret.txt",
        f":x@{loopback}/secret.txt",
        "*",
    ):
        for port in ("8000", "49983"):  # a user port, and envd (over its socket)
            headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": port}
            answer = _raw(served, f"GET {target} HTTP/1.1", headers)
            assert SECRET not in answer.content
            assert _is_json_error(answer, 400), (target, port, answer.content)
        via_host = _raw(
            served, f"POST {target} HTTP/1.1", {"Host": f"8000-{sbx.sandbox_id}.localhost"}
        )
        assert SECRET not in via_host.content and _is_json_error(via_host, 400)
    # A path is still a path, whatever it holds.
    fine = httpx.get(
        f"{served.url}/@{loopback}/",
        headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8000"},
    )
    assert fine.status_code == 404 and SECRET not in fine.content  # the sandbox's http.server


def test_a_websocket_target_that_is_not_a_path_is_refused(
    served: BilikServer, sbx: Sandbox, secret: LoopbackSecret
) -> None:
    upgrade = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
        "E2b-Sandbox-Id": sbx.sandbox_id,
        "E2b-Sandbox-Port": "8000",
    }
    for target in (f"@127.0.0.1:{secret.port}/ws", f"http://127.0.0.1:{secret.port}/ws"):
        answer = _raw(served, f"GET {target} HTTP/1.1", upgrade)
        assert answer.status_code != 101 and SECRET not in answer.content
        assert _is_json_error(answer, 400), answer.content


def test_a_websocket_redirect_to_the_host_is_not_followed(
    served: BilikServer, sbx: Sandbox
) -> None:
    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8766"}
    answer = _ws_refusal(served, headers)
    assert answer.status_code == 502 and "port is not open" in answer.json()["message"]


# -- a sandbox id that is a path ----------------------------------------------------------------


def test_a_sandbox_id_that_is_a_path_is_refused(
    served: BilikServer, sbx: Sandbox, secret: LoopbackSecret
) -> None:
    # The sandbox plants a record that points at the host's loopback, in its own rootfs.
    record = RECORDS.load(sbx.sandbox_id)
    assert record is not None
    forged = {**record.to_json(), "address": "127.0.0.1", "pooled": False}
    sbx.files.write("/record.json", json.dumps(forged), user="root")
    rootfs = SERVER_SETTINGS.data_dir / "sandboxes" / sbx.sandbox_id / "rootfs"
    assert (rootfs / "record.json").exists()  # (the attack's premise)
    for sandbox_id in (f"{sbx.sandbox_id}/rootfs", str(rootfs), f"../{sbx.sandbox_id}/rootfs"):
        headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(secret.port)}
        answer = httpx.get(f"{served.url}/secret.txt", headers=headers)
        assert SECRET not in answer.content
        assert _is_json_error(answer, 400), (sandbox_id, answer.content)
    # The record store itself never makes a path of what is not an id.
    for sandbox_id in (f"{sbx.sandbox_id}/rootfs", str(rootfs), f"{sbx.sandbox_id}\n", ".."):
        assert RECORDS.load(sandbox_id) is None
        with pytest.raises(SandboxNotFound):
            RECORDS.dir(sandbox_id)
    assert RECORDS.load(sbx.sandbox_id) == record  # (the real one is still read)


# -- sandboxes no one owns ----------------------------------------------------------------------


def _wait_pooled(timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pooled = [r.sandbox_id for r in RECORDS.all() if r.pooled]
        if pooled:
            return pooled[0]
        time.sleep(0.2)
    raise AssertionError("no sandbox came into the warm pool")


def _unreachable(served: BilikServer, sandbox_id: str) -> None:
    """Every way of naming ``sandbox_id`` gets the answer a sandbox that does not exist gets."""
    for port in ("49983", "8000"):
        headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": port}
        _not_found(httpx.get(f"{served.url}/health", headers=headers), sandbox_id)
    _not_found(
        httpx.get(f"{served.url}/health", headers={"E2b-Sandbox-Id": sandbox_id}), sandbox_id
    )
    _not_found(
        httpx.get(f"{served.url}/health", headers={"Host": f"49983-{sandbox_id}.localhost"}),
        sandbox_id,
    )
    _not_found(
        _ws_refusal(served, {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983"}), sandbox_id
    )


def test_a_pooled_sandbox_is_unreachable(served: BilikServer, sbx: Sandbox) -> None:
    pooled = _wait_pooled()
    record = RECORDS.load(pooled)
    assert record is not None and record.pooled
    _unreachable(served, MISSING)
    _unreachable(served, pooled)
    # Nor through an owned sandbox, at its address (its envd answers /health on 49983).
    for port in ("8000", "49983"):
        headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": port}
        for target in (f"@{record.address}:49983/health", f"@{record.address}:49983/execute"):
            answer = _raw(served, f"GET {target} HTTP/1.1", headers)
            assert _is_json_error(answer, 400), (target, answer.status_code, answer.content)
    assert pooled in {r.sandbox_id for r in RECORDS.all() if r.pooled}  # (still waiting)


def test_a_template_build_sandbox_is_unreachable(served: BilikServer, sbx: Sandbox) -> None:
    params = _params(served)
    name = f"slow-{uuid.uuid4().hex[:8]}"
    template = Template().from_base_image().run_cmd(f"echo {name} && sleep 20")
    build = Template.build_in_background(template, name, **params)
    try:
        known = {sbx.sandbox_id}
        deadline = time.monotonic() + 120
        builder = None
        while builder is None and time.monotonic() < deadline:
            others = [r for r in RECORDS.all() if not r.pooled and r.sandbox_id not in known]
            builder = others[0].sandbox_id if others else None
            time.sleep(0.2)
        assert builder is not None, "no build sandbox appeared"
        _unreachable(served, builder)
    finally:
        while Template.get_build_status(build, **params).status.value in ("building", "waiting"):
            time.sleep(0.5)
        httpx.delete(
            f"{served.url}/templates/{build.template_id}", headers={"X-API-Key": served.key}
        )


# -- ports and ids parsed strictly --------------------------------------------------------------


def test_malformed_ports_and_ids_are_400_json(served: BilikServer, sbx: Sandbox) -> None:
    for port in (b"\xb2", b"\xb9", b"0", b"65536", b"99999", b"-1", b"+80", b"8000x", b"0x50", b""):
        headers: dict[str, str | bytes] = {
            "E2b-Sandbox-Id": sbx.sandbox_id,
            "E2b-Sandbox-Port": port,
        }
        answer = _raw(served, "GET /health HTTP/1.1", headers)
        assert _is_json_error(answer, 400), (port, answer.status_code, answer.content)
    for host in (
        b"\xb2-%s.localhost",
        b"0-%s.localhost",
        b"65536-%s.localhost",
        b"8000-%s!.localhost",
    ):
        answer = _raw(served, "GET /health HTTP/1.1", {"Host": host % sbx.sandbox_id.encode()})
        assert _is_json_error(answer, 400), (host, answer.status_code, answer.content)
    for sandbox_id in (
        b"UPPERCASE123",
        b"short",
        b"a" * 33,
        b"\xe9t\xe9t\xe9t\xe9t\xe9",
        b"abc def ghi",
    ):
        answer = _raw(served, "GET /health HTTP/1.1", {"E2b-Sandbox-Id": sandbox_id})
        assert _is_json_error(answer, 400), (sandbox_id, answer.status_code, answer.content)
    # What is well formed still routes.
    ok = httpx.get(
        f"{served.url}/", headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8000"}
    )
    assert ok.status_code == 200
    via_host = httpx.get(f"{served.url}/", headers={"Host": f"8000-{sbx.sandbox_id}.localhost"})
    assert via_host.status_code == 200


def test_a_closed_port_says_no_more_than_that(served: BilikServer, sbx: Sandbox) -> None:
    answer = httpx.get(
        served.url, headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8001"}
    )
    assert answer.status_code == 502
    assert answer.json() == {
        "sandboxId": sbx.sandbox_id,
        "message": "The sandbox is running but port is not open",
        "code": 502,
        "port": 8001,
    }
