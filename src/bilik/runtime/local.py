"""The local runtime: sandboxes as OCI containers on this host.

A sandbox is a directory ``sandboxes/<id>`` holding its record, its disk image (mounted at
``disk``), its rootfs (an overlay of the template's layers and the disk's ``upper``) and its OCI
bundle; plus a network namespace, a veth on the instance's bridge, and cgroups (made by crun, or
by bilik for runsc). Create undoes its partial work on failure; kill and reconcile release
everything.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from pathlib import Path

from ..config import Settings
from . import (
    agent_python,
    agents,
    cgroups,
    debian_image,
    disk,
    gvisor_statx,
    oci,
    registry_image,
    seccomp,
    syscalls,
)
from .base import ExecResult, Process, Route, SandboxInfo, Usage
from .dns import DnsForwarder, DnsPolicy, host_resolvers
from .envd_client import EnvdClient
from .envd_zygote import EnvdZygote
from .errors import InvalidSpec, SandboxExists, SandboxNotFound, StepFailed
from .fsutil import file_lock, lock_fd, read_beneath, write_bytes_atomic, write_text
from .layers import BadTree, Image, LayerStore
from .network import HostNetwork
from .ocicli import RUNTIMES, OciCli
from .records import RecordStore, SandboxRecord
from .spec import SandboxSpec, egress_rule, is_sandbox_id, new_sandbox_id

Log = Callable[[str], None]

# How old an unused layer must be before collect_layers deletes it.
LAYER_GRACE_S = 600.0

# Host binaries copied into the runtime directory every sandbox sees read-only at /.bilik (beside
# the agents' Python, see agent_python).
RUNTIME_FILES = {"tini": "/usr/bin/tini-static", "busybox": "/bin/busybox"}

# envd's config, in the sandbox's control directory (named alike in ``bilik.envd.config``).
ENVD_CONFIG = "envd.json"
# envd's unix socket (crun only) and its log, and PID 1's output: host paths the sandbox cannot
# reach. The socket lies in the sandbox's directory, which only the host writes; the logs lie
# on the sandbox's own disk (beside its upper layer, out of its view), so what it writes there
# counts against its disk, never the host's.
ENVD_SOCKET = "envd.sock"
ENVD_LOG = "disk/envd.log"
CONSOLE_LOG = "disk/console.log"
ENVD_PORT = 49983
# How long a new sandbox's envd may take to listen before the create fails.
ENVD_START_S = 30.0

# PID 1: tini reaps every orphan; below it a shell that keeps the sandbox alive with no workload.
# Under crun, envd comes from the zygote (``envd_zygote``). gVisor's processes cannot be joined
# from the host, so there the shell runs envd itself, and starts it again should it ever die.
_BUSYBOX = f"{oci.RUNTIME_MOUNT}/busybox"
_ENVD = (
    f"{_BUSYBOX} env -i PATH=/usr/bin:/bin "
    f"{agent_python.MOUNTED_AT}/bin/python3 -I -m bilik.envd {oci.CONTROL_MOUNT}"
)


# The sandboxes' seccomp filter, compiled, in the runtime directory. Under gVisor every process
# sets it itself, through ``bilik.envd.seccomp_exec``: PID 1 (so all that descends from it) and
# what the runtime execs (runsc applies a bundle's filter to neither as it should: see oci).
SECCOMP_FILTER = "seccomp.bpf"
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


def _init(oci_runtime: str) -> list[str]:
    if oci_runtime == "runsc":
        work = f"{_ENVD}; {_BUSYBOX} sleep 1"
    else:
        work = f"{_BUSYBOX} sleep 2147483647 & wait"
    return [
        *(_SECCOMP_EXEC if oci_runtime == "runsc" else []),
        f"{oci.RUNTIME_MOUNT}/tini",
        "--",
        _BUSYBOX,
        "sh",
        "-c",
        f"trap '' TERM INT HUP; while :; do {work}; done",
    ]


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
        self._oci: dict[str, OciCli] = {}
        self.zygote = EnvdZygote(self.runtime_dir / "agents", self.runtime_dir / SECCOMP_FILTER)
        self._init_fds: dict[str, tuple[int, asyncio.AbstractEventLoop]] = {}
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
        await asyncio.to_thread(self._prepare_host)
        self._started = True

    async def close(self) -> None:
        """Stop what this process runs for the sandboxes (they and their envds live on)."""
        for sandbox_id in list(self._init_fds):
            self._unfollow_init(sandbox_id)
        await self.zygote.close()

    async def serve_dns(self) -> DnsForwarder:
        """Start the sandboxes' DNS forwarder on the gateway; the caller closes it."""
        upstreams = [u for u in self.settings.dns_upstream.split(",") if u] or host_resolvers()
        forwarder = DnsForwarder(
            str(self.network.gateway), upstreams, policy=self.dns_policy, learn=self.network.learn
        )
        await forwarder.start()
        return forwarder

    def _prepare_host(self) -> None:
        cgroups.prepare_host()
        self.network.ensure()
        self.runtime_dir.mkdir(exist_ok=True)
        os.chmod(self.runtime_dir, 0o755)
        for name, source in RUNTIME_FILES.items():
            target = self.runtime_dir / name
            if not target.exists() or target.stat().st_size != os.stat(source).st_size:
                shutil.copy2(source, target.with_suffix(".new"))
                os.replace(target.with_suffix(".new"), target)
        agents.ensure(self.runtime_dir, self.log)
        # For the processes that set the filter themselves: envds from the zygote, and every
        # process of a gVisor sandbox.
        filter_bpf = seccomp.compile_bpf(seccomp.profile())
        write_bytes_atomic(self.runtime_dir / SECCOMP_FILTER, filter_bpf)
        self.layers.discard_scratch()

    def oci(self, name: str | None = None) -> OciCli:
        name = name or self.settings.oci_runtime
        if name not in self._oci:
            self._oci[name] = OciCli(
                name,
                self.state_root,
                uid_base=self.settings.uid_base,
                netns_dir=self.network.netns_dir,
            )
        return self._oci[name]

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
        oci_cli = self.oci(runtime_name)
        sandbox_id = spec.sandbox_id or new_sandbox_id()
        task = asyncio.ensure_future(self._create(sandbox_id, spec, image, oci_cli))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The caller went away mid-create: let the create finish (or undo itself), then
            # kill what it made, so no half-made sandbox outlives the request.
            with contextlib.suppress(Exception):
                await self.kill((await task).sandbox_id)
            raise

    async def _create(
        self, sandbox_id: str, spec: SandboxSpec, image: Image, oci_cli: OciCli
    ) -> SandboxInfo:
        # Held until the sandbox runs, so a kill, the reaper or a reconcile in any process waits
        # for the create instead of releasing it halfway.
        async with self._locked(sandbox_id):
            record = await asyncio.to_thread(self._reserve, sandbox_id, spec, image, oci_cli.name)
            try:
                async with contextlib.AsyncExitStack() as undo:
                    undo.push_async_callback(self._undo_create, record)
                    cgroup_procs = await asyncio.to_thread(
                        self._prepare, record, image, spec.access_token
                    )
                    bundle = self.records.dir(sandbox_id)
                    pid = await oci_cli.run_detached(
                        sandbox_id, bundle, bundle / CONSOLE_LOG, cgroup_procs
                    )
                    record.init_pid, record.init_start = pid, _start_time(pid)
                    await asyncio.to_thread(self.records.save, record)
                    self._follow_init(record)
                    if oci_cli.name != "runsc":
                        await self._spawn_envd(record)
                    await self._wait_for_envd(record)
                    if image.start_cmd:
                        await self._start_workload(record, image)
                    undo.pop_all()
            except OSError as e:
                raise StepFailed("create", str(e)) from e
        return self._info(record, "running")

    def route(self, sandbox_id: str) -> Route:
        """How to reach the sandbox (from its record: no runtime call): its address, checked to
        be one of the instance's sandbox addresses, and its envd socket. SandboxNotFound for a
        warm-pool sandbox no one owns yet, and for anything else not to be routed to."""
        record = self._record(sandbox_id)
        if record.pooled or not self.network.is_sandbox_address(record.address):
            raise SandboxNotFound(sandbox_id)
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
        """The unix socket of the sandbox's envd on the host, or None where there is none
        (gVisor keeps sockets inside its own kernel: reach envd at the address instead)."""
        if record.oci_runtime == "runsc":
            return None
        return self.records.dir(record.sandbox_id) / ENVD_SOCKET

    async def _spawn_envd(self, record: SandboxRecord) -> None:
        """Have the zygote start envd in the crun sandbox ``record``, on a socket it makes at
        the host path :meth:`_envd_socket` names. Only into that sandbox's own PID 1: the record
        is the host's, and the pid must still be in the sandbox's cgroup."""
        d = self.records.dir(record.sandbox_id)
        if not cgroups.holds(self.settings.instance, record.sandbox_id, record.init_pid):
            raise StepFailed("start-envd", "the sandbox's init is gone")
        await self.zygote.spawn(
            record.init_pid, record.init_start, oci.CONTROL_MOUNT, d / ENVD_SOCKET, d / ENVD_LOG
        )

    async def revive_envd(self, sandbox_id: str) -> bool:
        """Start envd again in a running sandbox where it no longer answers (it crashed, or
        was killed from inside); True if envd answers now. Its processes live on, unknown to
        the new envd. Under gVisor the sandbox's own init restarts it."""
        async with self._locked(sandbox_id):
            record = self._record(sandbox_id)
            socket_path = self._envd_socket(record)
            if socket_path is None or not await self.is_running(sandbox_id):
                return False
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_unix_connection(socket_path)
                writer.close()
                return True
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
        record = self._record(sandbox_id)
        config = self.records.dir(sandbox_id) / "control" / ENVD_CONFIG
        # (read-only inside the sandbox; opened without following a link all the same)
        with os.fdopen(os.open(config, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)) as f:
            token = json.load(f).get("access_token", "")
        return EnvdClient(self._envd_socket(record), record.address, token)

    async def _start_workload(self, record: SandboxRecord, image: Image) -> None:
        """Start the template's start command, and wait until its ready check passes."""
        assert image.start_cmd is not None
        async with self.envd(record.sandbox_id) as envd:
            await envd.start(image.start_cmd, user=image.user, cwd=image.workdir, tag="start_cmd")
            if image.ready_cmd:
                await wait_ready(
                    envd,
                    image.ready_cmd,
                    image.user,
                    image.workdir,
                    self.settings.ready_timeout_s,
                )

    async def _wait_for_envd(self, record: SandboxRecord) -> None:
        """Until the new sandbox's envd answers: a create returns a sandbox ready for use."""
        socket_path = self._envd_socket(record)
        deadline = time.monotonic() + ENVD_START_S
        delay = 0.002
        while time.monotonic() < deadline:
            try:
                if socket_path is not None:
                    _, writer = await asyncio.open_unix_connection(socket_path)
                else:
                    _, writer = await asyncio.open_connection(record.address, ENVD_PORT)
                writer.close()
                return
            except OSError:
                pass
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
            )
            self.records.save(record)
            return record

    def _prepare(self, record: SandboxRecord, image: Image, access_token: str) -> list[Path]:
        """Disk, rootfs, /etc files, envd's config, network and bundle config: everything
        before the OCI start; under runsc also the cgroups, whose ``cgroup.procs`` files are
        returned (crun makes its own)."""
        d = self.records.dir(record.sandbox_id)
        uid = self.settings.uid_base
        control = d / "control"
        control.mkdir(mode=0o700)
        envd_config = control / ENVD_CONFIG
        envd_config.write_text(
            json.dumps(
                {
                    "access_token": access_token,
                    "default_user": image.user,
                    "default_workdir": image.workdir,
                    "env": record.env,
                    "port": ENVD_PORT,
                    "cpu_count": record.limits.cpu,
                    "memory_bytes": record.limits.memory_mb << 20,
                }
            )
        )
        for path in (control, envd_config):  # the sandbox's root, and nobody else in it
            os.chown(path, uid, uid)
        os.chmod(envd_config, 0o600)
        disk.create(d / "disk.img", d / "disk", record.limits.disk_mb, uid)
        gvisor_tmp = None
        if record.oci_runtime == "runsc":  # /tmp there (see oci): made here, so no one's link
            gvisor_statx.ensure(self.runtime_dir, oci.RUNTIME_MOUNT)
            gvisor_tmp = d / "disk" / "tmp"
            gvisor_tmp.mkdir(mode=0o1777)
            os.chmod(gvisor_tmp, 0o1777)
            os.chown(gvisor_tmp, uid, uid)
        rootfs = d / "rootfs"
        rootfs.mkdir()
        lower = ":".join(str(self.layers.path(k)) for k in reversed(record.layers))
        try:
            syscalls.mount(
                "overlay",
                str(rootfs),
                "overlay",
                # The merged tree is reachable from the host: no set-id or device files there.
                syscalls.MS_NOSUID | syscalls.MS_NODEV,
                f"lowerdir={lower},upperdir={d}/disk/upper,workdir={d}/disk/work,volatile",
            )
        except OSError as e:
            raise StepFailed("mount-rootfs", str(e)) from e
        etc = d / "etc"
        etc.mkdir()
        write_text(etc / "hostname", f"{record.sandbox_id}\n")
        write_text(
            etc / "hosts",
            f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"
            f"{record.address}\t{record.sandbox_id}\n",
        )
        write_text(etc / "resolv.conf", f"nameserver {self.network.gateway}\n")
        netns = self.network.create(record.sandbox_id, record.address, record.internet)
        self._set_egress(record, on=True)
        config = oci.config(
            sandbox_id=record.sandbox_id,
            rootfs=rootfs,
            netns=netns,
            limits=record.limits,
            instance=self.settings.instance,
            uid_base=uid,
            env=record.env,
            etc_dir=etc,
            runtime_dir=self.runtime_dir,
            control_dir=control,
            init=_init(record.oci_runtime),
            oci_runtime=record.oci_runtime,
            gvisor_tmp=gvisor_tmp,
        )
        (d / "config.json").write_text(json.dumps(config))
        if record.oci_runtime != "runsc":
            return []
        resources = config["linux"]["resources"]
        return cgroups.create(self.settings.instance, record.sandbox_id, resources)

    async def _release_locked(self, sandbox_id: str, record: SandboxRecord | None) -> None:
        """Release everything a sandbox holds (the caller holds its lock).

        Every step runs even when an earlier one failed, and each tolerates its thing being
        absent; the failures are reported together at the end.
        """
        self._unfollow_init(sandbox_id)
        errors: list[str] = []
        runtimes = (
            [record.oci_runtime]
            if record
            else [n for n in RUNTIMES if (self.state_root / n).exists()]
        )
        for name in runtimes:
            try:
                await self.oci(name).delete(sandbox_id)
            except StepFailed as e:
                errors.append(str(e))
        errors += await asyncio.to_thread(self._release_host, sandbox_id, record)
        if errors:
            raise StepFailed("release", "; ".join(errors))

    def _set_egress(self, record: SandboxRecord, *, on: bool) -> None:
        rules = {
            kind: [egress_rule(r, domains_ok=kind == "allow") for r in raw]
            for kind, raw in (("allow", record.allow_out), ("deny", record.deny_out))
        }
        self.network.set_egress(
            record.address,
            [v for k, v in rules["allow"] if k == "cidr"],
            [v for k, v in rules["deny"] if k == "cidr"],
            any(k == "domain" for k, _ in rules["allow"]),
            on=on,
        )

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

    def _release_host(self, sandbox_id: str, record: SandboxRecord | None) -> list[str]:
        d = self.records.dir(sandbox_id)
        address = record.address if record else None

        def egress() -> None:
            if record is not None:
                self._set_egress(record, on=False)

        steps: list[tuple[str, Callable[[], object]]] = [
            ("egress", egress),
            ("network", lambda: self.network.delete(sandbox_id, address)),
            ("cgroups", lambda: cgroups.remove_cgroup(self.settings.instance, sandbox_id)),
            ("unmount", lambda: _umount_all(syscalls.mounted_under(str(d)))),
            ("disk", lambda: disk.remove(d / "disk.img", d / "disk")),
            ("files", lambda: shutil.rmtree(d, ignore_errors=True)),
            ("pid files", lambda: self._remove_runsc_pid_files(sandbox_id)),
        ]
        errors = []
        for name, step in steps:
            try:
                step()
            except Exception as e:
                errors.append(f"{name}: {e}")
        return errors

    def _remove_runsc_pid_files(self, sandbox_id: str) -> None:
        """The pid files runsc wrote for the sandbox's execs (``<id>.exec-….pid``) that no
        one waited for."""
        for path in (self.state_root / "runsc").glob(f"{sandbox_id}.*.pid"):
            path.unlink(missing_ok=True)

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
        from signal import SIGKILL, pidfd_send_signal  # (stop's alone)

        instance = self.settings.instance

        def members() -> builtins.list[int]:
            pids: set[int] = set()
            for top in cgroups.sandbox_cgroup_dirs(instance, sandbox_id):
                with contextlib.suppress(OSError, ValueError):  # (gone meanwhile: empty)
                    for procs in top.rglob("cgroup.procs"):
                        pids.update(int(p) for p in procs.read_text().split())
            return sorted(pids)

        def kill_members(pids: builtins.list[int]) -> None:
            for pid in pids:
                with contextlib.suppress(OSError):
                    fd = os.pidfd_open(pid)
                    try:  # (the pidfd holds the process: its pid cannot be another's here)
                        if cgroups.holds(instance, sandbox_id, pid):
                            pidfd_send_signal(fd, SIGKILL)
                    finally:
                        os.close(fd)

        async with self._locked(sandbox_id):
            record = self._record(sandbox_id)
            self._unfollow_init(sandbox_id)
            await self.oci(record.oci_runtime).delete(sandbox_id)
            deadline = time.monotonic() + 30
            while pids := await asyncio.to_thread(members):
                if time.monotonic() > deadline:
                    raise StepFailed("stop", f"processes {pids} of {sandbox_id} would not end")
                await asyncio.to_thread(kill_members, pids)
                await asyncio.sleep(0.01)

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
        )

    async def _states(self) -> dict[str, str]:
        states: dict[str, str] = {}
        for name in RUNTIMES:
            if (self.state_root / name).exists():
                states.update(await self.oci(name).list())
        return states

    async def _state(self, record: SandboxRecord) -> str:
        """``running`` or ``stopped``: from PID 1 itself when the record knows it (a pidfd
        followed by the event loop, so a list of hundreds costs nothing), else from the OCI
        runtime."""
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

    async def usage(self, sandbox_id: str, interval_s: float = 0.1) -> Usage:
        """What the sandbox uses now: CPU over ``interval_s``, memory, and disk."""
        record = self._record(sandbox_id)
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

    async def set_timeout(self, sandbox_id: str, seconds: float) -> SandboxInfo:
        if not 0 <= seconds <= self.settings.caps.lifetime_s:
            raise InvalidSpec(f"timeout must be between 0 and {self.settings.caps.lifetime_s}")

        def extend() -> None:
            with file_lock(self.settings.data_dir / "locks" / "sandboxes"):
                record = self._record(sandbox_id)
                record.end_at = min(
                    time.time() + seconds, record.created_at + self.settings.caps.lifetime_s
                )
                self.records.save(record)

        await asyncio.to_thread(extend)
        return await self.inspect(sandbox_id)

    async def reap_expired(self) -> builtins.list[str]:
        """Kill every sandbox past its end time; returns their ids."""
        now = time.time()
        expired = [
            r.sandbox_id for r in await asyncio.to_thread(self.records.all) if r.end_at <= now
        ]
        reaped = await asyncio.gather(*(self._reap(i, now) for i in expired))
        return [i for i, done in zip(expired, reaped, strict=True) if done]

    async def _reap(self, sandbox_id: str, now: float) -> bool:
        async with self._locked(sandbox_id):
            record = self.records.load(sandbox_id)  # set_timeout may have moved the end
            if record is None or record.end_at > now:
                return False
            await self._release_locked(sandbox_id, record)
            return True

    async def reconcile(self) -> None:
        """Make the host match the records: re-adopt what runs, release everything else.

        A record whose container is gone, a container with no record, and any leftover (a
        directory, network namespace or cgroup of no live sandbox) are released. Each is checked
        again under its lock, so a sandbox another process is creating right now is left alone.
        """
        records = {r.sandbox_id for r in await asyncio.to_thread(self.records.all)}
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
        record = self._record(sandbox_id)
        if not argv:
            raise InvalidSpec("a process needs at least one argument")
        d = self.records.dir(sandbox_id)
        uid, gid, home = _lookup_user([self.layers.path(k) for k in record.layers], user)
        full_env = {**record.env, "HOME": home, "USER": user, "LOGNAME": user, **(env or {})}
        if record.oci_runtime == "runsc":
            argv = [*_SECCOMP_EXEC, *argv]
        process = {
            "terminal": False,
            "user": {"uid": uid, "gid": gid},
            "args": list(argv),
            "env": [f"{k}={v}" for k, v in full_env.items()],
            "cwd": cwd or (home if user != "root" else "/"),
            "capabilities": {
                k: oci.CAPABILITIES if uid == 0 else []
                for k in ("bounding", "effective", "permitted")
            },
            "noNewPrivileges": True,
        }
        name = f"exec-{os.urandom(6).hex()}"
        oci_cli = self.oci(record.oci_runtime)
        process_file, pid_file = d / f"{name}.json", d / f"{name}.pid"
        if oci_cli.name == "runsc":  # written as the sandbox's root: in runsc's own directory
            pid_file = oci_cli.root / f"{sandbox_id}.{name}.pid"
        process_file.write_text(json.dumps(process))
        proc = await asyncio.create_subprocess_exec(
            *oci_cli.exec_argv(sandbox_id, process_file, pid_file),
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        if oci_cli.name == "runsc":
            return Process(proc, pid_file, process_file, partial(oci_cli.kill_process, sandbox_id))
        return Process(proc, pid_file, process_file)

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
        feeder = asyncio.create_task(_feed(proc.stdin, input)) if input is not None else None
        out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        async for name, chunk in proc.output():
            out[name].append(chunk)
        if feeder is not None:
            feeder.cancel()
        code = await proc.wait()
        return ExecResult(code, b"".join(out["stdout"]), b"".join(out["stderr"]))


async def wait_ready(
    envd: EnvdClient, ready_cmd: str, user: str, workdir: str, timeout_s: float
) -> None:
    """Run ``ready_cmd`` until it succeeds; StepFailed after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        last = await envd.run(ready_cmd, user=user, cwd=workdir, timeout_s=10)
        if last.exit_code == 0:
            return
        if time.monotonic() > deadline:
            raise StepFailed(
                "ready-check",
                f"'{ready_cmd}' did not succeed within {timeout_s:.0f} s "
                f"(last exit {last.exit_code}: {last.output.strip()[-500:]})",
            )
        await asyncio.sleep(0.1)


def _start_time(pid: int) -> int:
    """When process ``pid`` started (clock ticks after boot); 0 if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0
    return 0 if fields[0] in (b"Z", b"X") else int(fields[19])


def _umount_all(points: list[str]) -> None:
    for point in points:
        syscalls.umount(point)


async def _feed(writer: asyncio.StreamWriter | None, data: bytes) -> None:
    """Write ``data`` to a process's stdin while its output is being read (no pipe deadlock)."""
    if writer is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        writer.write(data)
        await writer.drain()
    writer.close()


def _lookup_user(layers: list[Path], name: str) -> tuple[int, int, str]:
    """uid, gid and home of ``name`` from the template's /etc/passwd.

    Read from the read-only layers, never from the sandbox's own rootfs: that one is the
    sandbox's to change, and the host must not follow a link it planted.
    """
    for layer in reversed(layers):
        passwd = read_beneath(layer, "etc/passwd")
        if passwd is not None:
            for line in passwd.decode(errors="replace").splitlines():
                fields = line.split(":")
                if len(fields) >= 6 and fields[0] == name and fields[2].isdigit():
                    return int(fields[2]), int(fields[3] or 0), fields[5]
            break
    if name == "root":
        return 0, 0, "/root"
    raise InvalidSpec(f"user {name!r} does not exist in the sandbox")
