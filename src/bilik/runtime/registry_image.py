"""Images from OCI registries: pulled with skopeo, unpacked with umoci, cached by digest.

The image's filesystem becomes one read-only layer (owners shifted like every layer), keyed by
the registry, the repository and the digest of the image manifest, so a second pull of an
unchanged image costs one ``skopeo inspect`` (which also checks, with the caller's credentials,
that the caller may still read it). The image's config gives the environment and working
directory. As on E2B, a sandbox user ``user`` (uid 1000, home ``/home/user``) is added when the
image has none. Registry credentials are used for the pull only: handed to skopeo in a
temporary 0600 file, never stored.

A registry's answers are untrusted: it could answer the same tag differently to each request,
or a digest with other content, to plant content under a digest another build trusts. So the
manifest is fetched once and hashed here; a multi-arch index names the platform's manifest by
digest, which is fetched and hashed too; everything after is pulled by that digest (never by
tag again), and what lands on disk is checked against it, byte for byte, before it is
unpacked: the manifest, the config and every layer must hash to the digests the hashed manifest
names. Sizes are bounded before anything is read whole.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import StepFailed
from .fsutil import shift_owners
from .layers import Image, LayerStore, layer_key

Log = Callable[[str], None]

# What a manifest, an index or an image config may weigh (containers/image's own limit).
MAX_MANIFEST_BYTES = 4 << 20
# How many platforms an index, and how many layers an image, may list; and what an image's
# layers may add up to (as declared in the manifest, and then checked on disk).
MAX_INDEX_ENTRIES = 1024
MAX_LAYERS = 512
MAX_IMAGE_BYTES = 32 << 30
# How long the registry may take to answer a manifest request, and to hand over a whole image.
INSPECT_TIMEOUT_S = 300.0
PULL_TIMEOUT_S = 3600.0

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
# A Docker v2 image's layer types, as OCI names them (umoci reads OCI manifests only).
_OCI_LAYERS = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip": (
        "application/vnd.oci.image.layer.v1.tar+gzip"
    ),
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": (
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    ),
}
_INDEXES = (OCI_INDEX, DOCKER_LIST)
# The names the pulled image (as the registry has it) and its OCI form get in the scratch layout.
_PULLED, _CONVERTED = "pulled", "image"
_REF_NAME = "org.opencontainers.image.ref.name"

# An image reference, as Docker's reference grammar has it: [registry/]path[:tag][@digest].
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_REGISTRY = re.compile(
    rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9a-fA-F:.]+\])(?::(?P<port>[0-9]{{1,5}}))?"
)
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_PATH_PART}(?:/{_PATH_PART})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_BRACKETED = re.compile(r"\[([^\]]*)\](?::[0-9]+)?")
_MAX_NAME = 255
DOCKER_HUB = "docker.io"

# Machine names as Python has them → architectures as OCI images name them.
_ARCHITECTURES = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def _fail(detail: str) -> StepFailed:
    return StepFailed("pull-image", detail)


@dataclasses.dataclass(frozen=True)
class Reference:
    """An image reference taken apart: the registry (``host[:port]``, where skopeo goes and
    what credentials are for), the repository, and a tag or a digest."""

    registry: str
    repository: str
    tag: str = ""
    digest: str = ""

    @classmethod
    def parse(cls, ref: str) -> Reference:
        """``ref`` taken apart as Docker does (``ubuntu`` is ``docker.io/library/ubuntu:latest``);
        anything that is not an image reference is refused."""
        name, at, digest = ref.partition("@")
        if at and not _DIGEST.fullmatch(digest):
            raise _fail(f"{ref!r}: only sha256 digests are supported")
        first, slash, rest = name.partition("/")
        # Docker's rule: the first component names a registry if it has a dot or a port, is
        # ``localhost``, or has capitals (a path never has).
        if not slash or (
            not any(c in first for c in ".:") and first != "localhost" and first == first.lower()
        ):
            first, rest = DOCKER_HUB, name
        path, colon, tag = rest.partition(":")
        if first == "index.docker.io":
            first = DOCKER_HUB
        if first == DOCKER_HUB and "/" not in path:
            path = f"library/{path}"
        registry = _REGISTRY.fullmatch(first)
        port = registry.group("port") if registry else None
        if (
            not registry
            or (port is not None and not 0 < int(port) < 65536)
            or not _PATH.fullmatch(path)
            or (colon and not _TAG.fullmatch(tag))
            or len(first) + 1 + len(path) > _MAX_NAME
        ):
            raise _fail(f"{ref!r} is not an image reference")
        if digest:
            tag = ""  # (the digest says which image; skopeo takes no reference with both)
        return cls(first, path, tag or ("" if digest else "latest"), digest)

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def source(self) -> str:
        """The reference as asked for, for skopeo."""
        return self.pinned(self.digest) if self.digest else f"docker://{self.name}:{self.tag}"

    def pinned(self, digest: str) -> str:
        """The image of this repository with manifest ``digest``, for skopeo."""
        return f"docker://{self.name}@{digest}"

    @property
    def insecure(self) -> bool:
        return insecure(self.registry)


def insecure(registry: str) -> bool:
    """Whether ``registry`` (``host[:port]``) is reached over plain HTTP: only ``localhost``
    and literal loopback addresses are (a test or a local mirror). A name that merely starts
    like one (``localhost.example.com``, ``127.foo.com``) is somewhere else, and must speak TLS:
    credentials go to it."""
    bracketed = _BRACKETED.fullmatch(registry)
    host = bracketed.group(1) if bracketed else registry.partition(":")[0]
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_platform() -> tuple[str, str]:
    """The OS and architecture of this machine, as OCI indexes name them."""
    machine = platform.machine()
    return "linux", _ARCHITECTURES.get(machine, machine)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """An image manifest whose bytes were hashed here: what it is, and the blobs it names."""

    digest: str
    media_type: str
    config: tuple[str, int]
    layers: tuple[tuple[str, int], ...]
    layer_types: tuple[str, ...]
    size: int


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _skopeo(args: list[str], log: Log, *, timeout: float) -> bytes:
    try:
        proc = subprocess.run(["skopeo", *args], capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise _fail(f"skopeo {args[0]} took longer than {timeout:.0f} s") from None
    stderr = proc.stderr.decode(errors="replace")
    for line in stderr.splitlines():
        if line.strip():
            log(line.strip())
    if proc.returncode != 0:
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        # skopeo logs as: time="…" level=fatal msg="the message"
        match = re.search(r'msg="((?:[^"\\]|\\.)*)"', detail)
        if match:
            detail = match.group(1).replace('\\"', '"')
        raise _fail(detail or f"skopeo exited {proc.returncode}")
    return proc.stdout


def _inspect(source: str, args: list[str], log: Log) -> bytes:
    """The raw manifest (or index) at ``source``, exactly as the registry sent it."""
    raw = _skopeo(["inspect", *args, "--raw", source], log, timeout=INSPECT_TIMEOUT_S)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _fail(f"the registry's manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    return raw


def _document(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise _fail("the registry's manifest is not a JSON object")
    if doc.get("schemaVersion") != 2:
        raise _fail("only schema 2 manifests (Docker v2, OCI) are supported")
    return doc


def _is_index(doc: dict[str, Any]) -> bool:
    kind = doc.get("mediaType")
    return kind in _INDEXES or (kind is None and "manifests" in doc)


def _descriptor(value: object, what: str, limit: int) -> tuple[str, int]:
    """The digest and size of a descriptor, checked to be a sha256 digest and a size that fits."""
    digest = value.get("digest") if isinstance(value, dict) else None
    size = value.get("size") if isinstance(value, dict) else None
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise _fail(f"the manifest's {what} has no sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= limit:
        raise _fail(f"the manifest's {what} has no size, or one over {limit} bytes")
    return digest, size


def _manifest(digest: str, raw: bytes) -> Manifest:
    doc = _document(raw)
    kind = doc.get("mediaType") or OCI_MANIFEST
    if _is_index(doc) or kind not in _MANIFESTS:
        raise _fail(f"{digest} is not an image manifest ({kind})")
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise _fail(f"the manifest lists no layers, or more than {MAX_LAYERS}")
    found = tuple(_descriptor(layer, "layer", MAX_IMAGE_BYTES) for layer in layers)
    if sum(size for _, size in found) > MAX_IMAGE_BYTES:
        raise _fail(f"the image is larger than {MAX_IMAGE_BYTES >> 30} GiB")
    config = _descriptor(doc.get("config"), "config", MAX_MANIFEST_BYTES)
    types = tuple(str(layer.get("mediaType")) for layer in layers)
    return Manifest(digest, kind, config, found, types, len(raw))


def _platform_digest(index: dict[str, Any], ref: str) -> str:
    """The digest an index gives for this machine's platform (the first that fits)."""
    os_name, arch = host_platform()
    entries = index.get("manifests")
    if not isinstance(entries, list) or len(entries) > MAX_INDEX_ENTRIES:
        raise _fail(f"the index lists no images, or more than {MAX_INDEX_ENTRIES}")
    for entry in entries:
        found = entry.get("platform") if isinstance(entry, dict) else None
        if (
            isinstance(found, dict)
            and found.get("os") == os_name
            and found.get("architecture") == arch
        ):
            return _descriptor(entry, f"{os_name}/{arch} entry", MAX_MANIFEST_BYTES)[0]
    raise _fail(f"{ref} has no {os_name}/{arch} image")


def resolve(ref: Reference, args: list[str], log: Log) -> Manifest:
    """The manifest of the image ``ref`` names for this machine, its digest computed here.

    An index is followed to this platform's manifest by the digest it names, which is then
    what the image is (and what it is pulled and cached by)."""
    raw = _inspect(ref.source(), args, log)
    digest = _sha256(raw)
    if ref.digest and digest != ref.digest:
        raise _fail(f"the registry answered {ref.digest} with other content ({digest})")
    doc = _document(raw)
    if _is_index(doc):
        digest = _platform_digest(doc, ref.name)
        os_name, arch = host_platform()
        log(f"{os_name}/{arch}: {digest}")
        raw = _inspect(ref.pinned(digest), args, log)
        if _sha256(raw) != digest:
            raise _fail(f"the registry answered {digest} with other content ({_sha256(raw)})")
    return _manifest(digest, raw)


def _check_blob(layout: Path, digest: str, size: int) -> None:
    """The blob ``digest`` in ``layout`` is there, not a link, ``size`` bytes, and hashes to
    ``digest``."""
    path = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise _fail(f"the pull did not store {digest}") from None
    with os.fdopen(fd, "rb") as f:
        if os.fstat(f.fileno()).st_size != size:
            raise _fail(f"{digest} is not the size the manifest says")
        hasher = hashlib.sha256()
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    if "sha256:" + hasher.hexdigest() != digest:
        raise _fail(f"the content pulled as {digest} does not hash to it")


def check_layout(layout: Path, name: str, manifest: Manifest) -> None:
    """What the pull stored as ``name`` in the OCI layout is ``manifest`` itself, and every
    blob it names hashes to its digest: the image is exactly the one keyed on."""
    index_path = layout / "index.json"
    if index_path.is_symlink() or index_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise _fail("the pulled layout's index is unusable")
    index = json.loads(index_path.read_bytes())
    entries = [
        entry
        for entry in index.get("manifests", [])
        if isinstance(entry, dict) and (entry.get("annotations") or {}).get(_REF_NAME) == name
    ]
    if [entry.get("digest") for entry in entries] != [manifest.digest]:
        raise _fail(f"the pull stored another manifest than {manifest.digest}")
    _check_blob(layout, manifest.digest, manifest.size)
    for digest, size in (manifest.config, *manifest.layers):
        _check_blob(layout, digest, size)


def _as_oci(layout: Path, name: str, manifest: Manifest) -> None:
    """Name ``manifest`` (a Docker v2 image whose blobs were checked) as ``name`` in
    ``layout``, in the OCI form umoci reads: the same config and layers, OCI's media types
    (Docker's image config is OCI's, with fields OCI ignores)."""
    layers = []
    for (digest, size), kind in zip(manifest.layers, manifest.layer_types, strict=True):
        if kind not in _OCI_LAYERS:
            raise _fail(f"layer {digest} is of an unsupported type ({kind})")
        layers.append({"mediaType": _OCI_LAYERS[kind], "digest": digest, "size": size})
    config_digest, config_size = manifest.config
    oci = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": layers,
    }
    raw = json.dumps(oci, separators=(",", ":")).encode()
    digest = _sha256(raw)
    (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(raw)
    entry = {
        "mediaType": OCI_MANIFEST,
        "digest": digest,
        "size": len(raw),
        "annotations": {_REF_NAME: name},
    }
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))


@contextlib.contextmanager
def _credentials(registry: str, username: str | None, password: str | None) -> Iterator[list[str]]:
    """skopeo arguments for the credentials, in an auth file that is gone afterwards."""
    if not username:
        yield []
        return
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
    image_ref = Reference.parse(ref)
    tls = ["--tls-verify=false"] if image_ref.insecure else []
    with _credentials(image_ref.registry, username, password) as creds:
        log(f"Resolving {ref}")
        # Asked every time, with the caller's credentials: a cached image is only handed to
        # whoever the registry still shows it to.
        manifest = resolve(image_ref, [*tls, *creds], log)
        # Keyed on where it came from too: content another registry names with the same
        # digests is never handed out as this repository's (nor this one's as another's).
        key = layer_key("registry-image", image_ref.name, manifest.digest, uid_base)
        meta = layers.root / "registry" / f"{key}.json"
        if layers.has(key) and meta.exists():
            log(f"{ref} ({manifest.digest[:19]}) is cached")
            return Image.from_json(json.loads(meta.read_text()))
        with layers.lock(key):
            if layers.has(key) and meta.exists():  # (pulled meanwhile by another build)
                return Image.from_json(json.loads(meta.read_text()))
            if layers.has(key):  # (a pull cut short after publishing: no image names it)
                layers.remove(key)
            src = [
                *(["--src-tls-verify=false"] if tls else []),
                *(c.replace("--authfile", "--src-authfile") for c in creds),
            ]
            image = _pull_layer(layers, key, image_ref, manifest, src, uid_base, log)
            meta.parent.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps(image.to_json()))
            log(f"{ref} ready")
            return image


def _pull_layer(
    layers: LayerStore,
    key: str,
    ref: Reference,
    manifest: Manifest,
    src: list[str],
    uid_base: int,
    log: Log,
) -> Image:
    """Pull the image by ``manifest``'s digest, check it, and publish its filesystem as ``key``."""
    scratch = layers.scratch(key + ".pull")
    try:
        layout = scratch / "layout"
        log(f"Pulling {ref.name}@{manifest.digest}")
        # By digest, never by tag again; kept as the registry has it, so that it can be checked.
        _skopeo(
            ["copy", "--preserve-digests", *src, ref.pinned(manifest.digest),
             f"oci:{layout}:{_PULLED}"],
            log,
            timeout=PULL_TIMEOUT_S,
        )  # fmt: skip
        check_layout(layout, _PULLED, manifest)
        name = _PULLED
        if manifest.media_type != OCI_MANIFEST:
            _as_oci(layout, _CONVERTED, manifest)
            name = _CONVERTED
        bundle = scratch / "bundle"
        log("Unpacking")
        proc = subprocess.run(
            ["umoci", "unpack", "--image", f"{layout}:{name}", str(bundle)],
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
    process = config.get("process") if isinstance(config, dict) else None
    process = process if isinstance(process, dict) else {}
    env_list = process.get("env")
    env = dict(
        e.split("=", 1)
        for e in (env_list if isinstance(env_list, list) else [])
        if isinstance(e, str) and "=" in e
    )
    cwd = process.get("cwd")
    cwd = cwd if isinstance(cwd, str) else None
    return Image(
        name=f"registry-{key[:16]}",
        layers=(key,),
        env=env,
        user="user" if has_user else "root",
        workdir=cwd if cwd and cwd != "/" else ("/home/user" if has_user else "/"),
    )


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
