"""The statx shim of gVisor sandboxes (``gvisor_statx.c``): built into the runtime directory on
first use, preloaded into every process there through an ``/etc/ld.so.preload`` of the
sandbox's own."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .errors import StepFailed
from .fsutil import file_lock, write_bytes_atomic

SOURCE = Path(__file__).with_suffix(".c")
LIBRARY = "gvisor_statx.so"
PRELOAD = "ld.so.preload"


def ensure(runtime_dir: Path, mounted_at: str) -> None:
    """Build the shim into ``runtime_dir`` unless it is built from this source already, and
    write the preload list naming it where sandboxes see it (``mounted_at``)."""
    source = SOURCE.read_bytes()
    built_from = runtime_dir / SOURCE.name
    preload = f"{mounted_at}/{LIBRARY}\n".encode()
    if _current(built_from, source) and _current(runtime_dir / PRELOAD, preload):
        return
    with file_lock(runtime_dir / f".{LIBRARY}.lock"):
        if not _current(built_from, source):
            tmp = runtime_dir / f".{LIBRARY}.{os.getpid()}"
            try:
                proc = subprocess.run(
                    ["gcc", "-O2", "-shared", "-fPIC", "-nostdlib", "-o", str(tmp), str(SOURCE)],
                    capture_output=True,
                    text=True,
                )
            except FileNotFoundError:
                raise StepFailed("gvisor-statx", "gcc is not installed (see install.sh)") from None
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise StepFailed("gvisor-statx", proc.stderr.strip())
            os.chmod(tmp, 0o755)
            os.replace(tmp, runtime_dir / LIBRARY)
            write_bytes_atomic(built_from, source)
        write_bytes_atomic(runtime_dir / PRELOAD, preload)


def _current(path: Path, content: bytes) -> bool:
    try:
        return path.read_bytes() == content
    except FileNotFoundError:
        return False
