"""Pause, resume and E2B's lifecycle (pause at the timeout, resume on traffic) through the
official ``e2b`` SDK: what a pause keeps (memory: files and running processes; filesystem:
files only, a fresh boot), how a paused sandbox shows (state, lifecycle, how it is kept),
what reaches it (only a connect, unless traffic resumes it), that time paused is not counted,
and the answers to what cannot be done."""

from __future__ import annotations

import datetime
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from e2b import (
    NotFoundException,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxQuery,
    SandboxState,
    TimeoutException,
)
from e2b_code_interpreter import Sandbox as CodeSandbox

from server import SERVER_SETTINGS, BilikServer, code_interpreter_server

SERVER_LOG = SERVER_SETTINGS.data_dir / "server.log"
# A counter the sandbox keeps writing: proves its processes went on (or not) over a pause.
# (each count written whole: a reader never meets a file half written)
TICKER = (
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/t.new; mv /tmp/t.new /tmp/ticks; "
    "sleep 0.05; done"
)


@pytest.fixture(scope="module")
def server() -> Iterator[BilikServer]:
    with code_interpreter_server() as srv:
        yield srv


def api(server: BilikServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(
        method, server.url + path, headers={"X-API-Key": server.key}, timeout=60, **kwargs
    )


def detail(server: BilikServer, sandbox_id: str) -> dict[str, Any]:
    got = api(server, "GET", f"/sandboxes/{sandbox_id}")
    assert got.status_code == 200, got.text
    body: dict[str, Any] = got.json()
    return body


def wait_state(server: BilikServer, sandbox_id: str, state: str, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while detail(server, sandbox_id)["state"] != state:
        assert time.monotonic() < deadline, f"{sandbox_id} never became {state}"
        time.sleep(0.2)


def ends_in(server: BilikServer, sandbox_id: str) -> float:
    end = datetime.datetime.fromisoformat(
        detail(server, sandbox_id)["endAt"].replace("Z", "+00:00")
    )
    return end.timestamp() - time.time()


def ticks(sbx: Sandbox) -> int:
    return int(sbx.commands.run("cat /tmp/ticks").stdout.strip())


def test_memory_pause_keeps_files_and_running_processes(server: BilikServer) -> None:
    p = server.sdk_params()
    sbx = Sandbox.create("base", timeout=120, **p)
    try:
        sbx.files.write("/tmp/kept.txt", "before the pause")
        ticker = sbx.commands.run(TICKER, background=True)
        time.sleep(0.3)
        assert sbx.pause() is True
        assert sbx.pause() is False  # (paused already: E2B's 409)
        info = sbx.get_info()
        assert info.state == SandboxState.PAUSED
        shown = detail(server, sbx.sandbox_id)
        assert shown["pauseMode"] == "full"
        assert shown["bilikPause"]["memory"] is True
        assert shown["bilikPause"]["mechanism"] in ("freezer", "checkpoint")
        assert isinstance(shown["bilikPause"]["durable"], bool)
        # Without auto-resume, nothing reaches a paused sandbox: the proxy says it is gone.
        with pytest.raises(TimeoutException, match="paused"):
            sbx.files.read("/tmp/kept.txt")
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=60, **p)
        assert resumed.sandbox_id == sbx.sandbox_id
        assert resumed.files.read("/tmp/kept.txt") == "before the pause"
        # The same process runs on, counting.
        assert resumed.commands.run(f"kill -0 {ticker.pid}").exit_code == 0
        first = ticks(resumed)
        time.sleep(0.3)
        assert ticks(resumed) > first
        assert resumed.get_info().state == SandboxState.RUNNING
    finally:
        sbx.kill()


def test_filesystem_pause_keeps_files_and_boots_afresh(server: BilikServer) -> None:
    p = server.sdk_params()
    sbx = Sandbox.create("base", timeout=120, **p)
    try:
        sbx.files.write("/home/user/kept.txt", "files only")
        sbx.commands.run("sync")
        ticker = sbx.commands.run(TICKER, background=True)
        assert sbx.pause(mode="filesystem") is True
        shown = detail(server, sbx.sandbox_id)
        assert shown["state"] == "paused"
        assert shown["pauseMode"] == "filesystem"
        assert shown["bilikPause"] == {**shown["bilikPause"], "memory": False, "durable": True}
        resumed = Sandbox.connect(sbx.sandbox_id, **p)
        assert resumed.files.read("/home/user/kept.txt") == "files only"
        # A fresh boot: the process that ran is gone.
        assert (
            resumed.commands.run(f"kill -0 {ticker.pid} 2>/dev/null || echo gone").stdout.strip()
            == "gone"
        )
    finally:
        sbx.kill()


def test_code_interpreter_keeps_its_variables_over_a_memory_pause(server: BilikServer) -> None:
    p = server.sdk_params()
    sbx = CodeSandbox.create(timeout=120, **p)
    try:
        context = sbx.create_code_context()
        sbx.run_code("secret = 6 * 7", context=context)
        assert sbx.pause() is True
        resumed = CodeSandbox.connect(sbx.sandbox_id, **p)
        result = resumed.run_code("secret", context=context)
        assert result.text == "42"
    finally:
        sbx.kill()


def test_listed_by_state_and_killed_while_paused(server: BilikServer) -> None:
    p = server.sdk_params()
    tag = uuid.uuid4().hex
    running = Sandbox.create("base", timeout=120, metadata={"suite": tag}, **p)
    paused = Sandbox.create("base", timeout=120, metadata={"suite": tag}, **p)
    try:
        paused.pause()

        def listed(*states: SandboxState) -> set[str]:
            query = SandboxQuery(metadata={"suite": tag}, state=list(states) or None)
            pages = Sandbox.list(query=query, **p)
            seen: set[str] = set()
            while pages.has_next:
                seen |= {s.sandbox_id for s in pages.next_items()}
            return seen

        assert listed(SandboxState.PAUSED) == {paused.sandbox_id}
        assert listed(SandboxState.RUNNING) == {running.sandbox_id}
        assert listed() == {paused.sandbox_id, running.sandbox_id}
        v1 = api(server, "GET", "/sandboxes").json()
        states = {s["sandboxID"]: s["state"] for s in v1}
        assert states[paused.sandbox_id] == "paused"
        # Metrics of a paused one: none while paused (as E2B's).
        assert paused.get_metrics() == []
        assert Sandbox.kill(paused.sandbox_id, **p) is True
        assert paused.sandbox_id not in listed()
        with pytest.raises(SandboxNotFoundException):
            Sandbox.connect(paused.sandbox_id, **p)
    finally:
        running.kill()
        Sandbox.kill(paused.sandbox_id, **p)


def test_a_paused_sandbox_does_not_count_toward_the_running_cap(server: BilikServer) -> None:
    p = server.sdk_params()
    made = server.cli("keys", "create", "--name", "capped", "--max-sandboxes", "1", check=False)
    if made.returncode != 0:
        pytest.skip(f"no capped key from the CLI here: {made.stderr}")
    key = made.stdout.strip().split()[-1]
    capped = {**p, "api_key": key}
    first = Sandbox.create("base", timeout=60, **capped)
    try:
        with pytest.raises(SandboxException):
            Sandbox.create("base", timeout=60, **capped).kill()
        first.pause()
        second = Sandbox.create("base", timeout=60, **capped)
        second.kill()
    finally:
        first.kill()


def test_pause_at_the_timeout_then_connect(server: BilikServer) -> None:
    p = server.sdk_params()
    sbx = Sandbox.create(
        "base", timeout=3, lifecycle={"on_timeout": "pause", "auto_resume": False}, **p
    )
    try:
        sbx.files.write("/tmp/kept.txt", "kept over the timeout")
        assert sbx.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": False}
        wait_state(server, sbx.sandbox_id, "paused")
        assert detail(server, sbx.sandbox_id)["pauseMode"] == "full"
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=30, **p)
        assert resumed.files.read("/tmp/kept.txt") == "kept over the timeout"
        assert 20 < ends_in(server, sbx.sandbox_id) <= 31
    finally:
        sbx.kill()


def test_filesystem_pause_at_the_timeout(server: BilikServer) -> None:
    p = server.sdk_params()
    sbx = Sandbox.create(
        "base", timeout=3, lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}}, **p
    )
    try:
        sbx.files.write("/home/user/kept.txt", "on disk")
        sbx.commands.run("sync")
        wait_state(server, sbx.sandbox_id, "paused")
        assert detail(server, sbx.sandbox_id)["pauseMode"] == "filesystem"
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=30, **p)
        assert resumed.files.read("/home/user/kept.txt") == "on disk"
    finally:
        sbx.kill()


def test_auto_resume_by_a_plain_command(server: BilikServer) -> None:
    p = server.sdk_params()
    sbx = Sandbox.create(
        "base", timeout=3, lifecycle={"on_timeout": "pause", "auto_resume": True}, **p
    )
    try:
        sbx.files.write("/tmp/kept.txt", "resumed by traffic")
        ticker = sbx.commands.run(TICKER, background=True)
        wait_state(server, sbx.sandbox_id, "paused")
        # The SDK object made before the pause just goes on: its request resumes the sandbox.
        assert sbx.commands.run("cat /tmp/kept.txt").stdout == "resumed by traffic"
        assert sbx.commands.run(f"kill -0 {ticker.pid}").exit_code == 0
        assert detail(server, sbx.sandbox_id)["state"] == "running"
        assert sbx.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": True}
    finally:
        sbx.kill()


def test_time_paused_is_not_counted(server: BilikServer) -> None:
    p = server.sdk_params()
    sbx = Sandbox.create("base", timeout=8, **p)
    try:
        sbx.pause()
        time.sleep(10)  # (past the end it had: a paused sandbox is not reaped)
        assert detail(server, sbx.sandbox_id)["state"] == "paused"
        Sandbox.connect(sbx.sandbox_id, timeout=40, **p)
        assert 30 < ends_in(server, sbx.sandbox_id) <= 41
        # A legacy resume of a running one is 409; a connect to it only extends (200).
        assert (
            api(server, "POST", f"/sandboxes/{sbx.sandbox_id}/resume", json={}).status_code == 409
        )
        again = api(server, "POST", f"/v2/sandboxes/{sbx.sandbox_id}/connect", json={"timeout": 50})
        assert again.status_code == 200, again.text
        # A legacy resume of a paused one: 201.
        sbx.pause()
        legacy = api(server, "POST", f"/sandboxes/{sbx.sandbox_id}/resume", json={"timeout": 30})
        assert legacy.status_code == 201, legacy.text
        assert legacy.json()["sandboxID"] == sbx.sandbox_id
    finally:
        sbx.kill()


def test_what_cannot_be_done_is_refused(server: BilikServer) -> None:
    p = server.sdk_params()
    missing = "i" + uuid.uuid4().hex[:19]
    with pytest.raises(SandboxNotFoundException):
        Sandbox.pause(missing, **p)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(missing, **p)
    assert api(server, "POST", f"/sandboxes/{missing}/resume", json={}).status_code == 404
    # A create that asks for what cannot be: auto-resume of a files-only pause, a mode without
    # a pause, an unknown field of the lifecycle.
    for bad in (
        {"autoPause": True, "autoPauseMemory": False, "autoResume": {"enabled": True}},
        {"autoPause": False, "autoResume": {"enabled": True}},
        {"autoPause": False, "autoPauseMemory": True},
        {"autoPause": "yes"},
        {"lifecycle": {"onTimeout": "hibernate"}},
        {"lifecycle": {"onTimeout": {"action": "kill", "mode": "full"}}},
        {"lifecycle": {"onTimeout": "pause", "sleep": 1}},
        {"lifecycle": {"onTimeout": "pause"}, "autoPause": False},
    ):
        got = api(server, "POST", "/sandboxes", json={"templateID": "base", **bad})
        assert got.status_code == 400, (bad, got.text)
        assert set(got.json()) == {"code", "message"}
    sbx = Sandbox.create("base", timeout=60, **p)
    try:
        for path, body in (
            ("pause", {"memory": "no"}),
            ("pause", {"memory": True, "keep": 1}),
            ("fork", {"count": 0}),
            ("fork", {"count": 21}),
            ("snapshots", {"name": 3}),
            ("snapshots", {"name": "Not A Name!"}),
        ):
            got = api(server, "POST", f"/sandboxes/{sbx.sandbox_id}/{path}", json=body)
            assert got.status_code == 400, (path, body, got.text)
        connect = api(server, "POST", f"/v2/sandboxes/{sbx.sandbox_id}/connect", json={"memory": 1})
        assert connect.status_code == 400
        # A pause with its memory cannot be resumed with a fresh boot here: said so.
        sbx.pause()
        reboot = api(
            server, "POST", f"/v2/sandboxes/{sbx.sandbox_id}/connect", json={"memory": False}
        )
        assert reboot.status_code == 400 and "memory" in reboot.json()["message"]
        # What needs it running answers 409 while it is paused.
        assert (
            api(
                server, "POST", f"/sandboxes/{sbx.sandbox_id}/timeout", json={"timeout": 30}
            ).status_code
            == 409
        )
    finally:
        sbx.kill()
    with pytest.raises(NotFoundException):
        Sandbox.pause(sbx.sandbox_id, **p)


def test_bilik_sdk_pause_resume_fork_and_snapshots(server: BilikServer) -> None:
    import asyncio

    from bilik.sdk import AsyncSandbox
    from bilik.sdk import Sandbox as BilikSandbox

    opts = {"api_key": server.key, "api_url": server.url}
    sbx = BilikSandbox.create(
        "base", timeout=60, lifecycle={"on_timeout": "pause", "auto_resume": True}, **opts
    )
    children: list[Any] = []
    try:
        info = sbx.get_info()
        assert info.lifecycle == {"on_timeout": "pause", "auto_resume": True}
        sbx.files.write("/home/user/note.txt", "bilik sdk")
        assert sbx.pause() is True
        assert sbx.pause() is False
        assert BilikSandbox.get_info(sbx.sandbox_id, **opts).state == "paused"
        assert BilikSandbox.get_info(sbx.sandbox_id, **opts).pause_mode == "full"
        # Auto-resume: the next request resumes it.
        assert sbx.files.read("/home/user/note.txt") == "bilik sdk"
        sbx.pause(mode="filesystem")
        again = BilikSandbox.connect(sbx.sandbox_id, timeout=60, **opts)
        assert again.files.read("/home/user/note.txt") == "bilik sdk"
        snap = sbx.create_snapshot(name=f"bsdk-{uuid.uuid4().hex[:8]}")
        listed = BilikSandbox.list_snapshots(sandbox_id=sbx.sandbox_id, **opts).next_items()
        assert [s.snapshot_id for s in listed] == [snap.snapshot_id]
        forked = sbx.fork(count=1, timeout=60)
        assert all(isinstance(c, BilikSandbox) for c in forked)
        children += forked
        assert forked[0].files.read("/home/user/note.txt") == "bilik sdk"

        async def async_side() -> None:
            paused = await AsyncSandbox.pause(sbx.sandbox_id, **opts)
            assert paused is True
            resumed = await AsyncSandbox.connect(sbx.sandbox_id, **opts)
            assert await resumed.files.read("/home/user/note.txt") == "bilik sdk"
            assert await AsyncSandbox.delete_snapshot(snap.snapshot_id, **opts) is True

        asyncio.run(async_side())
        assert BilikSandbox.delete_snapshot(snap.snapshot_id, **opts) is False
    finally:
        for child in children:
            child.kill()
        sbx.kill()


def test_cli_pause_resume_snapshot_fork(
    server: BilikServer, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse
    import asyncio

    from bilik import cli_lifecycle

    parser = argparse.ArgumentParser(prog="bilik sandbox")
    cli_lifecycle.add_commands(parser.add_subparsers(dest="action", required=True))
    conn = ["--url", server.url, "--key", server.key]

    def bilik(*argv: str) -> tuple[int, str, str]:
        args = parser.parse_args([*argv, *conn])
        code = asyncio.run(args.func(args))
        out, err = capsys.readouterr()
        return code, out, err

    p = server.sdk_params()
    sbx = Sandbox.create("base", timeout=60, **p)
    children: list[str] = []
    try:
        sbx.files.write("/home/user/cli.txt", "from the cli")
        code, out, _ = bilik("pause", sbx.sandbox_id)
        assert (code, out.strip()) == (0, sbx.sandbox_id)
        assert detail(server, sbx.sandbox_id)["state"] == "paused"
        code, _, err = bilik("pause", sbx.sandbox_id)
        assert code == 1 and "paused already" in err
        code, out, _ = bilik("resume", sbx.sandbox_id, "--timeout", "60")
        assert (code, out.strip()) == (0, sbx.sandbox_id)
        assert detail(server, sbx.sandbox_id)["state"] == "running"
        code, out, _ = bilik("pause", sbx.sandbox_id, "--files-only")
        assert code == 0 and detail(server, sbx.sandbox_id)["pauseMode"] == "filesystem"
        bilik("resume", sbx.sandbox_id)
        code, out, _ = bilik("snapshot", sbx.sandbox_id, "--name", f"cli-{uuid.uuid4().hex[:8]}")
        assert code == 0
        snapshot_id = out.strip()
        code, out, _ = bilik("fork", sbx.sandbox_id, "--count", "2")
        children = out.split()
        assert code == 0 and len(children) == 2
        child = Sandbox.connect(children[0], **p)
        assert child.files.read("/home/user/cli.txt") == "from the cli"
        assert Sandbox.delete_snapshot(snapshot_id, **p) is True
        code, _, err = bilik("pause", "i" + uuid.uuid4().hex[:19])
        assert code == 1 and err.startswith("bilik: ")
    finally:
        for child_id in children:
            Sandbox.kill(child_id, **p)
        sbx.kill()
