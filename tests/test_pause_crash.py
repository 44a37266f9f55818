"""A server killed at each step of a pause or a resume (``BILIK_FAULT=<point>``: the service's
own steps and the runtime's) and started again: the sandbox is running or paused with the same
id, what was acknowledged before is intact, it resumes and is killed, and nothing is left
behind (the server fixture's leak check). Killed as a snapshot or a fork begins (its record
made, the runtime not yet asked), the sandbox runs on with its files, and neither a half-made
snapshot nor a fork's child is left."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from e2b import Sandbox

from server import SERVER_SETTINGS, BilikServer

# (point, pause mode): the step's own mode where it has one.
PAUSE_POINTS = [
    ("pause:record", "full"),
    ("pause:intent", "full"),
    ("pause:freeze", "full"),
    ("pause:commit", "full"),
    ("pause:recorded", "full"),
    ("pause:record", "filesystem"),
    ("pause:freeze", "filesystem"),
    ("pause:syncfs", "filesystem"),
    ("pause:stop", "filesystem"),
    ("pause:commit", "filesystem"),
    ("pause:recorded", "filesystem"),
]
RESUME_POINTS = [
    ("resume:record", "full"),
    ("resume:intent", "full"),
    ("resume:thaw", "full"),
    ("resume:commit", "full"),
    ("resume:recorded", "full"),
    ("resume:record", "filesystem"),
    ("resume:intent", "filesystem"),
    ("resume:boot", "filesystem"),
    ("resume:envd", "filesystem"),
    ("resume:commit", "filesystem"),
    ("resume:recorded", "filesystem"),
]


@pytest.fixture(scope="module")
def server() -> Iterator[BilikServer]:
    srv = BilikServer()
    try:
        srv.start()
        yield srv
    finally:
        srv.extra_env.pop("BILIK_FAULT", None)
        srv.finish()


def restart(server: BilikServer, fault: str | None) -> None:
    """Stop the server (it may be dead already) and start it again, set to die at ``fault``."""
    proc = server.procs[-1]
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=30)
    if fault is None:
        server.extra_env.pop("BILIK_FAULT", None)
    else:
        server.extra_env["BILIK_FAULT"] = fault
    server.start()


def post(server: BilikServer, path: str, body: dict[str, Any]) -> int | None:
    """The status of a POST; None if the server died answering it."""
    try:
        got = httpx.post(
            server.url + path, json=body, headers={"X-API-Key": server.key}, timeout=60
        )
    except httpx.TransportError:
        return None
    return got.status_code


def check_settled(server: BilikServer, sandbox_id: str, fault: str) -> None:
    """After the crash and a restart: running or paused, same id, files whole; it resumes."""
    p = server.sdk_params()
    got = httpx.get(
        f"{server.url}/sandboxes/{sandbox_id}", headers={"X-API-Key": server.key}, timeout=30
    )
    assert got.status_code == 200, (fault, got.text)
    assert got.json()["state"] in ("running", "paused"), fault
    resumed = Sandbox.connect(sandbox_id, timeout=60, **p)
    assert resumed.sandbox_id == sandbox_id
    assert resumed.files.read("/home/user/acked.txt") == "acknowledged", fault
    assert resumed.commands.run("echo alive").stdout.strip() == "alive", fault
    resumed.kill()


@pytest.mark.parametrize(("fault", "mode"), PAUSE_POINTS)
def test_a_crash_mid_pause_settles(server: BilikServer, fault: str, mode: str) -> None:
    restart(server, fault)
    sbx = Sandbox.create("base", timeout=120, **server.sdk_params())
    sbx.files.write("/home/user/acked.txt", "acknowledged")
    status = post(server, f"/sandboxes/{sbx.sandbox_id}/pause", {"memory": mode == "full"})
    assert status is None, f"{fault}: the server did not die ({status})"
    assert server.procs[-1].wait(timeout=30) != 0
    restart(server, None)
    check_settled(server, sbx.sandbox_id, fault)


@pytest.mark.parametrize(("fault", "mode"), RESUME_POINTS)
def test_a_crash_mid_resume_settles(server: BilikServer, fault: str, mode: str) -> None:
    restart(server, fault)
    sbx = Sandbox.create("base", timeout=120, **server.sdk_params())
    sbx.files.write("/home/user/acked.txt", "acknowledged")
    assert sbx.pause(mode=mode) is True  # type: ignore[arg-type]
    status = post(server, f"/v2/sandboxes/{sbx.sandbox_id}/connect", {"timeout": 60})
    assert status is None, f"{fault}: the server did not die ({status})"
    assert server.procs[-1].wait(timeout=30) != 0
    restart(server, None)
    check_settled(server, sbx.sandbox_id, fault)


def test_a_paused_sandbox_is_killed_after_the_retention(server: BilikServer) -> None:
    server.extra_env["BILIK_PAUSED_RETENTION_S"] = "2"
    try:
        restart(server, None)
        sbx = Sandbox.create("base", timeout=120, **server.sdk_params())
        log = SERVER_SETTINGS.data_dir / "server.log"
        since = log.stat().st_size
        sbx.pause()
        deadline = time.monotonic() + 30
        while _exists(server, sbx.sandbox_id):
            assert time.monotonic() < deadline, "never killed"
            time.sleep(0.2)
        with open(log, "rb") as f:
            f.seek(since)
            said = f.read().decode(errors="replace")
        assert f"sandbox {sbx.sandbox_id} was kept paused" in said
    finally:
        server.extra_env.pop("BILIK_PAUSED_RETENTION_S")
        restart(server, None)


def _exists(server: BilikServer, sandbox_id: str) -> bool:
    got = httpx.get(
        f"{server.url}/sandboxes/{sandbox_id}", headers={"X-API-Key": server.key}, timeout=30
    )
    return got.status_code == 200


def crash_at(server: BilikServer, fault: str, path: str, body: dict[str, Any]) -> Sandbox:
    """A sandbox with an acknowledged file, and the server killed at ``fault`` by a POST to
    the sandbox's ``path``, then started again."""
    restart(server, fault)
    sbx = Sandbox.create("base", timeout=120, **server.sdk_params())
    sbx.files.write("/home/user/acked.txt", "acknowledged")
    status = post(server, path.format(sandbox_id=sbx.sandbox_id), body)
    assert status is None, f"{fault}: the server did not die ({status})"
    assert server.procs[-1].wait(timeout=30) != 0
    restart(server, None)
    return sbx


def check_runs_on(server: BilikServer, sandbox_id: str) -> Sandbox:
    """The sandbox runs (never paused by what was cut short) with its id and its files."""
    got = httpx.get(
        f"{server.url}/sandboxes/{sandbox_id}", headers={"X-API-Key": server.key}, timeout=30
    )
    assert got.status_code == 200, got.text
    assert got.json()["state"] == "running"
    sbx = Sandbox.connect(sandbox_id, timeout=60, **server.sdk_params())
    assert sbx.sandbox_id == sandbox_id
    assert sbx.files.read("/home/user/acked.txt") == "acknowledged"
    assert sbx.commands.run("echo alive").stdout.strip() == "alive"
    return sbx


def test_a_crash_mid_snapshot_leaves_no_snapshot(server: BilikServer) -> None:
    p = server.sdk_params()
    name = f"crash-{uuid.uuid4().hex[:8]}"
    sbx = crash_at(server, "snapshot:record", "/sandboxes/{sandbox_id}/snapshots", {"name": name})
    try:
        sbx = check_runs_on(server, sbx.sandbox_id)
        assert Sandbox.list_snapshots(**p).next_items() == []
        assert Sandbox.list_snapshots(sandbox_id=sbx.sandbox_id, **p).next_items() == []
        assert Sandbox.list_snapshots(name=name, **p).next_items() == []
        # The name is not held by what was cut short: a snapshot by it is taken now, whole.
        snap = sbx.create_snapshot(name=name)
        listed = Sandbox.list_snapshots(**p).next_items()
        assert [s.snapshot_id for s in listed] == [snap.snapshot_id]
        started = Sandbox.create(snap.snapshot_id, timeout=60, **p)
        try:
            assert started.files.read("/home/user/acked.txt") == "acknowledged"
        finally:
            started.kill()
        assert Sandbox.delete_snapshot(snap.snapshot_id, **p) is True
        assert Sandbox.list_snapshots(**p).next_items() == []
    finally:
        sbx.kill()


def test_a_crash_mid_fork_leaves_no_child(server: BilikServer) -> None:
    p = server.sdk_params()
    sbx = crash_at(
        server, "fork:record", "/sandboxes/{sandbox_id}/fork", {"count": 2, "timeout": 60}
    )
    try:
        sbx = check_runs_on(server, sbx.sandbox_id)
        listed = Sandbox.list(**p).next_items()
        assert [s.sandbox_id for s in listed] == [sbx.sandbox_id]
        # (nor the image the children would have been made from)
        images = SERVER_SETTINGS.data_dir / "images"
        assert list(images.glob(f"fork-{sbx.sandbox_id}-*")) == []
        # Nor is the sandbox held by what was cut short: a fork of it now is made, whole.
        (child,) = sbx.fork(count=1, timeout=60)
        assert isinstance(child, Sandbox), child
        try:
            assert child.sandbox_id != sbx.sandbox_id
            assert child.files.read("/home/user/acked.txt") == "acknowledged"
        finally:
            child.kill()
    finally:
        sbx.kill()
