"""A sandbox's host side, made before its OCI runtime starts it and released after: control
directory, disk, rootfs, ``/etc`` files, network, egress rules, bundle config and cgroups.

Making them is a list of named steps; a failure names its step (``StepFailed(step, …)``), and
:meth:`Bundles.release` undoes every step, each tolerating its thing being absent, so a create
that failed halfway is released by the same code as a sandbox that ran.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..config import Settings
from ..proto.contract import CONFIG_FILE, ENVD_PORT, EnvdConfig
from . import cgroups, disk, oci, syscalls
from .backends import Backend
from .errors import step
from .fsutil import write_text
from .layers import Image, LayerStore
from .lxcfs import Lxcfs
from .network import HostNetwork
from .records import RecordStore, SandboxRecord
from .spec import egress_rule

# PID 1's output, envd's log and the template's start command's output (and the start log's
# older half): host paths the sandbox cannot reach, on the sandbox's own disk (beside its upper
# layer, out of its view), so what it writes there counts against its disk, never the host's.
CONSOLE_LOG = "disk/console.log"
ENVD_LOG = "disk/envd.log"
START_LOG = "disk/start.log"
START_LOG_OLD = "disk/start.log.1"


class Bundles:
    """The host side of this host's sandboxes (each in ``records.dir(id)``)."""

    def __init__(
        self,
        settings: Settings,
        layers: LayerStore,
        records: RecordStore,
        network: HostNetwork,
        runtime_dir: Path,
        lxcfs: Lxcfs,
    ) -> None:
        self.settings = settings
        self.layers = layers
        self.records = records
        self.network = network
        self.runtime_dir = runtime_dir
        self.lxcfs = lxcfs

    def prepare(
        self, record: SandboxRecord, image: Image, access_token: str, backend: Backend
    ) -> list[Path]:
        """Everything before the OCI start; returns the ``cgroup.procs`` files of the cgroups
        bilik made for the sandbox (none where the runtime makes them)."""
        d = self.records.dir(record.sandbox_id)
        uid = self.settings.uid_base
        with step("control-dir"):
            control = self._control_dir(d, record, image, access_token)
        with step("disk"):
            disk.create(d / "disk.img", d / "disk", record.limits.disk_mb, uid)
        with step("backend-files"):
            prepared = backend.prepare(d / "disk", uid, self.runtime_dir)
        with step("mount-rootfs"):
            rootfs = self._rootfs(d, record)
        with step("etc"):
            etc = self._etc(d, record)
        with step("network"):
            netns = self.network.create(record.sandbox_id, record.address, record.internet)
        with step("egress"):
            self.set_egress(record, on=True)
        with step("lxcfs"):
            # (started here, for a sandbox already reserved: nothing stops it meanwhile)
            lxcfs_dir = self.lxcfs.mountpoint if self.lxcfs.ensure() else None
        with step("bundle"):
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
                init=backend.init(),
                lxcfs_dir=lxcfs_dir,
            )
            backend.adapt(config, self.runtime_dir, **prepared)
            (d / "config.json").write_text(json.dumps(config))
        with step("cgroups"):
            resources = config["linux"]["resources"]
            return backend.make_cgroups(self.settings.instance, record.sandbox_id, resources)

    def _control_dir(self, d: Path, record: SandboxRecord, image: Image, access_token: str) -> Path:
        """The sandbox's control directory with envd's config: the sandbox's root may read
        it, nobody else in the sandbox, and nothing there may write it (mounted read-only)."""
        uid = self.settings.uid_base
        control = d / "control"
        control.mkdir(mode=0o700)
        config = EnvdConfig(
            access_token=access_token,
            default_user=image.user,
            default_workdir=image.workdir,
            env=record.env,
            port=ENVD_PORT,
            cpu_count=record.limits.cpu,
            memory_bytes=record.limits.memory_mb << 20,
        )
        path = control / CONFIG_FILE
        path.write_text(config.dumps())
        for p in (control, path):
            os.chown(p, uid, uid)
        os.chmod(path, 0o600)
        return control

    def _rootfs(self, d: Path, record: SandboxRecord) -> Path:
        """The overlay of the template's layers and the disk's upper directory.

        Set-uid programs work in it (``sudo``: the sandbox's root, an unprivileged host uid, is
        all they can become). On the host its set-uid files would make whoever runs them that
        uid, so only root and that uid's group (the runtime in the sandbox's user namespace)
        may pass through the sandbox's directory to it.
        """
        os.chown(d, 0, self.settings.uid_base)
        os.chmod(d, 0o710)
        rootfs = d / "rootfs"
        rootfs.mkdir()
        self._mount_rootfs(d, record)
        return rootfs

    def _mount_rootfs(self, d: Path, record: SandboxRecord) -> None:
        rootfs = d / "rootfs"
        lower = ":".join(str(self.layers.path(k)) for k in reversed(record.layers))
        syscalls.mount(
            "overlay",
            str(rootfs),
            "overlay",
            syscalls.MS_NODEV,
            f"lowerdir={lower},upperdir={d}/disk/upper,workdir={d}/disk/work,volatile",
        )

    def remake(self, record: SandboxRecord) -> None:
        """Make again, over the sandbox's existing disk (never formatted anew), what of its
        host side is gone (a restart of the host takes its mounts and network namespace): a
        files-paused sandbox is then ready to start again. What is there is kept."""
        d = self.records.dir(record.sandbox_id)
        with step("mount-disk"):
            if not os.path.ismount(d / "disk"):
                with syscalls.loop_device(str(d / "disk.img")) as device:
                    flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOATIME
                    syscalls.mount(device, str(d / "disk"), "ext4", flags)
        with step("mount-rootfs"):
            if not os.path.ismount(d / "rootfs"):
                # A volatile overlay ended uncleanly leaves a mark in its work directory
                # (``work/incompat/volatile``) and refuses to mount while it is there; the
                # directory is the overlay's scratch, which the sandbox never sees.
                shutil.rmtree(d / "disk" / "work" / "work", ignore_errors=True)
                self._mount_rootfs(d, record)
        if not self.network.netns_path(record.sandbox_id).exists():
            with step("network"):
                self.network.create(record.sandbox_id, record.address, record.internet)
            with step("egress"):
                self.set_egress(record, on=True)
        with step("lxcfs"):
            self.lxcfs.ensure()

    def _etc(self, d: Path, record: SandboxRecord) -> Path:
        """The sandbox's hostname, hosts and resolv.conf (bind-mounted read-only)."""
        etc = d / "etc"
        etc.mkdir()
        write_text(etc / "hostname", f"{record.sandbox_id}\n")
        write_text(
            etc / "hosts",
            f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"
            f"{record.address}\t{record.sandbox_id}\n",
        )
        write_text(etc / "resolv.conf", f"nameserver {self.network.gateway}\n")
        return etc

    def set_egress(self, record: SandboxRecord, *, on: bool) -> None:
        """Add (or remove) the sandbox's allow and deny rules by address."""
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

    def release(self, sandbox_id: str, record: SandboxRecord | None) -> list[str]:
        """Undo :meth:`prepare` (its container gone already): every step runs even when an
        earlier one failed; returns the failures."""
        d = self.records.dir(sandbox_id)
        address = record.address if record else None

        def egress() -> None:
            if record is not None:
                self.set_egress(record, on=False)

        def unmount() -> None:
            for point in syscalls.mounted_under(str(d)):
                syscalls.umount(point)

        steps: list[tuple[str, Callable[[], object]]] = [
            ("egress", egress),
            ("network", lambda: self.network.delete(sandbox_id, address)),
            ("cgroups", lambda: cgroups.remove_cgroup(self.settings.instance, sandbox_id)),
            ("unmount", unmount),
            ("disk", lambda: disk.remove(d / "disk.img", d / "disk")),
            ("files", lambda: shutil.rmtree(d, ignore_errors=True)),
        ]
        errors = []
        for name, undo in steps:
            try:
                undo()
            except Exception as e:
                errors.append(f"{name}: {e}")
        return errors
