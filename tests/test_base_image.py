"""The base template: what E2B's base template users expect, defined with bilik's template
builder, built once, rebuilt on request."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

from bilik.runtime import LocalRuntime, SandboxInfo, SandboxSpec
from bilik.templates.defaults import BASE
from helpers import run_ok
from server import BilikServer


async def test_base_has_what_users_expect(runtime: LocalRuntime, sandbox: SandboxInfo) -> None:
    tools = "bash curl wget git python3 pip3 ps ip ping sudo less nano unzip zip jq ssh file"
    out = await run_ok(runtime, sandbox.sandbox_id, f"for t in {tools}; do command -v $t; done")
    assert len(out.split()) == len(tools.split()), out
    release = await run_ok(runtime, sandbox.sandbox_id, ". /etc/os-release; echo $VERSION_CODENAME")
    assert release.strip() == "bookworm"
    user = await run_ok(runtime, sandbox.sandbox_id, "id; echo $HOME; ls -ld ~", user="user")
    assert user.splitlines()[:2] == [
        "uid=1000(user) gid=1000(user) groups=1000(user)",
        "/home/user",
    ]
    assert user.splitlines()[2].split()[2:4] == ["user", "user"]
    python = await run_ok(runtime, sandbox.sandbox_id, "python3 -m venv /tmp/v && echo ok", "user")
    assert python == "ok\n"
    # pip installs into the image's Python, as on E2B's base (Debian refuses that by default).
    pip = await run_ok(runtime, sandbox.sandbox_id, "echo $PIP_BREAK_SYSTEM_PACKAGES")
    assert pip == "1\n"
    sudoers = await run_ok(runtime, sandbox.sandbox_id, "cat /etc/sudoers.d/user")
    assert sudoers == "user ALL=(ALL:ALL) NOPASSWD: ALL\n"


async def test_rebuild_runs_every_step_again_and_spares_running_sandboxes(
    runtime: LocalRuntime, server: BilikServer
) -> None:
    before = await asyncio.to_thread(runtime.image, BASE)
    old = await runtime.create(SandboxSpec())
    try:
        await run_ok(runtime, old.sandbox_id, "echo kept > /root/mark")
        # (the server's instance shares this one's layers and images)
        rebuilt = server.cli("template", "build-default", BASE, "--rebuild", timeout=900)
        assert rebuilt.stdout.splitlines()[-1].startswith(f"{BASE}: ready ({BASE}:")
        assert "CACHED" not in rebuilt.stdout and "mmdebstrap" in rebuilt.stdout  # Debian too
        after = await asyncio.to_thread(runtime.image, BASE)
        assert after.layers != before.layers and not set(after.layers) & set(before.layers)
        # Asked again, it is there: nothing runs.
        again = server.cli("template", "build-default", BASE)
        assert again.stdout.splitlines() == [rebuilt.stdout.splitlines()[-1]]
        assert all(runtime.layers.has(key) for key in before.layers)  # the sandbox stands on them
        assert await run_ok(runtime, old.sandbox_id, "cat /root/mark") == "kept\n"
        new = await runtime.create(SandboxSpec())
        try:
            assert await run_ok(runtime, new.sandbox_id, "id -un", user="user") == "user\n"
        finally:
            await runtime.kill(new.sandbox_id)
    finally:
        await runtime.kill(old.sandbox_id)
    # Once no sandbox stands on them, the old layers go, unless a template built on the old base
    # (code-interpreter-v1, from an earlier run, say) still names them.
    top = before.layers[-1]
    named = [i.name for i in runtime.layers.images() if top in i.layers]
    collected = await asyncio.to_thread(runtime.collect_layers, grace_s=0)
    assert (top in collected) == (not named), named
    assert runtime.layers.has(top) == bool(named)
    assert (await asyncio.to_thread(runtime.image, BASE)).layers == after.layers


def test_a_default_build_cut_short_leaves_nothing_running(server: BilikServer) -> None:
    """A ``build-default`` killed mid-step: the next server start ends its build sandbox."""
    building = subprocess.Popen(
        [sys.executable, "-m", "bilik.cli", "template", "build-default", BASE, "--rebuild"],
        env=server.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not any(row["template"] == f"build-default-{BASE}" for row in _listed(server)):
            assert building.poll() is None, "the build ended first"
            assert time.monotonic() < deadline, "no build sandbox started"
            time.sleep(0.2)
    finally:
        building.kill()
        building.wait()
    assert _listed(server)  # left running by the killed build
    server.start()
    assert _listed(server) == []


def _listed(server: BilikServer) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(server.cli("sandbox", "list", "--json").stdout)
    return rows
