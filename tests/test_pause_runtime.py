"""Pause and resume lose nothing: many cycles under each runtime and mode, and a crash at every
step of a pause or a resume (``BILIK_FAULT``), settled by the next start's reconcile.

A writer in the sandbox (its template's start command, so a cold boot starts it again)
appends sequence numbers to a file, each fsynced before the next, carrying on from the file's
last number when it starts; beside it the test writes files through ``run()``, each
acknowledged when ``run()`` returns. After every resume the sequence has no gap, it reaches at
least the last number seen before the pause, every acknowledged file is there, and (a memory
pause) the same writer process carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from bilik.runtime import LocalRuntime, SandboxInfo, SandboxSpec, cgroups, syscalls
from bilik.runtime.errors import SandboxPaused
from helpers import SETTINGS, run_ok, sandbox_traces

WRITER = textwrap.dedent(
    """\
    import os, time
    path = '/home/user/seq'
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    lines = open(path).read().split()
    n = int(lines[-1]) if lines else 0
    with open('/home/user/writer.pid', 'w') as f:
        f.write(str(os.getpid()))
    while True:
        n += 1
        os.write(fd, b'%d\\n' % n)
        os.fsync(fd)
        time.sleep(0.002)
    """
)
WRITER_CMD = f"python3 -c 'exec(bytes.fromhex(\"{WRITER.encode().hex()}\").decode())'"

# Prints the sequence's length (failing at its first gap), the acknowledged files, the writer.
CHECK = (
    'awk \'NR != $1 { print "gap at line " NR ": " $0; exit 1 } END { print NR }\''
    " /home/user/seq && ls /home/user/acked | wc -l && cat /home/user/writer.pid"
)

# Cycles per runtime and mode (memory pause or files pause): fewer where a cycle is slow
# (gVisor's execs, and its cold boot: about 1 and 5 s a cycle).
CYCLES = {
    ("crun", True): 100,
    ("crun", False): 100,
    ("runsc", True): 20,
    ("runsc", False): 3,
}

FAULTS = {
    (True, "pause"): ["pause:intent", "pause:freeze", "pause:commit"],
    (False, "pause"): [
        "pause:intent",
        "pause:sync",
        "pause:freeze",
        "pause:syncfs",
        "pause:stop",
        "pause:commit",
    ],
    (True, "resume"): ["resume:intent", "resume:thaw", "resume:commit"],
    (False, "resume"): ["resume:intent", "resume:boot", "resume:envd", "resume:commit"],
}


@pytest_asyncio.fixture(params=["crun", "runsc"])
async def writing(
    request: pytest.FixtureRequest, runtime: LocalRuntime
) -> AsyncIterator[SandboxInfo]:
    """A sandbox under the runtime ``request.param`` whose start command is the writer."""
    base = await asyncio.to_thread(runtime.image, SandboxSpec().template)
    name = f"pause-writer-{request.param}"
    runtime.layers.save_image(
        dataclasses.replace(
            base, name=name, start_cmd=WRITER_CMD, ready_cmd="test -s /home/user/seq"
        )
    )
    try:
        info = await runtime.create(SandboxSpec(template=name), oci_runtime=request.param)
    finally:
        runtime.layers.remove_image(name)
    try:
        await run_ok(runtime, info.sandbox_id, "mkdir /home/user/acked")
        yield info
    finally:
        with contextlib.suppress(Exception):
            await runtime.kill(info.sandbox_id)
    assert not any(sandbox_traces(runtime.settings, info.sandbox_id).values())


class Ledger:
    """What the test wrote and saw of one sandbox, and the checks after each resume."""

    def __init__(self, rt: LocalRuntime, sandbox_id: str) -> None:
        self.rt = rt
        self.sandbox_id = sandbox_id
        self.acked = 0
        self.seen = 0  # the sequence's length seen last
        self.writer = ""

    async def write(self) -> None:
        """An acknowledged write, and the sequence as it stands."""
        k = self.acked + 1
        out = await run_ok(
            self.rt,
            self.sandbox_id,
            f"echo {k} > /home/user/acked/{k} && wc -l < /home/user/seq"
            " && cat /home/user/writer.pid",
        )
        self.acked = k
        length, self.writer = out.split()
        self.seen = int(length)

    async def check(self, *, same_writer: bool) -> None:
        out = await run_ok(self.rt, self.sandbox_id, CHECK)
        length, acked, writer = out.split()
        assert int(length) >= self.seen, (length, self.seen)
        assert int(acked) == self.acked
        if same_writer:
            assert writer == self.writer
        self.seen, self.writer = int(length), writer


@pytest.mark.parametrize("memory", [True, False], ids=["memory", "files"])
async def test_no_write_is_lost_over_many_cycles(
    runtime: LocalRuntime, writing: SandboxInfo, memory: bool
) -> None:
    rt, sandbox_id = runtime, writing.sandbox_id
    ledger = Ledger(rt, sandbox_id)
    cycles = CYCLES[(writing.oci_runtime, memory)]
    paused_s = resumed_s = 0.0
    for _ in range(cycles):
        await ledger.write()
        started = time.monotonic()
        info = await rt.pause(sandbox_id, memory=memory)
        paused_s += time.monotonic() - started
        assert info.pause is not None and info.pause.memory == memory
        started = time.monotonic()
        info = await rt.resume(sandbox_id, 60)
        resumed_s += time.monotonic() - started
        assert (info.state, info.address) == ("running", writing.address)
        await ledger.check(same_writer=memory)
    await ledger.check(same_writer=memory)
    print(
        f"{writing.oci_runtime} {'memory' if memory else 'files'}: {cycles} cycles,"
        f" pause {1000 * paused_s / cycles:.1f} ms, resume {1000 * resumed_s / cycles:.1f} ms"
    )


_CRASHER = """
import asyncio, dataclasses, sys
sys.path.insert(0, {tests!r})
from helpers import SETTINGS
from bilik.runtime import LocalRuntime

async def main() -> None:
    rt = LocalRuntime(SETTINGS)
    await rt.start()
    if {op!r} == "pause":
        await rt.pause({sandbox_id!r}, memory={memory!r})
    else:
        await rt.resume({sandbox_id!r}, 60)
    await rt.close()

asyncio.run(main())
"""


def _crash(op: str, sandbox_id: str, memory: bool, point: str) -> None:
    """Run a pause or resume in another process that dies (SIGKILL) at ``point``."""
    script = _CRASHER.format(
        tests=str(Path(__file__).parent), op=op, sandbox_id=sandbox_id, memory=memory
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "BILIK_FAULT": point},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -9, (point, done.returncode, done.stderr[-2000:])


def _temp_files(rt: LocalRuntime, sandbox_id: str) -> list[str]:
    d = rt.records.dir(sandbox_id)
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")] + [
        p.name for p in rt.layers.tmp_dir.iterdir() if p.name.startswith("snapshot-")
    ]


@pytest.mark.parametrize("memory", [True, False], ids=["memory", "files"])
async def test_a_crash_at_any_step_loses_nothing(
    runtime: LocalRuntime, writing: SandboxInfo, memory: bool
) -> None:
    rt, sandbox_id = runtime, writing.sandbox_id
    ledger = Ledger(rt, sandbox_id)
    for op in ("pause", "resume"):
        for point in FAULTS[(memory, op)]:
            gvisor_only = point == "pause:sync" or None
            if not memory and point == "pause:freeze":
                gvisor_only = False  # (a files pause under gVisor freezes nothing)
            if gvisor_only is not None and gvisor_only != (writing.oci_runtime == "runsc"):
                continue
            await ledger.write()
            if op == "resume":
                await rt.pause(sandbox_id, memory=memory)
            await asyncio.to_thread(_crash, op, sandbox_id, memory, point)
            fresh = LocalRuntime(SETTINGS)
            await fresh.start()
            try:
                await fresh.reconcile()
            finally:
                await fresh.close()
            settled = await rt.inspect(sandbox_id)
            assert settled.sandbox_id == sandbox_id, point
            assert settled.state in ("running", "paused"), (point, settled)
            assert not _temp_files(rt, sandbox_id), point
            if settled.state == "paused":
                assert settled.pause is not None
                assert not settled.pause.memory_lost, point  # (nothing restarted here)
                await rt.resume(sandbox_id, 60)
            assert (await rt.inspect(sandbox_id)).state == "running"
            # The same writer carries on unless the sandbox was booted anew.
            await ledger.check(same_writer=False)


def _lose_host_side(rt: LocalRuntime, sandbox_id: str) -> None:
    """What a restart of the host takes from a files-paused sandbox: its mounts, network
    namespace, egress rules and cgroups (its record, disk image and control files stay)."""
    record = rt.records.load(sandbox_id)
    assert record is not None
    for point in syscalls.mounted_under(str(rt.records.dir(sandbox_id))):
        syscalls.umount(point)
    rt.bundles.set_egress(record, on=False)
    rt.network.delete(sandbox_id, record.address)
    cgroups.remove_cgroup(rt.settings.instance, sandbox_id)


async def test_a_files_pause_outlives_the_host_side(
    runtime: LocalRuntime, writing: SandboxInfo
) -> None:
    """A files pause is durable: with its mounts and network gone (as after a restart of the
    host), the sandbox stays paused through a reconcile, and a resume makes them again over
    the same disk."""
    rt, sandbox_id = runtime, writing.sandbox_id
    ledger = Ledger(rt, sandbox_id)
    await ledger.write()
    paused = await rt.pause(sandbox_id, memory=False)
    await asyncio.to_thread(_lose_host_side, rt, sandbox_id)
    fresh = LocalRuntime(SETTINGS)
    await fresh.start()
    try:
        await fresh.reconcile()
    finally:
        await fresh.close()
    kept = await rt.inspect(sandbox_id)
    assert (kept.state, kept.pause) == ("paused", paused.pause)
    with pytest.raises(SandboxPaused):  # (its disk is not mounted: resume it first)
        await rt.snapshot(sandbox_id, "pause-runtime-unmounted")
    resumed = await rt.resume(sandbox_id, 60)
    assert (resumed.state, resumed.address) == ("running", writing.address)
    await ledger.check(same_writer=False)
    await ledger.write()
    # Its network is back, at the same address.
    probe = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
        f" s.connect(('{rt.network.gateway}', 9)); print(s.getsockname()[0])"
    )
    assert await run_ok(rt, sandbox_id, f'python3 -c "{probe}"') == f"{writing.address}\n"
    async with rt.envd(sandbox_id) as envd:
        assert (await envd.run("echo up")).output == "up\n"


async def test_a_memory_pause_that_loses_its_memory_keeps_its_files(
    runtime: LocalRuntime, writing: SandboxInfo
) -> None:
    """A memory pause does not outlive the host: after a restart (its processes, mounts,
    network and OCI state gone) a reconcile keeps it paused with its files alone, saying its
    memory was lost; a resume cold-boots it over the same disk."""
    rt, sandbox_id = runtime, writing.sandbox_id
    ledger = Ledger(rt, sandbox_id)
    await ledger.write()
    await rt.pause(sandbox_id, memory=True)

    def restart_host() -> None:
        rt._kill_members(sandbox_id)
        cgroups.thaw(rt.settings.instance, sandbox_id)
        state_dir = rt.oci(writing.oci_runtime).root  # (on /run: a restart empties it)
        for path in state_dir.iterdir():
            if sandbox_id in path.name:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        _lose_host_side(rt, sandbox_id)

    await asyncio.to_thread(restart_host)
    fresh = LocalRuntime(SETTINGS)
    await fresh.start()
    try:
        await fresh.reconcile()
    finally:
        await fresh.close()
    kept = await rt.inspect(sandbox_id)
    assert kept.state == "paused" and kept.pause is not None
    assert kept.pause.memory_lost and not kept.pause.memory
    assert (kept.pause.mechanism, kept.pause.durable) == ("disk", True)
    await rt.resume(sandbox_id, 60)
    await ledger.check(same_writer=False)
    await ledger.write()
