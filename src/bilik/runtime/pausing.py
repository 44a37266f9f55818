"""Pausing and resuming sandboxes, taking snapshots of them, and settling what a crash left.

Two kinds of pause, under both OCI runtimes:

- **memory** (``memory=True``): the sandbox is frozen in place (``mechanism "freezer"``): its
  processes and RAM stay as they are and a resume thaws them, in milliseconds. It does not
  survive a restart of the machine (``durable`` False). Under crun its cgroup is frozen; under
  gVisor the Sentry stops its own tasks (``runsc pause``: the cgroup freezer cannot always
  freeze gVisor's ptrace platform). (gVisor's ``runsc checkpoint`` would make it durable, but
  the Debian build refuses to checkpoint a sandbox with host networking, which bilik's gVisor
  sandboxes use: see ``backends.Runsc``.)
- **files** (``memory=False``, ``mechanism "disk"``, durable): frozen, the disk's filesystem
  flushed to the disk image (``syncfs``, then the image fsynced), then every process ended
  (under gVisor: ``sync`` inside, every process ended at once with the Sentry, then flushed).
  The record, the disk, its mounts, the control directory (envd's token) and the network stay;
  a resume starts a new container over the same disk and bundle, envd with the same token, and
  the template's start command and ready check again. After a restart of the host, the resume
  first makes again what the restart took (``Bundles.remake``: mounts, network namespace,
  egress rules), over the same disk. (gVisor's Sentry may hold written data
  the host has not seen yet: hence its ``sync`` inside.)

Every step is recorded first (``SandboxRecord.pause_op``) and its result after
(``SandboxRecord.pause``), each a durable record write, so :func:`settle` (run by the server's
``reconcile`` at start) can tell from what actually runs how a crashed pause or resume ended:
frozen → paused in memory; running → running (a cold boot that had not finished is stopped
again: files-paused); gone → files-paused, saying ``memory_lost`` if memory was to be kept.
``faults.fault`` marks each step, for tests that crash there.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import time
from typing import TYPE_CHECKING, Any

from . import cgroups, oci
from .base import PauseInfo, SandboxInfo
from .bundle import CONSOLE_LOG
from .errors import InvalidSpec, SandboxNotPaused, SandboxPaused, StepFailed, step
from .faults import fault
from .layers import BadTree, Image
from .records import SandboxRecord

if TYPE_CHECKING:
    from .local import LocalRuntime

# How long ``sync`` inside a gVisor sandbox may take before a files pause goes on without it.
SYNC_INSIDE_S = 10.0

_libc = ctypes.CDLL(None, use_errno=True)


def pause_info(record: SandboxRecord) -> PauseInfo | None:
    """The record's pause, as callers see it (None: not paused)."""
    if record.pause is None:
        return None
    return PauseInfo(**record.pause)


def _syncfs(path: str) -> None:
    """Flush the filesystem that ``path`` (a directory, opened without following a link) is on."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"syncfs {path}: {os.strerror(e)}")
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def pause(rt: LocalRuntime, sandbox_id: str, *, memory: bool) -> SandboxInfo:
    """See ``Runtime.pause``: returns once the pause is as durable as its ``PauseInfo`` says;
    a failed pause leaves the sandbox running (StepFailed)."""
    instance = rt.settings.instance
    async with rt._locked(sandbox_id):
        record = rt._record(sandbox_id)
        if record.pause is not None:
            raise SandboxPaused(sandbox_id)
        if record.pooled or not await rt._alive(record):
            raise StepFailed("pause", f"sandbox {sandbox_id!r} is not running")
        backend = rt.oci(record.oci_runtime)
        record = await rt._update(sandbox_id, pause_op={"op": "pause", "memory": memory})
        fault("pause:intent")
        stopping = False
        try:
            if not memory and not backend.freezes_cgroup:
                # gVisor: its kernel's writes reach the host's files, then the Sentry and its
                # gofer are killed at once, with every process of the sandbox (a sandbox runsc
                # paused could not be deleted after: runsc panics).
                await _sync_inside(rt, sandbox_id)
                fault("pause:sync")
            else:
                with step("freeze"):
                    await backend.freeze(instance, sandbox_id)
                fault("pause:freeze")
            if memory:
                info = {"memory": True, "mechanism": "freezer", "durable": False}
            else:
                d = rt.records.dir(sandbox_id)
                if not backend.freezes_cgroup:
                    stopping = True
                    rt._unfollow(sandbox_id)
                    await rt._stop_locked(record, kill_first=True)
                with step("syncfs"):
                    await asyncio.to_thread(_syncfs, str(d / "disk"))
                    await asyncio.to_thread(_fsync_file, str(d / "disk.img"))
                fault("pause:syncfs")
                if backend.freezes_cgroup:
                    stopping = True
                    rt._unfollow(sandbox_id)
                    # Killed while frozen: a thawed process with SIGKILL pending dies before
                    # it runs another instruction of its own.
                    await asyncio.to_thread(rt._kill_members, sandbox_id)
                    await asyncio.to_thread(cgroups.thaw, instance, sandbox_id)
                    await rt._stop_locked(record)
                fault("pause:stop")
                info = {"memory": False, "mechanism": "disk", "durable": True}
        except BaseException:
            if not stopping:
                await backend.thaw(instance, sandbox_id)
                await rt._update(sandbox_id, pause_op=None)
            else:  # (its processes may be gone: whatever it is now, said as reconcile would)
                with contextlib.suppress(Exception):
                    await settle(rt, sandbox_id)
            raise
        info["paused_at"] = time.time()
        changes: dict[str, Any] = {"pause": info, "pause_op": None}
        if not memory:
            changes.update(init_pid=0, init_start=0)
        record = await rt._update(sandbox_id, **changes)
        fault("pause:commit")
    return rt._info(record, "paused")


async def resume(rt: LocalRuntime, sandbox_id: str, timeout_s: float) -> SandboxInfo:
    """See ``Runtime.resume``: the sandbox runs again, ending ``timeout_s`` from now."""
    if not 0 < timeout_s <= rt.settings.caps.lifetime_s:
        raise InvalidSpec(f"timeout must be between 0 and {rt.settings.caps.lifetime_s}")
    instance = rt.settings.instance
    async with rt._locked(sandbox_id):
        record = rt._record(sandbox_id)
        if record.pause is None:
            raise SandboxNotPaused(sandbox_id)
        in_memory = record.pause["memory"] and await rt._alive(record)
        op = {"op": "resume", "memory": in_memory, "timeout_s": timeout_s}
        record = await rt._update(sandbox_id, pause_op=op)
        fault("resume:intent")
        if in_memory:
            try:
                with step("thaw"):
                    await rt.oci(record.oci_runtime).thaw(instance, sandbox_id)
            except BaseException:
                with contextlib.suppress(Exception):
                    await settle(rt, sandbox_id)  # (still frozen: paused as it was)
                raise
            fault("resume:thaw")
        else:
            try:
                await _boot(rt, record)
            except BaseException:
                # Back to paused as it was: no process of the failed boot is left.
                await asyncio.shield(_unboot(rt, record))
                raise
        record = await rt._update(
            sandbox_id, pause=None, pause_op=None, end_at=time.time() + timeout_s
        )
        fault("resume:commit")
    return rt._info(record, "running")


async def _boot(rt: LocalRuntime, record: SandboxRecord) -> None:
    """Start a files-paused sandbox's container again over its disk, envd with the same token,
    and the template's start command (and wait for its ready check)."""
    sandbox_id = record.sandbox_id
    d = rt.records.dir(sandbox_id)
    await asyncio.to_thread(rt.bundles.remake, record)  # (after a host restart)
    backend = rt.oci(record.oci_runtime)
    await backend.delete(sandbox_id)  # (what is left of the old container's state)

    def cgroups_of() -> list[Any]:
        config = json.loads((d / "config.json").read_text())
        resources = config["linux"]["resources"]
        return backend.make_cgroups(rt.settings.instance, sandbox_id, resources)

    with step("cgroups"):
        procs = await asyncio.to_thread(cgroups_of)
    with step("oci-start"):
        pid = await backend.run_detached(sandbox_id, d, d / CONSOLE_LOG, procs)
    from .local import _start_time  # (local imports this module)

    record = await rt._update(sandbox_id, init_pid=pid, init_start=_start_time(pid))
    fault("resume:boot")
    rt._follow_init(record)
    if backend.starts_envd:
        with step("start-envd"):
            await rt._spawn_envd(record)
    await rt._wait_for_envd(record)
    fault("resume:envd")
    if record.start_cmd:
        await rt._start_workload(record, _image_of(record, record.template))


async def _unboot(rt: LocalRuntime, record: SandboxRecord) -> None:
    """Undo a failed cold boot: every process gone, the record paused as before."""
    try:
        rt._unfollow(record.sandbox_id)
        await rt._stop_locked(record)
    finally:
        await rt._update(record.sandbox_id, pause_op=None, init_pid=0, init_start=0)


async def _sync_inside(rt: LocalRuntime, sandbox_id: str) -> None:
    """Run ``sync`` inside (bilik's own busybox, which the sandbox cannot change): what the
    sandbox's kernel holds reaches the host's files. A sandbox that stalls it only delays."""
    proc = await rt.exec(sandbox_id, [f"{oci.RUNTIME_MOUNT}/busybox", "sync"])
    try:
        await asyncio.wait_for(proc.wait(), SYNC_INSIDE_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        rt.log(f"pause of {sandbox_id}: sync inside did not end in {SYNC_INSIDE_S:.0f} s")


def _image_of(record: SandboxRecord, name: str, extra_layer: str | None = None) -> Image:
    """The image a sandbox stands on, as its record keeps it (plus ``extra_layer`` on top)."""
    layers = (*record.layers, extra_layer) if extra_layer else tuple(record.layers)
    return Image(
        name=name,
        layers=layers,
        env=dict(record.image_env if record.image_env is not None else record.env),
        user=record.user,
        workdir=record.workdir,
        oci_runtime=record.oci_runtime,
        start_cmd=record.start_cmd,
        ready_cmd=record.ready_cmd,
    )


async def snapshot(rt: LocalRuntime, sandbox_id: str, image_name: str) -> Image:
    """See ``Runtime.snapshot``. A running sandbox is frozen for the copy alone; a paused one
    stays paused. The disk of a files-paused sandbox stays mounted while the host runs; if it
    is not (the host restarted), SandboxPaused: resume it first."""
    if not image_name or len(image_name) > 255 or "\0" in image_name:
        raise InvalidSpec(f"not an image name: {image_name!r}")
    instance = rt.settings.instance
    async with rt._locked(sandbox_id):
        record = rt._record(sandbox_id)
        disk = rt.records.dir(sandbox_id) / "disk"
        if not os.path.ismount(disk):
            raise SandboxPaused(sandbox_id)
        freeze = record.pause is None
        backend = rt.oci(record.oci_runtime)
        if freeze:
            if record.pooled or not await rt._alive(record):
                raise StepFailed("snapshot", f"sandbox {sandbox_id!r} is not running")
            if not backend.starts_envd:
                await _sync_inside(rt, sandbox_id)
            with step("freeze"):
                await backend.freeze(instance, sandbox_id)
        try:
            key = await asyncio.to_thread(rt.layers.snapshot_upper, disk)
        except BadTree as e:
            raise StepFailed("snapshot", f"what the sandbox holds cannot be kept: {e}") from None
        finally:
            if freeze:
                await backend.thaw(instance, sandbox_id)
        image = _image_of(record, image_name, key)
        await asyncio.to_thread(rt.layers.save_image, image)
    return image


async def settle(rt: LocalRuntime, sandbox_id: str) -> None:
    """Make a paused sandbox's record, or one with a pause or resume in flight, match what
    runs (the caller holds its lock); see the module's docstring."""
    record = rt.records.load(sandbox_id)
    if record is None or (record.pause is None and record.pause_op is None):
        return
    op = record.pause_op or {}
    now = time.time()
    backend = rt.oci(record.oci_runtime)
    frozen = await backend.is_frozen(rt.settings.instance, sandbox_id)
    alive = await rt._alive(record)
    if alive and frozen:
        if record.pause is None or not record.pause["memory"]:
            rt.log(f"reconcile: {sandbox_id} is frozen: paused in memory")
            pause = {"memory": True, "mechanism": "freezer", "durable": False, "paused_at": now}
            await rt._update(sandbox_id, pause=pause, pause_op=None)
        elif op:
            await rt._update(sandbox_id, pause_op=None)
    elif alive and op.get("op") == "resume" and not op.get("memory"):
        rt.log(f"reconcile: {sandbox_id} had not finished booting: files-paused again")
        await _unboot(rt, record)
    elif alive:
        changes: dict[str, Any] = {"pause": None, "pause_op": None}
        if op.get("op") == "resume":
            changes["end_at"] = now + float(op.get("timeout_s", 0))
        rt.log(f"reconcile: {sandbox_id} runs")
        await rt._update(sandbox_id, **changes)
    elif not op and record.pause is not None and not record.pause["memory"]:
        return  # (files-paused, and nothing in flight: as it should be)
    else:
        pause = dict(record.pause or {})
        if not pause or pause.get("memory"):
            lost = bool(pause.get("memory") or (op.get("op") == "pause" and op.get("memory")))
            if lost:
                rt.log(f"reconcile: {sandbox_id} lost its memory: paused with its files alone")
            pause = {
                "memory": False,
                "mechanism": "disk",
                "durable": True,
                "paused_at": pause.get("paused_at", now),
                "memory_lost": lost,
            }
        # Whatever is left of the old container (a process outliving its init, a state dir).
        with contextlib.suppress(StepFailed):
            await backend.thaw(rt.settings.instance, sandbox_id)
        await rt._stop_locked(record)
        await rt._update(sandbox_id, pause=pause, pause_op=None, init_pid=0, init_start=0)
