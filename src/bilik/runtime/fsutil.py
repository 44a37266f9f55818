"""Small filesystem helpers shared by the runtime: atomic writes, locks, uid shifting."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that a crash leaves either the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (mode 644) by a rename: a reader sees the old or the new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_pid(path: Path) -> int:
    """The pid in ``path``, a file another uid may have written (runsc's, as the sandboxes'
    root): never through a link, never blocking on a FIFO. ValueError if it holds none."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a file")
        return int(os.read(fd, 32))
    finally:
        os.close(fd)


def write_text(path: Path, text: str, mode: int = 0o644) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def replace_dir(built: Path, target: Path) -> None:
    """Put the finished directory ``built`` at ``target``, replacing what was there, by renames:
    ``target`` is never half-built, only missing for an instant."""
    old = target.with_name(f".{target.name}.old.{os.getpid()}")
    if target.exists():
        target.rename(old)
    built.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def lock_fd(path: Path) -> int:
    """Take an exclusive flock on ``path`` (blocking); closing the returned fd releases it."""
    fd = _lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def try_lock_fd(path: Path) -> int | None:
    """:func:`lock_fd` if no one holds the lock now, else None (without waiting)."""
    fd = _lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _lock_file(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every bilik process on this host (flock)."""
    fd = lock_fd(path)
    try:
        yield
    finally:
        os.close(fd)


def shift_owners(root: Path, offset: int) -> None:
    """Add ``offset`` to the owner and group of every file under ``root``.

    Root inside a sandbox is host uid ``offset``, so a layer stored this way looks owned by
    root inside. ``chown`` clears set-id bits, so they are put back afterwards.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            _shift_one(os.path.join(dirpath, name), offset)
    _shift_one(str(root), offset)


def _shift_one(path: str, offset: int) -> None:
    st = os.lstat(path)
    if st.st_uid >= offset:
        return
    os.lchown(path, st.st_uid + offset, st.st_gid + offset)
    if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        os.chmod(path, stat.S_IMODE(st.st_mode))


def read_beneath(root: Path, relative: str, limit: int = 1 << 20) -> bytes | None:
    """The regular file at ``relative`` under ``root`` (at most ``limit`` bytes), reached
    without following any link on the way (a tree a sandbox made may hold links anywhere);
    None where there is no such file."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    *dirs, name = relative.split("/")
    try:
        fd = os.open(root, flags | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        for part in dirs:
            inner = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        file_fd = os.open(name, flags | os.O_NONBLOCK, dir_fd=fd)  # (a FIFO would block)
    except OSError:
        return None
    finally:
        os.close(fd)
    with os.fdopen(file_fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read(limit)
