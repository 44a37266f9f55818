"""Create, kill, failure and recovery leave the host exactly as it was.

What every backend must do through the runtime interface is in ``runtime_conformance``; these
are the local runtime's own cases: its create's steps, its records, its server process.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import stat
import time

import pytest

from bilik.runtime import LocalRuntime, SandboxSpec, StepFailed, oci
from helpers import EACH_OCI_RUNTIME, SETTINGS, host_state, sandbox_traces
from server import SERVER_SETTINGS, BilikServer


async def test_failed_create_leaves_nothing_behind(
    runtime: LocalRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = host_state(SETTINGS)
    real_config = oci.config

    def broken_config(**kwargs: object) -> dict[str, object]:
        spec = real_config(**kwargs)  # type: ignore[arg-type]
        spec["process"]["args"] = ["/no/such/init"]  # type: ignore[index]
        return spec

    monkeypatch.setattr(oci, "config", broken_config)
    with pytest.raises(StepFailed) as failure:
        await runtime.create(SandboxSpec(sandbox_id="failedcreate01"))
    assert failure.value.step == "oci-start"
    assert "/no/such/init" in str(failure.value)
    assert host_state(SETTINGS) == before


async def test_cancelled_create_leaves_nothing_behind(runtime: LocalRuntime) -> None:
    before = host_state(SETTINGS)
    for delay in (0.001, 0.005, 0.01, 0.02, 0.03):
        task = asyncio.ensure_future(runtime.create(SandboxSpec()))
        await asyncio.sleep(delay)
        task.cancel()
        try:
            info = await task
        except asyncio.CancelledError:
            pass
        else:  # it finished before the cancel arrived
            await runtime.kill(info.sandbox_id)
        assert host_state(SETTINGS) == before


async def test_twenty_concurrent_creates_and_kills(runtime: LocalRuntime) -> None:
    before = host_state(SETTINGS)
    infos = await asyncio.gather(*(runtime.create(SandboxSpec()) for _ in range(20)))
    assert len({i.address for i in infos}) == 20
    outputs = await asyncio.gather(*(runtime.run(i.sandbox_id, ["hostname"]) for i in infos))
    assert [o.stdout.decode().strip() for o in outputs] == [i.sandbox_id for i in infos]
    await asyncio.gather(*(runtime.kill(i.sandbox_id) for i in infos))
    assert host_state(SETTINGS) == before


@EACH_OCI_RUNTIME
async def test_reconcile_releases_orphans(runtime: LocalRuntime, oci_runtime: str) -> None:
    """A sandbox whose record is lost, and a record whose container was killed behind the
    runtime's back, are both released."""
    before = host_state(SETTINGS)
    unrecorded = await runtime.create(SandboxSpec(), oci_runtime=oci_runtime)
    dead = await runtime.create(SandboxSpec(), oci_runtime=oci_runtime)
    (runtime.records.dir(unrecorded.sandbox_id) / "record.json").unlink()
    await runtime.oci(oci_runtime).kill(dead.sandbox_id)
    await asyncio.sleep(0.2)
    await runtime.reconcile()
    ids = {i.sandbox_id for i in await runtime.list()}
    assert unrecorded.sandbox_id not in ids and dead.sandbox_id not in ids
    assert not any(sandbox_traces(SETTINGS, unrecorded.sandbox_id).values())
    assert not any(sandbox_traces(SETTINGS, dead.sandbox_id).values())
    assert host_state(SETTINGS) == before


# -- a real server, SIGKILLed and started again ----------------------------------------------


@EACH_OCI_RUNTIME
def test_sigkilled_server_finds_its_sandboxes_again(server: BilikServer, oci_runtime: str) -> None:
    first = server.start()
    create = ("sandbox", "create", "--oci-runtime", oci_runtime, "--timeout")
    long_lived = server.cli(*create, "600").stdout.strip()
    short_lived = server.cli(*create, "4").stdout.strip()
    record = SERVER_SETTINGS.data_dir / "sandboxes" / short_lived / "record.json"
    end_at = json.loads(record.read_text())["end_at"]
    first.send_signal(signal.SIGKILL)
    first.wait()

    server.start()  # a new server process: reconciles, re-adopts, and resumes reaping
    listed = {
        row["sandboxId"]: row for row in json.loads(server.cli("sandbox", "list", "--json").stdout)
    }
    assert listed[long_lived]["state"] == "running"
    assert listed[long_lived]["runtime"] == oci_runtime
    assert (
        server.cli("sandbox", "exec", long_lived, "--", "echo", "still here").stdout
        == "still here\n"
    )
    # The short-lived sandbox keeps its end time across the restart and dies within 2 s of it
    # (its end counts from its create, however long the OCI runtime took to start it).
    while short_lived in server.cli("sandbox", "list", "--json").stdout:
        assert time.time() < end_at + 2.5, "sandbox outlived its end time"
        time.sleep(0.2)
    assert time.time() >= end_at
    server.cli("sandbox", "kill", long_lived)


def test_first_start_makes_one_key_and_keeps_it(server: BilikServer) -> None:
    first = server.start()
    key_file = SERVER_SETTINGS.data_dir / "api-key"
    key = key_file.read_text().strip()
    assert re.fullmatch(r"e2b_[0-9a-f]{40}", key)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    first.send_signal(signal.SIGINT)
    first.wait(timeout=30)
    server.start()  # a key exists now: no new one
    keys = json.loads(server.cli("keys", "list", "--json").stdout)
    assert [(k["name"], k["state"]) for k in keys] == [("default", "active")]
    assert key.startswith(keys[0]["prefix"]) and key_file.read_text().strip() == key
