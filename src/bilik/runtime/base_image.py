"""The ``base`` template: a Debian rootfs built with mmdebstrap from the host's own apt sources."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .errors import StepFailed, TemplateNotFound
from .fsutil import shift_owners
from .layers import Image, LayerStore, layer_key

# Bump when the recipe below changes meaning, so cached layers are rebuilt.
RECIPE_VERSION = 1

PACKAGES = (
    "bash",
    "coreutils",
    "python3",
    "python3-pip",
    "python3-venv",
    "ca-certificates",
    "curl",
    "wget",
    "git",
    "procps",
    "iproute2",
    "iputils-ping",
    "sudo",
    "less",
    "nano",
    "unzip",
    "zip",
    "xz-utils",
    "file",
    "jq",
    "openssh-client",
    "tini",
)

BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
# ``base`` is for agents: ``pip install`` works in it as on E2B's, not only in a venv (Debian
# refuses installs into its own Python otherwise).
RECIPE_ENV = {"base": {**BASE_ENV, "PIP_BREAK_SYSTEM_PACKAGES": "1"}, "debian": BASE_ENV}

# Run inside the new rootfs (mmdebstrap passes it as $1).
_ADD_USER = 'chroot "$1" useradd --create-home --uid 1000 --user-group --shell /bin/bash user'
# Files the runtime bind-mounts per sandbox must exist as mount points.
_MOUNT_POINTS = 'touch "$1/etc/hostname" "$1/etc/hosts" "$1/etc/resolv.conf"'
_CLEAN = 'rm -rf "$1/var/cache/apt/archives"/*.deb "$1/var/lib/apt/lists"/*'
_CUSTOMIZE = [
    _ADD_USER,
    "echo 'user ALL=(ALL:ALL) NOPASSWD: ALL' > \"$1/etc/sudoers.d/user\"",
    'chmod 0440 "$1/etc/sudoers.d/user"',
    _MOUNT_POINTS,
    _CLEAN,
]

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


# ``debian``: plain Debian (what a registry's debian:<release> holds), plus the sandbox user.
DEBIAN_PACKAGES = ("bash", "ca-certificates")
_DEBIAN_CUSTOMIZE = [_ADD_USER, _MOUNT_POINTS, _CLEAN]
RECIPES = {"base": (PACKAGES, _CUSTOMIZE), "debian": (DEBIAN_PACKAGES, _DEBIAN_CUSTOMIZE)}


def base_layer_key(uid_base: int, release: str, recipe: str = "base") -> str:
    packages, customize = RECIPES[recipe]
    if recipe == "base":  # (the key base layers have always had)
        return layer_key("debian-base", RECIPE_VERSION, release, packages, customize, uid_base)
    return layer_key(f"debian-{recipe}", RECIPE_VERSION, release, packages, customize, uid_base)


def ensure_base_image(
    store: LayerStore, uid_base: int, log: Log, *, rebuild: bool = False, recipe_name: str = "base"
) -> Image:
    """Return the ``base`` image (or ``debian``, plain Debian of the host's release), building
    its layer first if it is not cached.

    ``rebuild`` builds a fresh layer under a new key and points the image at it; the old layer
    stays, since running sandboxes may still have it mounted.
    """
    release = host_release()
    recipe = base_layer_key(uid_base, release, recipe_name)
    with store.lock(recipe):
        if not rebuild and (current := built_base_image(store, uid_base, recipe_name)):
            return current
        key = f"{recipe}-{time.time_ns()}" if rebuild else recipe
        if not store.has(key):
            _build(store, key, release, uid_base, log, *RECIPES[recipe_name])
        image = Image(
            name=recipe_name,
            layers=(key,),
            env=dict(RECIPE_ENV[recipe_name]),
            user="user",
            workdir="/home/user",
        )
        store.save_image(image)
    return image


def built_base_image(store: LayerStore, uid_base: int, recipe_name: str = "base") -> Image | None:
    """The ``base`` (or ``debian``) image if it is built from the recipe as it is now; builds
    nothing."""
    recipe = base_layer_key(uid_base, host_release(), recipe_name)
    with contextlib.suppress(TemplateNotFound):
        current = store.image(recipe_name)
        if current.layers[0].startswith(recipe) and current.env == RECIPE_ENV[recipe_name]:
            return current
    return None


def _build(
    store: LayerStore,
    key: str,
    release: str,
    uid_base: int,
    log: Log,
    packages: tuple[str, ...],
    customize: list[str],
) -> None:
    sources = host_apt_sources()
    if not sources:
        raise StepFailed("build-base", "no apt sources configured on this host")
    scratch = store.scratch(key)
    try:
        rootfs = scratch / "rootfs"
        cmd = [
            "mmdebstrap",
            "--variant=minbase",
            "--mode=root",
            "--format=directory",
            f"--include={','.join(packages)}",
            *[f"--customize-hook={hook}" for hook in customize],
            release,
            str(rootfs),
            *map(str, sources),
        ]
        log(f"building base image from Debian {release} with mmdebstrap")
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
            raise StepFailed("build-base", "mmdebstrap failed:\n" + "\n".join(tail))
        if uid_base:
            log("shifting file owners for the sandbox user namespace")
            shift_owners(rootfs, uid_base)
        store.publish(key, rootfs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log("base image ready")
