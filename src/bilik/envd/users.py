"""Users of the sandbox, from its own /etc/passwd and /etc/group, and paths as they see them."""

from __future__ import annotations

import base64
import os
import posixpath
import re
from dataclasses import dataclass

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What a user name may be (useradd's portable set, at most 32 characters): never a ':', the
# separator of /etc/passwd and of the fields a file URL's signature covers.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.$-]{0,31}")


class UnknownUser(Exception):
    pass


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str
    groups: tuple[int, ...]

    def env(self) -> dict[str, str]:
        return {"PATH": PATH, "HOME": self.home, "USER": self.name, "LOGNAME": self.name}


def valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def lookup(name: str) -> User:
    """The user called ``name`` (root always exists, even in an image without /etc/passwd)."""
    for line in _lines("/etc/passwd"):
        fields = line.split(":")
        if len(fields) >= 6 and fields[0] == name and fields[2].isdigit():
            uid, gid = int(fields[2]), int(fields[3] or 0)
            return User(name, uid, gid, fields[5] or "/", _groups(name, gid))
    if name == "root":
        return User("root", 0, 0, "/root", (0,))
    raise UnknownUser(f"user '{name}' does not exist in the sandbox")


def _groups(name: str, gid: int) -> tuple[int, ...]:
    found = {gid}
    for line in _lines("/etc/group"):
        fields = line.split(":")
        if len(fields) >= 4 and fields[2].isdigit() and name in fields[3].split(","):
            found.add(int(fields[2]))
    return tuple(sorted(found))


def _lines(path: str) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []


def from_basic_auth(header: str | None) -> str | None:
    """The user name of an ``Authorization: Basic base64("<user>:")`` header, if any."""
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return decoded.split(":", 1)[0] or None


def resolve(path: str, user: User, workdir: str = "") -> str:
    """An absolute, normalised path: ``~`` is the user's home, relative paths start there (or
    at the sandbox's default workdir)."""
    if path == "~" or path.startswith("~/"):
        path = user.home + path[1:]
    if not path.startswith("/"):
        path = posixpath.join(workdir or user.home, path)
    return posixpath.normpath(path) if path != "/" else "/"


def make_parents(path: str) -> None:
    """Create the missing parents of ``path`` (as the calling thread's user, who owns them)."""
    parent = posixpath.dirname(path)
    missing = []
    while parent and not os.path.isdir(parent):
        missing.append(parent)
        parent = posixpath.dirname(parent)
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:  # made meanwhile: fine, if it is a directory
            if not os.path.isdir(d):
                raise
