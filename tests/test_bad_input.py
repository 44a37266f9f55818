"""Bad input gets a clear error and changes nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bilik.runtime import (
    InvalidSpec,
    Limits,
    LocalRuntime,
    SandboxExists,
    SandboxInfo,
    SandboxNotFound,
    SandboxSpec,
    StepFailed,
    TemplateNotFound,
)
from helpers import SETTINGS, host_state, run_ok


async def test_unknown_template(runtime: LocalRuntime) -> None:
    before = host_state(SETTINGS)
    with pytest.raises(TemplateNotFound, match="'no-such-template' not found"):
        await runtime.create(SandboxSpec(template="no-such-template"))
    assert host_state(SETTINGS) == before


@pytest.mark.parametrize(
    ("limits", "timeout", "message"),
    [
        (Limits(memory_mb=10 << 30), 300, "memory_mb must be between"),
        (Limits(memory_mb=1), 300, "memory_mb must be between"),
        (Limits(cpu=-1), 300, "cpu must be between"),
        (Limits(cpu=float("nan")), 300, "cpu must be a number"),
        (Limits(cpu=1000), 300, "cpu must be between"),
        (Limits(disk_mb=0), 300, "disk_mb must be between"),
        (Limits(disk_mb=1 << 40), 300, "disk_mb must be between"),
        (Limits(pids=0), 300, "pids must be between"),
        (Limits(), -5, "timeout must be between"),
        (Limits(), 10**9, "timeout must be between"),
    ],
)
async def test_absurd_limits(
    runtime: LocalRuntime, limits: Limits, timeout: float, message: str
) -> None:
    before = host_state(SETTINGS)
    with pytest.raises(InvalidSpec, match=message):
        await runtime.create(SandboxSpec(limits=limits, timeout_s=timeout))
    assert host_state(SETTINGS) == before


@pytest.mark.parametrize(
    "spec",
    [
        SandboxSpec(sandbox_id="../../etc"),
        SandboxSpec(sandbox_id="UPPER-case"),
        SandboxSpec(template="../escape"),
        SandboxSpec(env={"BAD NAME": "x"}),
        SandboxSpec(env={"NUL": "a\0b"}),
    ],
)
async def test_malformed_spec(runtime: LocalRuntime, spec: SandboxSpec) -> None:
    before = host_state(SETTINGS)
    with pytest.raises(InvalidSpec):
        await runtime.create(spec)
    assert host_state(SETTINGS) == before


async def test_duplicate_id_is_refused_and_the_original_keeps_running(
    runtime: LocalRuntime,
) -> None:
    info = await runtime.create(SandboxSpec(sandbox_id="duplicate0001"))
    try:
        await run_ok(runtime, info.sandbox_id, "echo first > /tmp/mark")
        with pytest.raises(SandboxExists):
            await runtime.create(SandboxSpec(sandbox_id="duplicate0001"))
        assert await run_ok(runtime, info.sandbox_id, "cat /tmp/mark") == "first\n"
    finally:
        await runtime.kill(info.sandbox_id)


async def test_unknown_sandbox(runtime: LocalRuntime) -> None:
    for call in (
        runtime.kill("nosuchsandbox1"),
        runtime.inspect("nosuchsandbox1"),
        runtime.run("nosuchsandbox1", ["true"]),
    ):
        with pytest.raises(SandboxNotFound):
            await call


async def test_bad_process_requests(runtime: LocalRuntime, sandbox: SandboxInfo) -> None:
    with pytest.raises(InvalidSpec, match="user 'nobody-here' does not exist"):
        await runtime.run(sandbox.sandbox_id, ["true"], user="nobody-here")
    with pytest.raises(InvalidSpec):
        await runtime.run(sandbox.sandbox_id, [])
    missing = await runtime.run(sandbox.sandbox_id, ["/no/such/binary"])
    assert missing.exit_code != 0 and b"/no/such/binary" in missing.stderr
    assert await run_ok(runtime, sandbox.sandbox_id, "echo fine") == "fine\n"


async def test_overlapping_subnet_is_refused(runtime: LocalRuntime) -> None:
    """A second instance on a subnet already in use fails clearly and takes nothing over."""
    from bilik.runtime.network import HostNetwork

    clash = HostNetwork("biltclash", SETTINGS.subnet)
    with pytest.raises(StepFailed, match=r"overlaps 10\.214\.0\.1/16 on biltest0"):
        await asyncio.to_thread(clash.ensure)
    assert not Path("/sys/class/net/biltclash0").exists()


async def test_calls_on_unknown_sandboxes_leave_no_trace(runtime: LocalRuntime) -> None:
    with pytest.raises(SandboxNotFound):
        await runtime.kill("nosuchsandbox2")
    assert not (runtime.state_root / "locks" / "nosuchsandbox2").exists()
