"""Images from OCI registries: pulled with skopeo, unpacked with umoci, cached by digest.

The image's filesystem becomes one read-only layer (owners shifted like every layer), keyed by
the manifest digest, so a second pull of an unchanged image costs one ``skopeo inspect``. The
image's config gives the environment and working directory. As on E2B, a sandbox user ``user``
(uid 1000, home ``/home/user``) is added when the image has none. Registry credentials are
used for the pull only: handed to skopeo in a temporary 0600 file, never stored.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import StepFailed
from .fsutil import shift_owners
from .layers import Image, LayerStore, layer_key

Log = Callable[[str], None]
# Registries on loopback are reached over plain HTTP (a test or a local mirror); any other
# registry must speak TLS.
_LOOPBACK = ("127.", "localhost", "[::1]")


def _insecure(ref: str) -> bool:
    return ref.startswith(_LOOPBACK)


def _skopeo(args: list[str], log: Log) -> str:
    proc = subprocess.run(["skopeo", *args], capture_output=True, text=True)
    for line in proc.stderr.splitlines():
        if line.strip():
            log(line.strip())
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        # skopeo logs as: time="…" level=fatal msg="the message"
        match = re.search(r'msg="((?:[^"\\]|\\.)*)"', detail)
        if match:
            detail = match.group(1).replace('\\"', '"')
        raise StepFailed("pull-image", detail or f"skopeo exited {proc.returncode}")
    return proc.stdout


@contextlib.contextmanager
def _credentials(ref: str, username: str | None, password: str | None) -> Iterator[list[str]]:
    """skopeo arguments for the credentials, in an auth file that is gone afterwards."""
    if not username:
        yield []
        return
    registry = ref.split("/", 1)[0]
    auth = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "auth.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"auths": {registry: {"auth": auth}}}, f)
        yield ["--authfile", str(path)]


def pull(
    layers: LayerStore,
    ref: str,
    uid_base: int,
    log: Log,
    *,
    username: str | None = None,
    password: str | None = None,
) -> Image:
    """The image ``ref`` as a one-layer :class:`Image` (named after the digest)."""
    tls = ["--tls-verify=false"] if _insecure(ref) else []
    with _credentials(ref, username, password) as creds:
        log(f"Resolving {ref}")
        raw = _skopeo(["inspect", *tls, *creds, "--raw", f"docker://{ref}"], log)
        digest = "sha256:" + hashlib.sha256(raw.encode()).hexdigest()
        key = layer_key("registry-image", digest, uid_base)
        meta = layers.root / "registry" / f"{key}.json"
        if layers.has(key) and meta.exists():
            log(f"{ref} ({digest[:19]}) is cached")
            return Image.from_json(json.loads(meta.read_text()))
        with layers.lock(key):
            scratch = layers.scratch(key + ".pull")
            try:
                layout = scratch / "layout"
                log(f"Pulling {ref}")
                src_tls = ["--src-tls-verify=false"] if tls else []
                src_creds = [c.replace("--authfile", "--src-authfile") for c in creds]
                _skopeo(
                    ["copy", *src_tls, *src_creds, f"docker://{ref}", f"oci:{layout}:image"], log
                )
                bundle = scratch / "bundle"
                log("Unpacking")
                proc = subprocess.run(
                    ["umoci", "unpack", "--image", f"{layout}:image", str(bundle)],
                    capture_output=True,
                    text=True,
                )
                if proc.returncode != 0:
                    raise StepFailed("unpack-image", proc.stderr.strip())
                config = json.loads((bundle / "config.json").read_text())
                rootfs = bundle / "rootfs"
                has_user = _ensure_user(rootfs)
                shift_owners(rootfs, uid_base)
                built = layers.scratch(key)
                os.rmdir(built)
                os.rename(rootfs, built)
                layers.publish(key, built)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            process = config.get("process", {})
            env = dict(e.split("=", 1) for e in process.get("env", []) if "=" in e)
            cwd = process.get("cwd")
            image = Image(
                name=f"registry-{key[:16]}",
                layers=(key,),
                env=env,
                user="user" if has_user else "root",
                workdir=cwd if cwd and cwd != "/" else ("/home/user" if has_user else "/"),
            )
            meta.parent.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps(image.to_json()))
            log(f"{ref} ready")
            return image


def _ensure_user(rootfs: Path) -> bool:
    """Add the sandbox user (uid 1000) to an image that has none; False if it has none and
    cannot get one. The image's files are untrusted: a link anywhere on the way (which would
    lead out to the host's files) means the image keeps what it has."""
    etc, home = rootfs / "etc", rootfs / "home"
    passwd, group = etc / "passwd", etc / "group"
    if any(p.is_symlink() for p in (etc, passwd, group, home, home / "user")):
        return _has_user(passwd) if not etc.is_symlink() and not passwd.is_symlink() else False
    etc.mkdir(exist_ok=True)
    users = passwd.read_text() if passwd.exists() else "root:x:0:0:root:/root:/bin/sh\n"
    if _has_user(passwd):
        return True
    shell = "/bin/bash" if (rootfs / "bin" / "bash").exists() else "/bin/sh"
    passwd.write_text(users.rstrip("\n") + f"\nuser:x:1000:1000::/home/user:{shell}\n")
    groups = group.read_text() if group.exists() else "root:x:0:\n"
    group.write_text(groups.rstrip("\n") + "\nuser:x:1000:\n")
    (home / "user").mkdir(parents=True, exist_ok=True)
    os.chown(home / "user", 1000, 1000)
    return True


def _has_user(passwd: Path) -> bool:
    with contextlib.suppress(OSError):
        return any(line.split(":")[0] == "user" for line in passwd.read_text().splitlines())
    return False
