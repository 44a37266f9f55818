"""The sandbox plane: sandbox ports on the server's one port, by header or by Host."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

import httpx
import pytest
from e2b import Sandbox

from server import BilikServer


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[BilikServer, str, str]]:
    """A server and a sandbox running a web server on port 8000, with a 64 MiB file to fetch."""
    server = BilikServer()
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
