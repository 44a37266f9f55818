"""A self-contained Python for agents inside sandboxes, whatever the image holds.

bilik's in-sandbox agents (envd, the code interpreter's server) are Python programs, yet a
template may be busybox or distroless. So the host's own Debian interpreter is copied, with its
standard library and every shared library it loads (the dynamic loader included), into the
runtime directory that every sandbox sees read-only at ``/.bilik``, and patched (patchelf) to
load its libraries from there only. It then runs in any rootfs, even one without /proc.

Built once per host and interpreter, atomically: a half-built copy is never visible.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

from .errors import StepFailed
from .fsutil import replace_dir

# Where the copy appears inside sandboxes; baked into the patched binaries.
MOUNTED_AT = "/.bilik/python"
RECIPE_VERSION = 2

# Parts of the standard library an agent never needs.
_SKIP = {
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "config-3.11-x86_64-linux-gnu",
}


def interpreter() -> Path:
    """The real binary of the host's Debian Python (not a venv's symlink)."""
    return Path(
        os.path.realpath(
            Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}"
            f".{sys.version_info.minor}"
        )
    )


def stdlib() -> Path:
    return Path(
        sysconfig.get_paths(vars={"installed_base": sys.base_prefix, "base": sys.base_prefix})[
            "stdlib"
        ]
    )


def fingerprint() -> str:
    binary = interpreter()
    st = binary.stat()
    return hashlib.sha256(
        f"{RECIPE_VERSION}:{binary}:{st.st_size}:{st.st_mtime_ns}:{sys.version}".encode()
    ).hexdigest()[:16]


def ensure(runtime_dir: Path, log: Callable[[str], None]) -> Path:
    """Build ``runtime_dir/python`` unless it is current; returns it."""
    target = runtime_dir / "python"
    stamp = target / ".fingerprint"
    want = fingerprint()
    if stamp.exists() and stamp.read_text() == want:
        return target
    log("building the sandbox agents' Python runtime")
    scratch = runtime_dir / f".python.{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        _build(scratch)
        (scratch / ".fingerprint").write_text(want)
        replace_dir(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _build(dest: Path) -> None:
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (dest / "bin").mkdir(parents=True)
    lib = dest / "lib"
    lib_python = lib / version
    binary = dest / "bin" / "python3"
    shutil.copy2(interpreter(), binary)
    # envd starts a user's processes through this (see SETUID_HELPER): exec'ing it lets envd
    # spawn with vfork, where switching users in Python would need a full fork.
    helper = dest / "bin" / "chroot"
    shutil.copy2("/usr/sbin/chroot", helper)
    shutil.copytree(
        stdlib(),
        lib_python,
        symlinks=False,
        ignore=lambda _d, names: [n for n in names if n in _SKIP],
    )
    elves = [binary, helper, *sorted((lib_python / "lib-dynload").glob("*.so"))]
    for name, library in closure(elves).items():
        shutil.copy2(library, lib / name)
    loader = next(p for p in lib.iterdir() if p.name.startswith("ld-linux"))
    for program in (binary, helper):
        _patchelf("--set-interpreter", f"{MOUNTED_AT}/lib/{loader.name}", str(program))
    for elf in [
        binary,
        helper,
        *(p for p in lib.glob("*.so*") if p != loader),
        *(lib_python / "lib-dynload").glob("*.so"),
    ]:
        patch_rpath(elf)
    compile_tree(lib_python)
    for path in dest.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, 0o755 if path.is_dir() or os.access(path, os.X_OK) else 0o644)


def compile_tree(root: Path) -> None:
    """Byte-compile every module under ``root`` ahead of time: sandboxes see it read-only."""
    subprocess.run(
        [
            str(interpreter()),
            "-I",
            "-m",
            "compileall",
            "-q",
            "-j0",
            "--invalidation-mode",
            "unchecked-hash",
            str(root),
        ],
        check=False,
        capture_output=True,
    )


def patch_rpath(elf: Path, *extra: str) -> None:
    """Make ``elf`` load its libraries from the agents' Python (and ``extra`` dirs) only.

    RUNPATH is not transitive, and $ORIGIN needs /proc: every object gets the fixed paths.
    """
    _patchelf("--force-rpath", "--set-rpath", ":".join([f"{MOUNTED_AT}/lib", *extra]), str(elf))


def closure(elves: list[Path]) -> dict[str, str]:
    """Every shared library the given ELF files load (by ldd): the name it is loaded by, and the
    file that name resolves to on the host."""
    found: dict[str, str] = {}
    for elf in elves:
        out = subprocess.run(["ldd", str(elf)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            match = re.search(r"(/\S+)\s+\(0x", line)
            if match and "linux-vdso" not in line:
                found[Path(match.group(1)).name] = os.path.realpath(match.group(1))
    return found


def _patchelf(*args: str) -> None:
    proc = subprocess.run(["patchelf", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise StepFailed("agent-python", f"patchelf {' '.join(args)}: {proc.stderr.strip()}")
