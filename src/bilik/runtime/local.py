"""The local runtime: sandboxes as OCI containers on this host.

A sandbox is a directory ``sandboxes/<id>`` holding its record, its disk image (mounted at
``disk``), its rootfs (an overlay of the template's layers and the disk's ``upper``) and its OCI
bundle; plus a network namespace, a veth on the instance's bridge, and cgroups (made by crun, or
by bilik for runsc). Create undoes its partial work on failure; kill and reconcile release
everything. Pause, resume and snapshots are in ``pausing``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Settings
from ..proto.contract import CONFIG_FILE, CONTROL_DIR, ENVD_PORT, EnvdConfig
from . import backends, cgroups, debian_image, exec, host, pausing, registry_image
from .backends import RUNTIMES, SECCOMP_FILTER, Backend
from .base import Counters, ExecResult, Log, LogLine, Process, Route, SandboxInfo, Usage
from .bundle import CONSOLE_LOG, ENVD_LOG, START_LOG, START_LOG_OLD, Bundles
from .dns import DnsForwarder, DnsPolicy, host_resolvers
from .envd_zygote import EnvdZygote
from .errors import (
    InvalidSpec,
    SandboxExists,
    SandboxNotFound,
    SandboxPaused,
    StepFailed,
    step,
)
from .fsutil import file_lock, lock_fd
from .layers import BadTree, Image, LayerStore
from .lxcfs import Lxcfs
from .network import HostNetwork
from .records import RecordStore, SandboxRecord
from .spec import SandboxSpec, egress_rule, is_sandbox_id, new_sandbox_id

if TYPE_CHECKING:  # (envd's client, and httpx with it, loads when a sandbox is reached)
    from .envd_client import EnvdClient, Started

# How old an unused layer must be before collect_layers deletes it.
LAYER_GRACE_S = 600.0

# envd's unix socket on the host (where the backend has one), in the sandbox's directory, which
# only the host writes.
ENVD_SOCKET = "envd.sock"
# How long a new sandbox's envd may take to listen before the create fails.
ENVD_START_S = 30.0
# The start command's log keeps this much, and its older half as much again, bytes; a line
# longer than LINE_CHARS is kept in pieces.
START_LOG_BYTES = 512 << 10
LINE_CHARS = 16 << 10


class LocalRuntime:
    """Sandboxes on this host, run by crun (default) or gVisor's runsc."""

    def __init__(self, settings: Settings, log: Log | None = None) -> None:
        self.settings = settings
        self.log: Log = log or (lambda line: None)
        data = settings.data_dir
        self.layers = LayerStore(data)
        self.records = RecordStore(data / "sandboxes")
        self.runtime_dir = data / "runtime"
        self.state_root = Path("/run") / settings.instance
        self.network = HostNetwork(settings.instance, settings.subnet)
        # (started by the first sandbox that needs it; it outlives this process for them)
        self.lxcfs = Lxcfs(self.state_root, self.log)
        self.bundles = Bundles(
            settings, self.layers, self.records, self.network, self.runtime_dir, self.lxcfs
        )
        self._backends: dict[str, Backend] = {}
        self.zygote = EnvdZygote(self.runtime_dir / "agents", self.runtime_dir / SECCOMP_FILTER)
        self._init_fds: dict[str, tuple[int, asyncio.AbstractEventLoop]] = {}
        # What follows each sandbox's start command (its output to its start log).
        self._start_followers: dict[str, asyncio.Task[None]] = {}
        self._by_address: dict[str, SandboxRecord] = {}
        self._by_address_at = 0.0
        self._started = False

    # -- lifecycle of the runtime itself ------------------------------------------------------

    async def start(self) -> None:
        """Prepare the host: cgroups, bridge, rules, runtime dir. Idempotent.

        The long-running server then calls :meth:`reconcile` and :meth:`serve_dns`; a one-shot
        CLI command must not, or it could release a sandbox another process is creating.
        """
        if self._started:
            return
        for d in (self.settings.data_dir, self.records.root):
            d.mkdir(parents=True, exist_ok=True)
            # Root inside a sandbox is an unprivileged host uid: the OCI runtime, already in the
            # sandbox's user namespace, must be able to traverse down to the bundle.
            os.chmod(d, 0o711)
        await asyncio.to_thread(
            host.prepare,
            self.network,
            self.runtime_dir,
            self.layers,
            self.settings.uid_base,
            self.log,
        )
        self._started = True

    async def close(self) -> None:
        """Stop what this process runs for the sandboxes (they and their envds live on; so
        does the LXCFS daemon while any sandbox of the instance is left)."""
        for sandbox_id in {*self._init_fds, *self._start_followers}:
            self._unfollow(sandbox_id)
        await self.zygote.close()
        await asyncio.to_thread(self.lxcfs.stop_unless, self._any_sandbox)

    def _any_sandbox(self) -> bool:
        try:
            return bool(self.records.ids())
        except FileNotFoundError:
            return False

    async def serve_dns(self) -> DnsForwarder:
        """Start the sandboxes' DNS forwarder on the gateway; the caller closes it."""
        upstreams = [u for u in self.settings.dns_upstream.split(",") if u] or host_resolvers()
        forwarder = DnsForwarder(
            str(self.network.gateway), upstreams, policy=self.dns_policy, learn=self.network.learn
        )
        await forwarder.start()
        return forwarder

    def oci(self, name: str | None = None) -> Backend:
        """The backend called ``name`` (the server's default if None)."""
        name = name or self.settings.oci_runtime
        if name not in self._backends:
            self._backends[name] = backends.backend(
                name,
                self.state_root,
                uid_base=self.settings.uid_base,
                netns_dir=self.network.netns_dir,
            )
        return self._backends[name]

    def image(self, template: str, *, rebuild: bool = False, log: Log | None = None) -> Image:
        """The image of ``template``; ``debian`` (plain Debian, for templates to build on) is
        built on first use, and built anew on ``rebuild``, its progress told to ``log``."""
        if template != debian_image.NAME:
            return self.layers.image(template)
        uid_base = self.settings.uid_base
        return debian_image.ensure(self.layers, uid_base, log or self.log, rebuild=rebuild)

    def pull_image(
        self,
        ref: str,
        log: Log,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> Image:
        """An image from an OCI registry, as a template's base (cached by digest)."""
        return registry_image.pull(
            self.layers,
            ref,
            self.settings.uid_base,
            log,
            username=username,
            password=password,
        )

    def collect_layers(self, *, grace_s: float = LAYER_GRACE_S) -> list[str]:
        """Delete layers that no template and no sandbox uses any more (e.g. after a rebuild).

        Layers younger than ``grace_s`` are kept: another process may be between publishing one
        and saving the image that names it. A rebuild, which just saved its image, needs none.
        """
        in_use = {key for record in self.records.all() for key in record.layers}
        removed = []
        for key in self.layers.unused(in_use):
            if self.layers.path(key).stat().st_mtime <= time.time() - grace_s:
                self.layers.remove(key)
                removed.append(key)
        return removed

    def _choose(self, template: str, oci_runtime: str | None) -> tuple[Image, str]:
        """The image and OCI runtime of a create: the create's runtime if it names one, else the
        template's, else the server's."""
        image = self.image(template)
        return image, oci_runtime or image.oci_runtime or self.settings.oci_runtime

    # -- sandboxes ----------------------------------------------------------------------------

    def check(self, spec: SandboxSpec) -> None:
        """Raise InvalidSpec if a create of ``spec`` would be refused (the operator's caps)."""
        caps = self.settings.caps
        spec.validate(
            max_cpu=caps.cpu,
            max_memory_mb=caps.memory_mb,
            max_disk_mb=caps.disk_mb,
            max_pids=caps.pids,
            max_lifetime_s=caps.lifetime_s,
        )

    async def create(self, spec: SandboxSpec, *, oci_runtime: str | None = None) -> SandboxInfo:
        self.check(spec)
        image, runtime_name = await asyncio.to_thread(self._choose, spec.template, oci_runtime)
        backend = self.oci(runtime_name)
        sandbox_id = spec.sandbox_id or new_sandbox_id()
        task = asyncio.ensure_future(self._create(sandbox_id, spec, image, backend))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The caller went away mid-create: let the create finish (or undo itself), then
            # kill what it made, so no half-made sandbox outlives the request.
            with contextlib.suppress(Exception):
                await self.kill((await task).sandbox_id)
            raise

    async def _create(
        self, sandbox_id: str, spec: SandboxSpec, image: Image, backend: Backend
    ) -> SandboxInfo:
        # Held until the sandbox runs, so a kill, the reaper or a reconcile in any process waits
        # for the create instead of releasing it halfway.
        async with self._locked(sandbox_id):
            with step("reserve"):
                record = await asyncio.to_thread(
                    self._reserve, sandbox_id, spec, image, backend.name
                )
            async with contextlib.AsyncExitStack() as undo:
                undo.push_async_callback(self._undo_create, record)
                cgroup_procs = await asyncio.to_thread(
                    self.bundles.prepare, record, image, spec.access_token, backend
                )
                bundle = self.records.dir(sandbox_id)
                with step("oci-start"):
                    pid = await backend.run_detached(
                        sandbox_id, bundle, bundle / CONSOLE_LOG, cgroup_procs
                    )
                record.init_pid, record.init_start = pid, _start_time(pid)
                with step("record"):
                    await asyncio.to_thread(self.records.save, record)
                self._follow_init(record)
                if backend.starts_envd:
                    with step("start-envd"):
                        await self._spawn_envd(record)
                await self._wait_for_envd(record)
                if image.start_cmd:
                    await self._start_workload(record, image)
                undo.pop_all()
        return self._info(record, "running")

    def route(self, sandbox_id: str) -> Route:
        """How to reach the sandbox (from its record: no runtime call): its address, checked to
        be one of the instance's sandbox addresses, and its envd socket. SandboxNotFound for a
        warm-pool sandbox no one owns yet, and for anything else not to be routed to."""
        record = self._record(sandbox_id)
        if record.pooled or not self.network.is_sandbox_address(record.address):
            raise SandboxNotFound(sandbox_id)
        if record.pause is not None:
            raise SandboxPaused(sandbox_id)
        return Route(record.address, self._envd_socket(record))

    async def hand_over(
        self, sandbox_id: str, timeout_s: float, metadata: dict[str, str]
    ) -> SandboxInfo:
        """Make a warm-pool sandbox an ordinary one, for the create it is given to: it ends
        ``timeout_s`` from now and carries the create's metadata. Its lifetime (and E2B's
        ``startedAt``) counts from now, as its owner sees it made now, however long it waited.
        SandboxNotFound if it is gone, no longer runs, or was handed over already."""
        async with self._locked(sandbox_id):
            record = self.records.load(sandbox_id)
            if record is None or not record.pooled or await self._state(record) != "running":
                raise SandboxNotFound(sandbox_id)

            def adopt() -> SandboxRecord:
                # The records lock, as set_timeout takes it: no end time is lost between them.
                with file_lock(self.settings.data_dir / "locks" / "sandboxes"):
                    record = self._record(sandbox_id)
                    now = time.time()
                    record.pooled = False
                    record.created_at, record.end_at = now, now + timeout_s
                    record.metadata = dict(metadata)
                    self.records.save(record)
                    return record

            record = await asyncio.to_thread(adopt)
        return self._info(record, "running")

    async def is_running(self, sandbox_id: str) -> bool:
        try:
            record = self._record(sandbox_id)
        except SandboxNotFound:
            return False
        return await self._state(record) == "running"

    def _envd_socket(self, record: SandboxRecord) -> Path | None:
        """The unix socket of the sandbox's envd on the host, or None where its backend has
        none (reach envd at the address instead)."""
        d = self.records.dir(record.sandbox_id)
        return self.oci(record.oci_runtime).envd_socket(d, ENVD_SOCKET)

    async def _spawn_envd(self, record: SandboxRecord) -> None:
        """Have the zygote start envd in the sandbox ``record``, on a socket it makes at
        the host path :meth:`_envd_socket` names. Only into that sandbox's own PID 1: the record
        is the host's, and the pid must still be in the sandbox's cgroup."""
        d = self.records.dir(record.sandbox_id)
        if not cgroups.holds(self.settings.instance, record.sandbox_id, record.init_pid):
            raise StepFailed("start-envd", "the sandbox's init is gone")
        await self.zygote.spawn(
            record.init_pid, record.init_start, CONTROL_DIR, d / ENVD_SOCKET, d / ENVD_LOG
        )

    async def revive_envd(self, sandbox_id: str) -> bool:
        """Start envd again in a running sandbox where it no longer answers (it crashed, or
        was killed from inside); True if envd answers now. Its processes live on, unknown to
        the new envd. Where the backend's init runs envd, the init starts it again itself."""
        async with self._locked(sandbox_id):
            record = self._running_record(sandbox_id)
            if not await self.is_running(sandbox_id):
                return False
            if await self._envd_answers(record):
                return True
            if not self.oci(record.oci_runtime).starts_envd:
                return False
            self.log(f"envd of {sandbox_id} is gone: starting it again")
            try:
                await self._spawn_envd(record)
                await self._wait_for_envd(record)
            except StepFailed as e:  # (the server's to know; callers answer as for no envd)
                self.log(f"envd of {sandbox_id} could not be started again: {e}")
                return False
            return True

    def envd(self, sandbox_id: str) -> EnvdClient:
        """A client of the sandbox's envd, for the runtime's own work inside it."""
        return self._envd_of(self._running_record(sandbox_id))

    def _envd_of(self, record: SandboxRecord) -> EnvdClient:
        """:meth:`envd`, paused or not (a resume's cold boot talks to envd before it ends)."""
        config = self.records.dir(record.sandbox_id) / "control" / CONFIG_FILE
        # (read-only inside the sandbox; opened without following a link all the same)
        with os.fdopen(os.open(config, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
            token = EnvdConfig.loads(f.read()).access_token
        from .envd_client import EnvdClient

        return EnvdClient(self._envd_socket(record), record.address, token)

    async def _start_workload(self, record: SandboxRecord, image: Image) -> None:
        """Start the template's start command, and wait until its ready check passes;
        StartFailed if the command ends badly first, or the check never passes."""
        started = await self._follow_start(record, image)
        if image.ready_cmd:
            async with self._envd_of(record) as envd:
                from .envd_client import wait_ready

                await wait_ready(
                    envd,
                    image.ready_cmd,
                    image.user,
                    image.workdir,
                    self.settings.ready_timeout_s,
                    started,
                )

    async def _follow_start(self, record: SandboxRecord, image: Image) -> Started:
        """Start the template's start command and follow it for as long as it runs (or until
        the sandbox is released), its output going to the sandbox's start log."""
        assert image.start_cmd is not None
        envd = self._envd_of(record)
        log = _StartLog(self.records.dir(record.sandbox_id))
        try:
            started = await envd.follow(
                image.start_cmd,
                user=image.user,
                cwd=image.workdir,
                tag="start_cmd",
                on_output=log.write,
            )
        except BaseException:
            await envd.aclose()
            raise

        async def follow() -> None:
            try:
                await started.ended
                log.flush()
            except Exception:  # (its stream broke: the sandbox went; a create learns it itself)
                pass
            finally:
                await envd.aclose()

        self._start_followers[record.sandbox_id] = asyncio.ensure_future(follow())
        return started

    async def _envd_answers(self, record: SandboxRecord) -> bool:
        """Whether the sandbox's envd takes a connection now."""
        socket_path = self._envd_socket(record)
        try:
            if socket_path is not None:
                _, writer = await asyncio.open_unix_connection(socket_path)
            else:
                _, writer = await asyncio.open_connection(record.address, ENVD_PORT)
        except OSError:
            return False
        writer.close()
        return True

    async def _wait_for_envd(self, record: SandboxRecord) -> None:
        """Until the new sandbox's envd answers: a create returns a sandbox ready for use."""
        deadline = time.monotonic() + ENVD_START_S
        delay = 0.002
        while time.monotonic() < deadline:
            if await self._envd_answers(record):
                return
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.05)
        console = await self.console(record.sandbox_id, limit_bytes=2000)
        raise StepFailed(
            "start-envd",
            f"envd did not start within {ENVD_START_S:.0f} s: " + " | ".join(console[-5:]),
        )

    async def _undo_create(self, record: SandboxRecord) -> None:
        try:
            await self._release_locked(record.sandbox_id, record)
        except Exception as e:  # the create's own error is the one to report
            self.log(f"undoing the create of {record.sandbox_id} left something behind: {e}")

    @contextlib.asynccontextmanager
    async def _locked(self, sandbox_id: str) -> AsyncIterator[None]:
        """Exclusive hold on one sandbox across every bilik process of this host.
        SandboxNotFound for what is not a sandbox id: every method on one sandbox takes this
        first, so no path is made of anything else."""
        if not is_sandbox_id(sandbox_id):
            raise SandboxNotFound(sandbox_id)
        path = self.state_root / "locks" / sandbox_id
        fd = await asyncio.to_thread(lock_fd, path)
        try:
            yield
        finally:
            if not self.records.dir(sandbox_id).exists():  # no sandbox (any more): no lock file
                path.unlink(missing_ok=True)
            os.close(fd)

    def _reserve(
        self, sandbox_id: str, spec: SandboxSpec, image: Image, runtime_name: str
    ) -> SandboxRecord:
        """Claim the id and an address, and record the sandbox before anything is made for it."""
        with file_lock(self.settings.data_dir / "locks" / "sandboxes"):
            directory = self.records.dir(sandbox_id)
            if directory.exists():
                raise SandboxExists(sandbox_id)
            used = {r.address_index for r in self.records.all()}
            index = next(i for i in range(len(used) + 1) if i not in used)
            address = self.network.address(index)
            directory.mkdir(mode=0o711)
            now = time.time()
            record = SandboxRecord(
                sandbox_id=sandbox_id,
                template=spec.template,
                layers=list(image.layers),
                limits=spec.limits,
                internet=spec.internet,
                address=address,
                address_index=index,
                oci_runtime=runtime_name,
                created_at=now,
                end_at=now + spec.timeout_s,
                user=image.user,
                workdir=image.workdir,
                env={**image.env, **spec.env},
                metadata=dict(spec.metadata),
                allow_out=list(spec.allow_out),
                deny_out=list(spec.deny_out),
                pooled=spec.pooled,
                start_cmd=image.start_cmd,
                ready_cmd=image.ready_cmd,
                image_env=dict(image.env),
            )
            self.records.save(record)
            return record

    async def _release_locked(self, sandbox_id: str, record: SandboxRecord | None) -> None:
        """Release everything a sandbox holds (the caller holds its lock).

        Every step runs even when an earlier one failed, and each tolerates its thing being
        absent; the failures are reported together at the end.
        """
        self._unfollow(sandbox_id)
        await self._thaw(record)
        errors: list[str] = []
        runtimes = (
            [record.oci_runtime]
            if record
            else [n for n in RUNTIMES if (self.state_root / n).exists()]
        )
        for name in runtimes:
            backend = self.oci(name)
            try:
                await backend.delete(sandbox_id)
            except StepFailed as e:
                errors.append(str(e))
            backend.forget(sandbox_id)
        errors += await asyncio.to_thread(self.bundles.release, sandbox_id, record)
        if errors:
            raise StepFailed("release", "; ".join(errors))

    def dns_policy(self, address: str) -> DnsPolicy | None:
        """What the DNS forwarder may answer the sandbox at ``address`` (None: no sandbox)."""
        record = self._by_address.get(address)
        if record is None or time.monotonic() - self._by_address_at > 1:
            self._by_address = {r.address: r for r in self.records.all()}
            self._by_address_at = time.monotonic()
            record = self._by_address.get(address)
        if record is None:
            return None
        domains = [
            value
            for kind, value in (egress_rule(r, domains_ok=True) for r in record.allow_out)
            if kind == "domain"
        ]
        return DnsPolicy(internet=record.internet, domains=domains)

    async def kill(self, sandbox_id: str) -> None:
        async with self._locked(sandbox_id):
            await self._release_locked(sandbox_id, self._record(sandbox_id))

    async def stop(self, sandbox_id: str) -> None:
        """End every process of the sandbox and return once none is left, its disk still
        mounted: what the sandbox wrote then stays as it is while the host reads it (a build
        keeps a step's upper directory). Nothing runs in it again; :meth:`kill` releases the
        rest. StepFailed if a process of it outlives the wait.

        The container goes first (its pid namespace with it: envd, and whatever a command left
        running; under gVisor the Sentry and its gofer); then whatever is still in the
        sandbox's cgroups, the only place its processes can be, is killed until none is left.
        """
        async with self._locked(sandbox_id):
            record = self._record(sandbox_id)
            self._unfollow(sandbox_id)
            await self._thaw(record)
            await self._stop_locked(record)

    async def _thaw(self, record: SandboxRecord | None) -> None:
        """Thaw a sandbox before it is ended (a paused sandbox is killed like any): a frozen
        process cannot die, and runsc cannot delete a sandbox it paused."""
        if record is None:
            return
        instance = self.settings.instance
        await asyncio.to_thread(cgroups.thaw, instance, record.sandbox_id)
        if record.pause is not None or record.pause_op is not None:
            with contextlib.suppress(StepFailed):
                await self.oci(record.oci_runtime).thaw(instance, record.sandbox_id)

    async def _stop_locked(self, record: SandboxRecord, *, kill_first: bool = False) -> None:
        """:meth:`stop`'s work (the caller holds the lock, and thawed the sandbox); with
        ``kill_first``, every process is killed at once before the container is deleted."""
        sandbox_id = record.sandbox_id
        if kill_first:
            await asyncio.to_thread(self._kill_members, sandbox_id)
        await self.oci(record.oci_runtime).delete(sandbox_id)
        deadline = time.monotonic() + 30
        while pids := await asyncio.to_thread(self._members, sandbox_id):
            if time.monotonic() > deadline:
                raise StepFailed("stop", f"processes {pids} of {sandbox_id} would not end")
            await asyncio.to_thread(self._kill_members, sandbox_id, pids)
            await asyncio.sleep(0.01)

    def _members(self, sandbox_id: str) -> builtins.list[int]:
        """Every process in the sandbox's cgroups (the only place its processes can be)."""
        pids: set[int] = set()
        for top in cgroups.sandbox_cgroup_dirs(self.settings.instance, sandbox_id):
            with contextlib.suppress(OSError, ValueError):  # (gone meanwhile: empty)
                for procs in top.rglob("cgroup.procs"):
                    pids.update(int(p) for p in procs.read_text().split())
        return sorted(pids)

    def _kill_members(self, sandbox_id: str, pids: builtins.list[int] | None = None) -> None:
        """SIGKILL ``pids`` (default: every member) that are still in the sandbox's cgroups."""
        from signal import SIGKILL, pidfd_send_signal

        instance = self.settings.instance
        for pid in self._members(sandbox_id) if pids is None else pids:
            with contextlib.suppress(OSError):
                fd = os.pidfd_open(pid)
                try:  # (the pidfd holds the process: its pid cannot be another's here)
                    if cgroups.holds(instance, sandbox_id, pid):
                        pidfd_send_signal(fd, SIGKILL)
                finally:
                    os.close(fd)

    async def commit(self, sandbox_id: str, key: str) -> None:
        """Keep what the sandbox changed (its upper layer) as layer ``key``: the sandbox is
        stopped first (:meth:`stop`), so nothing in it changes the tree while host root reads
        it; then the tree is copied by directory descriptors, never following a link and never
        leaving it (``layers.copy_tree``). The sandbox is the caller's to :meth:`kill`. If
        ``key`` exists already (the same step made meanwhile), it is kept as it is."""
        await self.stop(sandbox_id)
        disk = self.records.dir(sandbox_id) / "disk"
        try:
            await asyncio.to_thread(self.layers.keep_upper, disk, key)
        except BadTree as e:
            raise StepFailed("commit", f"what the sandbox left cannot be kept: {e}") from None

    def _record(self, sandbox_id: str) -> SandboxRecord:
        record = self.records.load(sandbox_id)
        if record is None:
            raise SandboxNotFound(sandbox_id)
        return record

    def _running_record(self, sandbox_id: str) -> SandboxRecord:
        """The record of a sandbox that is not paused (SandboxPaused if it is)."""
        record = self._record(sandbox_id)
        if record.pause is not None:
            raise SandboxPaused(sandbox_id)
        return record

    async def _update(self, sandbox_id: str, **changes: object) -> SandboxRecord:
        """Change fields of the sandbox's record, durably, under the records lock (as
        set_timeout takes it: neither change is lost)."""

        def change() -> SandboxRecord:
            with file_lock(self.settings.data_dir / "locks" / "sandboxes"):
                record = self._record(sandbox_id)
                for name, value in changes.items():
                    setattr(record, name, value)
                self.records.save(record)
                return record

        return await asyncio.to_thread(change)

    async def _alive(self, record: SandboxRecord) -> bool:
        """Whether the sandbox's container runs (frozen or not)."""
        if record.init_pid:
            return _start_time(record.init_pid) == record.init_start
        state = await self.oci(record.oci_runtime).state(record.sandbox_id)
        return str((state or {}).get("status")) in ("running", "paused")

    # -- pause, resume, snapshot (``pausing``) ------------------------------------------------

    async def pause(self, sandbox_id: str, *, memory: bool) -> SandboxInfo:
        """Pause the sandbox: with ``memory``, frozen in place (its processes continue on
        resume; ``PauseInfo.mechanism`` "freezer", not durable); else its files alone are kept
        (flushed to its disk, every process ended; "disk", durable) and a resume cold-boots it.
        Returns once the pause is as durable as it says. SandboxPaused if it is paused already;
        StepFailed (the sandbox still running) if the pause failed."""
        return await pausing.pause(self, sandbox_id, memory=memory)

    async def resume(self, sandbox_id: str, timeout_s: float) -> SandboxInfo:
        """Run a paused sandbox again, with the same id and address, ending ``timeout_s`` from
        now: thawed (a memory pause) or booted anew over the same disk (a files pause: envd with
        the same access token, then the template's start command and ready check).
        SandboxNotPaused if it is not paused."""
        return await pausing.resume(self, sandbox_id, timeout_s)

    async def snapshot(self, sandbox_id: str, image_name: str) -> Image:
        """Save the sandbox's files now as image ``image_name``: its own image with one more,
        content-addressed layer (what it changed). A running sandbox is frozen for the copy
        alone; a paused one stays paused (SandboxPaused if its disk is not mounted: after a
        host restart, resume it first). New sandboxes of ``template=image_name`` cold-boot
        from those files."""
        return await pausing.snapshot(self, sandbox_id, image_name)

    def _info(self, record: SandboxRecord, state: str) -> SandboxInfo:
        return SandboxInfo(
            sandbox_id=record.sandbox_id,
            template=record.template,
            state=state,
            limits=record.limits,
            internet=record.internet,
            address=record.address,
            oci_runtime=record.oci_runtime,
            created_at=record.created_at,
            end_at=record.end_at,
            metadata=dict(record.metadata),
            env=dict(record.env),
            pooled=record.pooled,
            pause=pausing.pause_info(record) if state == "paused" else None,
            allow_out=tuple(record.allow_out),
            deny_out=tuple(record.deny_out),
        )

    async def _states(self) -> dict[str, str]:
        states: dict[str, str] = {}
        for name in RUNTIMES:
            if (self.state_root / name).exists():
                states.update(await self.oci(name).list())
        return states

    async def _state(self, record: SandboxRecord) -> str:
        """``paused`` (as the record says), ``running`` or ``stopped``: from PID 1 itself when
        the record knows it (a pidfd followed by the event loop, so a list of hundreds costs
        nothing), else from the OCI runtime."""
        if record.pause is not None:
            return "paused"
        if record.sandbox_id in self._init_fds:
            return "running"
        if record.init_pid:
            alive = _start_time(record.init_pid) == record.init_start
            if alive:
                self._follow_init(record)
            return "running" if alive else "stopped"
        state = await self.oci(record.oci_runtime).state(record.sandbox_id)
        return str((state or {}).get("status", "stopped"))

    def _follow_init(self, record: SandboxRecord) -> None:
        """Hold a pidfd of the sandbox's PID 1, dropped (by the event loop) when it exits."""
        if record.sandbox_id in self._init_fds:
            return
        try:
            fd = os.pidfd_open(record.init_pid)
        except OSError:
            return
        if _start_time(record.init_pid) != record.init_start:  # the pid is another's by now
            os.close(fd)
            return
        loop = asyncio.get_running_loop()
        self._init_fds[record.sandbox_id] = (fd, loop)
        loop.add_reader(fd, self._unfollow_init, record.sandbox_id)

    def _unfollow(self, sandbox_id: str) -> None:
        """Stop following the sandbox's init and its start command (before its disk goes: a
        cancelled follower writes nothing more)."""
        follower = self._start_followers.pop(sandbox_id, None)
        if follower is not None:
            follower.cancel()
        self._unfollow_init(sandbox_id)

    def _unfollow_init(self, sandbox_id: str) -> None:
        held = self._init_fds.pop(sandbox_id, None)
        if held is not None:
            fd, loop = held
            if not loop.is_closed():
                loop.remove_reader(fd)
            os.close(fd)

    async def list(self) -> builtins.list[SandboxInfo]:
        records = await asyncio.to_thread(self.records.all)
        return [self._info(r, await self._state(r)) for r in records]

    async def inspect(self, sandbox_id: str) -> SandboxInfo:
        record = self._record(sandbox_id)
        return self._info(record, await self._state(record))

    async def console(self, sandbox_id: str, limit_bytes: int = 1 << 20) -> builtins.list[str]:
        """The last ``limit_bytes`` of what the sandbox's PID 1 wrote, as lines."""
        self._record(sandbox_id)
        path = self.records.dir(sandbox_id) / CONSOLE_LOG

        def tail() -> builtins.list[str]:
            try:
                with open(path, "rb") as f:
                    f.seek(max(0, f.seek(0, os.SEEK_END) - limit_bytes))
                    return f.read().decode(errors="replace").splitlines()
            except FileNotFoundError:
                return []

        return await asyncio.to_thread(tail)

    async def logs(self, sandbox_id: str, limit_bytes: int = 1 << 20) -> builtins.list[LogLine]:
        """What the sandbox's PID 1 wrote (stamped with its start) and its start command (with
        the time of each line), oldest first: the last ``limit_bytes`` of each."""
        record = self._record(sandbox_id)
        console = await self.console(sandbox_id, limit_bytes)
        d = self.records.dir(sandbox_id)
        started = await asyncio.to_thread(_read_start_log, d, limit_bytes)
        lines = [LogLine(record.created_at, "console", line) for line in console]
        return sorted(lines + started, key=lambda line: line.timestamp)

    async def usage(self, sandbox_id: str, interval_s: float = 0.1) -> Usage:
        """What the sandbox uses now: CPU over ``interval_s``, memory, and disk."""
        record = self._running_record(sandbox_id)
        instance = self.settings.instance
        before = cgroups.usage(instance, sandbox_id)
        started = time.monotonic()
        await asyncio.sleep(interval_s)
        after = cgroups.usage(instance, sandbox_id)
        elapsed_ns = (time.monotonic() - started) * 1e9
        busy = max(0, after.get("cpu_usage_ns", 0) - before.get("cpu_usage_ns", 0))
        disk = os.statvfs(self.records.dir(sandbox_id) / "disk")
        return Usage(
            cpu_count=record.limits.cpu,
            cpu_used_pct=round(100 * busy / elapsed_ns / record.limits.cpu, 2),
            mem_used=after.get("memory_bytes", 0),
            mem_total=record.limits.memory_mb << 20,
            disk_used=(disk.f_blocks - disk.f_bfree) * disk.f_frsize,
            disk_total=disk.f_blocks * disk.f_frsize,
        )

    async def counters(self, sandbox_ids: Sequence[str]) -> dict[str, Counters]:
        """The counters of those of ``sandbox_ids`` that are here (the rest are left out), all
        read in one thread."""
        instance = self.settings.instance

        def read() -> dict[str, Counters]:
            found: dict[str, Counters] = {}
            for sandbox_id in sandbox_ids:
                record = self.records.load(sandbox_id)
                if record is None or record.pause is not None:  # (a paused one uses nothing)
                    continue
                try:
                    disk = os.statvfs(self.records.dir(sandbox_id) / "disk")
                except OSError:  # (released meanwhile)
                    continue
                now = cgroups.usage(instance, sandbox_id)
                found[sandbox_id] = Counters(
                    cpu_count=record.limits.cpu,
                    cpu_ns=now.get("cpu_usage_ns", 0),
                    mem_used=now.get("memory_bytes", 0),
                    mem_total=record.limits.memory_mb << 20,
                    disk_used=(disk.f_blocks - disk.f_bfree) * disk.f_frsize,
                    disk_total=disk.f_blocks * disk.f_frsize,
                )
            return found

        return await asyncio.to_thread(read)

    async def set_timeout(self, sandbox_id: str, seconds: float) -> SandboxInfo:
        if not 0 <= seconds <= self.settings.caps.lifetime_s:
            raise InvalidSpec(f"timeout must be between 0 and {self.settings.caps.lifetime_s}")

        def extend() -> None:
            with file_lock(self.settings.data_dir / "locks" / "sandboxes"):
                record = self._running_record(sandbox_id)
                record.end_at = min(
                    time.time() + seconds, record.created_at + self.settings.caps.lifetime_s
                )
                self.records.save(record)

        await asyncio.to_thread(extend)
        return await self.inspect(sandbox_id)

    async def reap_expired(self, *, keep: Collection[str] = ()) -> builtins.list[str]:
        """Kill every sandbox past its end time but those in ``keep``; returns their ids. A
        paused one is never reaped: its time does not run (what becomes of it is its owner's
        to decide)."""
        now = time.time()
        expired = [
            r.sandbox_id
            for r in await asyncio.to_thread(self.records.all)
            if r.end_at <= now
            and r.pause is None
            and r.pause_op is None
            and r.sandbox_id not in keep
        ]
        reaped = await asyncio.gather(*(self._reap(i, now) for i in expired))
        return [i for i, done in zip(expired, reaped, strict=True) if done]

    async def _reap(self, sandbox_id: str, now: float) -> bool:
        async with self._locked(sandbox_id):
            record = self.records.load(sandbox_id)  # set_timeout may have moved the end
            if record is None or record.end_at > now or record.pause is not None:
                return False
            await self._release_locked(sandbox_id, record)
            return True

    async def reconcile(self) -> None:
        """Make the host match the records: re-adopt what runs, release everything else.

        A record whose container is gone, a container with no record, and any leftover (a
        directory, network namespace or cgroup of no live sandbox) are released. Each is checked
        again under its lock, so a sandbox another process is creating right now is left alone.
        A paused sandbox is kept, and a pause or resume a crash interrupted is settled from
        what runs (``pausing.settle``): it is then running or paused, never released.
        """
        all_records = await asyncio.to_thread(self.records.all)
        records = {r.sandbox_id for r in all_records}
        for r in all_records:
            if r.pause is not None or r.pause_op is not None:
                async with self._locked(r.sandbox_id):
                    try:
                        await pausing.settle(self, r.sandbox_id)
                    except StepFailed as e:
                        self.log(f"reconcile: {r.sandbox_id}: {e}")
        states = await self._states()
        found = (
            records
            | set(states)
            | set(self.records.ids())
            | set(self.network.leftover_ids())
            | set(cgroups.leftover_cgroups(self.settings.instance))
        )
        # Only names shaped like sandbox ids: never touch anything else that shares the prefix.
        for sandbox_id in sorted(i for i in found if is_sandbox_id(i)):
            if states.get(sandbox_id) == "running" and sandbox_id in records:
                continue
            async with self._locked(sandbox_id):
                record = self.records.load(sandbox_id)
                if record and (record.pause is not None or record.pause_op is not None):
                    continue  # (settled above, or paused meanwhile)
                state = await self.oci(record.oci_runtime if record else None).state(sandbox_id)
                if record and state and state.get("status") == "running":
                    continue
                self.log(f"reconcile: releasing {sandbox_id}")
                try:
                    await self._release_locked(sandbox_id, record)
                except StepFailed as e:
                    self.log(f"reconcile: {sandbox_id}: {e}")
        for key in await asyncio.to_thread(self.collect_layers):
            self.log(f"reconcile: removed unused layer {key[:12]}")

    # -- processes ----------------------------------------------------------------------------

    async def exec(
        self,
        sandbox_id: str,
        argv: Sequence[str],
        *,
        user: str = "root",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bool = False,
    ) -> Process:
        """Start ``argv`` in the sandbox as ``user`` (a name from its /etc/passwd)."""
        record = self._running_record(sandbox_id)
        layers = [self.layers.path(k) for k in record.layers]
        return await exec.start(
            self.oci(record.oci_runtime),
            record,
            self.records.dir(sandbox_id),
            layers,
            argv,
            user=user,
            env=env,
            cwd=cwd,
            stdin=stdin,
        )

    async def run(
        self,
        sandbox_id: str,
        argv: Sequence[str],
        *,
        user: str = "root",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        input: bytes | None = None,
    ) -> ExecResult:
        """Run ``argv`` to completion and collect its output."""
        proc = await self.exec(
            sandbox_id, argv, user=user, env=env, cwd=cwd, stdin=input is not None
        )
        return await exec.collect(proc, input)


def _start_time(pid: int) -> int:
    """When process ``pid`` started (clock ticks after boot); 0 if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0
    return 0 if fields[0] in (b"Z", b"X") else int(fields[19])


class _StartLog:
    """A sandbox's start command's output: a JSON line for each of its lines, with its time
    and stream, in the sandbox's START_LOG; past START_LOG_BYTES it becomes START_LOG_OLD and
    a new one begins. Opened for each write, never held (the disk is unmounted under it), and
    without following a link."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / START_LOG
        self.old = directory / START_LOG_OLD
        self._partial: dict[str, str] = {}  # each stream's unfinished line

    def write(self, stream: str, text: str) -> None:
        *lines, rest = (self._partial.pop(stream, "") + text).split("\n")
        while len(rest) > LINE_CHARS:
            lines.append(rest[:LINE_CHARS])
            rest = rest[LINE_CHARS:]
        if rest:
            self._partial[stream] = rest
        self._append(stream, lines)

    def flush(self) -> None:
        """Log the lines the command left unfinished (it ended)."""
        for stream, rest in self._partial.items():
            self._append(stream, [rest])
        self._partial.clear()

    def _append(self, stream: str, lines: builtins.list[str]) -> None:
        now = time.time()
        entries = [json.dumps({"t": now, "s": stream, "l": line}) + "\n" for line in lines]
        data = "".join(entries).encode()[-START_LOG_BYTES:]
        if not data:
            return
        # (A full disk, or a sandbox released meanwhile: the output goes unlogged.)
        with contextlib.suppress(OSError):
            if os.lstat(self.path).st_size + len(data) > START_LOG_BYTES:
                os.replace(self.path, self.old)
        with contextlib.suppress(OSError):
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(self.path, flags, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)


def _read_start_log(directory: Path, limit_bytes: int) -> builtins.list[LogLine]:
    """The last ``limit_bytes`` of a sandbox's start log (its older half first)."""
    chunks: builtins.list[bytes] = []
    left = limit_bytes
    for path in (directory / START_LOG, directory / START_LOG_OLD):
        if left <= 0:
            break
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        with os.fdopen(fd, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - left))
            chunk = f.read(left)
        chunks.insert(0, chunk)
        left -= len(chunk)
    lines = []
    for raw in b"".join(chunks).splitlines():
        try:  # (a line cut by the seek is left out)
            entry = json.loads(raw)
            lines.append(LogLine(float(entry["t"]), str(entry["s"]), str(entry["l"])))
        except (ValueError, TypeError, KeyError):
            continue
    return lines
