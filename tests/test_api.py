"""The control plane, driven by the official ``e2b`` SDK and by raw HTTP for bad input."""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from e2b import AsyncSandbox, AuthenticationException, Sandbox, SandboxException, SandboxQuery

from helpers import OLD_SDK_PYTHON
from server import BilikServer


@pytest.fixture(scope="module")
def shared_server() -> Iterator[BilikServer]:
    """One server for the many small requests below."""
    srv = BilikServer()
    srv.start()
    yield srv
    srv.finish()


def _params(server: BilikServer, key: str | None = None) -> dict[str, Any]:
    return {"api_key": key or server.key, "api_url": server.url, "sandbox_url": server.url}


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_server(request: pytest.FixtureRequest) -> Iterator[BilikServer]:
    """A server on the embedded SQLite, and one on PostgreSQL."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else ""
    srv = BilikServer(database_url=url)
    yield srv
    srv.finish()


def test_lifecycle_with_the_official_sdk(any_db_server: BilikServer) -> None:
    server = any_db_server
    server.start()
    params = _params(server)
    sbx = Sandbox.create("base", timeout=120, metadata={"suite": "api", "n": "1"}, **params)
    other = Sandbox.create("base", timeout=120, metadata={"suite": "api", "n": "2"}, **params)
    try:
        info = sbx.get_info()
        assert (info.sandbox_id, info.template_id, info.metadata) == (
            sbx.sandbox_id,
            "base",
            {"suite": "api", "n": "1"},
        )
        assert info.state == "running" and info.cpu_count == 1 and info.memory_mb == 512
        lifetime = info.end_at - info.started_at
        assert datetime.timedelta(seconds=115) < lifetime <= datetime.timedelta(seconds=121)

        sbx.set_timeout(30)
        assert sbx.get_info().end_at < info.end_at

        # Listing: metadata filter, and pagination one sandbox per page.
        only_one = Sandbox.list(query=SandboxQuery(metadata={"n": "2"}), **params).next_items()
        assert [s.sandbox_id for s in only_one] == [other.sandbox_id]
        pages = Sandbox.list(query=SandboxQuery(metadata={"suite": "api"}), limit=1, **params)
        seen = []
        while pages.has_next:
            seen += [s.sandbox_id for s in pages.next_items()]
        assert sorted(seen) == sorted([sbx.sandbox_id, other.sandbox_id])

        again = Sandbox.connect(sbx.sandbox_id, **params)
        assert again.sandbox_id == sbx.sandbox_id
        assert again.is_running()
        metrics = sbx.get_metrics()
        assert metrics and metrics[-1].mem_used > 0 and metrics[-1].cpu_count == 1
    finally:
        assert sbx.kill() is True
        assert Sandbox.kill(other.sandbox_id, **params) is True
    assert not sbx.is_running()
    assert Sandbox.kill(sbx.sandbox_id, **params) is False
    with pytest.raises(SandboxException):
        Sandbox.get_info(sbx.sandbox_id, **params)


def test_keys_see_only_their_own_sandboxes(server: BilikServer) -> None:
    server.start()
    stranger = server.cli("keys", "create", "--name", "stranger").stdout.strip()
    sbx = Sandbox.create("base", timeout=60, **_params(server))
    try:
        theirs = _params(server, stranger)
        assert Sandbox.list(**theirs).next_items() == []
        with pytest.raises(SandboxException):
            Sandbox.get_info(sbx.sandbox_id, **theirs)
        assert Sandbox.kill(sbx.sandbox_id, **theirs) is False
        assert sbx.get_info().state == "running"  # untouched by the stranger
    finally:
        sbx.kill()
    with pytest.raises(AuthenticationException):
        Sandbox.list(**_params(server, "e2b_" + "0" * 40)).next_items()


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("POST", "/v2/sandboxes", b"{not json", 400, "not valid JSON"),
        ("POST", "/v2/sandboxes", b"[]", 400, "JSON object"),
        ("POST", "/v2/sandboxes", b"{}", 400, "templateID is required"),
        ("POST", "/v2/sandboxes", b'{"templateID": "nope"}', 404, "template 'nope' not found"),
        ("POST", "/v2/sandboxes", b'{"templateID": "base", "timeout": -1}', 400, "timeout"),
        ("POST", "/v2/sandboxes", b'{"templateID": "base", "timeout": 99999}', 400, "timeout"),
        (
            "POST",
            "/v2/sandboxes",
            b'{"templateID": "base", "metadata": {"a": 1}}',
            400,
            "metadata must be an object of strings",
        ),
        (
            "POST",
            "/v2/sandboxes",
            json.dumps({"templateID": "base", "metadata": {"big": "x" * (10 << 20)}}).encode(),
            413,
            "larger than",
        ),
        ("GET", "/sandboxes/nosuchsandbox1", b"", 404, "not found"),
        ("DELETE", "/sandboxes/nosuchsandbox1", b"", 404, "not found"),
        ("GET", "/v2/sandboxes?limit=0", b"", 400, "limit"),
        ("GET", "/v2/sandboxes?state=weird", b"", 400, "state"),
        ("GET", "/no/such/route", b"", 404, "Not Found"),
    ],
)
def test_bad_requests_get_json_errors(
    shared_server: BilikServer, method: str, path: str, body: bytes, status: int, message: str
) -> None:
    server = shared_server
    headers = {"X-API-Key": server.key, "Content-Type": "application/json"}
    response = httpx.request(method, server.url + path, content=body, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["code"] == status and message in error["message"]
    # Nothing was made.
    assert json.loads(server.cli("sandbox", "list", "--json").stdout) == []


def test_missing_or_wrong_key_is_401_json(shared_server: BilikServer) -> None:
    server = shared_server
    for headers in ({}, {"X-API-Key": "e2b_" + "f" * 40}, {"X-API-Key": "garbage"}):
        response = httpx.get(server.url + "/v2/sandboxes", headers=headers)
        assert response.status_code == 401
        assert response.json()["code"] == 401


def _create(server: BilikServer, key: str, **body: Any) -> httpx.Response:
    return httpx.post(
        server.url + "/v2/sandboxes",
        headers={"X-API-Key": key},
        json={"templateID": "base", **body},
        timeout=60,
    )


def test_key_caps(shared_server: BilikServer) -> None:
    server = shared_server
    made: list[str] = []

    def key(*flags: str) -> str:
        return server.cli("keys", "create", "--name", "capped", *flags).stdout.strip()

    try:
        one_at_a_time = key("--max-sandboxes", "1")
        first = _create(server, one_at_a_time)
        made.append(first.json()["sandboxID"])
        second = _create(server, one_at_a_time)
        assert second.status_code == 429 and second.headers["Should-Retry"] == "false"
        assert second.json()["code"] == 429

        two_a_minute = key("--creates-per-minute", "2")
        for _ in range(2):
            made.append(_create(server, two_a_minute).json()["sandboxID"])
        third = _create(server, two_a_minute)
        assert third.status_code == 429 and 0 < int(third.headers["Retry-After"]) <= 60
        assert "2 sandboxes a minute" in third.json()["message"]

        short = key("--max-timeout", "60")
        too_long = _create(server, short, timeout=120)
        assert too_long.status_code == 400 and "than this key may" in too_long.json()["message"]

        small = key("--max-cpu", "1", "--max-memory-mb", "256")
        for asked in ({"cpuCount": 2, "memoryMB": 256}, {"memoryMB": 512}):
            refused = _create(server, small, **asked)
            assert refused.status_code == 400 and "than this key may" in refused.json()["message"]
        fits = _create(server, small, cpuCount=1, memoryMB=256)
        assert fits.status_code == 201, fits.text
        made.append(fits.json()["sandboxID"])
        detail = httpx.get(
            f"{server.url}/sandboxes/{made[-1]}", headers={"X-API-Key": small}
        ).json()
        assert (detail["cpuCount"], detail["memoryMB"]) == (1, 256)
        assert _create(server, server.key, cpuCount=64).status_code == 400  # the server's cap
        assert _create(server, server.key, memoryMB="lots").status_code == 400

        listed = json.loads(server.cli("keys", "list", "--json").stdout)
        caps = {
            (
                k["maxSandboxes"],
                k["createsPerMinute"],
                k["maxTimeout"],
                k["maxCpu"],
                k["maxMemoryMB"],
            )
            for k in listed
        }
        assert caps >= {
            (1, None, None, None, None),
            (None, 2, None, None, None),
            (None, None, 60, None, None),
            (None, None, None, 1, 256),
        }
    finally:
        for sandbox_id in made:
            server.cli("sandbox", "kill", sandbox_id)


def test_idempotent_create(shared_server: BilikServer) -> None:
    server = shared_server
    headers = {"X-API-Key": server.key, "Idempotency-Key": "job-42"}
    body = {"templateID": "base", "timeout": 60}
    first = httpx.post(server.url + "/v2/sandboxes", headers=headers, json=body, timeout=60)
    again = httpx.post(server.url + "/v2/sandboxes", headers=headers, json=body, timeout=60)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    sandbox_id = first.json()["sandboxID"]
    assert [r["sandboxId"] for r in json.loads(server.cli("sandbox", "list", "--json").stdout)] == [
        sandbox_id
    ]
    httpx.delete(f"{server.url}/sandboxes/{sandbox_id}", headers=headers)
    # Once its sandbox is gone, the same key makes a new one.
    fresh = httpx.post(server.url + "/v2/sandboxes", headers=headers, json=body, timeout=60)
    assert fresh.status_code == 201 and fresh.json()["sandboxID"] != sandbox_id
    httpx.delete(f"{server.url}/sandboxes/{fresh.json()['sandboxID']}", headers=headers)
    # Another key's identical Idempotency-Key is its own.
    other = server.cli("keys", "create").stdout.strip()
    theirs = httpx.post(
        server.url + "/v2/sandboxes",
        json=body,
        timeout=60,
        headers={"X-API-Key": other, "Idempotency-Key": "job-42"},
    )
    assert theirs.status_code == 201 and theirs.json()["sandboxID"] != fresh.json()["sandboxID"]
    httpx.delete(
        f"{server.url}/sandboxes/{theirs.json()['sandboxID']}", headers={"X-API-Key": other}
    )


def test_metrics_come_from_the_sandbox(shared_server: BilikServer) -> None:
    server = shared_server
    headers = {"X-API-Key": server.key}
    sandbox_id = _create(server, server.key, timeout=60).json()["sandboxID"]
    try:
        url = f"{server.url}/sandboxes/{sandbox_id}/metrics"
        idle = httpx.get(url, headers=headers, timeout=30).json()[0]
        assert idle["memTotal"] == 512 << 20 and idle["cpuCount"] == 1
        assert 0 < idle["diskUsed"] < idle["diskTotal"] <= 1 << 30
        server.cli(
            "sandbox",
            "exec",
            "--user",
            "root",
            sandbox_id,
            "--",
            "sh",
            "-c",
            "dd if=/dev/zero of=/fill bs=1M count=100 2>/dev/null; "
            "(timeout 5 sh -c 'while :; do :; done' >/dev/null 2>&1 &)",
        )
        # (a history: the spin shows in the sampler's next sample, 5 s on at most)
        time.sleep(6)
        history = httpx.get(url, headers=headers, timeout=30).json()
        busy = history[-1]
        assert max(m["cpuUsedPct"] for m in history) > 50, history
        assert busy["diskUsed"] >= idle["diskUsed"] + (90 << 20)
        assert busy["memUsed"] > 0 and busy["timestampUnix"] > 0
        assert (
            httpx.get(f"{server.url}/sandboxes/nosuchsandbox1/metrics", headers=headers).status_code
            == 404
        )
    finally:
        server.cli("sandbox", "kill", sandbox_id)


OLD_SDK_ROUND_TRIP = """
import os
from e2b import Sandbox
sbx = Sandbox.create("base", timeout=60, metadata={"sdk": "2.20"})
info = Sandbox.get_info(sbx.sandbox_id)
assert info.metadata == {"sdk": "2.20"}, info
sbx.set_timeout(30)
assert sbx.sandbox_id in [s.sandbox_id for s in Sandbox.list().next_items()]
assert sbx.kill() is True
print("ok")
"""


def test_older_sdk_round_trip(shared_server: BilikServer) -> None:
    """e2b 2.20 creates with POST /sandboxes (and checks keys' shape itself)."""
    env = {
        "E2B_API_URL": shared_server.url,
        "E2B_API_KEY": shared_server.key,
        "PATH": os.environ["PATH"],
    }
    run = subprocess.run(
        [str(OLD_SDK_PYTHON), "-c", OLD_SDK_ROUND_TRIP],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.stdout.strip() == "ok", run.stderr


async def test_lifecycle_with_the_async_sdk(shared_server: BilikServer) -> None:
    params = _params(shared_server)
    sbx = await AsyncSandbox.create("base", timeout=60, metadata={"flavour": "async"}, **params)
    try:
        info = await sbx.get_info()
        assert info.metadata == {"flavour": "async"} and info.state == "running"
        await sbx.set_timeout(30)
        assert (await sbx.get_info()).end_at < info.end_at
        paginator = AsyncSandbox.list(query=SandboxQuery(metadata={"flavour": "async"}), **params)
        assert [s.sandbox_id for s in await paginator.next_items()] == [sbx.sandbox_id]
        again = await AsyncSandbox.connect(sbx.sandbox_id, **params)
        assert again.sandbox_id == sbx.sandbox_id and await again.is_running()
        assert (await sbx.get_metrics())[-1].mem_total == 512 << 20
    finally:
        assert await sbx.kill() is True
    assert not await sbx.is_running()
    assert await AsyncSandbox.kill(sbx.sandbox_id, **params) is False


def test_logs_and_legacy_resume(shared_server: BilikServer) -> None:
    server = shared_server
    headers = {"X-API-Key": server.key}
    sandbox_id = _create(server, server.key, timeout=60).json()["sandboxID"]
    try:
        logs = httpx.get(f"{server.url}/sandboxes/{sandbox_id}/logs", headers=headers)
        assert logs.status_code == 200 and isinstance(logs.json()["logs"], list)
        resumed = httpx.post(
            f"{server.url}/sandboxes/{sandbox_id}/resume", headers=headers, json={"timeout": 60}
        )
        assert resumed.status_code == 409 and "already running" in resumed.json()["message"]
    finally:
        server.cli("sandbox", "kill", sandbox_id)
    gone = httpx.get(f"{server.url}/sandboxes/{sandbox_id}/logs", headers=headers)
    assert gone.status_code == 404


def test_concurrent_repeats_of_an_idempotent_create_make_one_sandbox(
    shared_server: BilikServer,
) -> None:
    server = shared_server
    headers = {"X-API-Key": server.key, "Idempotency-Key": "race-1"}

    def create() -> httpx.Response:
        return httpx.post(
            server.url + "/v2/sandboxes",
            headers=headers,
            timeout=60,
            json={"templateID": "base", "timeout": 60},
        )

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: create(), range(4)))
    ids = {a.json()["sandboxID"] for a in answers if a.status_code == 201}
    try:
        assert all(a.status_code in (201, 409) for a in answers), [a.text for a in answers]
        assert len(ids) == 1
        listed = json.loads(server.cli("sandbox", "list", "--json").stdout)
        assert [r["sandboxId"] for r in listed] == list(ids)
    finally:
        for sandbox_id in ids:
            server.cli("sandbox", "kill", sandbox_id)


def test_concurrent_creates_never_pass_the_cap(shared_server: BilikServer) -> None:
    server = shared_server
    capped = server.cli("keys", "create", "--max-sandboxes", "2").stdout.strip()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: _create(server, capped), range(6)))
    made = [a.json()["sandboxID"] for a in answers if a.status_code == 201]
    try:
        assert sorted(a.status_code for a in answers) == [201, 201, 429, 429, 429, 429]
    finally:
        for sandbox_id in made:
            server.cli("sandbox", "kill", sandbox_id)


def test_create_with_egress_rules(shared_server: BilikServer) -> None:
    server = shared_server
    params = _params(server)
    sbx = Sandbox.create(
        "base",
        timeout=60,
        allow_internet_access=False,
        network={"allow_out": ["198.51.100.0/24", "pypi.test"], "deny_out": ["192.0.2.0/24"]},
        **params,
    )
    try:
        assert sbx.get_info().state == "running"
    finally:
        sbx.kill()
    for network, fragment in (
        ({"allowOut": "1.1.1.1"}, "must be a list"),
        ({"denyOut": ["example.com"]}, "addresses and CIDRs only"),
        ({"allowOut": ["::1"]}, "no IPv6"),
        ("everything", "must be an object"),
    ):
        refused = _create(server, server.key, network=network)
        assert refused.status_code == 400 and fragment in refused.json()["message"], refused.text
