"""Joining a running sandbox from the host, exactly as strictly as its OCI runtime's ``exec``.

The caller (a freshly forked, single-threaded process running as host root) is moved into the
sandbox's cgroups and namespaces, chrooted to its root, made its root user, and left with the
sandbox's capabilities and its seccomp filter. What comes after runs with nothing more than a
process the OCI runtime itself would start in the sandbox.

``no_new_privs`` stays unset, as the OCI runtime leaves it for the sandbox's own processes, so
that set-uid programs (``sudo``) work inside. What they can gain is bounded by the sandbox's
capability bounding set, in the sandbox's user namespace, under the same seccomp filter (a
filter is inherited across ``execve`` and never removed). Without ``no_new_privs`` the kernel
lets only a task with ``CAP_SYS_ADMIN`` in its user namespace install a filter: the joiner
installs it while it still has every capability there, then drops them.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# The network namespace first: the host made it, so joining it takes the host's rights, which
# are gone once in the user namespace; that one grants the rights to join the rest (the OCI
# runtime made them inside it). The mount namespace last.
NAMESPACES = (
    ("net", CLONE_NEWNET),
    ("user", CLONE_NEWUSER),
    ("ipc", CLONE_NEWIPC),
    ("uts", CLONE_NEWUTS),
    ("cgroup", CLONE_NEWCGROUP),
    ("pid", CLONE_NEWPID),
    ("mnt", CLONE_NEWNS),
)

PR_SET_NAME = 15
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAPABILITY_VERSION_3 = 0x20080522
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2

# capability(7) numbers, in order from 0.
_CAPS = """CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP
LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE
SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME
SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG
WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE"""
CAP_NUMBERS = {name: number for number, name in enumerate(_CAPS.split())}

_libc = ctypes.CDLL(None, use_errno=True)


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")
    return result


def _prctl(option: int, arg: int = 0, arg3: int = 0) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(arg3), 0, 0), "prctl")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class SeccompFilter:
    """A compiled seccomp filter (classic BPF, ``struct sock_filter`` entries: the host's
    ``runtime.seccomp.compile_bpf``), loadable many times."""

    def __init__(self, program: bytes) -> None:
        if not program or len(program) % 8:
            raise ValueError("a seccomp filter is a whole number of 8-byte instructions")
        self._buffer = ctypes.create_string_buffer(program, len(program))
        self._fprog = _SockFprog(len(program) // 8, ctypes.addressof(self._buffer))

    def load(self) -> None:
        """Set the filter on this thread (which needs ``CAP_SYS_ADMIN`` in its user namespace,
        or ``no_new_privs``)."""
        _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(self._fprog))


@dataclass
class Target:
    """What to join: the sandbox's PID 1 (host pid, and its start time, so a pid reused by
    another process is refused) and its cgroup.procs files."""

    pid: int
    start_time: int
    cgroup_procs: list[str]


def start_time(pid: int) -> int:
    """When process ``pid`` started (clock ticks after boot); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def enter(target: Target, capabilities: list[str], seccomp: SeccompFilter) -> None:
    """Move this process into the sandbox and drop to what its own processes may do."""
    ns_fds = [
        (os.open(f"/proc/{target.pid}/ns/{name}", os.O_RDONLY), kind) for name, kind in NAMESPACES
    ]
    root = os.open(f"/proc/{target.pid}/root", os.O_RDONLY | os.O_DIRECTORY)
    # The namespaces are pinned now: check they are the sandbox's. Its PID 1 must still be the
    # process that started then, and live in a user namespace of its own: never the host's.
    if start_time(target.pid) != target.start_time:
        raise RuntimeError(f"process {target.pid} is not the sandbox's PID 1 any more")
    user_fd = next(fd for fd, kind in ns_fds if kind == CLONE_NEWUSER)
    if os.fstat(user_fd).st_ino == os.stat("/proc/self/ns/user").st_ino:
        raise RuntimeError(f"process {target.pid} is in the host's user namespace")
    me = str(os.getpid())
    for procs in target.cgroup_procs:
        with open(procs, "w") as f:
            f.write(me)
    for fd, kind in ns_fds:
        _check(_libc.setns(fd, kind), "setns")
        os.close(fd)
    os.fchdir(root)
    os.chroot(".")
    os.chdir("/")
    os.close(root)
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    # Before the capabilities go: setting a filter takes CAP_SYS_ADMIN (see the docstring).
    seccomp.load()
    keep = {CAP_NUMBERS[c.removeprefix("CAP_")] for c in capabilities}
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if cap not in keep:
            _prctl(PR_CAPBSET_DROP, cap)
    mask = sum(1 << c for c in keep)
    header = CapHeader(CAPABILITY_VERSION_3, 0)
    data = (CapData * 2)(
        CapData(mask & 0xFFFFFFFF, mask & 0xFFFFFFFF, 0),
        CapData(mask >> 32, mask >> 32, 0),
    )
    _check(_libc.capset(ctypes.byref(header), data), "capset")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)


def set_child_subreaper() -> None:
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_name(name: str) -> None:
    _libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
