"""The seccomp profile every sandbox runs under.

Everything is allowed except what sandboxed code has no business doing: mounting, loading kernel
modules or kernels, BPF, the kernel keyring, new user namespaces, clock and swap changes, raw I/O
ports, and the kernel's rarely-used, often-exploited corners (io_uring, userfaultfd, perf events,
open_by_handle_at). ptrace stays allowed: the pid namespace already confines it to the sandbox.
"""

from __future__ import annotations

import ctypes
import tempfile
from typing import Any

EPERM = 1
ENOSYS = 38
CLONE_NEWUSER = 0x10000000

DENIED = (
    # filesystems and mounts
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "quotactl",
    "quotactl_fd",
    "open_by_handle_at",
    "name_to_handle_at",
    # kernel and modules
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "get_kernel_syms",
    "query_module",
    "reboot",
    "syslog",
    "acct",
    "swapon",
    "swapoff",
    "_sysctl",
    "uselib",
    "lookup_dcookie",
    "nfsservctl",
    "vhangup",
    # bpf, perf, keys
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    # clocks
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "stime",
    # raw hardware
    "iopl",
    "ioperm",
    # namespaces
    "setns",
    "unshare",
    # attack surface with little use in sandboxes
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "kcmp",
    "process_madvise",
)


def profile() -> dict[str, Any]:
    """The OCI ``linux.seccomp`` section."""
    denied = sorted(DENIED)
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
            # New user namespaces through clone: refused. clone3 passes its flags in memory a
            # filter cannot read, so it answers ENOSYS and libc falls back to clone.
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": EPERM,
                "args": [
                    {
                        "index": 0,
                        "value": CLONE_NEWUSER,
                        "valueTwo": CLONE_NEWUSER,
                        "op": "SCMP_CMP_MASKED_EQ",
                    }
                ],
            },
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
        ],
    }


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_ACT_ERRNO = 0x00050000
_SCMP_ARCHES = {"SCMP_ARCH_X86": 0x40000003, "SCMP_ARCH_X32": 0x4000003E}
_SCMP_CMP = {"SCMP_CMP_NE": 1, "SCMP_CMP_EQ": 4, "SCMP_CMP_MASKED_EQ": 7}
_EEXIST = 17


def compile_bpf(section: dict[str, Any]) -> bytes:
    """The classic BPF program (``struct sock_filter`` entries) of an OCI seccomp section,
    compiled by libseccomp as crun does, for the processes that set their filter themselves:
    envds the zygote starts in crun sandboxes, and what the runtime execs in gVisor ones (see
    ``bilik.envd.seccomp_exec``)."""
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)
    ]  # fmt: skip
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    if section["defaultAction"] != "SCMP_ACT_ALLOW":
        raise ValueError("only allow-by-default profiles are supported")
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("libseccomp: seccomp_init failed")
    try:
        for arch in section.get("architectures", []):
            if arch in _SCMP_ARCHES:
                result = lib.seccomp_arch_add(ctx, _SCMP_ARCHES[arch])
                if result < 0 and -result != _EEXIST:  # EEXIST: the native one
                    raise OSError(-result, f"libseccomp: cannot add architecture {arch}")
        for rule in section["syscalls"]:
            if rule["action"] != "SCMP_ACT_ERRNO":
                raise ValueError(f"unsupported seccomp action {rule['action']}")
            action = _SCMP_ACT_ERRNO | (rule.get("errnoRet", EPERM) & 0xFFFF)
            args = rule.get("args", [])
            cmps = (_ArgCmp * max(len(args), 1))(
                *(
                    _ArgCmp(a["index"], _SCMP_CMP[a["op"]], a["value"], a.get("valueTwo", 0))
                    for a in args
                )
            )
            for name in rule["names"]:
                nr = lib.seccomp_syscall_resolve_name(name.encode())
                if nr < 0:  # not a syscall of this architecture
                    continue
                result = lib.seccomp_rule_add_array(ctx, action, nr, len(args), cmps)
                if result < 0:
                    raise OSError(-result, f"libseccomp: cannot add the rule for {name}")
        with tempfile.TemporaryFile() as out:
            result = lib.seccomp_export_bpf(ctx, out.fileno())
            if result < 0:
                raise OSError(-result, "libseccomp: cannot export the filter")
            out.seek(0)
            return out.read()
    finally:
        lib.seccomp_release(ctx)
