"""bilik's own SDK (async): every call against a real server, in the test's own event loop,
with async callbacks."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from bilik import AsyncSandbox
from bilik.sdk import (
    CommandExitException,
    FileNotFoundException,
    FilesystemEvent,
    FilesystemEventType,
    FileType,
    PtySize,
    SandboxNotFoundException,
    SandboxQuery,
    TimeoutException,
)
from server import BilikServer

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def sdk_server() -> Iterator[BilikServer]:
    srv = BilikServer()
    srv.start()
    yield srv
    srv.finish()


def _opts(server: BilikServer) -> dict[str, Any]:
    return {"api_key": server.key, "api_url": server.url}


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def asbx(sdk_server: BilikServer) -> AsyncIterator[AsyncSandbox]:
    async with await AsyncSandbox.create("base", timeout=600, **_opts(sdk_server)) as sandbox:
        yield sandbox


async def test_lifecycle(sdk_server: BilikServer) -> None:
    opts = _opts(sdk_server)
    sandbox = await AsyncSandbox.create(
        "base", timeout=120, metadata={"kind": "async"}, envs={"X": "y"}, memory_mb=256, **opts
    )
    try:
        info = await sandbox.get_info()
        assert info.metadata == {"kind": "async"} and info.memory_mb == 256
        assert (
            await AsyncSandbox.get_info(sandbox.sandbox_id, **opts)
        ).sandbox_id == info.sandbox_id
        await sandbox.set_timeout(300)
        await AsyncSandbox.set_timeout(sandbox.sandbox_id, 200, **opts)
        listed = [s async for s in AsyncSandbox.list(query=SandboxQuery({"kind": "async"}), **opts)]
        assert [s.sandbox_id for s in listed] == [sandbox.sandbox_id]
        page = AsyncSandbox.list(limit=1, **opts)
        assert len(await page.next_items()) == 1
        again = await AsyncSandbox.connect(sandbox.sandbox_id, **opts)
        assert (await again.commands.run("echo $X")).stdout == "y\n"
        assert await again.is_running()
        metrics = await sandbox.get_metrics()
        assert metrics[-1].mem_total == 256 * 1024 * 1024
        assert await AsyncSandbox.get_metrics(sandbox.sandbox_id, **opts)
        usage = await sandbox.get_resource_usage()
        assert usage.memory_total_mb == 256 and usage.memory_used_mb > 0
        assert isinstance(await sandbox.get_logs(), list)
    finally:
        assert await sandbox.kill() is True
    assert not await sandbox.is_running()
    assert await AsyncSandbox.kill(sandbox.sandbox_id, **opts) is False
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.connect(sandbox.sandbox_id, **opts)


async def test_concurrent_calls_share_one_loop(sdk_server: BilikServer) -> None:
    opts = _opts(sdk_server)
    sandboxes = await asyncio.gather(*(AsyncSandbox.create("base", **opts) for _ in range(3)))
    try:
        results = await asyncio.gather(
            *(s.commands.run(f"echo {i}") for i, s in enumerate(sandboxes))
        )
        assert [r.stdout for r in results] == ["0\n", "1\n", "2\n"]
    finally:
        await asyncio.gather(*(s.kill() for s in sandboxes))


async def test_files(asbx: AsyncSandbox) -> None:
    await asbx.files.write("/tmp/a/b.txt", "text")
    assert await asbx.files.read("/tmp/a/b.txt") == "text"
    await asbx.files.write("/tmp/a/bin", io.BytesIO(b"\x00\x01" * 1000), gzip=True)
    assert await asbx.files.read("/tmp/a/bin", format="bytes") == b"\x00\x01" * 1000
    chunks = [c async for c in await asbx.files.read("/tmp/a/bin", format="stream")]
    assert b"".join(chunks) == b"\x00\x01" * 1000
    await asbx.files.write_files([{"path": "/tmp/a/c.txt", "data": "c"}], metadata={"k": "v"})
    assert (await asbx.files.get_info("/tmp/a/c.txt")).metadata == {"k": "v"}
    assert {e.name for e in await asbx.files.list("/tmp/a")} == {"b.txt", "bin", "c.txt"}
    assert await asbx.files.make_dir("/tmp/a/d") and not await asbx.files.make_dir("/tmp/a/d")
    assert (await asbx.files.get_info("/tmp/a/d")).type == FileType.DIR
    await asbx.files.rename("/tmp/a/c.txt", "/tmp/a/d/c.txt")
    assert await asbx.files.exists("/tmp/a/d/c.txt")
    await asbx.files.remove("/tmp/a")
    assert not await asbx.files.exists("/tmp/a")
    with pytest.raises(FileNotFoundException):
        await asbx.files.read("/tmp/a/b.txt")
    url = asbx.files.download_url("/etc/hostname")
    async with httpx.AsyncClient() as client:
        assert (await client.get(url)).text.strip() == (
            await asbx.files.read("/etc/hostname")
        ).strip()
        upload = asbx.files.upload_url("/tmp/up.txt")
        assert (await client.post(upload, files={"file": ("x", b"up")})).is_success
    assert await asbx.files.read("/tmp/up.txt") == "up"


async def test_watch_with_async_callbacks(asbx: AsyncSandbox) -> None:
    await asbx.files.make_dir("/tmp/w")
    seen: list[FilesystemEvent] = []
    ended: list[Exception | None] = []

    async def on_event(event: FilesystemEvent) -> None:
        seen.append(event)

    handle = await asbx.files.watch_dir("/tmp/w", on_event, on_exit=ended.append, recursive=True)
    await asbx.files.write("/tmp/w/x.txt", "x")
    deadline = time.monotonic() + 5
    while not any(e.type == FilesystemEventType.CREATE for e in seen):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await handle.stop()
    assert ended == [None]


async def test_commands(asbx: AsyncSandbox) -> None:
    lines: list[str] = []

    async def on_stdout(line: str) -> None:
        lines.append(line)

    result = await asbx.commands.run("echo a; sleep 0.2; echo b", on_stdout=on_stdout)
    assert result.stdout == "a\nb\n" and lines == ["a\n", "b\n"]
    with pytest.raises(CommandExitException) as failed:
        await asbx.commands.run("exit 7")
    assert failed.value.exit_code == 7
    with pytest.raises(TimeoutException):
        await asbx.commands.run("sleep 10", timeout=1)
    handle = await asbx.commands.run("cat", background=True, stdin=True)
    await handle.send_stdin("in\n")
    await asbx.commands.close_stdin(handle.pid)
    assert (await handle.wait()).stdout == "in\n"
    sleeper = await asbx.commands.run("sleep 60", background=True)
    assert sleeper.pid in [p.pid for p in await asbx.commands.list()]
    await sleeper.disconnect()
    attached = await asbx.commands.connect(sleeper.pid)
    assert await asbx.commands.kill(sleeper.pid)
    with pytest.raises(CommandExitException):
        await attached.wait()
    await asbx.commands.send_stdin(
        (await asbx.commands.run("cat", background=True, stdin=True)).pid, "x"
    )


async def test_pty(asbx: AsyncSandbox) -> None:
    output = bytearray()
    terminal = await asbx.pty.create(PtySize(24, 80), on_data=output.extend)
    await terminal.send_stdin("stty size\n")
    await _until(lambda: b"24 80" in output)
    await asbx.pty.resize(terminal.pid, PtySize(30, 100))
    await asbx.pty.send_stdin(terminal.pid, "stty size\n")
    await _until(lambda: b"30 100" in output)
    await terminal.disconnect()
    more = bytearray()
    again = await asbx.pty.connect(terminal.pid, on_data=more.extend)
    await again.send_stdin("echo back\n")
    await _until(lambda: b"back" in more)
    assert await asbx.pty.kill(terminal.pid)


async def test_ports(asbx: AsyncSandbox) -> None:
    server = await asbx.commands.run("python3 -m http.server 8001 -d /etc", background=True)
    try:
        async with asbx.http_client(8001) as client:

            async def answers() -> bool:
                try:
                    return (await client.get("/hostname")).status_code == 200
                except httpx.HTTPError:
                    return False

            deadline = time.monotonic() + 10
            while not await answers():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
    finally:
        await server.kill()


async def _until(check: Any, seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
