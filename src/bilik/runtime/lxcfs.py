"""LXCFS: ``/proc/meminfo``, ``/proc/cpuinfo`` and the like as a sandbox's own limits show them.

The kernel answers ``/proc/meminfo`` and ``/proc/cpuinfo`` with the host's totals, whatever a
sandbox's cgroup allows; ``free``, ``top``, Python's ``os.cpu_count()`` (through
``/sys/devices/system/cpu/online``) and every agent that sizes its work by them would see the
host. LXCFS (Debian's ``lxcfs``) is a FUSE filesystem whose files answer for the cgroup of the
process that reads them (its pid namespace's init's): each sandbox gets them bind-mounted
read-only over the kernel's.

One daemon per instance, shared by every bilik process of it (the server, a CLI command) and by
the sandboxes, which outlive them all. It runs in a session of its own, mounted at
``/run/<instance>/lxcfs``. Whoever starts a sandbox makes sure it runs first (so a daemon that
died is started again for the next sandbox), and it is stopped once no sandbox of the instance
is left. Where it cannot run (no ``lxcfs``, no FUSE), sandboxes show the kernel's files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import syscalls
from .fsutil import file_lock

# What LXCFS answers per cgroup, and what each sandbox sees of it (paths inside the sandbox,
# and under the mount). ``loadavg`` needs a daemon thread per sandbox (``-l``): left out.
FILES = (
    "proc/cpuinfo",
    "proc/diskstats",
    "proc/meminfo",
    "proc/stat",
    "proc/swaps",
    "proc/uptime",
    "sys/devices/system/cpu/online",
)
START_S = 5.0
STOP_S = 5.0
# CPU counts from the cgroup's CPU quota (a sandbox's vCPUs), not only from its cpuset.
ARGS = ("--enable-cfs",)


def mounts(mountpoint: Path) -> list[dict[str, Any]]:
    """The bundle mounts that put the files of the LXCFS at ``mountpoint`` over the kernel's
    (read-only)."""
    return [
        {
            "destination": f"/{name}",
            "type": "bind",
            "source": str(mountpoint / name),
            "options": ["bind", "ro", "nosuid", "nodev", "noexec"],
        }
        for name in FILES
    ]


class Lxcfs:
    """The instance's LXCFS daemon (its state in ``state_root``, ``/run/<instance>``)."""

    def __init__(self, state_root: Path, log: Callable[[str], None]) -> None:
        self.mountpoint = state_root / "lxcfs"
        self.pidfile = state_root / "lxcfs.pid"
        self._logfile = state_root / "lxcfs.log"
        self._lockfile = state_root / "lxcfs.lock"
        self.log = log
        self._told = False

    def ensure(self) -> bool:
        """Start the daemon unless it runs; whether it runs now. Blocking: call in a thread."""
        with file_lock(self._lockfile):
            if self._running():
                return True
            self._clear()
            return self._start()

    def stop_unless(self, in_use: Callable[[], bool]) -> None:
        """Stop the daemon and remove its mount, unless ``in_use()`` (asked under the lock
        that starts take, so no sandbox starts on a daemon being stopped). Blocking."""
        if not self.pidfile.exists() and not os.path.ismount(self.mountpoint):
            return
        with file_lock(self._lockfile):
            if in_use():
                return
            pid = self._pid()
            if pid is not None and self._is_ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)  # (it unmounts itself)
                deadline = time.monotonic() + STOP_S
                while self._is_ours(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
            self._clear()

    # -- internals ------------------------------------------------------------------------------

    def _pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def _is_ours(self, pid: int) -> bool:
        """Whether ``pid`` is a live lxcfs serving our mount point (not a reused pid)."""
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return (
            bool(argv)
            and os.path.basename(argv[0]) == b"lxcfs"
            and os.fsencode(self.mountpoint) in argv
        )

    def _running(self) -> bool:
        pid = self._pid()
        return pid is not None and self._is_ours(pid) and os.path.ismount(self.mountpoint)

    def _clear(self) -> None:
        """Remove what a daemon that is gone left: its mount (a dead FUSE mount answers
        ENOTCONN), its pid file."""
        syscalls.umount(str(self.mountpoint))
        self.pidfile.unlink(missing_ok=True)

    def _start(self) -> bool:
        binary = shutil.which("lxcfs")
        if binary is None:
            self._tell("lxcfs is not installed: sandboxes see the host's /proc/meminfo and cpuinfo")
            return False
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        # The OCI runtime binds from here as the sandbox's root (an unprivileged host uid): it
        # must pass through (the files are LXCFS's, readable by all).
        for d in (self.mountpoint.parent, self.mountpoint):
            os.chmod(d, os.stat(d).st_mode & 0o7777 | 0o111)
        with open(self._logfile, "wb") as out:
            # setsid -f: in a session of its own, and no child of ours (nothing of ours to
            # reap when it ends; it outlives this process for the sandboxes that do).
            subprocess.run(
                ["setsid", "-f", binary, *ARGS, "-p", str(self.pidfile), str(self.mountpoint)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                check=False,
                close_fds=True,
            )
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self._running():
                self._told = False
                return True
            time.sleep(0.05)
        tail = self._logfile.read_text(errors="replace").strip().splitlines()[-3:]
        self._tell(
            f"lxcfs did not start ({' / '.join(tail) or 'no output'}): sandboxes see "
            "the host's /proc/meminfo and cpuinfo"
        )
        return False

    def _tell(self, message: str) -> None:
        if not self._told:
            self.log(message)
            self._told = True
