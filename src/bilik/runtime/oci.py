"""The OCI bundle config of a sandbox: namespaces, user mapping, mounts, limits, seccomp."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..proto.contract import CONTROL_DIR
from . import gvisor_statx, lxcfs, seccomp
from .spec import Limits

# Capabilities of root inside the sandbox, relative to its own user namespace (Docker's default set
# minus NET_RAW, MKNOD and AUDIT_WRITE, which a sandbox does not need).
CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_SETFCAP",
]

MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
    "/sys/devices/virtual/powercap", "/proc/sysrq-trigger",
    # /sys is the host's (see the mount below): hide its control and debug trees, among them
    # every other sandbox's cgroups.
    "/sys/fs/cgroup", "/sys/fs/bpf", "/sys/fs/fuse", "/sys/fs/pstore", "/sys/kernel/debug",
    "/sys/kernel/tracing", "/sys/kernel/security", "/sys/kernel/config",
]  # fmt: skip
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys"]

UID_RANGE = 65536
# Host tasks of runsc's own beside a sandbox's processes (see adapt_for_gvisor).
RUNSC_TASKS = 160
CPU_PERIOD_US = 100_000

# Where the runtime directory (init, and later envd) appears inside every sandbox.
RUNTIME_MOUNT = "/.bilik"


def process_capabilities(uid: int) -> dict[str, list[str]]:
    """The capability sets of a process started in a sandbox as ``uid``. Its bounding set is
    the sandbox's (all a set-uid program can gain there); root holds those, another user none."""
    held = CAPABILITIES if uid == 0 else []
    return {"bounding": CAPABILITIES, "effective": held, "permitted": held}


def config(
    *,
    sandbox_id: str,
    rootfs: Path,
    netns: Path,
    limits: Limits,
    instance: str,
    uid_base: int,
    env: dict[str, str],
    etc_dir: Path,
    runtime_dir: Path,
    control_dir: Path,
    init: list[str],
    lxcfs_dir: Path | None = None,
) -> dict[str, Any]:
    """Build ``config.json`` for one sandbox (as crun runs it; a backend adapts it to its
    runtime). ``init`` is PID 1's argv (inside the sandbox). ``lxcfs_dir``, the instance's
    LXCFS mount, shows ``/proc/meminfo`` and the like by the sandbox's own limits (None: the
    kernel's files, the host's totals)."""
    memory = limits.memory_mb * 1024 * 1024
    spec = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": init,
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": "/",
            "capabilities": process_capabilities(0),
            # Set-uid programs (``sudo``) work, as on E2B: what they gain is at most the
            # bounding set above, in the sandbox's user namespace, under the seccomp filter
            # (which the runtime installs before it drops CAP_SYS_ADMIN).
            "noNewPrivileges": False,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": sandbox_id,
        "mounts": [
            {
                "destination": "/proc",
                "type": "proc",
                "source": "proc",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            # sysfs cannot be mounted from a user namespace that does not own the network
            # namespace, so the host's is bind-mounted read-only (what rootless runtimes do),
            # with its sensitive parts masked below.
            {
                "destination": "/sys",
                "type": "bind",
                "source": "/sys",
                "options": ["rbind", "nosuid", "noexec", "nodev", "ro"],
            },
            *(
                {
                    "destination": f"/etc/{name}",
                    "type": "bind",
                    "source": str(etc_dir / name),
                    "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
                }
                for name in ("hostname", "hosts", "resolv.conf")
            ),
            {
                "destination": RUNTIME_MOUNT,
                "type": "bind",
                "source": str(runtime_dir),
                "options": ["rbind", "ro", "nosuid", "nodev"],
            },
            {
                # envd's config, read-only inside: the host trusts what is there, so the
                # sandbox must not change it (nor fill the host's disk through it).
                "destination": CONTROL_DIR,
                "type": "bind",
                "source": str(control_dir),
                "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
            },
            # (after /proc and /sys, over their files)
            *(lxcfs.mounts(lxcfs_dir) if lxcfs_dir is not None else []),
        ],
        "linux": {
            "uidMappings": [{"containerID": 0, "hostID": uid_base, "size": UID_RANGE}],
            "gidMappings": [{"containerID": 0, "hostID": uid_base, "size": UID_RANGE}],
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "cgroup"},
                {"type": "user"},
                {"type": "network", "path": str(netns)},
            ],
            "cgroupsPath": f"{instance}/{sandbox_id}",
            "resources": {
                "devices": [{"allow": False, "access": "rwm"}],
                "memory": {"limit": memory, "swap": memory},
                "cpu": {"period": CPU_PERIOD_US, "quota": int(limits.cpu * CPU_PERIOD_US)},
                "pids": {"limit": limits.pids},
            },
            "rootfsPropagation": "private",
            "seccomp": seccomp.profile(),
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    }
    return spec


def adapt_for_gvisor(spec: dict[str, Any], runtime_dir: Path, tmp: Path) -> None:
    """Fit the spec to gVisor (the Debian build of late 2022).

    This build refuses a user namespace in the bundle and cannot make cgroups or join a
    network namespace from one, so bilik runs it inside all three (``userns_exec``, with the
    same uid mapping, and cgroups made from ``resources``); it has no cgroup namespaces. Its
    processes preload a shim of ``statx`` (see ``gvisor_statx.c``) and set their seccomp filter
    themselves. It ignores set-uid bits and sets ``no_new_privs`` on every process whatever the
    bundle says (google/gvisor#212): ``sudo`` does not work there.
    """
    # Its /proc and /sys are the Sentry's own: LXCFS, which answers by the reading host
    # process's cgroup, would answer for the gofer, not for the sandbox.
    views = {f"/{name}" for name in lxcfs.FILES}
    spec["mounts"] = [m for m in spec["mounts"] if m["destination"] not in views]
    for mount in spec["mounts"]:
        if mount["destination"] == "/sys":  # gVisor has a sysfs of its own
            mount.update(type="sysfs", source="sysfs", options=["nosuid", "noexec", "nodev", "ro"])
    spec["mounts"] += [
        {
            "destination": "/etc/ld.so.preload",
            "type": "bind",
            "source": str(runtime_dir / gvisor_statx.PRELOAD),
            "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
        },
        # runsc puts a tmpfs on /tmp unless the bundle mounts something there: its writes would
        # take the Sentry's memory instead of the sandbox's capped disk. /tmp is on the disk.
        {
            "destination": "/tmp",
            "type": "bind",
            "source": str(tmp),
            "options": ["rbind", "rw", "nosuid", "nodev"],
        },
    ]
    linux = spec["linux"]
    linux["namespaces"] = [
        ns for ns in linux["namespaces"] if ns["type"] not in ("user", "cgroup", "network")
    ]
    del linux["uidMappings"], linux["gidMappings"], linux["cgroupsPath"]
    # This build applies a bundle's filter to PID 1 only, not to `runsc exec`'s processes, and
    # its own rendering of the filter keeps the processes under it from starting threads: the
    # sandbox's processes set the filter themselves (see backends.SECCOMP_FILTER).
    del linux["seccomp"]
    # The host's pids count the Sentry's and gofer's own threads too (about 80 at rest), and
    # a host process for every process in the sandbox.
    linux["resources"]["pids"]["limit"] += RUNSC_TASKS
