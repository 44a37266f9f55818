"""cgroup layout: which hierarchy the host has, the fix crun needs on hybrid hosts, usage.

Sandboxes live in ``<instance>/<sandbox id>`` under every controller (v1) or under the unified
tree (v2). The OCI runtime creates and removes them; this module finds leftovers and reads usage.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

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


def sandbox_cgroup_dirs(instance: str, sandbox_id: str) -> list[Path]:
    if is_v2():
        return [CGROUP_ROOT / instance / sandbox_id]
    return [CGROUP_ROOT / c / instance / sandbox_id for c in V1_CONTROLLERS]


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
