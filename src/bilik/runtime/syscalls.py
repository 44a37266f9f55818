"""Thin ctypes wrappers for the few syscalls the runtime makes itself (no process spawns)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Iterator

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOATIME = 1024
MS_BIND = 4096
MNT_DETACH = 2
CLONE_NEWNET = 0x40000000


def _check(result: int, what: str, path: str = "") -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path or None)


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        "mount",
        target,
    )


def umount(target: str, *, detach: bool = True) -> None:
    """Unmount ``target``; a path that is not mounted is not an error."""
    if _libc.umount2(target.encode(), MNT_DETACH if detach else 0) < 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount: {os.strerror(err)}", target)


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def mounted_under(prefix: str) -> list[str]:
    """Mount points at or below ``prefix`` in this mount namespace, deepest first."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix.rstrip("/") + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


# Loop devices, attached with LOOP_CONFIGURE and auto-cleared on the last unmount, so a crashed
# server never leaves one attached once its mount is gone.
_LOOP_CTL_GET_FREE = 0x4C82
_LOOP_CONFIGURE = 0x4C0A
_LO_FLAGS_AUTOCLEAR = 4
_LO_FLAGS_DIRECT_IO = 16


@contextlib.contextmanager
def loop_device(image: str) -> Iterator[str]:
    """Attach ``image`` to a free loop device and yield its path.

    The device detaches itself when the last user lets go of it: mount it inside the ``with``.
    """
    backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(32):
            ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
            try:
                number = fcntl.ioctl(ctl, _LOOP_CTL_GET_FREE)
            finally:
                os.close(ctl)
            device = f"/dev/loop{number}"
            dev_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            try:
                # struct loop_config { u32 fd; u32 block_size; loop_info64 info; u64 reserved[8]; }
                info = bytearray(232)
                struct.pack_into("=I", info, 52, _LO_FLAGS_AUTOCLEAR)  # lo_flags
                config = struct.pack("=II", backing, 0) + bytes(info) + bytes(64)
                try:
                    fcntl.ioctl(dev_fd, _LOOP_CONFIGURE, config)
                except OSError as e:
                    if e.errno != errno.EBUSY:  # another process took it first: try the next
                        raise
                    continue
                yield device
                return
            finally:
                os.close(dev_fd)
        raise OSError(errno.EBUSY, "no free loop device", image)
    finally:
        os.close(backing)
