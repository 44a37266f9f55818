"""What the host needs before any sandbox runs: cgroups delegated, the bridge and its rules,
and the runtime directory every sandbox sees read-only at ``/.bilik`` (init, busybox, the agents'
Python with envd, the compiled seccomp filter)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from . import agents, cgroups, seccomp
from .backends import SECCOMP_FILTER
from .fsutil import write_bytes_atomic
from .layers import LayerStore
from .network import HostNetwork

# Host binaries copied into the runtime directory (beside the agents' Python, see agent_python).
RUNTIME_FILES = {"tini": "/usr/bin/tini-static", "busybox": "/bin/busybox"}


def prepare(
    network: HostNetwork,
    runtime_dir: Path,
    layers: LayerStore,
    uid_base: int,
    log: Callable[[str], None],
) -> None:
    """Make the host ready for sandboxes (idempotent)."""
    cgroups.prepare_host()
    network.ensure()
    runtime_dir.mkdir(exist_ok=True)
    os.chmod(runtime_dir, 0o755)
    for name, source in RUNTIME_FILES.items():
        target = runtime_dir / name
        if not target.exists() or target.stat().st_size != os.stat(source).st_size:
            shutil.copy2(source, target.with_suffix(".new"))
            os.replace(target.with_suffix(".new"), target)
    agents.ensure(runtime_dir, log)
    # For the processes that set the filter themselves: envds from the zygote, and every
    # process of a gVisor sandbox.
    write_bytes_atomic(runtime_dir / SECCOMP_FILTER, seccomp.compile_bpf(seccomp.profile()))
    layers.discard_scratch()
    # Layers (and the trees a build is turning into layers) hold set-uid files of the sandboxes'
    # root, an unprivileged host uid: whoever ran one on the host would become that uid. Only
    # root and that uid's group (the runtime in a sandbox's user namespace) may pass.
    for d in (layers.layers_dir, layers.tmp_dir):
        os.chown(d, 0, uid_base)
        os.chmod(d, 0o710)
