"""What every sandbox backend must do: the ``Runtime`` protocol, tried on real sandboxes.

The tests here use a runtime through ``bilik.runtime.base.Runtime`` alone (and look at the host
only through ``helpers.host_state``), so that any backend can be held to them: crun and gVisor's
runsc today, a microVM later. They are not collected from this file; a test module runs them
for its backends by importing them and providing one fixture:

    from runtime_conformance import *  # noqa: F403

    @pytest_asyncio.fixture(scope="module", params=[...])
    async def backend(request) -> AsyncIterator[Backend]:
        ...  # a started runtime whose creates use the backend, described by a Backend

``tests/test_runtime_conformance.py`` does this for every backend in its ``BACKENDS``; a new
backend is one entry there. Each backend gets one sandbox that the tests which leave it as they
found it share (``shared``); a test that changes or ends a sandbox makes its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import stat
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from bilik.runtime import (
    InvalidSpec,
    Limits,
    Runtime,
    RuntimeFailure,
    SandboxExists,
    SandboxInfo,
    SandboxNotFound,
    SandboxSpec,
)
from bilik.runtime.errors import SandboxNotPaused, SandboxPaused
from bilik.runtime.layers import layer_key
from helpers import host_state, run_ok, sandbox_traces, wait_for

# A sandbox id no runtime has (well formed), and names that are not sandbox ids at all.
UNKNOWN_ID = "nosuchsandbox0000000"
NOT_IDS = ("../../etc", "", "UPPER", "a" * 64)

SHARED_SPEC = SandboxSpec(
    limits=Limits(cpu=0.5, memory_mb=256, disk_mb=256, pids=128),
    timeout_s=600,
    env={"GREETING": "hello", "SHADOWED": "by-the-sandbox"},
    metadata={"team": "blue", "purpose": "conformance"},
)


@dataclasses.dataclass(frozen=True)
class Backend:
    """A runtime under test, and what it promises beyond the protocol."""

    runtime: Runtime  # started; its creates use this backend
    name: str  # what its sandboxes report as ``SandboxInfo.oci_runtime``
    envd_socket: bool  # whether ``route`` gives envd's unix socket (else envd is at the address)


@pytest_asyncio.fixture(scope="module")
async def shared(backend: Backend) -> AsyncIterator[SandboxInfo]:
    """One running sandbox of ``SHARED_SPEC`` per backend, for the tests that leave it as they
    found it."""
    info = await backend.runtime.create(SHARED_SPEC)
    yield info
    await backend.runtime.kill(info.sandbox_id)


def _no_trace_of(backend: Backend, sandbox_id: str) -> bool:
    return not any(sandbox_traces(backend.runtime.settings, sandbox_id).values())


# -- create, inspect, list, route ---------------------------------------------------------------


async def test_a_new_sandbox_runs_as_asked(backend: Backend, shared: SandboxInfo) -> None:
    rt = backend.runtime
    assert shared.state == "running" and not shared.pooled
    assert shared.oci_runtime == backend.name
    assert shared.template == SHARED_SPEC.template and shared.internet
    assert shared.limits == SHARED_SPEC.limits
    assert shared.metadata == SHARED_SPEC.metadata
    assert SHARED_SPEC.env.items() <= shared.env.items()
    assert shared.created_at <= time.time()
    assert shared.end_at - shared.created_at == pytest.approx(SHARED_SPEC.timeout_s)
    # What inspect and list say agrees with what the create returned (but for a moved end).
    inspected = await rt.inspect(shared.sandbox_id)
    assert dataclasses.replace(inspected, end_at=shared.end_at) == shared
    listed = {i.sandbox_id: i for i in await rt.list()}
    assert dataclasses.replace(listed[shared.sandbox_id], end_at=shared.end_at) == shared
    assert await rt.is_running(shared.sandbox_id)
    assert await run_ok(rt, shared.sandbox_id, "hostname") == f"{shared.sandbox_id}\n"


async def test_unknown_sandboxes_are_not_found(backend: Backend) -> None:
    rt = backend.runtime
    for sandbox_id in (UNKNOWN_ID, *NOT_IDS):
        assert not await rt.is_running(sandbox_id)
        for call in (rt.inspect, rt.kill, rt.stop, rt.usage, rt.console, rt.logs):
            with pytest.raises(SandboxNotFound):
                await call(sandbox_id)
        with pytest.raises(SandboxNotFound):
            rt.route(sandbox_id)
        with pytest.raises(SandboxNotFound):
            await rt.run(sandbox_id, ["true"])
        with pytest.raises(SandboxNotFound):
            await rt.set_timeout(sandbox_id, 60)


async def test_route_leads_to_the_sandbox(backend: Backend, shared: SandboxInfo) -> None:
    rt = backend.runtime
    route = rt.route(shared.sandbox_id)
    subnet = ipaddress.IPv4Network(rt.settings.subnet)
    address = ipaddress.IPv4Address(route.address)
    assert route.address == shared.address
    assert address in subnet
    assert address not in (subnet.network_address, subnet.broadcast_address)
    if backend.envd_socket:
        assert route.envd_socket is not None and route.envd_socket.is_socket()
    else:
        assert route.envd_socket is None
    # envd answers there, and runs its commands with the sandbox's environment.
    async with rt.envd(shared.sandbox_id) as envd:
        greeting = await envd.run("echo $GREETING")
    assert (greeting.exit_code, greeting.output) == (0, "hello\n")


# -- processes ----------------------------------------------------------------------------------


async def test_run_as_a_user_with_env_and_cwd(backend: Backend, shared: SandboxInfo) -> None:
    rt = backend.runtime
    script = ["sh", "-c", 'id -un; echo "$HOME $GREETING $SHADOWED $EXTRA"; pwd']
    as_user = await rt.run(
        shared.sandbox_id, script, user="user", env={"SHADOWED": "by-the-run", "EXTRA": "x"}
    )
    assert as_user.exit_code == 0, as_user
    assert as_user.stdout.decode().splitlines() == [
        "user",
        "/home/user hello by-the-run x",
        "/home/user",  # a user starts at home
    ]
    as_root = await rt.run(shared.sandbox_id, script, cwd="/tmp")
    assert as_root.stdout.decode().splitlines() == ["root", "/root hello by-the-sandbox ", "/tmp"]
    with pytest.raises(InvalidSpec):
        await rt.run(shared.sandbox_id, ["true"], user="nosuchuser")


async def test_exit_codes_and_output_streams(backend: Backend, shared: SandboxInfo) -> None:
    rt = backend.runtime
    result = await rt.run(shared.sandbox_id, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    signalled = await rt.run(shared.sandbox_id, ["sh", "-c", "kill -TERM $$"])
    assert signalled.exit_code == 128 + 15, signalled
    missing = await rt.run(shared.sandbox_id, ["/no/such/command"])
    assert missing.exit_code != 0
    with pytest.raises(InvalidSpec):
        await rt.run(shared.sandbox_id, [])


async def test_stdin_reaches_the_process(backend: Backend, shared: SandboxInfo) -> None:
    rt = backend.runtime
    # More than a pipe holds, both ways at once: fed while the output is read.
    data = os.urandom(1 << 20)
    echoed = await rt.run(shared.sandbox_id, ["cat"], input=data)
    assert echoed.exit_code == 0 and echoed.stdout == data
    empty = await rt.run(shared.sandbox_id, ["wc", "-c"], input=b"")
    assert empty.stdout.strip() == b"0"
    process = await rt.exec(
        shared.sandbox_id, ["sh", "-c", 'read -r line; echo "got $line"'], stdin=True
    )
    assert process.stdin is not None
    process.stdin.write(b"a line\n")
    await process.stdin.drain()
    process.stdin.close()
    output = [chunk async for name, chunk in process.output() if name == "stdout"]
    assert (b"".join(output), await process.wait()) == (b"got a line\n", 0)


async def test_a_killed_process_ends(backend: Backend, shared: SandboxInfo) -> None:
    rt = backend.runtime
    process = await rt.exec(shared.sandbox_id, ["sleep", "600.25"])

    async def sleeping() -> bool:
        found = await rt.run(shared.sandbox_id, ["pgrep", "-f", "^sleep 600.25"])
        return found.exit_code == 0

    async def gone() -> bool:
        return not await sleeping()

    assert await wait_for(sleeping)
    process.kill()
    assert await asyncio.wait_for(process.wait(), 10) == 128 + 9
    assert await wait_for(gone)


# -- time, resources, output ----------------------------------------------------------------


async def test_set_timeout_moves_the_end(backend: Backend, shared: SandboxInfo) -> None:
    rt = backend.runtime
    before = time.time()
    moved = await rt.set_timeout(shared.sandbox_id, 120)
    assert before + 120 <= moved.end_at <= time.time() + 120
    assert (await rt.inspect(shared.sandbox_id)).end_at == moved.end_at
    for seconds in (-1, rt.settings.caps.lifetime_s + 1):
        with pytest.raises(InvalidSpec):
            await rt.set_timeout(shared.sandbox_id, seconds)
    assert (await rt.inspect(shared.sandbox_id)).end_at == moved.end_at
    await rt.set_timeout(shared.sandbox_id, SHARED_SPEC.timeout_s)


async def test_usage_is_within_the_limits(backend: Backend, shared: SandboxInfo) -> None:
    rt = backend.runtime
    limits = SHARED_SPEC.limits
    spin = "import time\nt = time.time()\nwhile time.time() - t < 2: pass"
    busy = await rt.exec(shared.sandbox_id, ["python3", "-c", spin])
    try:
        usage = await rt.usage(shared.sandbox_id, interval_s=0.5)
    finally:
        busy.kill()
        await busy.wait()
    assert usage.cpu_count == limits.cpu
    assert usage.cpu_used_pct > 0
    assert usage.mem_total == limits.memory_mb << 20
    assert 0 < usage.mem_used <= usage.mem_total
    assert usage.disk_total <= limits.disk_mb << 20
    assert 0 < usage.disk_used < usage.disk_total


async def test_counters_are_read_for_many_at_once(backend: Backend, shared: SandboxInfo) -> None:
    rt = backend.runtime
    limits = SHARED_SPEC.limits
    before = (await rt.counters([shared.sandbox_id, UNKNOWN_ID, *NOT_IDS]))[shared.sandbox_id]
    spin = "import time\nt = time.time()\nwhile time.time() - t < 0.5: pass"
    assert (await rt.run(shared.sandbox_id, ["python3", "-c", spin])).exit_code == 0
    found = await rt.counters([shared.sandbox_id, UNKNOWN_ID, *NOT_IDS])
    assert set(found) == {shared.sandbox_id}  # (unknown ids and non-ids are left out)
    after = found[shared.sandbox_id]
    assert after.cpu_ns - before.cpu_ns >= 100_000_000
    assert after.cpu_count == limits.cpu and after.mem_total == limits.memory_mb << 20
    assert 0 < after.mem_used <= after.mem_total
    assert 0 < after.disk_used < after.disk_total <= limits.disk_mb << 20


async def test_console_holds_what_init_wrote(backend: Backend, shared: SandboxInfo) -> None:
    rt = backend.runtime
    marker = f"console-{uuid.uuid4().hex}"
    await run_ok(rt, shared.sandbox_id, f"echo {marker} > /proc/1/fd/1")
    lines = await rt.console(shared.sandbox_id)
    assert marker in lines
    tail = await rt.console(shared.sandbox_id, limit_bytes=len(marker) + 1)
    assert tail == [marker]
    # The sandbox's log holds it too, at the sandbox's start (the console keeps no times).
    logged = [line for line in await rt.logs(shared.sandbox_id) if line.line == marker]
    assert [(line.stream, line.timestamp) for line in logged] == [("console", shared.created_at)]


# -- creates that must not happen ---------------------------------------------------------------


async def test_invalid_specs_are_refused(backend: Backend) -> None:
    rt = backend.runtime
    before = host_state(rt.settings)
    caps = rt.settings.caps
    for spec in (
        SandboxSpec(deny_out=("example.com",)),  # deny takes addresses only
        SandboxSpec(allow_out=("not a name!",)),
        SandboxSpec(allow_out=("2001:db8::/32",)),
        SandboxSpec(allow_out=tuple(f"10.0.{i}.0/24" for i in range(101))),
        SandboxSpec(limits=Limits(cpu=caps.cpu + 1)),
        SandboxSpec(timeout_s=caps.lifetime_s + 1),
        SandboxSpec(env={"NOT A NAME": "x"}),
        SandboxSpec(template="no-such-template"),
    ):
        if spec.template == SandboxSpec().template:
            with pytest.raises(InvalidSpec):
                rt.check(spec)
        with pytest.raises(InvalidSpec):
            await rt.create(spec)
    assert host_state(rt.settings) == before


async def test_a_live_id_is_not_taken_again(backend: Backend, shared: SandboxInfo) -> None:
    rt = backend.runtime
    before = host_state(rt.settings)
    with pytest.raises(SandboxExists):
        await rt.create(SandboxSpec(sandbox_id=shared.sandbox_id))
    assert host_state(rt.settings) == before
    assert await run_ok(rt, shared.sandbox_id, "echo still") == "still\n"


async def test_failed_create_leaves_nothing_behind(backend: Backend, shared: SandboxInfo) -> None:
    """A create that fails late (its sandbox runs, envd answers, the template's start command
    cannot start) undoes all it made."""
    rt = backend.runtime
    base = await asyncio.to_thread(rt.image, SandboxSpec().template)
    broken = f"conformance-broken-{backend.name}"
    rt.layers.save_image(
        dataclasses.replace(base, name=broken, user="nosuchuser", start_cmd="true")
    )
    ids = {i.sandbox_id for i in await rt.list()}
    before = host_state(rt.settings)
    try:
        with pytest.raises(RuntimeFailure):
            await rt.create(SandboxSpec(template=broken, sandbox_id=f"failed{backend.name}01"))
    finally:
        rt.layers.remove_image(broken)
    assert host_state(rt.settings) == before
    assert {i.sandbox_id for i in await rt.list()} == ids


# -- sandboxes of their own ---------------------------------------------------------------------


async def test_kill_leaves_nothing_behind(backend: Backend) -> None:
    rt = backend.runtime
    info = await rt.create(SandboxSpec())
    traces = sandbox_traces(rt.settings, info.sandbox_id)
    assert traces["mounts"] and traces["netns"] and traces["veths"] and traces["cgroups"]
    await run_ok(rt, info.sandbox_id, "sleep 1000 >/dev/null 2>&1 & echo started")
    await rt.kill(info.sandbox_id)
    assert _no_trace_of(backend, info.sandbox_id)
    assert info.sandbox_id not in {i.sandbox_id for i in await rt.list()}
    with pytest.raises(SandboxNotFound):
        await rt.kill(info.sandbox_id)


async def test_a_pooled_sandbox_is_routed_only_once_handed_over(
    backend: Backend, shared: SandboxInfo
) -> None:
    rt = backend.runtime
    info = await rt.create(SandboxSpec(pooled=True))
    try:
        assert info.pooled
        with pytest.raises(SandboxNotFound):
            rt.route(info.sandbox_id)
        listed = {i.sandbox_id: i for i in await rt.list()}
        assert listed[info.sandbox_id].pooled
        handing = time.time()
        owned = await rt.hand_over(info.sandbox_id, 60, {"owner": "conformance"})
        assert not owned.pooled and owned.state == "running"
        assert owned.metadata == {"owner": "conformance"}
        # Its life counts from the hand-over, as its owner sees it made then.
        assert handing <= owned.created_at <= time.time()
        assert owned.end_at - owned.created_at == pytest.approx(60)
        assert rt.route(info.sandbox_id).address == info.address
        assert await run_ok(rt, info.sandbox_id, "echo mine") == "mine\n"
        for taken in (info.sandbox_id, shared.sandbox_id, UNKNOWN_ID):  # (only pooled ones)
            with pytest.raises(SandboxNotFound):
                await rt.hand_over(taken, 60, {})
    finally:
        await rt.kill(info.sandbox_id)
    assert _no_trace_of(backend, info.sandbox_id)


async def test_expired_sandboxes_are_reaped(backend: Backend, shared: SandboxInfo) -> None:
    rt = backend.runtime
    info = await rt.create(SandboxSpec())
    try:
        assert info.sandbox_id not in await rt.reap_expired()
        await rt.set_timeout(info.sandbox_id, 0)
        # (those the caller keeps, as the service keeps those their timeout pauses, stay)
        assert info.sandbox_id not in await rt.reap_expired(keep={info.sandbox_id})
        assert await rt.is_running(info.sandbox_id)
        reaped = await rt.reap_expired()
        assert info.sandbox_id in reaped and shared.sandbox_id not in reaped
        assert _no_trace_of(backend, info.sandbox_id)
        assert await rt.is_running(shared.sandbox_id)
    finally:
        if info.sandbox_id in {i.sandbox_id for i in await rt.list()}:
            await rt.kill(info.sandbox_id)


async def test_stop_ends_every_process_and_reconcile_releases_the_rest(
    backend: Backend, shared: SandboxInfo
) -> None:
    """After ``stop`` nothing of the sandbox runs; its container is gone, so a reconcile
    releases it (and leaves the sandboxes that run alone)."""
    rt = backend.runtime
    before = host_state(rt.settings)
    info = await rt.create(SandboxSpec())
    try:
        process = await rt.exec(info.sandbox_id, ["sleep", "600"])
        await run_ok(rt, info.sandbox_id, "setsid sleep 600 >/dev/null 2>&1 & echo started")
        await rt.stop(info.sandbox_id)
        assert not await rt.is_running(info.sandbox_id)
        assert (await rt.inspect(info.sandbox_id)).state == "stopped"
        await asyncio.wait_for(process.wait(), 10)
        assert set(host_state(rt.settings)["processes"]) <= set(before["processes"])
        await asyncio.sleep(0.2)
        await rt.reconcile()
        assert info.sandbox_id not in {i.sandbox_id for i in await rt.list()}
        assert _no_trace_of(backend, info.sandbox_id)
        assert await run_ok(rt, shared.sandbox_id, "echo ok") == "ok\n"
    finally:
        with contextlib.suppress(SandboxNotFound):
            await rt.kill(info.sandbox_id)
    assert host_state(rt.settings) == before


async def test_commit_keeps_the_upper_layer_and_never_follows_links(backend: Backend) -> None:
    rt = backend.runtime
    key = layer_key("conformance", backend.name, uuid.uuid4().hex)
    info = await rt.create(SandboxSpec())
    try:
        await run_ok(rt, info.sandbox_id, "echo mine > ~/made-by-user", user="user")
        await run_ok(
            rt,
            info.sandbox_id,
            "echo root > /etc/made-by-root && rm /etc/debian_version"
            " && ln -s /etc/shadow /planted-file-link && ln -s / /planted-root-link"
            f" && ln -s {rt.settings.data_dir} /home/user/planted-dir-link",
        )
        await rt.commit(info.sandbox_id, key)
        assert not await rt.is_running(info.sandbox_id)
        layer = rt.layers.path(key)
        assert (layer / "home" / "user" / "made-by-user").read_text() == "mine\n"
        assert (layer / "etc" / "made-by-root").read_text() == "root\n"
        whiteout = os.lstat(layer / "etc" / "debian_version")  # (overlay's mark of a removal)
        assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
        for link, target in (
            ("planted-file-link", "/etc/shadow"),
            ("planted-root-link", "/"),
            ("home/user/planted-dir-link", str(rt.settings.data_dir)),
        ):
            assert (layer / link).is_symlink() and os.readlink(layer / link) == target
    finally:
        await rt.kill(info.sandbox_id)
        rt.layers.remove(key)
    assert _no_trace_of(backend, info.sandbox_id)


# -- envd ---------------------------------------------------------------------------------------


async def test_envd_killed_inside_is_revived(backend: Backend, shared: SandboxInfo) -> None:
    """envd killed from inside (by root, as any sandbox may) answers again once the runtime is
    asked to revive it (under gVisor the sandbox's own init starts it again)."""
    rt = backend.runtime
    killer = (
        "import os\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n"
        "        comm = open(f'/proc/{pid}/comm').read().strip()\n"
        "        argv = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')\n"
        "    except OSError:\n"
        "        continue\n"
        "    if comm == 'envd' or b'bilik.envd' in argv:\n"
        "        os.kill(int(pid), 9)\n"
        "        print(pid)\n"
    )
    killed = await rt.run(shared.sandbox_id, ["python3", "-c", killer])
    assert killed.exit_code == 0 and killed.stdout.split(), killed

    async def answers() -> bool:
        await rt.revive_envd(shared.sandbox_id)
        try:
            async with rt.envd(shared.sandbox_id) as envd:
                return (await envd.run("echo back")).output == "back\n"
        except (OSError, httpx.HTTPError, RuntimeFailure):
            return False

    assert await wait_for(answers, timeout=15)
    # Once envd answers again, revive says so.
    assert await rt.revive_envd(shared.sandbox_id)


# -- pause, resume, snapshot --------------------------------------------------------------------

# An in-memory counter that never starts over: its pid and count, replaced whole each tick.
COUNTER = (
    "import os, time\n"
    "n = 0\n"
    "while True:\n"
    "    n += 1\n"
    "    with open('/tmp/counter.new', 'w') as f:\n"
    "        f.write(f'{os.getpid()} {n}')\n"
    "    os.replace('/tmp/counter.new', '/tmp/counter')\n"
    "    time.sleep(0.02)\n"
)


async def _counter(rt: Runtime, sandbox_id: str) -> tuple[int, int]:
    pid, count = (await run_ok(rt, sandbox_id, "cat /tmp/counter")).split()
    return int(pid), int(count)


async def _start_counter(rt: Runtime, sandbox_id: str) -> tuple[int, int]:
    written = await rt.run(
        sandbox_id, ["sh", "-c", "cat > /tmp/counter.py"], input=COUNTER.encode()
    )
    assert written.exit_code == 0, written
    await run_ok(rt, sandbox_id, "setsid python3 /tmp/counter.py >/dev/null 2>&1 & echo started")

    async def counting() -> bool:
        found = await rt.run(sandbox_id, ["sh", "-c", "cat /tmp/counter"])
        return found.exit_code == 0 and int(found.stdout.split()[1]) > 2

    assert await wait_for(counting)
    return await _counter(rt, sandbox_id)


async def _assert_refused_while_paused(rt: Runtime, info: SandboxInfo) -> None:
    with pytest.raises(SandboxPaused):
        await rt.run(info.sandbox_id, ["true"])
    with pytest.raises(SandboxPaused):
        rt.route(info.sandbox_id)
    with pytest.raises(SandboxPaused):
        rt.envd(info.sandbox_id)
    with pytest.raises(SandboxPaused):
        await rt.set_timeout(info.sandbox_id, 60)
    with pytest.raises(SandboxPaused):
        await rt.usage(info.sandbox_id)
    with pytest.raises(SandboxPaused):
        await rt.pause(info.sandbox_id, memory=True)
    assert info.sandbox_id not in await rt.counters([info.sandbox_id])
    assert not await rt.is_running(info.sandbox_id)


async def test_a_memory_pause_keeps_processes_and_files(backend: Backend) -> None:
    rt = backend.runtime
    info = await rt.create(SandboxSpec())
    try:
        with pytest.raises(SandboxNotPaused):
            await rt.resume(info.sandbox_id, 60)
        await run_ok(rt, info.sandbox_id, "echo kept > /home/user/kept")
        pid, before = await _start_counter(rt, info.sandbox_id)
        paused = await rt.pause(info.sandbox_id, memory=True)
        assert paused.state == "paused" and paused.pause is not None
        assert paused.pause.memory and not paused.pause.memory_lost
        inspected = await rt.inspect(info.sandbox_id)
        assert (inspected.state, inspected.pause) == ("paused", paused.pause)
        listed = {i.sandbox_id: i for i in await rt.list()}[info.sandbox_id]
        assert (listed.state, listed.pause) == ("paused", paused.pause)
        await _assert_refused_while_paused(rt, info)
        resuming = time.time()
        resumed = await rt.resume(info.sandbox_id, 90)
        assert resumed.state == "running" and resumed.pause is None
        assert (resumed.sandbox_id, resumed.address) == (info.sandbox_id, info.address)
        assert resuming + 90 <= resumed.end_at <= time.time() + 90
        after_pid, after = await _counter(rt, info.sandbox_id)
        assert after_pid == pid and after >= before  # (the same process, counting on)
        assert await run_ok(rt, info.sandbox_id, "cat /home/user/kept") == "kept\n"

        async def counts_on() -> bool:
            return (await _counter(rt, info.sandbox_id))[1] > after

        assert await wait_for(counts_on)
        assert rt.route(info.sandbox_id).address == info.address
    finally:
        await rt.kill(info.sandbox_id)
    assert _no_trace_of(backend, info.sandbox_id)


async def test_a_files_pause_keeps_files_and_cold_boots(backend: Backend) -> None:
    rt = backend.runtime
    base = await asyncio.to_thread(rt.image, SandboxSpec().template)
    name = f"conformance-boots-{backend.name}"
    rt.layers.save_image(
        dataclasses.replace(
            base,
            name=name,
            start_cmd="echo booted >> /home/user/boots; sleep 100000",
            ready_cmd="test -s /home/user/boots",
        )
    )
    try:
        info = await rt.create(SandboxSpec(template=name))
    finally:
        rt.layers.remove_image(name)
    try:
        await run_ok(rt, info.sandbox_id, "echo kept > /home/user/kept")
        await _start_counter(rt, info.sandbox_id)
        paused = await rt.pause(info.sandbox_id, memory=False)
        assert paused.state == "paused" and paused.pause is not None
        assert not paused.pause.memory and paused.pause.durable
        assert not paused.pause.memory_lost
        assert (await rt.inspect(info.sandbox_id)).pause == paused.pause
        await _assert_refused_while_paused(rt, info)
        resumed = await rt.resume(info.sandbox_id, 60)
        assert (resumed.state, resumed.address) == ("running", info.address)
        assert await run_ok(rt, info.sandbox_id, "cat /home/user/kept") == "kept\n"
        # The start command ran again; the counter's process is gone with the old container.
        assert await run_ok(rt, info.sandbox_id, "cat /home/user/boots") == "booted\nbooted\n"
        gone = await run_ok(rt, info.sandbox_id, "pgrep -f '^python3 /tmp/counter' || echo none")
        assert gone == "none\n"
        async with rt.envd(info.sandbox_id) as envd:
            assert (await envd.run("echo $GREETING-envd")).output == "-envd\n"
        # Paused again, in memory this time, and back.
        await rt.pause(info.sandbox_id, memory=True)
        await rt.resume(info.sandbox_id, 60)
        assert await run_ok(rt, info.sandbox_id, "cat /home/user/kept") == "kept\n"
    finally:
        await rt.kill(info.sandbox_id)
    assert _no_trace_of(backend, info.sandbox_id)


@pytest.mark.parametrize("memory", [True, False])
async def test_kill_of_a_paused_sandbox_leaves_nothing(backend: Backend, memory: bool) -> None:
    rt = backend.runtime
    info = await rt.create(SandboxSpec())
    await run_ok(rt, info.sandbox_id, "setsid sleep 1000 >/dev/null 2>&1 & echo started")
    await rt.pause(info.sandbox_id, memory=memory)
    await rt.kill(info.sandbox_id)
    assert _no_trace_of(backend, info.sandbox_id)
    assert info.sandbox_id not in {i.sandbox_id for i in await rt.list()}


@pytest.mark.parametrize("memory", [True, False])
async def test_paused_sandboxes_are_kept_by_reaper_and_reconcile(
    backend: Backend, memory: bool
) -> None:
    rt = backend.runtime
    info = await rt.create(SandboxSpec())
    try:
        await run_ok(rt, info.sandbox_id, "echo kept > /home/user/kept")
        await rt.set_timeout(info.sandbox_id, 0)  # (its end has come: a running one is reaped)
        paused = await rt.pause(info.sandbox_id, memory=memory)
        assert info.sandbox_id not in await rt.reap_expired()
        await rt.reconcile()
        kept = await rt.inspect(info.sandbox_id)
        assert (kept.state, kept.pause) == ("paused", paused.pause)
        await rt.resume(info.sandbox_id, 60)
        assert info.sandbox_id not in await rt.reap_expired()
        assert await run_ok(rt, info.sandbox_id, "cat /home/user/kept") == "kept\n"
    finally:
        await rt.kill(info.sandbox_id)
    assert _no_trace_of(backend, info.sandbox_id)


async def test_a_snapshot_is_an_image_of_the_files(backend: Backend) -> None:
    rt = backend.runtime
    marker = uuid.uuid4().hex
    name = f"conformance/snap-{backend.name}:{marker[:8]}"
    info = await rt.create(SandboxSpec())
    made: list[str] = []
    try:
        await run_ok(
            rt,
            info.sandbox_id,
            f"echo {marker} > /home/user/marker && rm /etc/debian_version"
            " && ln -s /etc/shadow /home/user/planted-link",
        )
        image = await rt.snapshot(info.sandbox_id, name)
        made.append(image.layers[-1])
        assert image.name == name and image.oci_runtime == backend.name
        assert image.layers[:-1] == rt.image(SandboxSpec().template).layers
        # The sandbox runs on, its processes unfrozen.
        assert (await rt.inspect(info.sandbox_id)).state == "running"
        assert await run_ok(rt, info.sandbox_id, "echo on") == "on\n"
        layer = rt.layers.path(image.layers[-1])
        assert (layer / "home/user/planted-link").is_symlink()  # (copied as a link)
        assert image.layers[-1] not in rt.collect_layers(grace_s=0)
        child = await rt.create(SandboxSpec(template=name))
        try:
            seen = await run_ok(
                rt,
                child.sandbox_id,
                "cat /home/user/marker; test -e /etc/debian_version || echo removed;"
                " readlink /home/user/planted-link",
            )
            assert seen == f"{marker}\nremoved\n/etc/shadow\n"
        finally:
            await rt.kill(child.sandbox_id)
        # A paused sandbox stays paused through a snapshot.
        await run_ok(rt, info.sandbox_id, f"echo {marker}-2 > /home/user/marker")
        for memory in (True, False):
            await rt.pause(info.sandbox_id, memory=memory)
            again = await rt.snapshot(info.sandbox_id, name)
            made.append(again.layers[-1])
            assert (await rt.inspect(info.sandbox_id)).state == "paused"
            marked = rt.layers.path(again.layers[-1]) / "home/user/marker"
            assert marked.read_text() == f"{marker}-2\n"
            await rt.resume(info.sandbox_id, 60)
    finally:
        await rt.kill(info.sandbox_id)
        rt.layers.remove_image(name)
        for key in made:
            rt.layers.remove(key)
    assert _no_trace_of(backend, info.sandbox_id)


async def test_pause_and_resume_of_unknown_sandboxes(backend: Backend) -> None:
    rt = backend.runtime
    for sandbox_id in (UNKNOWN_ID, *NOT_IDS):
        with pytest.raises(SandboxNotFound):
            await rt.pause(sandbox_id, memory=True)
        with pytest.raises(SandboxNotFound):
            await rt.resume(sandbox_id, 60)
        with pytest.raises(SandboxNotFound):
            await rt.snapshot(sandbox_id, "conformance-nothing")
