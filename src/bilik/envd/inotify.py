"""Directory watches with Linux inotify (through ctypes: envd carries no compiled code)."""

from __future__ import annotations

import asyncio
import ctypes
import os
import struct
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
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


class Watch:
    """Changes under ``root`` (its subdirectories too when recursive), reported to ``emit``."""

    def __init__(self, root: str, recursive: bool, emit: Callable[[Change], None]) -> None:
        self.root = root
        self.recursive = recursive
        self.emit = emit
        self.fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        self.dirs: dict[int, str] = {}
        try:
            self._add(root)
            if recursive:
                for path, subdirs, _ in os.walk(root):
                    for d in subdirs:
                        self._add(os.path.join(path, d))
        except BaseException:
            os.close(self.fd)
            raise
        asyncio.get_running_loop().add_reader(self.fd, self._read)

    def _add(self, path: str) -> None:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), MASK)
        if wd >= 0:
            self.dirs[wd] = path
        elif path == self.root:
            _check(wd)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return
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
                self.emit(Change(path, "create", is_dir))
                if is_dir and self.recursive:
                    self._add(path)
            if mask & IN_MOVED_TO:
                self.emit(Change(path, "create", is_dir))
                if is_dir and self.recursive:
                    self._add(path)
            if mask & IN_MODIFY:
                self.emit(Change(path, "write", is_dir))
            if mask & IN_ATTRIB:
                self.emit(Change(path, "chmod", is_dir))
            if mask & IN_MOVED_FROM:
                self.emit(Change(path, "rename", is_dir))
            if mask & IN_DELETE:
                self.emit(Change(path, "remove", is_dir))

    def close(self) -> None:
        if self.fd >= 0:
            asyncio.get_running_loop().remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
