"""Limits hold: memory, processes, disk and CPU, each contained to the sandbox that hits it."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from bilik.runtime import Limits, LocalRuntime, SandboxInfo, SandboxSpec, cgroups
from helpers import EACH_OCI_RUNTIME, SETTINGS, run_ok, wait_for

pytestmark = EACH_OCI_RUNTIME


@pytest_asyncio.fixture
async def small(runtime: LocalRuntime, oci_runtime: str) -> AsyncIterator[SandboxInfo]:
    info = await runtime.create(
        SandboxSpec(limits=Limits(cpu=0.25, memory_mb=128, disk_mb=64, pids=64), internet=False),
        oci_runtime=oci_runtime,
    )
    yield info
    await runtime.kill(info.sandbox_id)


async def _ends_alone(runtime: LocalRuntime, bombed: SandboxInfo) -> None:
    """gVisor has no OOM handling of its own (google/gvisor#1967): a bomb's processes are
    threads of its Sentry, which the host's OOM killer (or the pids limit) ends, and with it the
    whole sandbox. That sandbox alone: the host and every other sandbox carry on."""

    async def gone() -> bool:
        return not await runtime.is_running(bombed.sandbox_id)

    assert await wait_for(gone)
    assert subprocess.run(["true"]).returncode == 0
    other = await runtime.create(SandboxSpec(), oci_runtime="runsc")
    try:
        assert await run_ok(runtime, other.sandbox_id, "echo alive") == "alive\n"
    finally:
        await runtime.kill(other.sandbox_id)


async def test_memory_bomb_is_oom_killed_and_sandbox_survives(
    runtime: LocalRuntime, small: SandboxInfo, oci_runtime: str
) -> None:
    bomb = 'python3 -c "x = []\nwhile True: x.append(bytearray(16 << 20))"'
    result = await runtime.run(small.sandbox_id, ["sh", "-c", bomb])
    if oci_runtime == "runsc":
        await _ends_alone(runtime, small)
        return
    assert result.exit_code == 137, result
    assert await run_ok(runtime, small.sandbox_id, "echo alive") == "alive\n"
    memory = f"/sys/fs/cgroup/memory/{SETTINGS.instance}/{small.sandbox_id}"
    if os.path.exists(memory):
        assert Path(memory, "memory.limit_in_bytes").read_text().strip() == str(128 << 20)


async def test_fork_bomb_hits_pids_max_and_host_is_unaffected(
    runtime: LocalRuntime, small: SandboxInfo, oci_runtime: str
) -> None:
    script = (
        "import os, signal, time\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30); os._exit(0)\n"
        "        n += 1\n"
        "except BlockingIOError:\n"
        "    print(n, flush=True)\n"
        "os.killpg(0, signal.SIGKILL)\n"
    )
    result = await runtime.run(small.sandbox_id, ["setsid", "python3", "-c", script])
    if oci_runtime == "runsc":
        await _ends_alone(runtime, small)
        return
    forked = int(result.stdout.split()[0])
    assert 0 < forked < 64
    # The host still forks freely, and the sandbox recovers once the bomb is gone.
    assert subprocess.run(["true"]).returncode == 0
    assert await run_ok(runtime, small.sandbox_id, "echo alive") == "alive\n"


async def test_filling_the_disk_ends_in_enospc(runtime: LocalRuntime, small: SandboxInfo) -> None:
    result = await runtime.run(
        small.sandbox_id, ["dd", "if=/dev/zero", "of=/big", "bs=1M", "count=200"]
    )
    assert result.exit_code != 0
    assert b"No space left on device" in result.stderr
    image = SETTINGS.data_dir / "sandboxes" / small.sandbox_id / "disk.img"
    assert image.stat().st_blocks * 512 <= 64 << 20
    # /tmp is on the same capped disk; removing the file frees the space again.
    await run_ok(runtime, small.sandbox_id, "rm /big && echo ok > /tmp/after")


async def test_busy_loop_gets_its_cpu_share(runtime: LocalRuntime, small: SandboxInfo) -> None:
    """Measured on the host, from the sandbox's cgroup (gVisor's own clocks count a throttled
    Sentry's time as run time)."""
    script = "import time\nw0 = time.monotonic()\nwhile time.monotonic() - w0 < 2: pass\n"
    before = cgroups.usage(SETTINGS.instance, small.sandbox_id)["cpu_usage_ns"]
    started = time.monotonic()
    await run_ok(runtime, small.sandbox_id, f'python3 -c "{script}"')
    elapsed = time.monotonic() - started
    used = cgroups.usage(SETTINGS.instance, small.sandbox_id)["cpu_usage_ns"] - before
    share = used / 1e9 / elapsed
    assert 0.1 < share < 0.45, f"a 0.25-CPU sandbox got {share:.2f} of a CPU"
