"""The local runtime: sandboxes as OCI containers on this host.

A sandbox is a directory ``sandboxes/<id>`` holding its record, its disk image (mounted at
``disk``), its rootfs (an overlay of the template's layers and the disk's ``upper``) and its OCI
bundle; plus a network namespace, a veth on the instance's bridge, and cgroups made by the OCI
runtime. Create undoes its partial work on failure; kill and reconcile release everything.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config import Settings
from . import base_image, cgroups, disk, oci, syscalls
from .base import ExecResult, Process, SandboxInfo
from .dns import DnsForwarder, host_resolvers
from .errors import InvalidSpec, SandboxExists, SandboxNotFound, StepFailed
from .fsutil import file_lock, write_text
from .layers import Image, LayerStore
from .network import HostNetwork
from .ocicli import OciCli
from .records import RecordStore, SandboxRecord
from .spec import SandboxSpec, is_sandbox_id, new_sandbox_id

Log = Callable[[str], None]

# Host binaries copied into the runtime directory every sandbox sees read-only at /.bilik.
RUNTIME_FILES = {"tini": "/usr/bin/tini-static", "busybox": "/bin/busybox"}

# PID 1: tini reaps every orphan; the loop below it keeps the sandbox alive with no workload.
INIT = [
    f"{oci.RUNTIME_MOUNT}/tini",
    "--",
    f"{oci.RUNTIME_MOUNT}/busybox",
    "sh",
    "-c",
    f"trap '' TERM INT HUP; while :; do {oci.RUNTIME_MOUNT}/busybox sleep 2147483647 & wait; done",
]


class LocalRuntime:
    """Sandboxes on this host, run by crun (default), runc or runsc."""

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

    async def serve_dns(self) -> DnsForwarder:
        """Start the sandboxes' DNS forwarder on the gateway; the caller closes it."""
        upstreams = [u for u in self.settings.dns_upstream.split(",") if u] or host_resolvers()
        forwarder = DnsForwarder(str(self.network.gateway), upstreams)
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
        self.layers.discard_scratch()

    def oci(self, name: str | None = None) -> OciCli:
        name = name or self.settings.oci_runtime
        if name not in self._oci:
            self._oci[name] = OciCli(name, self.state_root)
        return self._oci[name]

    def uid_base(self, oci_runtime: str) -> int:
        """Host uid of root inside: gVisor makes no host user namespace (see ``oci``)."""
        return 0 if oci_runtime == "runsc" else self.settings.uid_base

    def image(
        self, template: str, *, oci_runtime: str | None = None, rebuild: bool = False
    ) -> Image:
        """The image of ``template`` for ``oci_runtime``; ``base`` is built on first use."""
        uid_base = self.uid_base(oci_runtime or self.settings.oci_runtime)
        if template == "base":
            return base_image.ensure_base_image(self.layers, uid_base, self.log, rebuild=rebuild)
        return self.layers.image(template)

    # -- sandboxes ----------------------------------------------------------------------------

    async def create(self, spec: SandboxSpec, *, oci_runtime: str | None = None) -> SandboxInfo:
        caps = self.settings.caps
        spec.validate(
            max_cpu=caps.cpu,
            max_memory_mb=caps.memory_mb,
            max_disk_mb=caps.disk_mb,
            max_pids=caps.pids,
            max_lifetime_s=caps.lifetime_s,
        )
        oci_cli = self.oci(oci_runtime)
        image = await asyncio.to_thread(self.image, spec.template, oci_runtime=oci_cli.name)
        sandbox_id = spec.sandbox_id or new_sandbox_id()
        record = await asyncio.to_thread(self._reserve, sandbox_id, spec, image, oci_cli.name)
        try:
            async with contextlib.AsyncExitStack() as undo:
                undo.push_async_callback(self._release, record)
                await asyncio.to_thread(self._prepare, record, image)
                bundle = self.records.dir(sandbox_id)
                await oci_cli.run_detached(sandbox_id, bundle, bundle / "console.log")
                undo.pop_all()
        except OSError as e:
            raise StepFailed("create", str(e)) from e
        return self._info(record, "running")

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
            directory.mkdir(mode=0o711)
            now = time.time()
            record = SandboxRecord(
                sandbox_id=sandbox_id,
                template=spec.template,
                layers=list(image.layers),
                limits=spec.limits,
                internet=spec.internet,
                address=self.network.address(index),
                address_index=index,
                oci_runtime=runtime_name,
                created_at=now,
                end_at=now + spec.timeout_s,
                user=image.user,
                workdir=image.workdir,
                env={**image.env, **spec.env},
                metadata=dict(spec.metadata),
            )
            self.records.save(record)
            return record

    def _prepare(self, record: SandboxRecord, image: Image) -> None:
        """Disk, rootfs, /etc files, network and bundle config: everything before the OCI start."""
        d = self.records.dir(record.sandbox_id)
        uid = self.uid_base(record.oci_runtime)
        disk.create(d / "disk.img", d / "disk", record.limits.disk_mb, uid)
        rootfs = d / "rootfs"
        rootfs.mkdir()
        lower = ":".join(str(self.layers.path(k)) for k in reversed(record.layers))
        try:
            syscalls.mount(
                "overlay",
                str(rootfs),
                "overlay",
                0,
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
            init=INIT,
            oci_runtime=record.oci_runtime,
        )
        (d / "config.json").write_text(json.dumps(config))

    async def _release(self, record: SandboxRecord | str) -> None:
        """Release everything a sandbox holds; every step tolerates the thing being absent."""
        sandbox_id = record if isinstance(record, str) else record.sandbox_id
        rec = self.records.load(sandbox_id) if isinstance(record, str) else record
        runtimes = (
            [rec.oci_runtime]
            if rec
            else [n for n in ("crun", "runc", "runsc") if (self.state_root / n).exists()]
        )
        for name in runtimes:
            await self.oci(name).delete(sandbox_id)
        await asyncio.to_thread(self._release_host, sandbox_id, rec.address if rec else None)

    def _release_host(self, sandbox_id: str, address: str | None) -> None:
        d = self.records.dir(sandbox_id)
        self.network.delete(sandbox_id, address)
        cgroups.remove_cgroup(self.settings.instance, sandbox_id)
        for point in syscalls.mounted_under(str(d)):
            syscalls.umount(point)
        disk.remove(d / "disk.img", d / "disk")
        shutil.rmtree(d, ignore_errors=True)

    async def kill(self, sandbox_id: str) -> None:
        record = self._record(sandbox_id)
        await self._release(record)

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
        )

    async def _states(self) -> dict[str, str]:
        states: dict[str, str] = {}
        for name in ("crun", "runc", "runsc"):
            if (self.state_root / name).exists():
                states.update(await self.oci(name).list())
        return states

    async def list(self) -> builtins.list[SandboxInfo]:
        states = await self._states()
        return [
            self._info(r, states.get(r.sandbox_id, "stopped"))
            for r in await asyncio.to_thread(self.records.all)
        ]

    async def inspect(self, sandbox_id: str) -> SandboxInfo:
        record = self._record(sandbox_id)
        state = await self.oci(record.oci_runtime).state(sandbox_id)
        return self._info(record, (state or {}).get("status", "stopped"))

    async def set_timeout(self, sandbox_id: str, seconds: float) -> SandboxInfo:
        if not 0 <= seconds <= self.settings.caps.lifetime_s:
            raise InvalidSpec(f"timeout must be between 0 and {self.settings.caps.lifetime_s}")
        with file_lock(self.settings.data_dir / "locks" / "sandboxes"):
            record = self._record(sandbox_id)
            record.end_at = min(
                time.time() + seconds, record.created_at + self.settings.caps.lifetime_s
            )
            self.records.save(record)
        return await self.inspect(sandbox_id)

    async def reap_expired(self) -> builtins.list[str]:
        """Kill every sandbox past its end time; returns their ids."""
        now = time.time()
        expired = [r for r in await asyncio.to_thread(self.records.all) if r.end_at <= now]
        await asyncio.gather(*(self._release(r) for r in expired))
        return [r.sandbox_id for r in expired]

    async def reconcile(self) -> None:
        """Make the host match the records: re-adopt what runs, release everything else.

        A record whose container is gone, a container with no record, and any leftover (a
        directory, network namespace or cgroup of no live sandbox) are released.
        """
        states = await self._states()
        records = {r.sandbox_id: r for r in await asyncio.to_thread(self.records.all)}
        live = {i for i, r in records.items() if states.get(i) == "running"}
        found = (
            set(records)
            | set(states)
            | set(self.records.ids())
            | set(self.network.leftover_ids())
            | set(cgroups.leftover_cgroups(self.settings.instance))
        )
        # Only names shaped like sandbox ids: never touch anything else that shares the prefix.
        leftovers = {i for i in found - live if is_sandbox_id(i)}
        for sandbox_id in sorted(leftovers):
            self.log(f"reconcile: releasing {sandbox_id}")
            await self._release(records.get(sandbox_id) or sandbox_id)

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
        uid, gid, home = _lookup_user(d / "rootfs", user)
        full_env = {**record.env, "HOME": home, "USER": user, "LOGNAME": user, **(env or {})}
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
        process_file, pid_file = d / f"{name}.json", d / f"{name}.pid"
        process_file.write_text(json.dumps(process))
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.oci(record.oci_runtime).exec_argv(sandbox_id, process_file, pid_file),
                stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        finally:
            # The runtime reads the file before it forks the process: a brief wait is enough.
            asyncio.get_running_loop().call_later(5, process_file.unlink, True)
        return Process(proc, pid_file)

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
        if input is not None and proc.stdin is not None:
            proc.stdin.write(input)
            await proc.stdin.drain()
            proc.stdin.close()
        out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        async for name, chunk in proc.output():
            out[name].append(chunk)
        code = await proc.wait()
        return ExecResult(code, b"".join(out["stdout"]), b"".join(out["stderr"]))


def _lookup_user(rootfs: Path, name: str) -> tuple[int, int, str]:
    try:
        for line in (rootfs / "etc" / "passwd").read_text().splitlines():
            fields = line.split(":")
            if len(fields) >= 6 and fields[0] == name:
                return int(fields[2]), int(fields[3]), fields[5]
    except (OSError, ValueError):
        pass
    if name == "root":
        return 0, 0, "/root"
    raise InvalidSpec(f"user {name!r} does not exist in the sandbox")
