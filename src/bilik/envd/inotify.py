"""Directory watches with Linux inotify (through ctypes: envd carries no compiled code)."""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_IGNORED = 0x8000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)
_HEADER = struct.Struct("iIII")

# Already loaded by the interpreter: no search (find_library would run ldconfig).
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


@dataclass
class Change:
    path: str  # the changed entry's absolute path
    kind: str  # create | write | remove | rename | chmod
    is_dir: bool


def _check(result: int) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


class Watch:
    """Changes under ``root`` (its subdirectories too when recursive), read by a thread of its
    own and handed to ``deliver`` in that thread, a batch at a time.

    The thread is the watching user's (``credentials.thread_as``): the watches, those added
    for directories made later included, are placed with that user's permissions, and
    ``deliver`` describes the changed entries as that user sees them.
    """

    def __init__(self, root: str, recursive: bool, deliver: Callable[[list[Change]], None]) -> None:
        self.root = root
        self.recursive = recursive
        self.deliver = deliver
        self.fd = -1
        self.dirs: dict[int, str] = {}
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        # Whoever comes second of ``close`` and the thread's end must not touch a descriptor
        # the other one closed (its number may be another file's by then).
        self._lock = threading.Lock()
        self._closed = False

    def open(self) -> None:
        """Watch ``root`` (and what is below it): in the watching thread, before ``run``."""
        self.fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        try:
            self._add(self.root)
            if self.recursive:
                for path, subdirs, _ in os.walk(self.root):
                    for d in subdirs:
                        self._add(os.path.join(path, d))
        except BaseException:
            self.release()
            raise

    def run(self) -> None:
        """Read and deliver changes until ``close``; then let go of everything."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self._stop_r in ready:
                    return
                changes = self._read()
                if changes:
                    self.deliver(changes)
        finally:
            self.release()

    def close(self) -> None:
        """Stop the watching thread (from any thread; more than once is fine)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.write(self._stop_w, b"x")

    def release(self) -> None:
        """Close every descriptor: by the watching thread as it ends (or fails to start)."""
        with self._lock:
            self._closed = True
            for fd in (self.fd, self._stop_r, self._stop_w):
                if fd >= 0:
                    os.close(fd)
            self.fd = self._stop_r = self._stop_w = -1

    def _add(self, path: str) -> None:
        """Watch the directory ``path``, if the watching user may read it. Linux checks that
        itself; gVisor does not, so it is checked here too, on a descriptor opened with the
        same credentials, and the watch is kept only if it is on that same directory (a path
        swapped in between is refused; one swapped and swapped back is beyond this check)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            if path == self.root:
                raise
            return
        try:
            wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), MASK)
            if wd < 0:
                if path == self.root:
                    _check(wd)
                return
            opened, watched = os.fstat(fd), _stat_or_none(path)
            if watched is None or (watched.st_dev, watched.st_ino) != (
                opened.st_dev,
                opened.st_ino,
            ):
                _libc.inotify_rm_watch(self.fd, wd)
                if path == self.root:
                    raise PermissionError(errno.EACCES, "the directory changed while watched")
                return
            self.dirs[wd] = path
        finally:
            os.close(fd)

    def _read(self) -> list[Change]:
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
        changes: list[Change] = []
        offset = 0
        while offset + _HEADER.size <= len(data):
            wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
            raw = data[offset + _HEADER.size : offset + _HEADER.size + length]
            offset += _HEADER.size + length
            name = raw.rstrip(b"\0").decode(errors="surrogateescape")
            directory = self.dirs.get(wd)
            if directory is None:
                continue
            if mask & IN_IGNORED:
                del self.dirs[wd]
                continue
            if not name:  # the watched directory itself went away
                continue
            path = os.path.join(directory, name)
            is_dir = bool(mask & IN_ISDIR)
            if mask & IN_CREATE:
                changes.append(Change(path, "create", is_dir))
                if is_dir and self.recursive:
                    self._add(path)
            if mask & IN_MOVED_TO:
                changes.append(Change(path, "create", is_dir))
                if is_dir and self.recursive:
                    self._add(path)
            if mask & IN_MODIFY:
                changes.append(Change(path, "write", is_dir))
            if mask & IN_ATTRIB:
                changes.append(Change(path, "chmod", is_dir))
            if mask & IN_MOVED_FROM:
                changes.append(Change(path, "rename", is_dir))
            if mask & IN_DELETE:
                changes.append(Change(path, "remove", is_dir))
        return changes
