"""Warm pools: sandboxes made ahead, handed over to creates that ask for what they were made with.

Evidence that a create was answered from the pool is behavioural: the sandbox it got was
already running, in the pool, before the create was sent.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import Sandbox, SandboxException
from e2b_code_interpreter import Sandbox as CodeSandbox

from bilik.runtime.records import RecordStore
from server import SERVER_SETTINGS, BilikServer

RECORDS = RecordStore(SERVER_SETTINGS.data_dir / "sandboxes")


def _params(server: BilikServer, key: str | None = None) -> dict[str, Any]:
    return {"api_key": key or server.key, "api_url": server.url, "sandbox_url": server.url}


def _pooled(template: str = "base") -> list[str]:
    """Ids of the sandboxes waiting in the server's pool for ``template``."""
    return [
        r.sandbox_id
        for r in RECORDS.all()
        if r.pooled and (r.template == template or r.template.startswith(f"{template}:"))
    ]


def _wait_pooled(
    server: BilikServer, template: str = "base", timeout: float = 60, not_: str = ""
) -> str:
    """The id of the sandbox waiting ready in the pool (one other than ``not_``), once the
    server says one is ready (its pools keep one each here)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = httpx.get(f"{server.url}/health").json()["warmPool"].get(template, 0)
        waiting = [i for i in _pooled(template) if i != not_]
        if ready and len(waiting) == 1:
            return waiting[0]
        time.sleep(0.1)
    raise AssertionError(f"no {template} sandbox came into the pool within {timeout} s")


def _listed() -> set[str]:
    return {r.sandbox_id for r in RECORDS.all()}


def _create(server: BilikServer, key: str, **body: Any) -> httpx.Response:
    return httpx.post(
        server.url + "/v2/sandboxes",
        headers={"X-API-Key": key},
        json={"templateID": "base", "timeout": 60, **body},
        timeout=60,
    )


@pytest.fixture
def pool_server() -> Iterator[BilikServer]:
    """A server keeping one ``base`` sandbox ready (each test its own: a server of this
    instance runs alone)."""
    srv = BilikServer(warm_pool="base=1")
    srv.start()
    yield srv
    srv.finish()


def test_a_claimed_sandbox_works_and_no_one_else_sees_it(pool_server: BilikServer) -> None:
    server = pool_server
    stranger = server.cli("keys", "create", "--name", "stranger").stdout.strip()
    pooled = _wait_pooled(server)
    # Waiting in the pool, it is no key's: not listed, not found, not killed, not routed to.
    for key in (server.key, stranger):
        assert Sandbox.list(**_params(server, key)).next_items() == []
        with pytest.raises(SandboxException):
            Sandbox.get_info(pooled, **_params(server, key))
        assert Sandbox.kill(pooled, **_params(server, key)) is False
    probe = httpx.get(f"{server.url}/health", headers={"E2b-Sandbox-Id": pooled})
    assert probe.status_code == 502 and probe.json()["message"] == "The sandbox was not found"
    assert pooled in _pooled()

    sbx = Sandbox.create("base", timeout=120, metadata={"job": "7"}, **_params(server))
    try:
        assert sbx.sandbox_id == pooled  # the one that was waiting
        assert pooled not in _pooled()
        assert sbx.commands.run("echo hi from $(hostname)").stdout == f"hi from {pooled}\n"
        sbx.files.write("/tmp/note.txt", "kept")
        assert sbx.files.read("/tmp/note.txt") == "kept"
        info = sbx.get_info()
        assert info.metadata == {"job": "7"} and info.state == "running"
        # Its lifetime is the create's, counted from the hand-over.
        assert 110 <= (info.end_at - info.started_at).total_seconds() <= 130
        assert [s.sandbox_id for s in Sandbox.list(**_params(server)).next_items()] == [pooled]
        # Owned now, and by its creator only.
        assert Sandbox.list(**_params(server, stranger)).next_items() == []
        with pytest.raises(SandboxException):
            Sandbox.get_info(pooled, **_params(server, stranger))
        assert Sandbox.kill(pooled, **_params(server, stranger)) is False
        # The pool makes a successor.
        assert _wait_pooled(server, not_=pooled) != pooled
    finally:
        sbx.kill()
    assert Sandbox.list(**_params(server)).next_items() == []


def test_creates_that_ask_for_something_else_bypass_the_pool(pool_server: BilikServer) -> None:
    server = pool_server
    pooled = _wait_pooled(server)
    made = []
    try:
        for body in (
            {"envVars": {"GREETING": "hello"}},
            {"allow_internet_access": False},
            {"memoryMB": 256},
            {"cpuCount": 2},
            {"network": {"denyOut": ["10.99.0.0/16"]}},
        ):
            response = _create(server, server.key, **body)
            assert response.status_code == 201, response.text
            made.append(response.json()["sandboxID"])
            assert made[-1] != pooled, body
            assert _pooled() == [pooled], body  # still waiting, untouched
        sbx = Sandbox.connect(made[0], **_params(server))
        assert sbx.commands.run("echo $GREETING").stdout == "hello\n"
    finally:
        for sandbox_id in made:
            Sandbox.kill(sandbox_id, **_params(server))


def test_caps_and_idempotency_apply_to_claims(pool_server: BilikServer) -> None:
    server = pool_server
    capped = server.cli("keys", "create", "--max-sandboxes", "1").stdout.strip()
    pooled = _wait_pooled(server)
    headers = {"X-API-Key": capped, "Idempotency-Key": "pool-job"}
    body = {"templateID": "base", "timeout": 60}
    first = httpx.post(server.url + "/v2/sandboxes", headers=headers, json=body, timeout=60)
    again = httpx.post(server.url + "/v2/sandboxes", headers=headers, json=body, timeout=60)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json() and first.json()["sandboxID"] == pooled
    successor = _wait_pooled(server, not_=pooled)
    refused = _create(server, capped)
    assert refused.status_code == 429
    assert _pooled() == [successor]  # a refused create takes nothing from the pool
    Sandbox.kill(pooled, **_params(server, capped))


def test_racing_creates_get_one_pooled_sandbox_between_them(pool_server: BilikServer) -> None:
    server = pool_server
    pooled = _wait_pooled(server)
    with concurrent.futures.ThreadPoolExecutor(4) as workers:
        responses = list(workers.map(lambda _: _create(server, server.key), range(4)))
    ids = [r.json()["sandboxID"] for r in responses]
    try:
        assert all(r.status_code == 201 for r in responses)
        assert len(set(ids)) == 4 and ids.count(pooled) == 1
        for sandbox_id in ids:
            sbx = Sandbox.connect(sandbox_id, **_params(server))
            assert sbx.commands.run("hostname").stdout == f"{sandbox_id}\n"
    finally:
        for sandbox_id in ids:
            Sandbox.kill(sandbox_id, **_params(server))


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_a_pooled_sandbox_that_died_is_not_handed_over(pool_server: BilikServer) -> None:
    server = pool_server
    pooled = _wait_pooled(server)
    record = RECORDS.load(pooled)
    assert record is not None
    os.kill(record.init_pid, signal.SIGKILL)
    # (a SIGKILL takes effect a moment later: a create before that could rightly get it)
    deadline = time.monotonic() + 10
    while _alive(record.init_pid):
        assert time.monotonic() < deadline, "the pooled sandbox's init did not die"
        time.sleep(0.01)
    sbx = Sandbox.create("base", timeout=60, **_params(server))
    try:
        assert sbx.sandbox_id != pooled
        assert sbx.commands.run("echo alive").stdout == "alive\n"
        # The dead one is released, and a live one takes its place.
        deadline = time.monotonic() + 30
        while pooled in _listed():
            assert time.monotonic() < deadline, "the dead pool member was never released"
            time.sleep(0.1)
        _wait_pooled(server, not_=pooled)
    finally:
        sbx.kill()


def test_restart_releases_stale_pool_members_and_stop_leaves_none(server: BilikServer) -> None:
    server.warm_pool = "base=1"
    first = server.start()
    stale = _wait_pooled(server)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert stale in _pooled()  # a crash leaves it running, with no one to hand it to

    second = server.start()
    fresh = _wait_pooled(server, not_=stale)
    assert stale not in _listed()
    sbx = Sandbox.create("base", timeout=60, **_params(server))
    assert sbx.sandbox_id == fresh
    sbx.kill()
    _wait_pooled(server, not_=fresh)

    second.send_signal(signal.SIGINT)
    second.wait(timeout=30)
    rows = json.loads(server.cli("sandbox", "list", "--json").stdout)
    assert rows == []  # the pool's sandboxes went with the server


def test_code_interpreter_from_the_pool(server: BilikServer) -> None:
    server.warm_pool = "code-interpreter-v1=1"
    server.start()
    # Built beside the server; its pool fills once the template is there (never before).
    built = server.cli("template", "build-default", "code-interpreter-v1", check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    pooled = _wait_pooled(server, "code-interpreter-v1", timeout=120)
    with CodeSandbox.create(timeout=60, **_params(server)) as sbx:
        assert sbx.sandbox_id == pooled
        execution = sbx.run_code("1 + 1")
        assert execution.text == "2"
        assert execution.execution_count == 1  # the pool's warm-up ran no code of its own
        assert sbx.run_code("x = 40\nx + 2").text == "42"
        assert sbx.commands.run("echo $((6 * 7))").stdout == "42\n"
        contexts = sbx.list_code_contexts()
        assert sorted(c.language for c in contexts) == ["javascript", "python"]  # (E2B's two)
    # A create with envVars gets a sandbox of its own, the variables in its kernel.
    with CodeSandbox.create(timeout=60, envs={"ANSWER": "42"}, **_params(server)) as sbx:
        assert sbx.sandbox_id != pooled
        assert sbx.run_code("import os; os.environ['ANSWER']").text == "42"
