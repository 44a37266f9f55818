"""The seccomp profile every sandbox runs under.

Everything is allowed except what sandboxed code has no business doing: mounting, loading kernel
modules or kernels, BPF, the kernel keyring, new user namespaces, clock and swap changes, raw I/O
ports, and the kernel's rarely-used, often-exploited corners (io_uring, userfaultfd, perf events,
open_by_handle_at). ptrace stays allowed: the pid namespace already confines it to the sandbox.
"""

from __future__ import annotations

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
