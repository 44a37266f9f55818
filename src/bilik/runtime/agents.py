"""The in-sandbox agents' code, in the runtime directory every sandbox sees at ``/.bilik``.

``/.bilik/agents`` holds bilik's ``envd`` and ``proto`` packages and the third-party packages
they import, copied from the server's own environment (one set of versions everywhere),
byte-compiled (the directory is read-only inside sandboxes) and, for compiled extensions,
patched to load their libraries from the agents' Python (see ``agent_python``). The agents'
Python finds the directory through a ``.pth`` file, so ``python3 -I -m bilik.envd`` works.

Rebuilt atomically whenever any of it changes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from . import agent_python
from .fsutil import replace_dir

MOUNTED_AT = "/.bilik/agents"
# bilik's own packages that run inside sandboxes (never the server's). The interpreter runs
# with a code-interpreter template's Python, which has jupyter_client.
OWN_PACKAGES = ("envd", "interpreter", "proto")
# What they import, by distribution name.
DISTRIBUTIONS = (
    "connectrpc",
    "pyqwest",
    "protobuf-py",
    "protobuf-py-ext",
    "typing_extensions",
    "uvicorn",
    "h11",
    "click",
)


def _bilik_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _sources() -> list[tuple[Path, str]]:
    """Every file to copy: (host path, path under the agents directory)."""
    files: list[tuple[Path, str]] = []
    root = _bilik_root()
    for package in OWN_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            files.append((path, f"bilik/{path.relative_to(root)}"))
    for name in DISTRIBUTIONS:
        dist = importlib.metadata.distribution(name)
        for entry in dist.files or []:
            parts = entry.parts
            if ".." in parts or "__pycache__" in parts or parts[0].endswith((".data",)):
                continue
            if parts[0].endswith(".dist-info") and entry.name not in ("METADATA", "RECORD"):
                continue
            files.append((Path(str(entry.locate())).resolve(), str(entry)))
    return files


def fingerprint(files: list[tuple[Path, str]]) -> str:
    digest = hashlib.sha256(agent_python.fingerprint().encode())
    for source, target in files:
        st = source.stat()
        digest.update(f"{target}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def ensure(runtime_dir: Path, log: Callable[[str], None]) -> Path:
    """Build ``runtime_dir/agents`` unless it is current; returns it."""
    python = agent_python.ensure(runtime_dir, log)
    pth = python / "lib" / "python3" / "dist-packages" / "bilik-agents.pth"
    if not pth.exists():
        pth.parent.mkdir(parents=True, exist_ok=True)
        pth.write_text(MOUNTED_AT + "\n")
        for d in (pth.parent, pth.parent.parent):
            os.chmod(d, 0o755)
        os.chmod(pth, 0o644)
    target = runtime_dir / "agents"
    files = _sources()
    want = fingerprint(files)
    stamp = target / ".fingerprint"
    if stamp.exists() and stamp.read_text() == want:
        return target
    log("installing the sandbox agents")
    scratch = runtime_dir / f".agents.{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        (scratch / "bilik").mkdir(parents=True)
        (scratch / "bilik" / "__init__.py").write_text("")
        for source, relative in files:
            dest = scratch / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest)
        _add_libraries(scratch, python / "lib")
        agent_python.compile_tree(scratch)
        for path in scratch.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)
        (scratch / ".fingerprint").write_text(want)
        replace_dir(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _add_libraries(agents: Path, python_libs: Path) -> None:
    """Copy the shared libraries the extensions load that the agents' Python lacks into
    ``agents/lib``, and point every extension (and those libraries) at both directories."""
    extensions = sorted(agents.rglob("*.so"))
    lib = agents / "lib"
    lib.mkdir()
    for name, library in agent_python.closure(extensions).items():
        if not (python_libs / name).exists():
            shutil.copy2(library, lib / name)
    for elf in [*extensions, *lib.iterdir()]:
        agent_python.patch_rpath(elf, f"{MOUNTED_AT}/lib")
