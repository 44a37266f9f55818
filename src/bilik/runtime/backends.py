"""Sandbox backends: what differs between the OCI runtimes that run a sandbox's bundle.

Every difference between crun and gVisor's runsc lives here, as one object per runtime, so the
rest of the runtime asks a question ("where does envd listen?", "what is PID 1?") instead of
testing a name. A later backend (a microVM runtime on hosts with hardware virtualisation) is one
more subclass and one more entry in :data:`BACKENDS`.

- **crun** runs the bundle as written: namespaces (user included), cgroups it makes itself, the
  bundle's seccomp filter. envd is started from the host by the zygote (``envd_zygote``), on a
  unix socket made on the host and passed in, so the host reaches envd with networking off.
- **runsc** (Debian 12's gVisor) refuses a user namespace in the bundle and cannot make cgroups
  or join a network namespace from one: it runs inside all three (``userns_exec``, cgroups made
  by bilik). Its processes cannot be joined from the host, so PID 1 runs envd itself and the host
  reaches it at the sandbox's address; every process sets the seccomp filter itself
  (``bilik.envd.seccomp_exec``), as this build applies a bundle's filter to PID 1 alone.
"""

from __future__ import annotations

import asyncio
import builtins
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from ..proto.contract import CONTROL_DIR
from . import agent_python, cgroups, gvisor_statx, oci, userns_exec
from .ocicli import OciCli

# The sandboxes' seccomp filter, compiled, in the runtime directory (for the processes that set
# it themselves: envds from the zygote, and every process of a gVisor sandbox).
SECCOMP_FILTER = "seccomp.bpf"

_BUSYBOX = f"{oci.RUNTIME_MOUNT}/busybox"
_ENVD = (
    f"{_BUSYBOX} env -i PATH=/usr/bin:/bin "
    f"{agent_python.MOUNTED_AT}/bin/python3 -I -m bilik.envd {CONTROL_DIR}"
)
# The loader's variables are the command's, not the filter-setting Python's (code they load
# would run before the filter is set): a static shell puts them aside, seccomp_exec restores them.
_LOADER_VARS = ("LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "GCONV_PATH")
_PUT_ASIDE = "".join(f'[ "${{{v}+x}}" ] && export BILIK_KEPT_{v}="${v}"; ' for v in _LOADER_VARS)
_SECCOMP_EXEC = [
    _BUSYBOX,
    "sh",
    "-c",
    f'{_PUT_ASIDE}unset {" ".join(_LOADER_VARS)}; exec "$@"',
    "seccomp_exec",
    f"{agent_python.MOUNTED_AT}/bin/python3",
    "-I",
    "-m",
    "bilik.envd.seccomp_exec",
    f"{oci.RUNTIME_MOUNT}/{SECCOMP_FILTER}",
]


def _init(work: str) -> list[str]:
    """PID 1: tini reaps every orphan; below it a shell that runs ``work`` forever (it keeps
    the sandbox alive with no workload)."""
    return [
        f"{oci.RUNTIME_MOUNT}/tini",
        "--",
        _BUSYBOX,
        "sh",
        "-c",
        f"trap '' TERM INT HUP; while :; do {work}; done",
    ]


class Backend(OciCli):
    """One OCI runtime, and how a sandbox is shaped for it."""

    # Whether the host starts envd (through the zygote, on a socket it passes in); if not,
    # the sandbox's PID 1 runs envd itself.
    starts_envd = True
    # Whether :meth:`freeze` freezes the sandbox's cgroup (else the runtime pauses it itself).
    freezes_cgroup = True

    def init(self) -> list[str]:
        """PID 1's argv, inside the sandbox."""
        raise NotImplementedError

    def wrap(self, argv: builtins.list[str]) -> builtins.list[str]:
        """The argv a process the runtime execs in the sandbox runs as."""
        return argv

    def envd_socket(self, sandbox_dir: Path, socket_name: str) -> Path | None:
        """Where envd's unix socket is on the host (None: reach envd at the address)."""
        return sandbox_dir / socket_name

    def prepare(self, disk_dir: Path, uid: int, runtime_dir: Path) -> dict[str, Any]:
        """Make what the bundle of this runtime needs on the sandbox's disk; returns the extra
        arguments of :func:`oci.config`'s adaptation (see :meth:`adapt`)."""
        return {}

    def adapt(self, config: dict[str, Any], runtime_dir: Path, **prepared: Any) -> None:
        """Fit the bundle's config to this runtime."""

    def make_cgroups(
        self, instance: str, sandbox_id: str, resources: dict[str, Any]
    ) -> builtins.list[Path]:
        """The cgroups the runtime is to start the sandbox in (their ``cgroup.procs``), where
        bilik makes them; none where the runtime does it from the bundle."""
        return []

    def exec_pid_file(self, sandbox_dir: Path, sandbox_id: str, name: str) -> Path:
        """Where the runtime's exec ``name`` writes its pid."""
        return sandbox_dir / f"{name}.pid"

    def process_killer(self, sandbox_id: str) -> Callable[[int], None] | None:
        """Kills a process of the sandbox by the pid its exec wrote, when that is no host pid
        (None: it is a host pid, killed directly)."""
        return None

    def forget(self, sandbox_id: str) -> None:
        """Remove what this runtime keeps of a released sandbox outside its directory."""

    # A memory pause: the sandbox's processes stopped in place, their memory kept. Under crun
    # the cgroup freezer (which survives a restart of bilik, and says whether it holds them).
    async def freeze(self, instance: str, sandbox_id: str) -> None:
        """Stop every process of the sandbox in place; returns once all are stopped (OSError
        or StepFailed if they are not, the sandbox left running)."""
        await asyncio.to_thread(cgroups.freeze, instance, sandbox_id)

    async def thaw(self, instance: str, sandbox_id: str) -> None:
        """Let a frozen sandbox's processes run on (nothing if it is not frozen)."""
        await asyncio.to_thread(cgroups.thaw, instance, sandbox_id)

    async def is_frozen(self, instance: str, sandbox_id: str) -> bool:
        return await asyncio.to_thread(cgroups.is_frozen, instance, sandbox_id)


class Crun(Backend):
    def __init__(self, state_root: Path, *, uid_base: int, netns_dir: Path) -> None:
        super().__init__("crun", state_root, uid_base=uid_base, netns_dir=netns_dir)
        self.base.append("--cgroup-manager=cgroupfs")

    def init(self) -> list[str]:
        return _init(f"{_BUSYBOX} sleep 2147483647 & wait")


class Runsc(Backend):
    starts_envd = False
    freezes_cgroup = False

    def __init__(self, state_root: Path, *, uid_base: int, netns_dir: Path) -> None:
        super().__init__("runsc", state_root, uid_base=uid_base, netns_dir=netns_dir)
        # gVisor's own netstack refuses to start in this build ("cannot run with network
        # enabled in root network namespace"); its host mode hands sockets to the host
        # kernel, inside the sandbox's own network namespace that bilik filters. Its
        # cgroups are made by bilik (``cgroups.create``): runsc cannot from a user namespace.
        self.base += ["--network=host", "--ignore-cgroups"]
        # runsc in its user namespace writes its state as the sandbox's root.
        os.chown(self.root, uid_base, uid_base)
        self._tasks: set[asyncio.Task[str]] = set()

    def _argv(self, netns_of: str | None = None, cgroup_procs: Sequence[Path] = ()) -> list[str]:
        """runsc always runs as the sandboxes' root, in a user namespace: its state is theirs
        to write, so host root never acts on it; with ``netns_of``, also in that sandbox's
        network namespace, the only place its Sentry's control socket is reached from."""
        return [
            sys.executable,
            "-I",
            "-S",
            userns_exec.__file__,
            str(self.netns_dir / netns_of) if netns_of else "-",
            str(self.uid_base),
            str(oci.UID_RANGE),
            *map(str, cgroup_procs),
            "--",
            *self.base,
        ]

    def _delete_args(self, sandbox_id: str) -> list[str]:
        return ["delete", "-force", sandbox_id]

    def exec_argv(self, sandbox_id: str, process_file: Path, pid_file: Path) -> list[str]:
        """As :meth:`OciCli.exec_argv`, but ``pid_file`` gets the process's pid inside (it has
        no host pid), for :meth:`kill_process`."""
        return [
            *self._argv(sandbox_id),
            "exec",
            "-process",
            str(process_file),
            "-internal-pid-file",
            str(pid_file),
            sandbox_id,
        ]

    def kill_process(self, sandbox_id: str, pid: int) -> None:
        """SIGKILL process ``pid`` (its pid inside) in the background: killing ``runsc exec``
        would leave it running."""
        task = asyncio.ensure_future(
            self._run("oci-kill", "kill", "-pid", str(pid), sandbox_id, "KILL", netns_of=sandbox_id)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def init(self) -> list[str]:
        # gVisor's processes cannot be joined from the host: PID 1 runs envd, and starts it
        # again should it ever die.
        return [*_SECCOMP_EXEC, *_init(f"{_ENVD}; {_BUSYBOX} sleep 1")]

    def wrap(self, argv: builtins.list[str]) -> builtins.list[str]:
        return [*_SECCOMP_EXEC, *argv]

    def envd_socket(self, sandbox_dir: Path, socket_name: str) -> Path | None:
        return None  # (gVisor keeps sockets inside its own kernel)

    def prepare(self, disk_dir: Path, uid: int, runtime_dir: Path) -> dict[str, Any]:
        gvisor_statx.ensure(runtime_dir, oci.RUNTIME_MOUNT)
        # /tmp on the sandbox's disk (see oci.adapt_for_gvisor): made here, so no one's link.
        tmp = disk_dir / "tmp"
        tmp.mkdir(mode=0o1777)
        tmp.chmod(0o1777)
        os.chown(tmp, uid, uid)
        return {"tmp": tmp}

    def adapt(self, config: dict[str, Any], runtime_dir: Path, **prepared: Any) -> None:
        oci.adapt_for_gvisor(config, runtime_dir, prepared["tmp"])

    def make_cgroups(
        self, instance: str, sandbox_id: str, resources: dict[str, Any]
    ) -> builtins.list[Path]:
        return cgroups.create(instance, sandbox_id, resources)

    def exec_pid_file(self, sandbox_dir: Path, sandbox_id: str, name: str) -> Path:
        # Written as the sandbox's root: in runsc's own directory.
        return self.root / f"{sandbox_id}.{name}.pid"

    def process_killer(self, sandbox_id: str) -> Callable[[int], None] | None:
        return partial(self.kill_process, sandbox_id)

    # The cgroup freezer cannot always freeze gVisor's ptrace platform (a traced stub stays
    # "FREEZING"): the Sentry stops its own tasks instead (``runsc pause``), which its state
    # then says. (``runsc checkpoint`` would keep the memory on disk, durable, but this build
    # refuses it for a sandbox with host networking: "checkpoint not supported when using
    # hostinet".)
    async def freeze(self, instance: str, sandbox_id: str) -> None:
        await self._run("freeze", "pause", sandbox_id, netns_of=sandbox_id)

    async def thaw(self, instance: str, sandbox_id: str) -> None:
        if await self.is_frozen(instance, sandbox_id):
            await self._run("thaw", "resume", sandbox_id, netns_of=sandbox_id)

    async def is_frozen(self, instance: str, sandbox_id: str) -> bool:
        return (await self.state(sandbox_id) or {}).get("status") == "paused"

    def forget(self, sandbox_id: str) -> None:
        """The pid files runsc wrote for the sandbox's execs that no one waited for."""
        for path in self.root.glob(f"{sandbox_id}.*.pid"):
            path.unlink(missing_ok=True)


BACKENDS: dict[str, type[Crun] | type[Runsc]] = {"crun": Crun, "runsc": Runsc}
RUNTIMES = tuple(BACKENDS)


def backend(name: str, state_root: Path, *, uid_base: int, netns_dir: Path) -> Backend:
    """The backend called ``name``; ValueError for one bilik does not know."""
    if name not in BACKENDS:
        raise ValueError(f"unknown OCI runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    return BACKENDS[name](state_root, uid_base=uid_base, netns_dir=netns_dir)
