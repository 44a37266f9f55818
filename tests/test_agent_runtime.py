"""What every sandbox gets from the host at /.bilik, whatever its image: PID 1, a shell, and a
Python for in-sandbox agents."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator

import pytest_asyncio

from bilik.runtime import LocalRuntime, SandboxInfo, SandboxSpec
from bilik.runtime.fsutil import shift_owners
from bilik.runtime.layers import Image
from helpers import SETTINGS, run_ok

PROBE = (
    "import asyncio, json, socket, ssl, sqlite3, sys; "
    'print(sys.prefix, asyncio.run(asyncio.sleep(0, "ok")))'
)


def _busybox_image(runtime: LocalRuntime) -> Image:
    """A template holding nothing but a static busybox: no libc, no Python, no /etc beyond
    users."""
    key = "test-busybox-only"
    if not runtime.layers.has(key):
        scratch = runtime.layers.scratch(key)
        (scratch / "bin").mkdir()
        (scratch / "etc").mkdir()
        shutil.copy("/bin/busybox", scratch / "bin" / "busybox")
        (scratch / "bin" / "sh").symlink_to("busybox")
        (scratch / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
        for name in ("hostname", "hosts", "resolv.conf"):
            (scratch / "etc" / name).touch()
        shift_owners(scratch, SETTINGS.uid_base)
        runtime.layers.publish(key, scratch)
    image = Image(
        name="test-busybox", layers=(key,), env={"PATH": "/bin"}, user="root", workdir="/"
    )
    runtime.layers.save_image(image)
    return image


@pytest_asyncio.fixture
async def busybox(runtime: LocalRuntime) -> AsyncIterator[SandboxInfo]:
    await asyncio.to_thread(_busybox_image, runtime)
    info = await runtime.create(SandboxSpec(template="test-busybox"))
    yield info
    await runtime.kill(info.sandbox_id)
    runtime.layers.remove_image("test-busybox")


async def test_agent_python_runs_in_the_base_image(
    runtime: LocalRuntime, sandbox: SandboxInfo
) -> None:
    out = await run_ok(
        runtime, sandbox.sandbox_id, f"/.bilik/python/bin/python3 -I -c '{PROBE}'", user="user"
    )
    assert out.split() == ["/.bilik/python", "ok"]


async def test_agent_python_runs_in_an_image_without_python(
    runtime: LocalRuntime, busybox: SandboxInfo
) -> None:
    missing = await runtime.run(busybox.sandbox_id, ["sh", "-c", "ls /usr/bin/python3 /lib"])
    assert missing.exit_code != 0
    out = await run_ok(runtime, busybox.sandbox_id, f"/.bilik/python/bin/python3 -I -c '{PROBE}'")
    assert out.split() == ["/.bilik/python", "ok"]


async def test_runtime_directory_is_read_only(runtime: LocalRuntime, sandbox: SandboxInfo) -> None:
    result = await runtime.run(sandbox.sandbox_id, ["sh", "-c", "echo x > /.bilik/python/x"])
    assert result.exit_code != 0 and b"Read-only file system" in result.stderr
