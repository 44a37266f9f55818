"""Pause and resume under concurrency, through the official ``e2b`` SDK: many requests to a
sandbox paused at its timeout make one resume and are all answered; connects racing pauses,
kills racing connects and a pause cutting a streaming command leave a sandbox in one state,
its files whole."""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from e2b import Sandbox, SandboxException, TimeoutException

from server import SERVER_SETTINGS, BilikServer

SERVER_LOG = SERVER_SETTINGS.data_dir / "server.log"


@pytest.fixture(scope="module")
def server() -> Iterator[BilikServer]:
    srv = BilikServer()
    try:
        srv.start()
        yield srv
    finally:
        srv.finish()


def state(server: BilikServer, sandbox_id: str) -> str:
    got = httpx.get(
        f"{server.url}/sandboxes/{sandbox_id}", headers={"X-API-Key": server.key}, timeout=30
    )
    assert got.status_code == 200, got.text
    return str(got.json()["state"])


def wait_paused(server: BilikServer, sandbox_id: str) -> None:
    deadline = time.monotonic() + 20
    while state(server, sandbox_id) != "paused":
        assert time.monotonic() < deadline
        time.sleep(0.2)


def resumes_logged(sandbox_id: str, since: int) -> int:
    with open(SERVER_LOG, "rb") as log:
        log.seek(since)
        text = log.read().decode(errors="replace")
    return len(re.findall(rf"sandbox {sandbox_id} resumed by", text))


def test_fifty_requests_to_a_paused_sandbox_make_one_resume(server: BilikServer) -> None:
    p = server.sdk_params()
    sbx = Sandbox.create(
        "base", timeout=3, lifecycle={"on_timeout": "pause", "auto_resume": True}, **p
    )
    try:
        for n in range(5):
            sbx.files.write(f"/tmp/f{n}", f"file {n}")
        wait_paused(server, sbx.sandbox_id)
        since = SERVER_LOG.stat().st_size
        barrier = threading.Barrier(50)

        def read(n: int) -> str:
            barrier.wait()
            return sbx.files.read(f"/tmp/f{n % 5}")

        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(read, range(50)))
        assert answers == [f"file {n % 5}" for n in range(50)]
        assert resumes_logged(sbx.sandbox_id, since) == 1
        assert state(server, sbx.sandbox_id) == "running"
    finally:
        sbx.kill()


def test_connects_racing_pauses_leave_one_state(server: BilikServer) -> None:
    p = server.sdk_params()
    sbx = Sandbox.create("base", timeout=120, **p)
    try:
        sbx.files.write("/tmp/kept", "whole")
        for _ in range(10):
            barrier = threading.Barrier(2)

            def pause(barrier: threading.Barrier = barrier) -> bool:
                barrier.wait()
                return Sandbox.pause(sbx.sandbox_id, **p)

            def connect(barrier: threading.Barrier = barrier) -> str:
                barrier.wait()
                return Sandbox.connect(sbx.sandbox_id, timeout=60, **p).sandbox_id

            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                paused, connected = pool.submit(pause), pool.submit(connect)
                assert isinstance(paused.result(), bool)
                assert connected.result() == sbx.sandbox_id
            assert state(server, sbx.sandbox_id) in ("running", "paused")
            Sandbox.connect(sbx.sandbox_id, timeout=60, **p)
            assert sbx.files.read("/tmp/kept") == "whole"
    finally:
        sbx.kill()


def test_a_pause_cuts_a_streaming_command_and_the_sandbox_goes_on(server: BilikServer) -> None:
    p = server.sdk_params()
    sbx = Sandbox.create("base", timeout=120, **p)
    try:
        seen: list[str] = []
        started = threading.Event()

        def on_stdout(line: str) -> None:
            seen.append(line)
            started.set()

        def stream() -> BaseException | None:
            try:
                sbx.commands.run(
                    "for i in $(seq 1 600); do echo $i; sleep 0.05; done",
                    on_stdout=on_stdout,
                    timeout=60,
                )
            except (SandboxException, TimeoutException) as e:
                return e
            return None

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            running = pool.submit(stream)
            assert started.wait(30)
            assert sbx.pause() is True
            # The stream ends with an error (not a hang, not a success).
            assert running.result(timeout=60) is not None
        Sandbox.connect(sbx.sandbox_id, timeout=60, **p)
        assert sbx.commands.run("echo after").stdout.strip() == "after"
    finally:
        sbx.kill()


def test_kills_racing_connects_of_a_paused_sandbox(server: BilikServer) -> None:
    p = server.sdk_params()
    for _ in range(5):
        sbx = Sandbox.create("base", timeout=120, **p)
        sbx.pause()
        barrier = threading.Barrier(2)

        def kill(barrier: threading.Barrier = barrier, sandbox_id: str = sbx.sandbox_id) -> bool:
            barrier.wait()
            return Sandbox.kill(sandbox_id, **p)

        def connect(
            barrier: threading.Barrier = barrier, sandbox_id: str = sbx.sandbox_id
        ) -> str | None:
            barrier.wait()
            try:
                return Sandbox.connect(sandbox_id, timeout=60, **p).sandbox_id
            except SandboxException:
                return None  # (killed first: not found)

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            killed, connected = pool.submit(kill), pool.submit(connect)
            assert killed.result() is True
            assert connected.result() in (None, sbx.sandbox_id)
        assert Sandbox.kill(sbx.sandbox_id, **p) is False
        assert sbx.sandbox_id not in {s.sandbox_id for s in Sandbox.list(**p).next_items()}
