"""The OCI bundle config of a sandbox: namespaces, user mapping, mounts, limits, seccomp."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import seccomp
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
CPU_PERIOD_US = 100_000

# Where the runtime directory (init, and later envd) appears inside every sandbox.
RUNTIME_MOUNT = "/.bilik"
# The sandbox's own control directory (envd's config and socket), shared with the host.
CONTROL_MOUNT = "/run/bilik"


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
    oci_runtime: str = "crun",
) -> dict[str, Any]:
    """Build ``config.json`` for one sandbox. ``init`` is PID 1's argv (inside the sandbox)."""
    memory = limits.memory_mb * 1024 * 1024
    spec = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": init,
            "env": [f"{k}={v}" for k, v in env.items()],
            "cwd": "/",
            "capabilities": {k: CAPABILITIES for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
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
                "destination": CONTROL_MOUNT,
                "type": "bind",
                "source": str(control_dir),
                "options": ["rbind", "rw", "nosuid", "nodev", "noexec"],
            },
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
    if oci_runtime == "runsc":
        _adapt_for_gvisor(spec)
    return spec


def _adapt_for_gvisor(spec: dict[str, Any]) -> None:
    """Fit the spec to gVisor (the Debian build of late 2022).

    Its user-space kernel is the isolation boundary: sandbox processes are emulated by the Sentry,
    which runs as an unprivileged host user, so it takes no host user namespace (this build
    refuses one) and has no cgroup namespaces. Its layers are therefore stored unshifted.
    """
    for mount in spec["mounts"]:
        if mount["destination"] == "/sys":  # gVisor has a sysfs of its own
            mount.update(type="sysfs", source="sysfs", options=["nosuid", "noexec", "nodev", "ro"])
    linux = spec["linux"]
    linux["namespaces"] = [ns for ns in linux["namespaces"] if ns["type"] not in ("user", "cgroup")]
    del linux["uidMappings"], linux["gidMappings"]
