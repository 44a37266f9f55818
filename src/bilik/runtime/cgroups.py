"""cgroup layout: which hierarchy the host has, the fix crun needs on hybrid hosts, usage.

Sandboxes live in ``<instance>/<sandbox id>`` under every controller (v1) or under the unified
tree (v2). crun creates them from the bundle; for runsc, which cannot from its user namespace,
:func:`create` does. This module also removes them, finds leftovers and reads usage.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer", "blkio", "cpuset", "devices")


def is_v2() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def prepare_host() -> None:
    """Make the host's cgroups usable by crun.

    On a v1 "hybrid" host (v1 controllers plus a v2 mount at ``unified``), crun refuses to run
    while any controller is left on the v2 side; on these hosts that is ``hugetlb``. Mounting
    hugetlb as a v1 hierarchy moves it over, after which crun works.
    """
    if is_v2():
        return
    unified = CGROUP_ROOT / "unified" / "cgroup.controllers"
    try:
        leftover = unified.read_text().split()
    except FileNotFoundError:
        return
    for controller in leftover:
        target = CGROUP_ROOT / controller
        if target.is_dir() and os.path.ismount(target):
            continue
        # /sys/fs/cgroup is a tmpfs on hybrid hosts, so a new mount point can be made there.
        target.mkdir(exist_ok=True)
        subprocess.run(
            ["mount", "-t", "cgroup", "-o", controller, "cgroup", str(target)],
            check=True,
            capture_output=True,
        )


# The controllers a runsc sandbox is limited by (v1). Its devices are the Sentry's own.
_LIMITED = ("memory", "cpu", "cpuacct", "pids")
_V2_CONTROLLERS = "+memory +cpu +pids"


def create(instance: str, sandbox_id: str, resources: dict[str, Any]) -> list[Path]:
    """Make the sandbox's cgroups with the limits of a bundle's ``linux.resources`` (memory,
    cpu, pids); returns the ``cgroup.procs`` files a process writes its pid to, to run in
    them."""
    memory = resources["memory"]["limit"]
    swap = resources["memory"]["swap"]
    quota, period = resources["cpu"]["quota"], resources["cpu"]["period"]
    pids = resources["pids"]["limit"]
    if is_v2():
        path = CGROUP_ROOT / instance / sandbox_id
        (CGROUP_ROOT / "cgroup.subtree_control").write_text(_V2_CONTROLLERS)
        path.parent.mkdir(exist_ok=True)
        (path.parent / "cgroup.subtree_control").write_text(_V2_CONTROLLERS)
        path.mkdir(exist_ok=True)  # (kept by a files pause, which then starts it again)
        for name, value in (
            ("memory.max", memory),
            ("memory.swap.max", swap - memory),
            ("cpu.max", f"{quota} {period}"),
            ("pids.max", pids),
        ):
            if name != "memory.swap.max" or (path / name).exists():  # (no swap accounting)
                (path / name).write_text(str(value))
        return [path / "cgroup.procs"]
    paths = []
    for controller in _LIMITED:
        path = CGROUP_ROOT / controller / instance / sandbox_id
        path.mkdir(parents=True, exist_ok=True)  # cpu and cpuacct are often one hierarchy
        paths.append(path)
    memory_dir, cpu_dir, _, pids_dir = paths
    (memory_dir / "memory.limit_in_bytes").write_text(str(memory))
    if (memory_dir / "memory.memsw.limit_in_bytes").exists():  # swap accounting is on
        (memory_dir / "memory.memsw.limit_in_bytes").write_text(str(swap))
    (cpu_dir / "cpu.cfs_period_us").write_text(str(period))
    (cpu_dir / "cpu.cfs_quota_us").write_text(str(quota))
    (pids_dir / "pids.max").write_text(str(pids))
    return sorted({p.resolve() / "cgroup.procs" for p in paths})


def sandbox_cgroup_dirs(instance: str, sandbox_id: str) -> list[Path]:
    if is_v2():
        return [CGROUP_ROOT / instance / sandbox_id]
    return [CGROUP_ROOT / c / instance / sandbox_id for c in V1_CONTROLLERS]


def holds(instance: str, sandbox_id: str, pid: int) -> bool:
    """Whether process ``pid`` is in the sandbox's cgroup (or one the sandbox made below it)."""
    own = f"/{instance}/{sandbox_id}"
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    v2 = is_v2()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if (controllers == "") if v2 else ("pids" in controllers.split(",")):
            return path == own or path.startswith(own + "/")
    return False


def leftover_cgroups(instance: str) -> list[str]:
    """Sandbox ids that still have a cgroup directory under ``instance``."""
    parents = (
        [CGROUP_ROOT / instance]
        if is_v2()
        else [CGROUP_ROOT / c / instance for c in V1_CONTROLLERS]
    )
    ids: set[str] = set()
    for parent in parents:
        with contextlib.suppress(FileNotFoundError):
            ids.update(p.name for p in parent.iterdir() if p.is_dir())
    return sorted(ids)


def remove_cgroup(instance: str, sandbox_id: str) -> None:
    """Remove a sandbox's cgroups, killing anything left in them first."""
    for path in sandbox_cgroup_dirs(instance, sandbox_id):
        if not path.exists():
            continue
        procs = path / "cgroup.procs"
        with contextlib.suppress(OSError):
            for pid in procs.read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
        for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if sub.is_dir():
                with contextlib.suppress(OSError):
                    sub.rmdir()
        with contextlib.suppress(OSError):
            path.rmdir()


def pids_in(instance: str) -> list[int]:
    """Every process in any sandbox of ``instance``."""
    pids: set[int] = set()
    parents = [CGROUP_ROOT / instance] if is_v2() else [CGROUP_ROOT / "pids" / instance]
    for parent in parents:
        if not parent.exists():
            continue
        for procs in parent.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in procs.read_text().split())
    return sorted(pids)


def usage(instance: str, sandbox_id: str) -> dict[str, int]:
    """Current usage: ``cpu_usage_ns``, ``memory_bytes``, ``memory_limit_bytes``, ``pids``."""
    out: dict[str, int] = {}
    if is_v2():
        base = CGROUP_ROOT / instance / sandbox_id
        with contextlib.suppress(OSError):
            stat = dict(line.split() for line in (base / "cpu.stat").read_text().splitlines())
            out["cpu_usage_ns"] = int(stat["usage_usec"]) * 1000
        out["memory_bytes"] = _read_int(base / "memory.current")
        out["memory_limit_bytes"] = _read_int(base / "memory.max")
        out["pids"] = _read_int(base / "pids.current")
        return out
    out["cpu_usage_ns"] = _read_int(
        CGROUP_ROOT / "cpuacct" / instance / sandbox_id / "cpuacct.usage"
    )
    memory = CGROUP_ROOT / "memory" / instance / sandbox_id
    out["memory_bytes"] = _read_int(memory / "memory.usage_in_bytes")
    out["memory_limit_bytes"] = _read_int(memory / "memory.limit_in_bytes")
    out["pids"] = _read_int(CGROUP_ROOT / "pids" / instance / sandbox_id / "pids.current")
    return out


def _read_int(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


# How long a freeze may take to settle (processes in uninterruptible sleep hold it up).
FREEZE_S = 10.0


def _freezer(instance: str, sandbox_id: str) -> tuple[Path, str, str]:
    """The file that freezes the sandbox's cgroup, and what it reads frozen and thawed."""
    if is_v2():
        return CGROUP_ROOT / instance / sandbox_id / "cgroup.freeze", "1", "0"
    return CGROUP_ROOT / "freezer" / instance / sandbox_id / "freezer.state", "FROZEN", "THAWED"


def is_frozen(instance: str, sandbox_id: str) -> bool:
    """Whether the sandbox's cgroup is frozen (or freezing): its processes run no more."""
    if is_v2():
        try:
            events = (CGROUP_ROOT / instance / sandbox_id / "cgroup.events").read_text()
        except OSError:
            return False
        return (
            "frozen 1" in events.splitlines()
            or _read_int(CGROUP_ROOT / instance / sandbox_id / "cgroup.freeze") == 1
        )
    path, _, thawed = _freezer(instance, sandbox_id)
    try:
        return path.read_text().strip() != thawed
    except OSError:
        return False


def freeze(instance: str, sandbox_id: str) -> None:
    """Freeze every process of the sandbox, and return once all are frozen; OSError if they
    are not within FREEZE_S (thawed again: a failed freeze leaves the sandbox running)."""
    path, frozen, thawed = _freezer(instance, sandbox_id)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{sandbox_id} has no freezer cgroup")
    path.write_text(frozen)
    deadline = time.monotonic() + FREEZE_S
    delay = 0.0005
    while not _settled(instance, sandbox_id, path, frozen):
        if time.monotonic() > deadline:
            path.write_text(thawed)
            raise TimeoutError(f"{sandbox_id} did not freeze within {FREEZE_S:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _settled(instance: str, sandbox_id: str, path: Path, frozen: str) -> bool:
    if is_v2():
        events = (CGROUP_ROOT / instance / sandbox_id / "cgroup.events").read_text()
        return "frozen 1" in events.splitlines()
    return path.read_text().strip() == frozen


def thaw(instance: str, sandbox_id: str) -> None:
    """Let the sandbox's processes run again (nothing if it has no cgroup, or is not frozen)."""
    path, _, thawed = _freezer(instance, sandbox_id)
    with contextlib.suppress(FileNotFoundError):
        path.write_text(thawed)
