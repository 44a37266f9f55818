"""bilik's own SDK (sync): every call against a real server."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import select
import signal
import struct
import sys
import termios
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from bilik import Sandbox
from bilik.sdk import (
    AuthenticationException,
    CommandExitException,
    FileNotFoundException,
    FilesystemEventType,
    FileType,
    InvalidArgumentException,
    NotFoundException,
    PtySize,
    RateLimitException,
    SandboxException,
    SandboxNotFoundException,
    SandboxQuery,
    TimeoutException,
)
from bilik.sdk.api import ApiClient
from bilik.sdk.config import ConnectionConfig
from helpers import make_wheel
from server import BilikServer


@pytest.fixture(scope="module")
def sdk_server() -> Iterator[BilikServer]:
    srv = BilikServer()
    srv.start()
    yield srv
    srv.finish()


def _opts(server: BilikServer) -> dict[str, Any]:
    return {"api_key": server.key, "api_url": server.url}


@pytest.fixture(scope="module")
def sbx(sdk_server: BilikServer) -> Iterator[Sandbox]:
    with Sandbox.create("base", timeout=600, **_opts(sdk_server)) as sandbox:
        yield sandbox


# -- lifecycle --------------------------------------------------------------------------------


def test_create_info_list_connect_and_kill(sdk_server: BilikServer) -> None:
    opts = _opts(sdk_server)
    sandbox = Sandbox.create(
        "base",
        timeout=120,
        metadata={"purpose": "sdk-test"},
        envs={"GREETING": "hello"},
        cpu_count=2,
        memory_mb=256,
        **opts,
    )
    try:
        info = sandbox.get_info()
        assert (info.sandbox_id, info.template_id) == (sandbox.sandbox_id, "base")
        assert info.metadata == {"purpose": "sdk-test"}
        assert (info.cpu_count, info.memory_mb, info.state) == (2, 256, "running")
        assert 100 < (info.end_at - info.started_at).total_seconds() <= 120
        assert sandbox.commands.run("echo $GREETING").stdout == "hello\n"
        # The class forms take an id.
        assert Sandbox.get_info(sandbox.sandbox_id, **opts).metadata == {"purpose": "sdk-test"}
        sandbox.set_timeout(600)
        assert (sandbox.get_info().end_at - datetime.now(UTC)).total_seconds() > 500
        Sandbox.set_timeout(sandbox.sandbox_id, 300, **opts)
        assert (sandbox.get_info().end_at - datetime.now(UTC)).total_seconds() < 310
        # Listed (filtered by metadata), and reachable again by id.
        query = SandboxQuery(metadata={"purpose": "sdk-test"})
        assert [s.sandbox_id for s in Sandbox.list(query=query, **opts)] == [sandbox.sandbox_id]
        assert not list(Sandbox.list(query=SandboxQuery(metadata={"purpose": "other"}), **opts))
        again = Sandbox.connect(sandbox.sandbox_id, **opts)
        assert again.commands.run("echo $GREETING").stdout == "hello\n"
        assert again.is_running()
    finally:
        assert sandbox.kill() is True
    assert not sandbox.is_running()
    assert Sandbox.kill(sandbox.sandbox_id, **opts) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sandbox.sandbox_id, **opts)
    with pytest.raises(SandboxNotFoundException):
        sandbox.get_info()


def test_list_pages(sdk_server: BilikServer) -> None:
    opts = _opts(sdk_server)
    # (a value with the characters a query string gives meaning to)
    metadata = {"page": "yes & a=b %2B+"}
    made = [Sandbox.create("base", metadata=metadata, **opts) for _ in range(3)]
    try:
        pages = Sandbox.list(query=SandboxQuery(metadata=metadata), limit=2, **opts)
        first = pages.next_items()
        assert len(first) == 2 and pages.has_next and pages.next_token
        second = pages.next_items()
        assert not pages.has_next
        ids = [s.sandbox_id for s in first + second]
        assert sorted(ids) == sorted(s.sandbox_id for s in made)
    finally:
        for sandbox in made:
            sandbox.kill()


def test_context_manager_kills_and_egress_options(sdk_server: BilikServer) -> None:
    opts = _opts(sdk_server)
    with Sandbox.create("base", allow_internet_access=False, **opts) as offline:
        assert offline.get_info().allow_internet_access is False
    assert not offline.is_running()
    with Sandbox.create("base", network={"deny_out": ["192.0.2.0/24"]}, **opts) as ruled:
        assert ruled.is_running()


def test_metrics_usage_and_logs(sbx: Sandbox, sdk_server: BilikServer) -> None:
    sbx.commands.run("head -c 50M /dev/zero > /tmp/fill")
    metrics = sbx.get_metrics()
    assert metrics and metrics[-1].mem_total == 512 * 1024 * 1024
    assert metrics[-1].disk_used >= 50 * 1000 * 1000
    assert Sandbox.get_metrics(sbx.sandbox_id, **_opts(sdk_server))
    usage = sbx.get_resource_usage()
    assert 0 < usage.memory_used_mb < usage.memory_total_mb == 512
    assert usage.cpu_count == 1 and usage.cpu_used_pct >= 0 and usage.disk_used_mb >= 47
    assert isinstance(sbx.get_logs(), list)
    sbx.files.remove("/tmp/fill")


def test_configuration_from_the_environment(
    sdk_server: BilikServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BILIK_URL", sdk_server.url)
    monkeypatch.setenv("BILIK_API_KEY", sdk_server.key)
    with Sandbox.create("base") as sandbox:
        assert sandbox.commands.run("true").exit_code == 0
    # E2B's names work as well.
    monkeypatch.delenv("BILIK_URL")
    monkeypatch.delenv("BILIK_API_KEY")
    monkeypatch.setenv("E2B_API_URL", sdk_server.url)
    monkeypatch.setenv("E2B_API_KEY", sdk_server.key)
    assert isinstance(list(Sandbox.list()), list)


def test_api_errors(sdk_server: BilikServer) -> None:
    with pytest.raises(AuthenticationException):
        Sandbox.create("base", api_key="e2b_" + "0" * 40, api_url=sdk_server.url)
    with pytest.raises(NotFoundException):
        Sandbox.create("no-such-template", **_opts(sdk_server))
    with pytest.raises(InvalidArgumentException):
        Sandbox.create("base", cpu_count=0, **_opts(sdk_server))
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info("nosuchsandbox", **_opts(sdk_server))


def test_a_full_key_is_not_retried(sdk_server: BilikServer) -> None:
    key = sdk_server.cli("keys", "create", "--name", "one", "--max-sandboxes", "1").stdout.strip()
    opts = {"api_key": key, "api_url": sdk_server.url}
    with Sandbox.create("base", **opts):
        started = time.monotonic()
        with pytest.raises(RateLimitException):
            Sandbox.create("base", **opts)
        # The server says Should-Retry: false: no backoff.
        assert time.monotonic() - started < 2


def test_retries_honour_retry_after() -> None:
    """429, 502, 503 and 504 are retried, after Retry-After seconds when given."""
    answers = [(503, {"Retry-After": "1"}), (429, {}), (200, {})]
    seen: list[float] = []

    class Flaky(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(time.monotonic())
            status, headers = answers[len(seen) - 1]
            body = json.dumps({"code": status, "message": "busy"} if status != 200 else []).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        config = ConnectionConfig.resolve(api_key="k", api_url=url)
        from bilik.sdk._portal import run

        response = run(ApiClient(config).request("GET", "/v2/sandboxes"))
        assert response.status_code == 200 and len(seen) == 3
        assert seen[1] - seen[0] >= 0.95  # Retry-After: 1
        # With retries off, the first answer is final.
        answers[:] = [(503, {})]
        seen.clear()
        with pytest.raises(Exception, match="busy"):
            run(
                ApiClient(ConnectionConfig.resolve(api_key="k", api_url=url, retries=0)).request(
                    "GET", "/v2/sandboxes"
                )
            )
        assert len(seen) == 1
    finally:
        server.shutdown()


# -- files ------------------------------------------------------------------------------------


def test_files_read_write(sbx: Sandbox) -> None:
    info = sbx.files.write("/home/user/notes/hello.txt", "héllo")
    assert info.path == "/home/user/notes/hello.txt" and info.type == FileType.FILE
    assert sbx.files.read("/home/user/notes/hello.txt") == "héllo"
    blob = bytes(range(256)) * 1024
    sbx.files.write("/tmp/blob.bin", blob)
    assert sbx.files.read("/tmp/blob.bin", format="bytes") == blob
    assert b"".join(sbx.files.read("/tmp/blob.bin", format="stream")) == blob
    sbx.files.write("/tmp/streamed.bin", io.BytesIO(blob))
    assert sbx.files.read("/tmp/streamed.bin", format="bytes") == blob
    sbx.files.write("/tmp/zipped.txt", "zip " * 1000, gzip=True)
    assert sbx.files.read("/tmp/zipped.txt") == "zip " * 1000
    sbx.files.write("/tmp/tagged.txt", "x", metadata={"owner": "agent-7"})
    assert sbx.files.get_info("/tmp/tagged.txt").metadata == {"owner": "agent-7"}
    written = sbx.files.write_files(
        [{"path": "/tmp/many/a.txt", "data": "A"}, {"path": "/tmp/many/sub/b.txt", "data": b"B"}]
    )
    assert [w.path for w in written] == ["/tmp/many/a.txt", "/tmp/many/sub/b.txt"]
    assert sbx.files.read("/tmp/many/sub/b.txt") == "B"
    # As another user: root may write where user may not.
    sbx.files.write("/opt/root-only.txt", "r", user="root")
    assert sbx.files.get_info("/opt/root-only.txt").owner == "root"
    with pytest.raises(FileNotFoundException):
        sbx.files.read("/no/such/file")
    sbx.files.write("/tmp/latin1.txt", "café".encode("latin-1"))
    assert sbx.files.read("/tmp/latin1.txt") == "caf\ufffd"  # (as E2B's: no error)


def test_files_tree(sbx: Sandbox) -> None:
    assert sbx.files.make_dir("/tmp/tree/a/b") is True
    assert sbx.files.make_dir("/tmp/tree/a/b") is False
    sbx.files.write("/tmp/tree/a/b/deep.txt", "d")
    sbx.files.write("/tmp/tree/top.txt", "t")
    top = sbx.files.list("/tmp/tree")
    assert {e.name: e.type for e in top} == {"a": FileType.DIR, "top.txt": FileType.FILE}
    assert len(sbx.files.list("/tmp/tree", depth=3)) == 4
    entry = sbx.files.get_info("/tmp/tree/top.txt")
    assert (entry.size, entry.owner, entry.permissions) == (1, "user", "-rw-r--r--")
    assert sbx.files.exists("/tmp/tree/top.txt") and not sbx.files.exists("/tmp/tree/nope")
    moved = sbx.files.rename("/tmp/tree/top.txt", "/tmp/tree/moved.txt")
    assert moved.path == "/tmp/tree/moved.txt"
    sbx.files.remove("/tmp/tree")
    assert not sbx.files.exists("/tmp/tree")
    with pytest.raises(FileNotFoundException):
        sbx.files.list("/no/such/dir")


def test_files_watch(sbx: Sandbox) -> None:
    sbx.files.make_dir("/tmp/watched")
    handle = sbx.files.watch_dir("/tmp/watched")
    try:
        sbx.files.write("/tmp/watched/new.txt", "1")
        sbx.files.remove("/tmp/watched/new.txt")
        deadline = time.monotonic() + 5
        events: list[Any] = []
        while time.monotonic() < deadline and not any(
            e.type == FilesystemEventType.REMOVE for e in events
        ):
            events += handle.get_new_events()
            time.sleep(0.05)
        assert {(e.name, e.type) for e in events} >= {
            ("new.txt", FilesystemEventType.CREATE),
            ("new.txt", FilesystemEventType.REMOVE),
        }
    finally:
        handle.stop()


def test_files_urls(sbx: Sandbox) -> None:
    sbx.files.write("/tmp/shared.txt", "shared")
    url = sbx.files.download_url("/tmp/shared.txt")
    assert httpx.get(url).text == "shared"  # no key, no headers: the signature is enough
    upload = sbx.files.upload_url("/tmp/uploaded.txt", use_signature_expiration=60)
    assert httpx.post(upload, files={"file": ("x", b"up")}).status_code == 200
    assert sbx.files.read("/tmp/uploaded.txt") == "up"
    tampered = url.replace("shared.txt", "other.txt")
    assert httpx.get(tampered).status_code in (401, 404)  # no sandbox signed it


def test_pip_installs_into_the_base_python(sbx: Sandbox, tmp_path: Path) -> None:
    """As on E2B's base: no venv needed (Debian's own Python refuses otherwise)."""
    make_wheel(tmp_path / "wheels")
    wheel = tmp_path / "wheels" / "bilikdemo-1.0-py3-none-any.whl"
    sbx.files.write(f"/tmp/{wheel.name}", wheel.read_bytes())
    sbx.commands.run(f"pip install --no-index /tmp/{wheel.name}")
    assert sbx.commands.run("python3 -c 'import bilikdemo; print(bilikdemo.WORD)'").stdout == (
        "from-a-wheel\n"
    )


def test_a_forked_child_gets_a_clear_error(sbx: Sandbox) -> None:
    """The SDK's connections do not survive a fork: a child that uses them is told so."""
    sbx.commands.run("true")
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            sbx.commands.run("true")
        except SandboxException as e:
            code = 0 if "forked" in str(e) else 3
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child hung")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(done[1]) == 0


# -- commands and terminals ---------------------------------------------------------------------


def test_commands_run(sbx: Sandbox) -> None:
    result = sbx.commands.run("echo out; echo err >&2; pwd; whoami")
    assert result.stdout == "out\n/home/user\nuser\n" and result.stderr == "err\n"
    assert result.exit_code == 0
    assert sbx.commands.run("whoami", user="root").stdout == "root\n"
    assert sbx.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sbx.commands.run("echo $A", envs={"A": "b"}).stdout == "b\n"
    with pytest.raises(CommandExitException) as failed:
        sbx.commands.run("echo bad >&2; exit 3")
    assert failed.value.exit_code == 3 and failed.value.stderr == "bad\n"
    assert isinstance(failed.value, SandboxException)  # (as E2B's)
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 10", timeout=1)


def test_commands_stream_as_they_run(sbx: Sandbox) -> None:
    seen: list[tuple[float, str]] = []
    errors: list[str] = []
    sbx.commands.run(
        "for i in 1 2 3; do echo $i; sleep 0.3; done; echo done >&2",
        on_stdout=lambda line: seen.append((time.monotonic(), line)),
        on_stderr=errors.append,
    )
    assert "".join(line for _, line in seen) == "1\n2\n3\n" and errors == ["done\n"]
    assert seen[-1][0] - seen[0][0] > 0.5


def test_commands_in_the_background(sbx: Sandbox) -> None:
    handle = sbx.commands.run("sleep 0.5; echo finished", background=True)
    assert handle.exit_code is None
    assert any(p.pid == handle.pid for p in sbx.commands.list())
    result = handle.wait()
    assert result.stdout == "finished\n" and handle.exit_code == 0
    # Killed, from the handle and by pid.
    sleeper = sbx.commands.run("sleep 60", background=True)
    assert sleeper.kill() is True
    with pytest.raises(CommandExitException):
        sleeper.wait()
    other = sbx.commands.run("sleep 60", background=True)
    assert sbx.commands.kill(other.pid) is True
    assert sbx.commands.kill(999999) is False


def test_commands_stdin_and_connect(sbx: Sandbox) -> None:
    cat = sbx.commands.run("cat", background=True, stdin=True)
    cat.send_stdin("first\n")
    sbx.commands.send_stdin(cat.pid, "second\n")
    sbx.commands.close_stdin(cat.pid)
    assert cat.wait().stdout == "first\nsecond\n"
    # Disconnect from a running command, connect again, get the rest.
    ticker = sbx.commands.run("sleep 0.5; echo tick; sleep 0.5; echo tock", background=True)
    ticker.disconnect()
    again = sbx.commands.connect(ticker.pid)
    assert "tock" in again.wait().stdout


def test_pty(sbx: Sandbox) -> None:
    output = bytearray()
    terminal = sbx.pty.create(PtySize(rows=24, cols=80), on_data=output.extend)
    terminal.send_stdin("stty size; echo $TERM\n")
    _wait_for(lambda: b"24 80" in output and b"xterm-256color" in output)
    sbx.pty.resize(terminal.pid, PtySize(rows=40, cols=120))
    sbx.pty.send_stdin(terminal.pid, "stty size\n")
    _wait_for(lambda: b"40 120" in output)
    # Reattached, the terminal still answers.
    terminal.disconnect()
    seen = bytearray()
    again = sbx.pty.connect(terminal.pid, on_data=seen.extend)
    again.send_stdin("echo again-$((6*7))\n")
    _wait_for(lambda: b"again-42" in seen)
    assert sbx.pty.kill(terminal.pid) is True
    with pytest.raises(CommandExitException):
        again.wait()


def _wait_for(check: Any, seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# -- ports --------------------------------------------------------------------------------------


def test_reach_a_port(sbx: Sandbox) -> None:
    sbx.files.write("/tmp/site/index.html", "from the sandbox")
    server = sbx.commands.run("python3 -m http.server 8000 -d /tmp/site", background=True)
    try:
        with sbx.http_client(8000) as client:
            _wait_for(lambda: _answers(client))
            assert client.get("/index.html").text == "from the sandbox"
        host = sbx.get_host(8000)
        assert host.startswith(f"8000-{sbx.sandbox_id}.localhost:")
        response = httpx.get(f"{sbx.connection_config.api_url}/index.html", headers={"Host": host})
        assert response.text == "from the sandbox"
    finally:
        server.kill()


def _answers(client: httpx.Client) -> bool:
    try:
        return client.get("/").status_code == 200
    except httpx.HTTPError:
        return False


# -- the CLI for people ---------------------------------------------------------------------------


def test_spawn_a_terminal(sdk_server: BilikServer) -> None:
    """``bilik sandbox spawn`` in a real terminal: type, see, resize, exit (and the sandbox
    goes with it)."""
    before = {s.sandbox_id for s in Sandbox.list(**_opts(sdk_server))}
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on the terminal's other end, 30x100 to start with
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        os.environ.update(BILIK_URL=sdk_server.url, BILIK_API_KEY=sdk_server.key)
        os.execv(sys.executable, [sys.executable, "-m", "bilik.cli", "sandbox", "spawn", "base"])
    screen = bytearray()

    def expect(text: bytes) -> None:
        deadline = time.monotonic() + 30
        while text not in screen:
            assert time.monotonic() < deadline, f"never saw {text!r} in {bytes(screen)!r}"
            if select.select([fd], [], [], 0.1)[0]:
                screen.extend(os.read(fd, 4096))

    try:
        expect(b"$ ")
        os.write(fd, b"echo spawned-$((40+2)); stty size\r")
        expect(b"spawned-42")
        expect(b"30 100")
        spawned = {s.sandbox_id for s in Sandbox.list(**_opts(sdk_server))} - before
        assert len(spawned) == 1
        # Resizing the terminal reaches the sandbox's.
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
        time.sleep(0.3)
        os.write(fd, b"stty size\r")
        expect(b"50 132")
        os.write(fd, b"exit 3\r")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 3
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert not spawned & {s.sandbox_id for s in Sandbox.list(**_opts(sdk_server))}


def test_logs_and_metrics_commands(sdk_server: BilikServer, sbx: Sandbox) -> None:
    metrics = json.loads(sdk_server.cli("sandbox", "metrics", sbx.sandbox_id, "--json").stdout)
    assert metrics["memTotalMiB"] == 512 and metrics["cpuCount"] == 1
    table = sdk_server.cli("sandbox", "metrics", sbx.sandbox_id).stdout
    assert table.splitlines()[0].split()[:3] == ["sandboxId", "cpuCount", "cpuUsedPct"]
    assert isinstance(
        json.loads(sdk_server.cli("sandbox", "logs", sbx.sandbox_id, "--json").stdout), list
    )
    missing = sdk_server.cli("sandbox", "logs", "nosuchsandbox1", check=False)
    assert missing.returncode == 1 and "nosuchsandbox1" in missing.stderr


def test_a_reused_address_reaches_the_new_sandbox(sdk_server: BilikServer, sbx: Sandbox) -> None:
    """Addresses pass from killed sandboxes to new ones: the new one's port answers at once
    (``sbx`` keeps the bridge up meanwhile, so the host's neighbour entries live on)."""

    def serve_and_fetch(sandbox: Sandbox) -> str:
        sandbox.files.write("/tmp/site/who", sandbox.sandbox_id)
        # (HTTP/1.1: the connection stays open for more requests)
        server = (
            "import functools, http.server as h; h.test(functools.partial("
            "h.SimpleHTTPRequestHandler, directory='/tmp/site'), h.ThreadingHTTPServer, "
            "'HTTP/1.1', 8002)"
        )
        sandbox.commands.run(f'python3 -c "{server}"', background=True)
        with sandbox.http_client(8002) as client:
            _wait_for(lambda: _answers(client))
            return client.get("/who").text

    def address(sandbox: Sandbox) -> str:
        shown = sdk_server.cli("sandbox", "inspect", sandbox.sandbox_id).stdout
        return str(json.loads(shown)["address"])

    with Sandbox.create("base", **_opts(sdk_server)) as first:
        assert serve_and_fetch(first) == first.sandbox_id
        was = address(first)
    with Sandbox.create("base", **_opts(sdk_server)) as second:
        assert address(second) == was  # (else this test shows nothing)
        assert serve_and_fetch(second) == second.sandbox_id
