"""The control plane against clients that do not play fair: bodies too large to hold (the server
read a 300 MB body whole, before checking its size or the caller's key), slow clients that hold
connections (half-sent requests stayed open for ever), key caps side-stepped after a create
(``timeout`` and ``connect``) and by template builds, malformed ids, and malformed fields that
were a 500."""

from __future__ import annotations

import contextlib
import datetime
import json
import select
import socket
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from e2b import Sandbox, SandboxException, SandboxQuery

from server import BilikServer

MiB = 1 << 20
HUGE = 300 * MiB


def _params(server: BilikServer, key: str | None = None) -> dict[str, Any]:
    return {"api_key": key or server.key, "api_url": server.url, "sandbox_url": server.url}


def _key(server: BilikServer, *flags: str) -> str:
    return server.cli("keys", "create", "--name", "capped", *flags).stdout.strip()


def _body_chunks(total: int, chunked: bool) -> Iterator[bytes]:
    piece = b" " * MiB
    for _ in range(total // MiB):
        yield b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
    if chunked:
        yield b"0\r\n\r\n"


def _read_response(sock: socket.socket, data: bytes, deadline: float) -> tuple[int, bytes]:
    """Status and body of the one response ``data`` begins (read on until whole)."""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        more = sock.recv(65536)
        assert more, f"the connection closed mid-response: {data!r}"
        data += more
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), body[: _length(data)]


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name == "content-length":
            return int(value)
    return 0


def _flood(
    server: BilikServer, path: str, key: str | None, chunked: bool
) -> tuple[int, dict[str, Any], float]:
    """POST a 300 MB body the way an attacker does: all of it, as fast as the server takes it.
    Returns the status, the JSON error, and how long the answer took."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += f"X-API-Key: {key}\r\n" if key else ""
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {HUGE}\r\n"
    sock = socket.create_connection(("127.0.0.1", server.port))
    started = time.monotonic()
    deadline = started + 120
    answered: float | None = None
    received = b""
    try:
        sock.sendall(head.encode() + b"\r\n")
        open_ = True
        chunks = _body_chunks(HUGE, chunked)
        view = memoryview(b"")
        while open_:
            if not view:
                view = memoryview(next(chunks, b""))
                if not view:
                    break  # all sent
            assert time.monotonic() < deadline, "the server neither read nor answered"
            readable, writable, _ = select.select([sock], [sock], [], 5)
            try:
                if readable:
                    more = sock.recv(65536)
                    open_ = bool(more)
                    received += more
                    answered = answered or time.monotonic()
                if writable and open_:
                    view = view[sock.send(view) :]
            except (BrokenPipeError, ConnectionResetError):
                open_ = False  # the server stopped taking it: the point
        status, body = _read_response(sock, received, deadline)
        answered = answered or time.monotonic()
    finally:
        sock.close()
    return status, json.loads(body), answered - started


def test_huge_bodies_are_refused_before_they_are_read(server: BilikServer) -> None:
    server.start()
    key = server.key
    # (warm up every path taken below, so the peak measures the bodies alone)
    for path in ("/templates/tags", "/sandboxes"):
        httpx.post(server.url + path, content=b"{}", headers={"X-API-Key": key}, timeout=30)
        httpx.post(server.url + path, content=b"{}", timeout=30)
    before = server.peak_rss_kib()
    for path, with_key, chunked, expected in (
        ("/templates/tags", False, False, 401),
        ("/templates/tags", False, True, 401),
        ("/sandboxes", False, False, 401),
        ("/templates/tags", True, False, 413),
        ("/templates/tags", True, True, 413),
        ("/sandboxes", True, False, 413),
        ("/sandboxes", True, True, 413),
    ):
        status, error, took = _flood(server, path, key if with_key else None, chunked)
        assert (status, error["code"]) == (expected, expected), (path, with_key, chunked, error)
        assert took < 10, f"{path}: the answer took {took:.1f} s"
    grown = server.peak_rss_kib() - before
    assert grown < 16 * 1024, f"the server grew by {grown} KiB taking bodies it refused"
    # Nothing was made, and the server still answers.
    assert httpx.get(server.url + "/health").status_code == 200
    assert json.loads(server.cli("sandbox", "list", "--json").stdout) == []


def _slow_socket(server: BilikServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v2/sandboxes HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    return sock


def test_a_slowloris_does_not_starve_other_clients(server: BilikServer) -> None:
    """300 connections that each send a header byte every 2 s: others are answered at once,
    and the slow ones are cut off at the header timeout (10 s by default)."""
    server.start()
    slow = [_slow_socket(server) for _ in range(300)]
    started = time.monotonic()
    try:
        answered_in: list[float] = []
        closed: set[int] = set()
        while time.monotonic() - started < 25 and len(closed) < len(slow):
            t = time.monotonic()
            assert httpx.get(server.url + "/health", timeout=5).status_code == 200
            assert (
                Sandbox.list(
                    query=SandboxQuery(metadata={"suite": "slowloris"}), **_params(server)
                ).next_items()
                == []
            )
            answered_in.append(time.monotonic() - t)
            for i, sock in enumerate(slow):
                if i in closed:
                    continue
                readable, _, _ = select.select([sock], [], [], 0)
                try:
                    if readable:
                        answer = sock.recv(65536)
                        assert not answer or answer.startswith(b"HTTP/1.1 408"), answer
                        closed.add(i)
                    else:
                        sock.send(b"x")
                except (BrokenPipeError, ConnectionResetError):
                    closed.add(i)
            time.sleep(2)
        assert len(closed) == len(slow), f"{len(slow) - len(closed)} slow clients still held"
        # (a 10 s timeout, plus a round of the loop)
        assert time.monotonic() - started < 20
        assert max(answered_in) < 3, f"others waited up to {max(answered_in):.1f} s"
    finally:
        for sock in slow:
            sock.close()


def test_a_body_answered_unread_cannot_be_trickled_for_ever(server: BilikServer) -> None:
    """Refused before its body is read (no key here), a request whose client goes on sending a
    byte now and then, slower than any timeout of a body being read, is cut off all the same."""
    server.start()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /templates/tags HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{"
        )
        status, _ = _read_response(sock, b"", time.monotonic() + 10)
        assert status == 401
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while time.monotonic() - started < 20:
                sock.send(b" ")
                readable, _, _ = select.select([sock], [], [], 1)
                if readable and not sock.recv(65536):
                    break
        assert time.monotonic() - started < 10, "the connection was held for the whole trickle"


def test_connections_past_the_cap_get_a_json_503_until_slow_ones_time_out(
    server: BilikServer,
) -> None:
    server.extra_env.update({"BILIK_MAX_CONNECTIONS": "64", "BILIK_HEADER_TIMEOUT_S": "3"})
    server.start()
    held = [_slow_socket(server) for _ in range(80)]
    try:
        time.sleep(0.5)
        refused = httpx.get(server.url + "/health", timeout=5)
        assert refused.status_code == 503 and refused.json()["code"] == 503
        time.sleep(4)  # the header timeout frees them
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        for sock in held:
            sock.settimeout(1)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(65536).startswith(b"HTTP/1.1 408")
    finally:
        for sock in held:
            sock.close()


def _detail(server: BilikServer, key: str, sandbox_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/sandboxes/{sandbox_id}", headers={"X-API-Key": key})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _end_in(detail: dict[str, Any]) -> float:
    end = datetime.datetime.fromisoformat(detail["endAt"].replace("Z", "+00:00"))
    return end.timestamp() - time.time()


def test_timeout_and_connect_keep_the_keys_timeout_cap(server: BilikServer) -> None:
    server.start()
    short = _key(server, "--max-timeout", "60")
    headers = {"X-API-Key": short}
    made = httpx.post(
        server.url + "/v2/sandboxes",
        json={"templateID": "base", "timeout": 60},
        headers=headers,
        timeout=60,
    )
    assert made.status_code == 201, made.text
    sandbox_id = made.json()["sandboxID"]
    try:
        for path in ("timeout", "connect"):
            for prefix in ("", "/v2") if path == "connect" else ("",):
                refused = httpx.post(
                    f"{server.url}{prefix}/sandboxes/{sandbox_id}/{path}",
                    json={"timeout": 3000},
                    headers=headers,
                    timeout=30,
                )
                assert refused.status_code == 400, (path, refused.text)
                assert "than this key may" in refused.json()["message"]
        with pytest.raises(SandboxException):
            Sandbox.connect(sandbox_id, timeout=3000, **_params(server, short))
        with pytest.raises(SandboxException):
            Sandbox.set_timeout(sandbox_id, 3000, **_params(server, short))
        assert _end_in(_detail(server, short, sandbox_id)) <= 61
        # Within the cap, as before.
        Sandbox.set_timeout(sandbox_id, 50, **_params(server, short))
        assert 40 < _end_in(_detail(server, short, sandbox_id)) <= 51
    finally:
        server.cli("sandbox", "kill", sandbox_id)


def _request_build(server: BilikServer, key: str, name: str) -> tuple[str, str]:
    response = httpx.post(
        server.url + "/v3/templates",
        json={"name": name, "cpuCount": 1, "memoryMB": 512},
        headers={"X-API-Key": key},
    )
    assert response.status_code == 202, response.text
    return response.json()["templateID"], response.json()["buildID"]


def _start_build(server: BilikServer, key: str, template_id: str, build_id: str) -> httpx.Response:
    # (as the official SDK sends it; a word of its own, so that no layer is cached)
    spec = {
        "fromImage": "e2bdev/base",
        "force": False,
        "steps": [{"type": "RUN", "args": [f"echo {uuid.uuid4().hex}; sleep 3"], "force": False}],
    }
    return httpx.post(
        f"{server.url}/v2/templates/{template_id}/builds/{build_id}",
        json=spec,
        headers={"X-API-Key": key},
        timeout=30,
    )


def _wait_build(server: BilikServer, key: str, template_id: str, build_id: str) -> str:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = httpx.get(
            f"{server.url}/templates/{template_id}/builds/{build_id}/status",
            headers={"X-API-Key": key},
        ).json()["status"]
        if status in ("ready", "error"):
            return str(status)
        time.sleep(0.5)
    raise AssertionError("the build never finished")


def _create(server: BilikServer, key: str) -> httpx.Response:
    return httpx.post(
        server.url + "/v2/sandboxes",
        json={"templateID": "base", "timeout": 60},
        headers={"X-API-Key": key},
        timeout=60,
    )


def test_builds_count_against_the_keys_caps(server: BilikServer) -> None:
    server.start()
    made: list[str] = []
    templates: list[tuple[str, str]] = []
    try:
        # A key at its sandbox cap starts no build.
        one = _key(server, "--max-sandboxes", "1")
        first = _create(server, one)
        assert first.status_code == 201, first.text
        made.append(first.json()["sandboxID"])
        template_id, build_id = _request_build(server, one, "capped-build")
        templates.append((one, template_id))
        refused = _start_build(server, one, template_id, build_id)
        assert refused.status_code == 429 and refused.json()["code"] == 429, refused.text
        assert refused.headers["Should-Retry"] == "false"

        # Its build, once started, is one of its sandboxes until it ends.
        server.cli("sandbox", "kill", made.pop())
        started = _start_build(server, one, template_id, build_id)
        assert started.status_code == 202, started.text
        during = _create(server, one)
        assert during.status_code == 429, during.text
        other_id, other_build = _request_build(server, one, "capped-build-2")
        templates.append((one, other_id))
        assert _start_build(server, one, other_id, other_build).status_code == 429
        assert _wait_build(server, one, template_id, build_id) == "ready"
        after = _create(server, one)
        assert after.status_code == 201, after.text
        made.append(after.json()["sandboxID"])

        # A build's start is one of the key's creates of the minute.
        rate = _key(server, "--creates-per-minute", "1")
        template_id, build_id = _request_build(server, rate, "rated-build")
        templates.append((rate, template_id))
        assert _start_build(server, rate, template_id, build_id).status_code == 202
        late = _create(server, rate)
        assert late.status_code == 429 and "a minute" in late.json()["message"], late.text
        assert 0 < int(late.headers["Retry-After"]) <= 60
        _wait_build(server, rate, template_id, build_id)
    finally:
        for sandbox_id in made:
            server.cli("sandbox", "kill", sandbox_id)
        # (their layers can go once the templates do)
        for key, template_id in templates:
            httpx.delete(f"{server.url}/templates/{template_id}", headers={"X-API-Key": key})


_MALFORMED_IDS = [
    "..",
    "a" * 3000,
    "ñandbox123",
    "abcdefgh\n",
    "abcdefgh\x00",
    "abc def gh",
    "UPPERCASE1",
]
_BUILD_ID = "0b6bd3a1-8c44-4f86-a8e1-5d0d1f6e6f1e"


def _paths(bad: str, template_id: str) -> list[tuple[str, str, Any]]:
    b = urllib.parse.quote(bad, safe="").replace(".", "%2E")
    return [
        ("POST", f"/v2/templates/{template_id}/builds/{b}", {}),
        ("GET", f"/templates/{template_id}/builds/{b}/status", None),
        ("GET", f"/sandboxes/{b}", None),
        ("DELETE", f"/sandboxes/{b}", None),
        ("POST", f"/sandboxes/{b}/timeout", {"timeout": 10}),
        ("POST", f"/v2/sandboxes/{b}/connect", {}),
        ("GET", f"/sandboxes/{b}/logs", None),
        ("GET", f"/sandboxes/{b}/metrics", None),
        ("GET", f"/templates/{b}/tags", None),
        ("DELETE", f"/templates/{b}", None),
        ("GET", f"/templates/aliases/{b}", None),
        ("GET", f"/templates/base/builds/{b}/status", None),
        ("POST", f"/v2/templates/{b}/builds/{_BUILD_ID}", {"steps": []}),
        ("POST", "/v2/sandboxes", {"templateID": bad}),
        ("POST", "/v2/sandboxes", {"templateID": f"base:{bad}"}),
        ("POST", "/templates/tags", {"target": f"{bad}:default", "tags": ["t"]}),
        ("DELETE", "/templates/tags", {"name": bad, "tags": ["t"]}),
    ] + (
        # A new template's name and tags are trimmed and lowercased first, as E2B takes them:
        # only what is malformed after that is refused there.
        [
            ("POST", "/v3/templates", {"name": bad}),
            ("POST", "/v3/templates", {"name": "fine", "tags": [bad]}),
        ]
        if bad.strip().lower() == bad
        else []
    )


def test_malformed_ids_are_json_4xx(server: BilikServer) -> None:
    server.start()
    headers = {"X-API-Key": server.key}
    # (a template of the key's own, so that a build path reaches its build id)
    template_id, _ = _request_build(server, server.key, "mine")
    for bad in _MALFORMED_IDS:
        for method, path, body in _paths(bad, template_id):
            response = httpx.request(
                method, server.url + path, json=body, headers=headers, timeout=30
            )
            assert response.status_code in (400, 404), (method, path, response.text)
            error = response.json()
            assert error["code"] == response.status_code and error["message"], (path, error)
    listed = httpx.get(server.url + "/templates", headers=headers).json()
    assert [t["names"] for t in listed] == [["mine"]]  # no template of a malformed name
    httpx.delete(f"{server.url}/templates/{template_id}", headers=headers)


_MALFORMED_BODIES = [
    b'{"templateID": "base", "timeout": null}',
    b'{"templateID": "base", "timeout": "60"}',
    b'{"templateID": "base", "metadata": ""}',
    b'{"templateID": "base", "metadata": []}',
    b'{"templateID": "base", "envVars": 0}',
    b'{"templateID": "base", "network": false}',
    b'{"templateID": "base", "network": {"allowOut": ""}}',
    b'{"templateID": "base", "cpuCount": null}',
    b'{"templateID": "base", "timeout": ' + b"9" * 5000 + b"}",
    b'{"templateID": "base", "metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"templateID": ["base"]}',
    b"\xff\xfe",
]


def test_malformed_fields_are_400(server: BilikServer) -> None:
    server.start()
    headers = {"X-API-Key": server.key, "Content-Type": "application/json"}
    for body in _MALFORMED_BODIES:
        response = httpx.post(
            server.url + "/v2/sandboxes", content=body, headers=headers, timeout=30
        )
        assert response.status_code == 400, (body[:60], response.text)
        assert response.json()["code"] == 400
    assert json.loads(server.cli("sandbox", "list", "--json").stdout) == []
    sandbox_id = _create(server, server.key).json()["sandboxID"]
    try:
        for path in ("timeout", "connect"):
            response = httpx.post(
                f"{server.url}/sandboxes/{sandbox_id}/{path}",
                content=b'{"timeout": null}',
                headers=headers,
                timeout=30,
            )
            assert response.status_code == 400, (path, response.text)
    finally:
        server.cli("sandbox", "kill", sandbox_id)
