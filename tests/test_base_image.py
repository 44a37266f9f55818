"""The base template: what E2B's base template users expect, built once, rebuilt on request."""

from __future__ import annotations

import asyncio

from bilik.runtime import LocalRuntime, SandboxInfo, SandboxSpec
from helpers import run_ok


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


async def test_rebuild_replaces_the_layer_and_spares_running_sandboxes(
    runtime: LocalRuntime,
) -> None:
    before = await asyncio.to_thread(runtime.image, "base")
    old = await runtime.create(SandboxSpec())
    try:
        await run_ok(runtime, old.sandbox_id, "echo kept > /root/mark")
        after = await asyncio.to_thread(runtime.image, "base", rebuild=True)
        assert after.layers != before.layers
        assert runtime.layers.has(before.layers[0])  # the running sandbox still stands on it
        assert await run_ok(runtime, old.sandbox_id, "cat /root/mark") == "kept\n"
        new = await runtime.create(SandboxSpec())
        try:
            assert await run_ok(runtime, new.sandbox_id, "id -un", user="user") == "user\n"
        finally:
            await runtime.kill(new.sandbox_id)
    finally:
        await runtime.kill(old.sandbox_id)
    # Once no sandbox stands on it, the old layer goes, unless a template built on the old base
    # (code-interpreter-v1, from an earlier run, say) still names it.
    named = [i.name for i in runtime.layers.images() if before.layers[0] in i.layers]
    collected = await asyncio.to_thread(runtime.collect_layers, grace_s=0)
    assert (before.layers[0] in collected) == (not named), named
    assert runtime.layers.has(before.layers[0]) == bool(named)
    assert (await asyncio.to_thread(runtime.image, "base")).layers == after.layers
