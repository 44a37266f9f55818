"""envd, driven through bilik's one port by the official ``e2b`` SDK (sync and async)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    FilesystemEventType,
    FileType,
    InvalidArgumentException,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxException,
    TimeoutException,
)

from helpers import OLD_SDK_PYTHON
from server import BilikServer


@pytest.fixture(scope="module")
def envd_server() -> Iterator[BilikServer]:
    srv = BilikServer()
    srv.start()
    yield srv
    srv.finish()


def _params(server: BilikServer) -> dict[str, Any]:
    return {"api_key": server.key, "api_url": server.url, "sandbox_url": server.url}


@pytest.fixture(scope="module")
def sbx(envd_server: BilikServer) -> Iterator[Sandbox]:
    sandbox = Sandbox.create("base", timeout=600, **_params(envd_server))
    yield sandbox
    sandbox.kill()


@pytest_asyncio.fixture(loop_scope="session")
async def asbx(envd_server: BilikServer) -> AsyncIterator[AsyncSandbox]:
    sandbox = await AsyncSandbox.create("base", timeout=300, **_params(envd_server))
    yield sandbox
    await sandbox.kill()


# -- files ------------------------------------------------------------------------------------


def test_write_and_read_text_bytes_and_streams(sbx: Sandbox) -> None:
    info = sbx.files.write("notes/hello.txt", "héllo")
    assert info.path == "/home/user/notes/hello.txt" and info.type == FileType.FILE
    assert sbx.files.read("/home/user/notes/hello.txt") == "héllo"
    blob = bytes(range(256)) * 64
    sbx.files.write("/tmp/blob.bin", blob)
    assert sbx.files.read("/tmp/blob.bin", format="bytes") == blob
    assert b"".join(sbx.files.read("/tmp/blob.bin", format="stream")) == blob
    # A file-like body goes as a streamed octet-stream upload; gzip both ways.
    sbx.files.write("/tmp/streamed.bin", io.BytesIO(blob))
    assert sbx.files.read("/tmp/streamed.bin", format="bytes", gzip=True) == blob
    sbx.files.write("/tmp/gz.txt", "zipped " * 1000, gzip=True)
    assert sbx.files.read("/tmp/gz.txt") == "zipped " * 1000
    # Owned by the user, parents made.
    entry = sbx.files.get_info("notes/hello.txt")
    assert (entry.owner, entry.group, entry.size) == ("user", "user", len("héllo".encode()))
    assert sbx.files.get_info("/home/user/notes").owner == "user"


def test_write_several_files_and_metadata(sbx: Sandbox) -> None:
    infos = sbx.files.write_files(
        [
            {"path": "/tmp/many/a.txt", "data": "A"},
            {"path": "/tmp/many/b.txt", "data": b"B"},
            {"path": "/tmp/many/sub/c.txt", "data": "C"},
        ]
    )
    assert [i.path for i in infos] == ["/tmp/many/a.txt", "/tmp/many/b.txt", "/tmp/many/sub/c.txt"]
    assert sbx.files.read("/tmp/many/sub/c.txt") == "C"
    sbx.files.write("/tmp/tagged.txt", "x", metadata={"Owner": "agent-7"})
    assert sbx.files.get_info("/tmp/tagged.txt").metadata == {"owner": "agent-7"}
    sbx.files.write("/tmp/tagged.txt", "y")  # an upload replaces the metadata
    assert not sbx.files.get_info("/tmp/tagged.txt").metadata


def test_list_exists_make_dir_rename_remove(sbx: Sandbox) -> None:
    assert sbx.files.make_dir("/tmp/tree/a/b") is True
    assert sbx.files.make_dir("/tmp/tree/a/b") is False
    sbx.files.write("/tmp/tree/a/b/deep.txt", "d")
    sbx.files.write("/tmp/tree/top.txt", "t")
    top = sbx.files.list("/tmp/tree")
    assert sorted(e.name for e in top) == ["a", "top.txt"]
    assert {e.name: e.type for e in top}["a"] == FileType.DIR
    deep = sbx.files.list("/tmp/tree", depth=3)
    assert sorted(e.path for e in deep) == [
        "/tmp/tree/a",
        "/tmp/tree/a/b",
        "/tmp/tree/a/b/deep.txt",
        "/tmp/tree/top.txt",
    ]
    assert sbx.files.exists("/tmp/tree/top.txt") and not sbx.files.exists("/tmp/tree/nope")
    moved = sbx.files.rename("/tmp/tree/top.txt", "/tmp/tree/moved/top.txt")
    assert moved.path == "/tmp/tree/moved/top.txt" and sbx.files.read(moved.path) == "t"
    sbx.files.remove("/tmp/tree")
    assert not sbx.files.exists("/tmp/tree")
    with pytest.raises(NotFoundException):
        sbx.files.rename("/tmp/tree/x", "/tmp/y")
    with pytest.raises(NotFoundException):
        sbx.files.list("/no/such/dir")
    with pytest.raises(NotFoundException):
        sbx.files.read("/no/such/file")
    with pytest.raises(NotFoundException):
        sbx.files.get_info("/no/such/file")
    # A symlink is described as one, with its target.
    sbx.commands.run("ln -sf /etc/hostname /tmp/link")
    link = sbx.files.get_info("/tmp/link")
    assert link.symlink_target == "/etc/hostname"


def test_watch_dir_sync(sbx: Sandbox) -> None:
    sbx.files.make_dir("/tmp/watched")
    handle = sbx.files.watch_dir("/tmp/watched", recursive=True)
    try:
        sbx.files.write("/tmp/watched/new.txt", "1")
        sbx.files.make_dir("/tmp/watched/sub")
        sbx.files.write("/tmp/watched/sub/inner.txt", "2")
        sbx.files.remove("/tmp/watched/new.txt")
        events: list[Any] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            events += handle.get_new_events()
            if any(e.type == FilesystemEventType.REMOVE for e in events) and any(
                e.name == "sub/inner.txt" for e in events
            ):
                break
            time.sleep(0.1)
        kinds = {(e.name, e.type) for e in events}
        assert ("new.txt", FilesystemEventType.CREATE) in kinds
        assert ("new.txt", FilesystemEventType.REMOVE) in kinds
        assert ("sub/inner.txt", FilesystemEventType.CREATE) in kinds
    finally:
        handle.stop()
    with pytest.raises(NotFoundException):
        sbx.files.watch_dir("/tmp/not-there")


def test_signed_urls_need_no_sandbox_headers(envd_server: BilikServer, sbx: Sandbox) -> None:
    sbx.files.write("/tmp/shared.txt", "via url")
    url = sbx.download_url("/tmp/shared.txt", use_signature_expiration=60)
    assert "signature=" in url
    assert httpx.get(url).text == "via url"
    upload = sbx.upload_url("/tmp/uploaded.txt")
    response = httpx.post(upload, files={"file": ("uploaded.txt", b"up")})
    assert response.status_code == 200, response.text
    assert sbx.files.read("/tmp/uploaded.txt") == "up"
    # A tampered signature, or one for another path, routes nowhere and opens nothing.
    assert httpx.get(url.replace("shared", "secret")).status_code in (401, 404)
    expired = sbx.download_url("/tmp/shared.txt", use_signature_expiration=-5)
    answer = httpx.get(expired)
    assert answer.status_code == 401 and "expired" in answer.json()["message"]


async def test_files_and_watch_async(asbx: AsyncSandbox) -> None:
    await asbx.files.write("/tmp/a.txt", "async")
    assert await asbx.files.read("/tmp/a.txt") == "async"
    seen: list[Any] = []
    got = asyncio.Event()

    def on_event(event: Any) -> None:
        seen.append(event)
        if event.name == "later.txt":
            got.set()

    await asbx.files.make_dir("/tmp/awatch")
    handle = await asbx.files.watch_dir("/tmp/awatch", on_event, include_entry=True)
    try:
        await asbx.files.write("/tmp/awatch/later.txt", "x")
        await asyncio.wait_for(got.wait(), 10)
        created = next(e for e in seen if e.type == FilesystemEventType.CREATE)
        assert created.name == "later.txt"
    finally:
        await handle.stop()


# -- commands ---------------------------------------------------------------------------------


def test_run_output_exit_codes_env_and_users(sbx: Sandbox) -> None:
    result = sbx.commands.run("echo out; echo err >&2; whoami; pwd")
    assert result.stdout == "out\nuser\n/home/user\n" and result.stderr == "err\n"
    assert sbx.commands.run("whoami", user="root").stdout == "root\n"
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sbx.commands.run("echo $GREETING", envs={"GREETING": "hi"}).stdout == "hi\n"
    assert sbx.commands.run("echo $HOME $USER").stdout == "/home/user user\n"
    with pytest.raises(CommandExitException) as failed:
        sbx.commands.run("echo before; exit 3")
    assert failed.value.exit_code == 3 and failed.value.stdout == "before\n"
    with pytest.raises(InvalidArgumentException):
        sbx.commands.run("true", cwd="/no/such/dir")


def test_streaming_callbacks_and_background(sbx: Sandbox) -> None:
    seen: list[tuple[float, str]] = []
    sbx.commands.run(
        "for i in 1 2 3; do echo $i; sleep 0.3; done",
        on_stdout=lambda s: seen.append((time.monotonic(), s)),
    )
    assert "".join(s for _, s in seen) == "1\n2\n3\n"
    assert seen[-1][0] - seen[0][0] > 0.4  # delivered as produced, not at the end
    errs: list[str] = []
    handle = sbx.commands.run("sleep 0.2; echo late >&2", background=True)
    result = handle.wait(on_stderr=errs.append)
    assert errs == ["late\n"] and result.exit_code == 0


def test_stdin_by_send_stream_and_close(sbx: Sandbox) -> None:
    handle = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(handle.pid, "one\n")
    sbx.commands.stream_input(handle.pid, iter(["two\n", b"three\n"]))
    sbx.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "one\ntwo\nthree\n"


def test_kill_list_and_connect_after_disconnect(sbx: Sandbox) -> None:
    handle = sbx.commands.run("for i in $(seq 1 30); do echo $i; sleep 0.1; done", background=True)
    assert handle.pid in [p.pid for p in sbx.commands.list()]
    handle.disconnect()
    time.sleep(0.5)
    again = sbx.commands.connect(handle.pid)
    result = again.wait()
    # The rest: nothing produced while nobody listened is lost.
    assert result.stdout.split() == [str(i) for i in range(1, 31)][-len(result.stdout.split()) :]
    assert "30" in result.stdout.split()
    assert len(result.stdout.split()) >= 25
    # An exited process still tells its end to a late connect.
    assert sbx.commands.connect(handle.pid).wait().exit_code == 0

    sleeper = sbx.commands.run("sleep 60", background=True)
    assert sbx.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException) as killed:
        sleeper.wait()
    assert killed.value.exit_code == -1 and "killed" in (killed.value.error or "")
    assert sleeper.pid not in [p.pid for p in sbx.commands.list()]
    assert sbx.commands.kill(999999) is False
    with pytest.raises(NotFoundException):
        sbx.commands.connect(999999)


def test_timeouts_end_the_process(sbx: Sandbox) -> None:
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30; echo never", timeout=1)
    time.sleep(0.5)
    assert "sleep 30" not in sbx.commands.run("ps -eo args").stdout


def test_pty_input_resize_and_kill(sbx: Sandbox) -> None:
    out = bytearray()
    terminal = sbx.pty.create(PtySize(rows=24, cols=80))

    def read() -> None:
        with contextlib.suppress(CommandExitException):  # how a killed terminal ends
            terminal.wait(on_pty=out.extend)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    sbx.pty.send_stdin(terminal.pid, b"stty size; tty\n")
    _until(lambda: b"24 80" in out and b"/dev/pts/" in out)
    sbx.pty.resize(terminal.pid, PtySize(rows=40, cols=100))
    sbx.pty.send_stdin(terminal.pid, b"stty size\n")
    _until(lambda: b"40 100" in out)
    assert sbx.pty.kill(terminal.pid) is True
    thread.join(10)
    assert not thread.is_alive()


async def test_commands_and_pty_async(asbx: AsyncSandbox) -> None:
    chunks: list[str] = []
    result = await asbx.commands.run("echo a; sleep 0.2; echo b", on_stdout=chunks.append)
    assert result.stdout == "a\nb\n" and chunks == ["a\n", "b\n"]
    handle = await asbx.commands.run("cat", background=True, stdin=True)
    await asbx.commands.send_stdin(handle.pid, "echo\n")
    await asbx.commands.close_stdin(handle.pid)
    assert (await handle.wait()).stdout == "echo\n"
    out = bytearray()
    terminal = await asbx.pty.create(PtySize(rows=10, cols=50), on_data=out.extend)
    await asbx.pty.send_stdin(terminal.pid, b"echo $((6*7))\n")
    for _ in range(100):
        if b"42" in out:
            break
        await asyncio.sleep(0.05)
    assert b"42" in out
    assert await asbx.pty.kill(terminal.pid)


# -- bad input --------------------------------------------------------------------------------


def test_non_utf8_and_huge_output(sbx: Sandbox) -> None:
    result = sbx.commands.run("printf 'ok \\377\\376 end'")
    assert result.stdout.startswith("ok ") and result.stdout.endswith(" end")
    big = sbx.commands.run("head -c 30000000 /dev/zero | tr '\\0' x")
    assert len(big.stdout) == 30_000_000
    assert sbx.commands.run("echo still here").stdout == "still here\n"


def test_client_gone_mid_stream_and_bad_tokens(envd_server: BilikServer, sbx: Sandbox) -> None:
    url = f"{envd_server.url}/process.Process/Start"
    headers = {
        "E2b-Sandbox-Id": sbx.sandbox_id,
        "E2b-Sandbox-Port": "49983",
        "Content-Type": "application/connect+json",
    }
    body = b'{"process":{"cmd":"/bin/bash","args":["-c","yes | head -c 100000000"]}}'
    envelope = b"\0" + len(body).to_bytes(4, "big") + body
    with httpx.stream(
        "POST",
        url,
        content=envelope,
        headers={**headers, "X-Access-Token": sbx._envd_access_token or ""},
    ) as response:
        assert response.status_code == 200
        next(response.iter_raw())  # then hang up mid-stream
    wrong = httpx.post(url, content=envelope, headers={**headers, "X-Access-Token": "wrong"})
    assert wrong.status_code == 401 and wrong.json()["code"] == 401
    listing = httpx.post(
        f"{envd_server.url}/filesystem.Filesystem/ListDir",
        json={"path": "/"},
        headers={**headers, "Content-Type": "application/json"},
    )
    assert listing.status_code == 401
    files = httpx.get(f"{envd_server.url}/files", params={"path": "/etc/hostname"}, headers=headers)
    assert files.status_code == 401
    assert sbx.commands.run("echo fine").stdout == "fine\n"


def test_paths_that_do_not_exist_or_are_wrong(sbx: Sandbox) -> None:
    with pytest.raises(SandboxException):
        sbx.files.write("/etc/hostname/child", "x")  # a file in the way
    with pytest.raises(SandboxException):
        sbx.files.read("/tmp")  # a directory
    sbx.files.remove("/no/such/path")  # nothing there: no error, as on E2B
    with pytest.raises(AuthenticationException):
        sbx.commands.run("true", user="nobody-here")  # type: ignore[arg-type]


def _until(check: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition never became true")


def test_big_file_round_trip_stays_out_of_memory(envd_server: BilikServer, sbx: Sandbox) -> None:
    """200 MB up and down intact, and neither the server nor envd ever holds it whole."""
    size = 200 * 1024 * 1024
    chunk = bytes(range(256)) * 4096  # 1 MiB

    def body() -> Iterator[bytes]:
        for _ in range(size // len(chunk)):
            yield chunk

    server_before = envd_server.peak_rss_kib()
    sbx.files.write("/tmp/big.bin", body())
    assert sbx.files.get_info("/tmp/big.bin").size == size
    digest = sbx.commands.run("sha256sum /tmp/big.bin").stdout.split()[0]
    expected = hashlib.sha256()
    for piece in body():
        expected.update(piece)
    assert digest == expected.hexdigest()
    got = hashlib.sha256()
    total = 0
    for piece in sbx.files.read("/tmp/big.bin", format="stream"):
        got.update(piece)
        total += len(piece)
    assert total == size and got.hexdigest() == expected.hexdigest()
    # Peak resident memory of envd (inside the sandbox) and of the server.
    peak = sbx.commands.run(
        "grep VmHWM /proc/$(pgrep -f 'bilik.envd' | head -1)/status", user="root"
    ).stdout
    assert int(peak.split()[1]) < 100 * 1024, peak
    assert envd_server.peak_rss_kib() - server_before < 64 * 1024
    sbx.files.remove("/tmp/big.bin")


def test_processes_outlive_a_server_crash(envd_server: BilikServer, sbx: Sandbox) -> None:
    """envd, and what it runs, carry on while the server is down; the new server reaches them."""
    ticker = sbx.commands.run(
        "i=0; while :; do i=$((i+1)); echo $i > /tmp/tick; sleep 0.1; done",
        background=True,
        timeout=0,
    )
    envd_server.procs[-1].kill()
    envd_server.procs[-1].wait()
    envd_server.start()
    again = Sandbox.connect(sbx.sandbox_id, **_params(envd_server))
    first = int(again.files.read("/tmp/tick"))
    time.sleep(0.5)
    assert int(again.files.read("/tmp/tick")) > first
    assert ticker.pid in [p.pid for p in again.commands.list()]
    assert again.commands.kill(ticker.pid)


def test_old_sdk_commands_and_files(envd_server: BilikServer, sbx: Sandbox) -> None:
    """e2b 2.20, which uploads octet-stream bodies to this envd version by default."""
    script = (
        "from e2b import Sandbox\n"
        f"s = Sandbox.connect({sbx.sandbox_id!r})\n"
        "s.files.write('/tmp/old.txt', 'from 2.20')\n"
        "print(s.files.read('/tmp/old.txt'))\n"
        "print(s.commands.run('echo $((1+2))').stdout.strip())\n"
    )
    env = {
        "E2B_API_KEY": envd_server.key,
        "E2B_API_URL": envd_server.url,
        "E2B_SANDBOX_URL": envd_server.url,
        "PATH": os.environ["PATH"],
    }
    out = subprocess.run(
        [str(OLD_SDK_PYTHON), "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["from 2.20", "3"]


def test_a_dead_envd_is_started_again(sbx: Sandbox) -> None:
    survivor = sbx.commands.run("sleep 600", background=True, timeout=0)
    # Killed from inside (as root; the stream of this very command breaks with it): the next
    # request finds it gone and starts a new one.
    with contextlib.suppress(SandboxException):
        sbx.commands.run("kill -9 $(pgrep -x envd)", user="root")
    assert sbx.commands.run("echo back").stdout == "back\n"
    # What the old envd started lives on.
    assert str(survivor.pid) in sbx.commands.run("pgrep -x sleep").stdout.split()
