"""gVisor (runsc) sandboxes: the same bundle under a user-space kernel.

Debian's runsc (a build of December 2022) serves the sandbox from its own kernel, the Sentry, so
several checks read differently than under crun: mounts and user namespaces are emulated inside
the Sentry rather than refused, and it rejects the statx flags of bookworm's coreutils (``ls``
and ``stat`` fail with EINVAL), which is why these checks use Python and the shell.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from bilik.runtime import Limits, LocalRuntime, SandboxInfo, SandboxSpec
from helpers import run_ok


@pytest_asyncio.fixture
async def gvisor(runtime: LocalRuntime) -> AsyncIterator[SandboxInfo]:
    info = await runtime.create(SandboxSpec(limits=Limits(memory_mb=256)), oci_runtime="runsc")
    yield info
    await runtime.kill(info.sandbox_id)


async def test_runs_processes_as_root_and_user(runtime: LocalRuntime, gvisor: SandboxInfo) -> None:
    assert await run_ok(runtime, gvisor.sandbox_id, "id -u; hostname") == (
        f"0\n{gvisor.sandbox_id}\n"
    )
    out = await run_ok(runtime, gvisor.sandbox_id, "id -un; echo $HOME; echo x > ~/f", user="user")
    assert out.splitlines() == ["user", "/home/user"]


async def test_host_is_out_of_sight(runtime: LocalRuntime, gvisor: SandboxInfo) -> None:
    marker = Path("/tmp") / f"bilik-marker-{uuid.uuid4().hex}"
    marker.write_text("secret")
    try:
        result = await runtime.run(gvisor.sandbox_id, ["cat", str(marker)])
        assert result.exit_code != 0
        pids = await run_ok(
            runtime, gvisor.sandbox_id, "python3 -c \"import os; print(os.listdir('/proc'))\""
        )
        assert str(os.getpid()) not in pids
    finally:
        marker.unlink()


async def test_kernel_interfaces_are_refused(runtime: LocalRuntime, gvisor: SandboxInfo) -> None:
    script = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print([libc.syscall(nr, 0, 0, 0, 0) for nr in (175, 313, 246, 321)])\n"
    )
    out = await run_ok(runtime, gvisor.sandbox_id, f'python3 -c "{script}"')
    assert out.strip() == "[-1, -1, -1, -1]"


async def test_memory_limit(runtime: LocalRuntime, gvisor: SandboxInfo) -> None:
    bomb = 'python3 -c "x = []\nwhile True: x.append(bytearray(16 << 20))"'
    result = await runtime.run(gvisor.sandbox_id, ["sh", "-c", bomb])
    assert result.exit_code != 0


async def test_egress_filter_applies(
    runtime: LocalRuntime, gvisor: SandboxInfo, internet: dict[str, str]
) -> None:
    def fetch(url: str) -> list[str]:
        return [
            "python3",
            "-c",
            f"import urllib.request; print(urllib.request.urlopen('{url}', timeout=2).status)",
        ]

    ok = await runtime.run(gvisor.sandbox_id, fetch(f"http://{internet['public']}:8080/"))
    assert ok.stdout.strip() == b"200", ok
    blocked = await runtime.run(gvisor.sandbox_id, fetch(f"http://{internet['private']}:8080/"))
    assert blocked.exit_code != 0
    host = await runtime.run(gvisor.sandbox_id, fetch("http://10.214.0.1:22/"))
    assert host.exit_code != 0


async def test_a_template_can_choose_gvisor(runtime: LocalRuntime) -> None:
    """A template's image names its OCI runtime; creates follow it unless they name another."""
    base = await asyncio.to_thread(runtime.image, "base", oci_runtime="runsc")
    runtime.layers.save_image(dataclasses.replace(base, name="test-gvisor", oci_runtime="runsc"))
    try:
        info = await runtime.create(SandboxSpec(template="test-gvisor"))
        try:
            assert info.oci_runtime == "runsc"
            kernel = await run_ok(runtime, info.sandbox_id, "dmesg | head -1")
            assert "gVisor" in kernel
        finally:
            await runtime.kill(info.sandbox_id)
    finally:
        runtime.layers.remove_image("test-gvisor")
