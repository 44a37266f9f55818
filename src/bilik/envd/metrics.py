"""``GET /metrics``: what the sandbox uses, as seen from inside.

The sandbox has no cgroup tree of its own to read, but its pid namespace holds exactly its
processes: CPU time and resident memory are summed over them (CPU time of exited children is
in their parents' ``cutime``/``cstime``). The limits come from envd's config.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..proto.contract import EnvdConfig

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_last: tuple[float, float] | None = None


def _processes() -> tuple[float, int]:
    """CPU seconds and resident bytes of every process in the sandbox."""
    cpu, rss = 0.0, 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # After the command: state is field 3, utime 14 … cstime 17, rss 24 (1-based).
        cpu += sum(int(x) for x in fields[11:15]) / _TICK
        rss += int(fields[21]) * _PAGE
    return cpu, rss


def snapshot(config: EnvdConfig) -> dict[str, Any]:
    """CPU use since the previous call (0 on the first), memory and the root disk."""
    global _last
    now = time.monotonic()
    cpu, rss = _processes()
    cpu_pct = 0.0
    if _last is not None and now > _last[0]:
        cpu_pct = 100 * (cpu - _last[1]) / (now - _last[0]) / config.cpu_count
    _last = (now, cpu)
    disk = os.statvfs("/")
    return {
        "ts": int(time.time()),
        "cpu_count": config.cpu_count,
        "cpu_used_pct": round(max(cpu_pct, 0.0), 2),
        "mem_total": config.memory_bytes,
        "mem_used": rss,
        "disk_total": disk.f_blocks * disk.f_frsize,
        "disk_used": (disk.f_blocks - disk.f_bfree) * disk.f_frsize,
    }
