"""Per-sandbox disks: a sparse ext4 image on a loop device holds the overlay's writable layer.

Writes past its size fail with ENOSPC inside the sandbox and touch nothing outside it (project
quotas would be lighter, but kernels of this machine kind are built without quota support).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from . import syscalls
from .errors import StepFailed


def create(image: Path, mountpoint: Path, size_mb: int, owner: int) -> None:
    """Make a ``size_mb`` ext4 image at ``image`` and mount it at ``mountpoint``."""
    proc = subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-O",
            "^has_journal,^resize_inode",
            "-m",
            "0",
            "-E",
            f"lazy_itable_init=1,root_owner={owner}:{owner}",
            str(image),
            f"{size_mb}M",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise StepFailed("make-disk", proc.stderr.strip())
    mountpoint.mkdir(exist_ok=True)
    try:
        with syscalls.loop_device(str(image)) as device:
            syscalls.mount(
                device,
                str(mountpoint),
                "ext4",
                syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOATIME,
            )
    except OSError as e:
        raise StepFailed("mount-disk", str(e)) from e
    for sub in ("upper", "work"):
        os.mkdir(mountpoint / sub, 0o755)
        os.chown(mountpoint / sub, owner, owner)


def remove(image: Path, mountpoint: Path) -> None:
    """Unmount and delete; the loop device detaches itself on the last unmount."""
    syscalls.umount(str(mountpoint))
    image.unlink(missing_ok=True)
