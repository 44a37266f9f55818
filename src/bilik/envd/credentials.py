"""File operations done with a sandbox user's own credentials.

envd runs as the sandbox's root, but every file request acts for one user (the one a signed URL
names, or the one an access-token holder asks for). The kernel must judge each operation as that
user's own process would be judged: the permissions of every directory on the way, every link
followed, what ``open`` may create, and the ownership of what it creates. A check written in
envd would miss something (a link in a parent, a change between the check and the use); the
kernel's own, made with the user's credentials, misses nothing, and root's capabilities
(``CAP_DAC_OVERRIDE`` and the rest) are not in play.

Credentials belong to each thread on Linux, and a raw system call changes only the calling
thread's (glibc's ``setresuid``/``setgroups`` wrappers change every thread of the process, so
they are not used). Each user therefore has worker threads of its own: a worker takes the user's
groups, effective gid and effective uid when it starts (the kernel then clears the thread's
effective capabilities; they are also cleared explicitly and checked), and keeps them until it
ends. Nothing ever gives them back, so no operation can meet a half-restored thread; a worker
that cannot become its user breaks its pool, whose jobs then fail, never run as root. gVisor
keeps credentials per task as Linux does (it lacks ``setfsuid``, hence the effective ids): the
same code runs under crun and runsc.

Only the steps the kernel checks run in these workers (resolving, opening, creating, listing,
renaming, removing, watching); the bytes of an open file are then moved through its
descriptor, which carries the access the user was granted.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import platform
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.thread import BrokenThreadPool
from typing import TypeVar

from .enter import CAPABILITY_VERSION_3, CapData, CapHeader
from .users import User

T = TypeVar("T")

# Raw system call numbers: glibc's wrappers would change the credentials of every thread.
_NUMBERS = {
    "x86_64": {"setgroups": 116, "setresuid": 117, "setresgid": 119, "capget": 125, "capset": 126},
    "aarch64": {"setgroups": 159, "setresuid": 147, "setresgid": 149, "capget": 90, "capset": 91},
}
_KEEP = -1  # setres[ug]id: leave this id as it is

WORKERS_PER_USER = 4
MAX_USERS = 16  # pools kept at once; the least recently used one is let go beyond that

_libc = ctypes.CDLL("libc.so.6", use_errno=True)  # already loaded: no search


def _syscall(name: str, *args: object) -> None:
    number = _NUMBERS[platform.machine()][name]
    if _libc.syscall(ctypes.c_long(number), *args) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{name}: {os.strerror(code)}")


def _capabilities() -> tuple[CapHeader, ctypes.Array[CapData]]:
    header = CapHeader(CAPABILITY_VERSION_3, 0)  # pid 0: the calling thread
    data = (CapData * 2)()
    _syscall("capget", ctypes.byref(header), data)
    return header, data


def become(user: User) -> None:
    """Give the calling thread ``user``'s credentials for the rest of its life (root's: none to
    change). Never called on the main thread, whose credentials envd itself needs."""
    if user.uid == 0:
        return
    if threading.current_thread() is threading.main_thread():
        raise RuntimeError("the main thread keeps root's credentials")
    groups = (ctypes.c_uint32 * len(user.groups))(*user.groups)
    _syscall("setgroups", ctypes.c_size_t(len(user.groups)), groups)
    _syscall("setresgid", ctypes.c_long(_KEEP), ctypes.c_long(user.gid), ctypes.c_long(_KEEP))
    _syscall("setresuid", ctypes.c_long(_KEEP), ctypes.c_long(user.uid), ctypes.c_long(_KEEP))
    # A non-zero effective uid already clears the effective capabilities, unless securebits
    # say otherwise: clear them in any case, and check.
    header, data = _capabilities()
    for half in data:
        half.effective = 0
    _syscall("capset", ctypes.byref(header), data)
    _, now = _capabilities()
    if (
        any(half.effective for half in now)
        or (os.geteuid(), os.getegid()) != (user.uid, user.gid)
        or set(os.getgroups()) != set(user.groups)
    ):
        raise PermissionError(errno.EPERM, f"this thread did not become user '{user.name}'")


_pools: OrderedDict[tuple[int, int, tuple[int, ...]], ThreadPoolExecutor] = OrderedDict()


def _pool(user: User) -> ThreadPoolExecutor:
    """The workers of ``user`` (by its ids: a renamed user is the same one). Event loop only."""
    key = (user.uid, user.gid, user.groups)
    pool = _pools.get(key)
    if pool is None:
        pool = ThreadPoolExecutor(
            WORKERS_PER_USER,
            thread_name_prefix=f"as-{user.uid}",
            initializer=become,
            initargs=(user,),
        )
        _pools[key] = pool
        while len(_pools) > MAX_USERS:
            _, old = _pools.popitem(last=False)
            old.shutdown(wait=False)  # its running jobs finish first
    _pools.move_to_end(key)
    return pool


async def run_as(user: User, operation: Callable[[], T]) -> T:
    """``operation()`` in one of ``user``'s worker threads."""
    pool = _pool(user)
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, operation)
    except BrokenThreadPool:
        # A worker could not become the user: nothing ran. The next request tries anew.
        key = (user.uid, user.gid, user.groups)
        if _pools.get(key) is pool:
            del _pools[key]
        raise PermissionError(errno.EPERM, f"cannot act as user '{user.name}'") from None


def thread_as(
    user: User, target: Callable[[], None], failed: Callable[[OSError], None], name: str
) -> None:
    """Start a daemon thread that runs ``target`` with ``user``'s credentials (for work that
    lasts, like a watch, which would hold a pool's worker for ever). If the thread cannot
    become the user, ``failed`` is called in it instead and ``target`` never runs."""

    def run() -> None:
        try:
            become(user)
        except OSError as e:
            failed(e)
            return
        target()

    threading.Thread(target=run, name=name, daemon=True).start()
