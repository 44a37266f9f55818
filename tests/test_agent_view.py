"""Sandboxes as agents see them: their own memory and CPUs in ``/proc``, JSON for every file
error, a code interpreter that survives its kernel's death, and ``get_host`` addresses that
reach the sandbox. The official ``e2b`` and ``e2b_code_interpreter`` SDKs are the clients
against a real ``bilik serve``; ``/proc`` and the LXCFS daemon are checked on the runtime."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import InvalidArgumentException, NotFoundException
from e2b import Sandbox as E2bSandbox
from e2b_code_interpreter import Sandbox as InterpreterSandbox

from bilik.runtime import Limits, LocalRuntime, SandboxSpec, syscalls
from bilik.runtime.lxcfs import Lxcfs
from helpers import run_ok
from server import BilikServer, code_interpreter_server


@pytest.fixture(scope="module")
def agent_server() -> Iterator[BilikServer]:
    with code_interpreter_server() as srv:
        yield srv


def _params(server: BilikServer) -> dict[str, Any]:
    return {"api_key": server.key, "api_url": server.url, "sandbox_url": server.url}


# -- /files errors ------------------------------------------------------------------------------


def test_file_errors_are_json(agent_server: BilikServer) -> None:
    with E2bSandbox.create(template="base", timeout=120, **_params(agent_server)) as sbx:
        with pytest.raises(InvalidArgumentException, match="is a directory"):
            sbx.files.read("/home")
        with pytest.raises(NotFoundException):
            sbx.files.read("/no/such/file")
        with pytest.raises(InvalidArgumentException, match="is a directory"):
            sbx.files.write("/home", "x")
        headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "X-Access-Token": sbx._envd_access_token}
        cases = [
            ("GET", "/files?path=/home", 400),
            ("GET", "/files?path=/no/such/file", 404),
            ("GET", "/files", 400),
            ("GET", "/files?path=/etc/hostname&username=nobody-here", 401),
            ("PUT", "/files?path=/tmp/x", 405),
            ("POST", "/files?path=/home", 400),
        ]
        for method, target, status in cases:
            r = httpx.request(method, agent_server.url + target, headers=headers, content=b"x")
            assert r.status_code == status, (method, target, r.status_code, r.text)
            assert r.headers["content-type"] == "application/json", (target, r.text)
            assert r.json()["code"] == status and r.json()["message"], r.text
        r = httpx.get(agent_server.url + "/files?path=/home", headers=headers)
        assert r.json()["message"] == "path '/home' is a directory"


# -- get_host -----------------------------------------------------------------------------------


def test_get_host_reaches_the_sandbox(agent_server: BilikServer) -> None:
    with E2bSandbox.create(template="base", timeout=120, **_params(agent_server)) as sbx:
        host = sbx.get_host(8000)
        assert host == f"8000-{sbx.sandbox_id}.localhost:{agent_server.port}"
        again = E2bSandbox.connect(sbx.sandbox_id, **_params(agent_server))
        assert again.get_host(8000) == host
        sbx.files.write("/tmp/www/hello.txt", "hello from the sandbox")
        sbx.commands.run("cd /tmp/www && python3 -m http.server 8000", background=True)
        deadline = time.monotonic() + 20
        while True:
            # The name as a browser would send it (no resolver needed: the server is local).
            r = httpx.get(f"http://127.0.0.1:{agent_server.port}/hello.txt", headers={"Host": host})
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.text == "hello from the sandbox", (r.status_code, r.text)


# -- a kernel's death ---------------------------------------------------------------------------


def test_the_next_execution_after_a_kernels_death_restarts_it(agent_server: BilikServer) -> None:
    with InterpreterSandbox.create(timeout=300, **_params(agent_server)) as sbx:
        assert sbx.run_code("kept = 41; kept + 1").text == "42"
        died = sbx.run_code("x = bytearray(3 * 1024**3)", timeout=60)
        assert died.error is not None and died.error.name == "UnexpectedEndOfExecution"
        assert "died" in died.error.value
        # With envs (which once waited for the dead kernel past any timeout) and without.
        started = time.monotonic()
        after = sbx.run_code("import os; os.environ['WHO']", envs={"WHO": "me"}, timeout=60)
        assert time.monotonic() - started < 60
        assert after.error is None, after.error
        assert after.text == "me"
        assert any("restarted" in line for line in after.logs.stderr), after.logs
        # The user's state is gone, and the kernel works on as before.
        gone = sbx.run_code("kept")
        assert gone.error is not None and gone.error.name == "NameError"
        assert not gone.logs.stderr
        assert sbx.run_code("2 + 2").text == "4"
        # A context the user made is theirs to restart: it says so at once, envs or not.
        made = sbx.create_code_context()
        assert sbx.run_code("bytearray(3 * 1024**3)", context=made).error is not None
        started = time.monotonic()
        dead = sbx.run_code("1", context=made, envs={"WHO": "me"}, timeout=60)
        assert time.monotonic() - started < 30
        assert dead.error is not None and "restart the context" in dead.error.value, dead.error
        sbx.restart_code_context(made)
        assert sbx.run_code("1 + 1", context=made).text == "2"


# -- /proc as the sandbox's limits show it ------------------------------------------------------


async def test_proc_shows_the_sandboxs_own_limits(runtime: LocalRuntime) -> None:
    info = await runtime.create(SandboxSpec(limits=Limits(cpu=1, memory_mb=512)))
    try:
        out = await run_ok(
            runtime,
            info.sandbox_id,
            "head -1 /proc/meminfo; grep -c ^processor /proc/cpuinfo; "
            "grep -c '^cpu[0-9]' /proc/stat; cat /sys/devices/system/cpu/online; "
            "free -m | awk '/^Mem:/ {print $2}'; cut -d' ' -f1 /proc/uptime",
        )
        meminfo, cpus, stat_cpus, online, free_total, uptime = out.split("\n")[:6]
        assert meminfo.split()[1] == str(512 * 1024), out
        assert (cpus, stat_cpus, online) == ("1", "1", "0"), out
        assert free_total == "512", out
        # The sandbox's own uptime: it has just started.
        assert float(uptime) < 120, out
        # Read-only: nothing in the sandbox changes what the others see.
        result = await runtime.run(info.sandbox_id, ["sh", "-c", "echo x > /proc/meminfo"])
        assert result.exit_code != 0
    finally:
        await runtime.kill(info.sandbox_id)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, whose reaper may be slow, does not)."""
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def test_lxcfs_daemon_is_restarted_and_released(tmp_path: Path) -> None:
    state = tmp_path / "run"
    daemon = Lxcfs(state, log=lambda line: None)
    try:
        assert daemon.ensure()
        assert os.path.ismount(daemon.mountpoint)
        assert "MemTotal" in (daemon.mountpoint / "proc/meminfo").read_text()
        first = int(daemon.pidfile.read_text())
        assert daemon.ensure() and int(daemon.pidfile.read_text()) == first
        # A daemon that died is started anew by the next sandbox, its dead mount cleared.
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _alive(first) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemon.ensure()
        second = int(daemon.pidfile.read_text())
        assert second != first
        assert "MemTotal" in (daemon.mountpoint / "proc/meminfo").read_text()
        # Kept while a sandbox may use it; released (process and mount) once none is left.
        daemon.stop_unless(lambda: True)
        assert os.path.ismount(daemon.mountpoint)
        daemon.stop_unless(lambda: False)
        assert not os.path.ismount(daemon.mountpoint)
        assert not _alive(second)
        assert not syscalls.mounted_under(str(state))
    finally:
        daemon.stop_unless(lambda: False)
