"""The statx shim of gVisor sandboxes (``gvisor_statx.c``): built into the runtime directory,
preloaded into every process there through an ``/etc/ld.so.preload`` of the sandbox's own."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .errors import StepFailed

SOURCE = Path(__file__).with_suffix(".c")
LIBRARY = "gvisor_statx.so"
PRELOAD = "ld.so.preload"


def ensure(runtime_dir: Path, mounted_at: str) -> None:
    """Build the shim into ``runtime_dir`` unless it is built from this source already, and
    write the preload list naming it where sandboxes see it (``mounted_at``)."""
    source = SOURCE.read_bytes()
    built_from = runtime_dir / SOURCE.name
    library = runtime_dir / LIBRARY
    if not library.exists() or not built_from.exists() or built_from.read_bytes() != source:
        tmp = runtime_dir / f".{LIBRARY}.{os.getpid()}"
        proc = subprocess.run(
            ["gcc", "-O2", "-shared", "-fPIC", "-nostdlib", "-o", str(tmp), str(SOURCE)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise StepFailed("build-gvisor-statx", proc.stderr.strip())
        os.chmod(tmp, 0o755)
        os.replace(tmp, library)
        built_from.write_bytes(source)
    (runtime_dir / PRELOAD).write_text(f"{mounted_at}/{LIBRARY}\n")
