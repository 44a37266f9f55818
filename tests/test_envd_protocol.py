"""envd's wire protocol below the SDKs: codecs, keepalives, plain endpoints, any image."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from bilik.envd.enter import start_time
from bilik.proto import filesystem_pb, process_pb
from bilik.runtime import LocalRuntime, SandboxInfo, SandboxSpec, StepFailed
from helpers import run_ok
from test_agent_runtime import _busybox_image

TOKEN = "protocol-test-token"
ROOT = Path(__file__).resolve().parents[1]


@pytest_asyncio.fixture
async def envd(runtime: LocalRuntime) -> AsyncIterator[tuple[SandboxInfo, httpx.AsyncClient]]:
    info = await runtime.create(SandboxSpec(access_token=TOKEN, env={"TEAM": "blue"}))
    socket_path = runtime.route(info.sandbox_id).envd_socket
    assert socket_path is not None
    transport = httpx.AsyncHTTPTransport(uds=str(socket_path))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://envd", headers={"X-Access-Token": TOKEN}
    ) as client:
        yield info, client
    await runtime.kill(info.sandbox_id)


def _envelope(payload: bytes, flags: int = 0) -> bytes:
    return bytes([flags]) + len(payload).to_bytes(4, "big") + payload


def _frames(body: bytes) -> list[tuple[int, bytes]]:
    frames = []
    while body:
        size = int.from_bytes(body[1:5], "big")
        frames.append((body[0], body[5 : 5 + size]))
        body = body[5 + size :]
    return frames


async def test_binary_protobuf_codec(envd: tuple[SandboxInfo, httpx.AsyncClient]) -> None:
    _, client = envd
    stat = await client.post(
        "/filesystem.Filesystem/Stat",
        content=filesystem_pb.StatRequest(path="/etc").to_binary(),
        headers={"Content-Type": "application/proto"},
    )
    assert stat.status_code == 200
    entry = filesystem_pb.StatResponse.from_binary(stat.content).entry
    assert entry is not None and entry.type == filesystem_pb.FileType.DIRECTORY
    start = process_pb.StartRequest(
        process=process_pb.ProcessConfig(
            cmd="/bin/sh", args=["-c", "echo $TEAM $X"], envs={"X": "y"}
        )
    )
    streamed = await client.post(
        "/process.Process/Start",
        content=_envelope(start.to_binary()),
        headers={"Content-Type": "application/connect+proto"},
    )
    frames = _frames(streamed.content)
    events = [process_pb.StartResponse.from_binary(p).event for f, p in frames if f == 0]
    assert [e.event.field for e in events if e and e.event] == ["start", "data", "end"]
    data = events[1].event.value  # type: ignore[union-attr]
    assert data.output.value == b"blue y\n"  # type: ignore[union-attr]
    assert frames[-1][0] == 2  # the end-of-stream trailer


async def test_keepalives_while_silent(envd: tuple[SandboxInfo, httpx.AsyncClient]) -> None:
    _, client = envd
    body = json.dumps({"process": {"cmd": "/bin/sleep", "args": ["2.5"]}}).encode()
    response = await client.post(
        "/process.Process/Start",
        content=_envelope(body),
        headers={"Content-Type": "application/connect+json", "Keepalive-Ping-Interval": "1"},
    )
    kinds = [
        next(iter(json.loads(p).get("event", {"x": 0})))
        for f, p in _frames(response.content)
        if f == 0
    ]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("keepalive") >= 2


async def test_plain_endpoints(
    runtime: LocalRuntime, envd: tuple[SandboxInfo, httpx.AsyncClient]
) -> None:
    info, client = envd
    # Inside the sandbox envd answers on E2B's port too.
    inside = await run_ok(
        runtime, info.sandbox_id, "curl -s -o /dev/null -w '%{http_code}' localhost:49983/health"
    )
    assert inside == "204"
    assert (await client.get("/health", headers={"X-Access-Token": ""})).status_code == 204
    envs = await client.get("/envs")
    assert envs.status_code == 200 and envs.json()["TEAM"] == "blue"
    metrics = (await client.get("/metrics")).json()
    assert metrics["mem_total"] == 512 << 20 and metrics["mem_used"] > 0
    assert metrics["disk_total"] > 0 and metrics["cpu_count"] >= 1
    assert (await client.get("/envs", headers={"X-Access-Token": "no"})).status_code == 401
    missing = await client.get("/no-such-endpoint")
    assert missing.status_code == 404 and missing.json()["code"] == 404
    # A malformed Connect body is the client's error; envd goes on.
    bad = await client.post(
        "/filesystem.Filesystem/Stat",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert 400 <= bad.status_code < 500 and "code" in bad.json()
    truncated = await client.post(
        "/files?path=/tmp/x",
        content=b"--b\r\nContent-Disposition: form-data; name=file; filename=x\r\n\r\nabc",
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert truncated.status_code == 400 and "truncated" in truncated.json()["message"]
    assert (await client.get("/health")).status_code == 204


async def test_orphans_are_reaped(
    runtime: LocalRuntime, envd: tuple[SandboxInfo, httpx.AsyncClient]
) -> None:
    info, client = envd
    body = json.dumps(
        {"process": {"cmd": "/bin/sh", "args": ["-c", "for i in 1 2 3; do (sleep 0.1 &) ; done"]}}
    ).encode()
    for _ in range(3):
        await client.post(
            "/process.Process/Start",
            content=_envelope(body),
            headers={"Content-Type": "application/connect+json"},
        )
    await asyncio.sleep(0.5)
    states = await run_ok(runtime, info.sandbox_id, "ps -eo stat=")
    assert "Z" not in states, states


async def test_envd_in_an_image_without_anything(runtime: LocalRuntime) -> None:
    """A template of nothing but a static busybox: envd still serves processes and files."""
    await asyncio.to_thread(_busybox_image, runtime)
    info = await runtime.create(SandboxSpec(template="test-busybox", access_token=TOKEN))
    try:
        socket_path = runtime.route(info.sandbox_id).envd_socket
        assert socket_path is not None
        async with httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
            base_url="http://envd",
            headers={"X-Access-Token": TOKEN},
        ) as client:
            up = await client.post(
                "/files",
                params={"path": "/tmp/note"},
                content=b"hi",
                headers={"Content-Type": "application/octet-stream"},
            )
            assert up.status_code == 200, up.text
            assert (await client.get("/files", params={"path": "/tmp/note"})).content == b"hi"
            body = json.dumps({"process": {"cmd": "/bin/sh", "args": ["-c", "cat /tmp/note"]}})
            out = await client.post(
                "/process.Process/Start",
                content=_envelope(body.encode()),
                headers={"Content-Type": "application/connect+json"},
            )
            assert b'"stdout":"aGk="' in out.content
    finally:
        await runtime.kill(info.sandbox_id)
        runtime.layers.remove_image("test-busybox")


def test_generated_modules_match_the_protos() -> None:
    """The committed message and service modules are what scripts/gen-proto.sh makes."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([str(ROOT / "scripts" / "gen-proto.sh"), out], check=True)
        for name in sorted(os.listdir(out)):
            committed = ROOT / "src" / "bilik" / "proto" / name
            assert committed.read_text() == Path(out, name).read_text(), f"{name} is stale"


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


async def test_envd_is_confined_like_the_sandbox_itself(
    runtime: LocalRuntime, envd: tuple[SandboxInfo, httpx.AsyncClient]
) -> None:
    """envd joins from the host (the zygote), yet ends up exactly where PID 1 is."""
    info, client = envd
    record = runtime.records.load(info.sandbox_id)
    assert record is not None
    init = record.init_pid
    envd_pid = next(
        int(p)
        for p in Path(f"/sys/fs/cgroup/pids/{runtime.settings.instance}/{info.sandbox_id}")
        .joinpath("cgroup.procs")
        .read_text()
        .split()
        if Path(f"/proc/{p}/comm").read_text().strip() == "envd"
    )
    mine, theirs = _status(envd_pid), _status(init)
    for field in (
        "Uid",
        "Gid",
        "CapInh",
        "CapPrm",
        "CapEff",
        "CapBnd",
        "CapAmb",
        "NoNewPrivs",
        "Seccomp",
        "Seccomp_filters",
    ):
        assert mine[field] == theirs[field], field
    for ns in ("user", "mnt", "pid", "net", "uts", "ipc", "cgroup"):
        assert os.readlink(f"/proc/{envd_pid}/ns/{ns}") == os.readlink(f"/proc/{init}/ns/{ns}")
    assert Path(f"/proc/{envd_pid}/cgroup").read_text() == Path(f"/proc/{init}/cgroup").read_text()
    assert os.stat(f"/proc/{envd_pid}/root/").st_ino == os.stat(f"/proc/{init}/root/").st_ino
    # And what it starts can do no more than the sandbox allows.
    body = json.dumps(
        {
            "process": {
                "cmd": "/bin/sh",
                "args": ["-c", "unshare -U true; echo $?; mount -t tmpfs x /mnt; echo $?; id -u"],
            }
        }
    ).encode()
    out = await client.post(
        "/process.Process/Start",
        content=_envelope(body),
        headers={"Content-Type": "application/connect+json", "Authorization": "Basic cm9vdDo="},
    )
    stdout = b"".join(
        base64.b64decode(json.loads(p)["event"]["data"]["stdout"])
        for f, p in _frames(out.content)
        if f == 0 and "stdout" in json.loads(p).get("event", {}).get("data", {})
    )
    unshare_status, mount_status, uid = stdout.split()
    assert unshare_status != b"0" and mount_status != b"0" and uid == b"0", stdout


async def test_the_zygote_joins_only_sandboxes(
    runtime: LocalRuntime, envd: tuple[SandboxInfo, httpx.AsyncClient], tmp_path: Path
) -> None:
    """Asked to start envd beside a host process, or beside a process that merely took a
    sandbox PID 1's number, the zygote refuses."""
    me = os.getpid()
    files = (tmp_path / "envd.sock", tmp_path / "envd.log")
    with pytest.raises(StepFailed, match="host's user namespace"):
        await runtime.zygote.spawn(me, start_time(me), "/run/bilik", *files)
    info, _ = envd
    record = runtime.records.load(info.sandbox_id)
    assert record is not None
    with pytest.raises(StepFailed, match="not the sandbox's PID 1"):
        await runtime.zygote.spawn(record.init_pid, record.init_start + 1, "/run/bilik", *files)


async def test_clients_that_hang_up_mid_stream_leave_envd_running(
    runtime: LocalRuntime, envd: tuple[SandboxInfo, httpx.AsyncClient]
) -> None:
    """A client may go away while envd still writes to it (here: at once after the request
    went out, again and again, with output in flight): envd handles the broken connection and
    keeps serving (it once died silently of SIGPIPE)."""
    info, client = envd
    socket_path = runtime.route(info.sandbox_id).envd_socket
    assert socket_path is not None
    body = _envelope(b'{"process":{"cmd":"/bin/sh","args":["-c","seq 100000"]}}')
    request = (
        b"POST /process.Process/Start HTTP/1.1\r\nHost: envd\r\n"
        + f"X-Access-Token: {TOKEN}\r\nContent-Type: application/connect+json\r\n".encode()
        + b"Authorization: Basic cm9vdDo=\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    for _ in range(20):
        reader, writer = await asyncio.open_unix_connection(socket_path)
        writer.write(request)
        await writer.drain()
        await reader.read(100)  # (the stream has begun)
        writer.transport.abort()
    await asyncio.sleep(0.5)
    answer = await client.get("/health")
    assert answer.status_code == 204, answer.text
