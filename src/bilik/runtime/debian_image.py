"""``debian``: plain Debian of the host's release, built with mmdebstrap from the host's own apt
sources (what a registry's ``debian:<release>`` holds, plus the sandbox user). Templates build
on it; bilik's ``base`` is one of them (``templates.defaults``)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from .errors import StepFailed, TemplateNotFound
from .fsutil import shift_owners
from .layers import Image, LayerStore, layer_key

NAME = "debian"
# Bump when the recipe below changes meaning, so cached layers are rebuilt.
RECIPE_VERSION = 1
PACKAGES = ("bash", "ca-certificates")
ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
# Run inside the new rootfs (mmdebstrap passes it as $1): the sandbox user; the files the
# runtime bind-mounts per sandbox, as mount points; no package caches.
CUSTOMIZE = (
    'chroot "$1" useradd --create-home --uid 1000 --user-group --shell /bin/bash user',
    'touch "$1/etc/hostname" "$1/etc/hosts" "$1/etc/resolv.conf"',
    'rm -rf "$1/var/cache/apt/archives"/*.deb "$1/var/lib/apt/lists"/*',
)

Log = Callable[[str], None]


def host_release() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return "bookworm"


def host_apt_sources() -> list[Path]:
    """The host's configured apt sources, so images come from the same Debian mirror."""
    paths = []
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists() and any(
        line.strip() and not line.lstrip().startswith("#")
        for line in legacy.read_text().splitlines()
    ):
        paths.append(legacy)
    parts = Path("/etc/apt/sources.list.d")
    if parts.is_dir():
        paths += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    return paths


def recipe_key(uid_base: int, release: str) -> str:
    return layer_key(f"debian-{NAME}", RECIPE_VERSION, release, PACKAGES, list(CUSTOMIZE), uid_base)


def ensure(store: LayerStore, uid_base: int, log: Log, *, rebuild: bool = False) -> Image:
    """The ``debian`` image, its layer built first if it is not cached.

    ``rebuild`` builds a fresh layer under a new key and points the image at it; the old layer
    stays, since running sandboxes and templates may still stand on it.
    """
    release = host_release()
    recipe = recipe_key(uid_base, release)
    with store.lock(recipe):
        if not rebuild and (current := built(store, uid_base)):
            return current
        key = store.remake(recipe) if rebuild else recipe
        if not store.has(key):
            _build(store, key, release, uid_base, log)
        image = Image(name=NAME, layers=(key,), env=dict(ENV), user="user", workdir="/home/user")
        store.save_image(image)
    return image


def built(store: LayerStore, uid_base: int) -> Image | None:
    """The ``debian`` image if it is built from the recipe as it is now; builds nothing."""
    recipe = recipe_key(uid_base, host_release())
    with contextlib.suppress(TemplateNotFound):
        current = store.image(NAME)
        if current.layers[0].startswith(recipe) and current.env == ENV:
            return current
    return None


def _build(store: LayerStore, key: str, release: str, uid_base: int, log: Log) -> None:
    sources = host_apt_sources()
    if not sources:
        raise StepFailed("build-debian", "no apt sources configured on this host")
    scratch = store.scratch(key)
    try:
        rootfs = scratch / "rootfs"
        cmd = [
            "mmdebstrap",
            "--variant=minbase",
            "--mode=root",
            "--format=directory",
            f"--include={','.join(PACKAGES)}",
            *[f"--customize-hook={hook}" for hook in CUSTOMIZE],
            release,
            str(rootfs),
            *map(str, sources),
        ]
        log(f"building Debian {release} with mmdebstrap")
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            log(line.rstrip("\n"))
            tail = [*tail[-19:], line.rstrip("\n")]
        if proc.wait() != 0:
            raise StepFailed("build-debian", "mmdebstrap failed:\n" + "\n".join(tail))
        if uid_base:
            log("shifting file owners for the sandbox user namespace")
            shift_owners(rootfs, uid_base)
        store.publish(key, rootfs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"Debian {release} ready")
