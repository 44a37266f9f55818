"""The runtime interface: what the control plane, the CLI and the tests use to run sandboxes."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import os
import signal
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..config import Settings
from .dns import DnsForwarder
from .fsutil import read_pid
from .layers import Image, LayerStore
from .spec import Limits, SandboxSpec

if TYPE_CHECKING:
    from .envd_client import EnvdClient

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class PauseInfo:
    """How a paused sandbox is kept.

    ``memory``: its processes and memory are kept and a resume continues them; else only its
    files are, and a resume cold-boots it (its start command and envd run again).
    ``mechanism``: ``"freezer"`` (its cgroup frozen in place: RAM stays held), ``"checkpoint"``
    (gVisor's state image on disk) or ``"disk"`` (files only). ``durable``: it survives a
    restart of the machine (a frozen sandbox does not). ``memory_lost``: a memory pause whose
    memory did not survive (the machine restarted): now files only, said so."""

    memory: bool
    mechanism: str
    durable: bool
    paused_at: float
    memory_lost: bool = False


@dataclasses.dataclass(frozen=True)
class SandboxInfo:
    sandbox_id: str
    template: str
    # "running", "paused" (``pause`` says how), "stopped" (its container is gone) or "creating"
    state: str
    limits: Limits
    internet: bool
    address: str
    oci_runtime: str
    created_at: float
    end_at: float
    metadata: dict[str, str]
    env: dict[str, str]
    pooled: bool = False  # waiting in the warm pool, no one's yet
    pause: PauseInfo | None = None  # set while paused
    # its egress rules as its create gave them (a fork's children get the same)
    allow_out: tuple[str, ...] = ()
    deny_out: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Usage:
    """A sandbox's resource use at one moment (CPU % is of its own CPU limit)."""

    cpu_count: float
    cpu_used_pct: float
    mem_used: int
    mem_total: int
    disk_used: int
    disk_total: int


@dataclasses.dataclass(frozen=True)
class Counters:
    """A sandbox's running totals at one moment, cheap to read for many sandboxes at once: the
    CPU time it has used since it started, and its memory and disk use now (a rate such as CPU %
    is the reader's to work out from two readings)."""

    cpu_count: float
    cpu_ns: int
    mem_used: int
    mem_total: int
    disk_used: int
    disk_total: int


@dataclasses.dataclass(frozen=True)
class LogLine:
    """A line of a sandbox's log: what its PID 1 wrote (``console``, stamped with the sandbox's
    start: the console keeps no times) or its template's start command (``stdout``,
    ``stderr``), at ``timestamp`` (seconds since the epoch)."""

    timestamp: float
    stream: str
    line: str


@dataclasses.dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


class Process:
    """A process running inside a sandbox. Read its output with :meth:`output`."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        pid_file: Path,
        spec_file: Path,
        kill_inside: Callable[[int], None] | None = None,
    ) -> None:
        """``pid_file`` will hold the process's host pid; with ``kill_inside``, its pid inside
        the sandbox instead, which ``kill_inside`` kills (gVisor's processes have no host
        pid)."""
        self._proc = proc
        self._pid_file = pid_file
        self._spec_file = spec_file
        self._kill_inside = kill_inside

    @property
    def stdin(self) -> asyncio.StreamWriter | None:
        return self._proc.stdin

    async def output(self) -> AsyncIterator[tuple[str, bytes]]:
        """Yield ``("stdout" | "stderr", chunk)`` as the process produces output, until both end."""
        queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()

        async def pump(name: str, stream: asyncio.StreamReader | None) -> None:
            try:
                while stream is not None and (chunk := await stream.read(65536)):
                    await queue.put((name, chunk))
            finally:
                await queue.put(None)

        tasks = [
            asyncio.create_task(pump("stdout", self._proc.stdout)),
            asyncio.create_task(pump("stderr", self._proc.stderr)),
        ]
        try:
            open_streams = 2
            while open_streams:
                item = await queue.get()
                if item is None:
                    open_streams -= 1
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    async def wait(self) -> int:
        """Wait for the process to end; returns its exit code (128+N when killed by signal N)."""
        code = await self._proc.wait()
        self._pid_file.unlink(missing_ok=True)
        self._spec_file.unlink(missing_ok=True)
        return 128 - code if code < 0 else code

    def kill(self) -> None:
        """Kill the process inside the sandbox (the runtime's exec helper follows it out)."""
        with contextlib.suppress(OSError, ValueError):
            pid = read_pid(self._pid_file)
            if self._kill_inside is not None:
                self._kill_inside(pid)
            else:
                os.kill(pid, signal.SIGKILL)
        if self._proc.returncode is None:
            self._proc.kill()


@dataclasses.dataclass(frozen=True)
class Route:
    """How the host reaches one sandbox: its address on the instance's bridge (every port),
    and its envd's unix socket on the host where it has one (else envd answers at the address,
    on ``ENVD_PORT``)."""

    address: str
    envd_socket: Path | None


class Runtime(Protocol):
    """What every sandbox backend provides, and all that its callers (the sandbox service, the
    sandbox plane, template builds, the CLI) use of it. ``tests/runtime_conformance.py`` holds
    what every implementation must pass."""

    settings: Settings
    layers: LayerStore  # the images and layers sandboxes stand on (templates build into it)
    log: Log

    # -- the runtime itself
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def serve_dns(self) -> DnsForwarder: ...
    async def reconcile(self) -> None: ...
    async def reap_expired(self, *, keep: Collection[str] = ...) -> builtins.list[str]: ...
    def collect_layers(self, *, grace_s: float = ...) -> builtins.list[str]: ...

    # -- images
    def image(self, template: str, *, rebuild: bool = False, log: Log | None = None) -> Image: ...
    def pull_image(
        self, ref: str, log: Log, *, username: str | None = None, password: str | None = None
    ) -> Image: ...

    # -- sandboxes
    def check(self, spec: SandboxSpec) -> None: ...
    async def create(self, spec: SandboxSpec, *, oci_runtime: str | None = None) -> SandboxInfo: ...
    async def hand_over(
        self, sandbox_id: str, timeout_s: float, metadata: dict[str, str]
    ) -> SandboxInfo: ...
    async def kill(self, sandbox_id: str) -> None: ...
    async def stop(self, sandbox_id: str) -> None: ...
    async def commit(self, sandbox_id: str, key: str) -> None: ...
    async def pause(self, sandbox_id: str, *, memory: bool) -> SandboxInfo:
        """Pause the sandbox (``memory``: its processes kept, else its files alone) and return
        it paused (``SandboxInfo.pause`` says how) once the pause is as durable as it says.
        SandboxPaused if it is paused; StepFailed, the sandbox still running, if it failed.
        While paused it is listed, never reaped nor released by a reconcile, and killed like
        any; what needs it running (route, exec, run, envd, usage, set_timeout) raises
        SandboxPaused."""
        ...

    async def resume(self, sandbox_id: str, timeout_s: float) -> SandboxInfo:
        """Run a paused sandbox again, with the same id and address, ending ``timeout_s`` from
        now (paused time does not count): its processes continue (a memory pause), or it boots
        anew over its files (envd with the same access token; the template's start command and
        ready check again). SandboxNotPaused if it is not paused."""
        ...

    async def snapshot(self, sandbox_id: str, image_name: str) -> Image:
        """Save the sandbox's files as image ``image_name`` (its image plus one layer of what
        it changed), from which new sandboxes cold-boot. A running sandbox keeps running, a
        paused one stays paused."""
        ...

    async def list(self) -> builtins.list[SandboxInfo]: ...
    async def inspect(self, sandbox_id: str) -> SandboxInfo: ...
    async def is_running(self, sandbox_id: str) -> bool: ...
    async def set_timeout(self, sandbox_id: str, seconds: float) -> SandboxInfo: ...
    async def usage(self, sandbox_id: str, interval_s: float = ...) -> Usage: ...
    async def counters(self, sandbox_ids: Sequence[str]) -> dict[str, Counters]: ...
    async def console(self, sandbox_id: str, limit_bytes: int = ...) -> builtins.list[str]: ...
    async def logs(self, sandbox_id: str, limit_bytes: int = ...) -> builtins.list[LogLine]: ...

    # -- reaching into a sandbox
    def route(self, sandbox_id: str) -> Route: ...
    async def revive_envd(self, sandbox_id: str) -> bool: ...
    def envd(self, sandbox_id: str) -> EnvdClient: ...
    async def exec(
        self,
        sandbox_id: str,
        argv: Sequence[str],
        *,
        user: str = "root",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bool = False,
    ) -> Process: ...
    async def run(
        self,
        sandbox_id: str,
        argv: Sequence[str],
        *,
        user: str = "root",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        input: bytes | None = None,
    ) -> ExecResult: ...
