"""``GET /metrics``: what the sandbox uses, as the sandbox itself sees it (its cgroup)."""

from __future__ import annotations

import os
import time
from typing import Any

_last: tuple[float, int] | None = None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cpu_usage_ns() -> int | None:
    v1 = _read("/sys/fs/cgroup/cpuacct/cpuacct.usage") or _read(
        "/sys/fs/cgroup/cpu,cpuacct/cpuacct.usage"
    )
    if v1 and v1.isdigit():
        return int(v1)
    stat = _read("/sys/fs/cgroup/cpu.stat")
    for line in (stat or "").splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value) * 1000
    return None


def _memory() -> tuple[int, int]:
    used = _read("/sys/fs/cgroup/memory/memory.usage_in_bytes") or _read(
        "/sys/fs/cgroup/memory.current"
    )
    limit = _read("/sys/fs/cgroup/memory/memory.limit_in_bytes") or _read(
        "/sys/fs/cgroup/memory.max"
    )
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if limit and limit.isdigit():
        total = min(total, int(limit))
    return (int(used) if used and used.isdigit() else 0), total


def snapshot() -> dict[str, Any]:
    """CPU use since the previous call (0 on the first), memory and the root disk."""
    global _last
    now = time.monotonic()
    cpu_count = len(os.sched_getaffinity(0))
    usage = _cpu_usage_ns()
    cpu_pct = 0.0
    if usage is not None and _last is not None and now > _last[0]:
        cpu_pct = 100 * (usage - _last[1]) / ((now - _last[0]) * 1e9) / cpu_count
    if usage is not None:
        _last = (now, usage)
    mem_used, mem_total = _memory()
    disk = os.statvfs("/")
    return {
        "ts": int(time.time()),
        "cpu_count": cpu_count,
        "cpu_used_pct": round(max(cpu_pct, 0.0), 2),
        "mem_total": mem_total,
        "mem_used": mem_used,
        "disk_total": disk.f_blocks * disk.f_frsize,
        "disk_used": (disk.f_blocks - disk.f_bfree) * disk.f_frsize,
    }
