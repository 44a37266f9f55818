"""The layer store: content-addressed, read-only rootfs layers, and the images made of them.

A layer is a directory ``layers/<key>`` holding a filesystem tree; ``key`` is a hash of what
made it (its parent layer, the step, and the files the step copied), so an unchanged step is
never rebuilt. An image is an ordered list of layers plus the config sandboxes start with; a
template name points at an image. Layers are only ever published whole, by renaming a finished
build directory into place, so nothing half-built is ever used.

A layer made from a sandbox's writable directory is copied by :func:`copy_tree`, as host root,
from a tree the sandbox wrote: everything in it is the sandbox's choice (links to host paths,
names that clash, device nodes). The copy walks it by directory file descriptors, one name at
a time, never following a link and never leaving the tree (no ``..``, no other file system);
the caller makes sure nothing can change the tree while it is read (``Runtime.commit`` stops
the sandbox first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

from .errors import TemplateNotFound
from .fsutil import file_lock, write_json_atomic


def layer_key(*parts: Any) -> str:
    """A layer's key: the hash of the canonical JSON of what made it."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclasses.dataclass(frozen=True)
class Image:
    """A template's image: layers from bottom to top, and how its processes start."""

    name: str
    layers: tuple[str, ...]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    user: str = "user"
    workdir: str = "/home/user"
    # The OCI runtime its sandboxes run under unless a create names one; None: the server's.
    oci_runtime: str | None = None
    # Started in every new sandbox (as ``user``, in ``workdir``); the create returns once
    # ``ready_cmd`` succeeds.
    start_cmd: str | None = None
    ready_cmd: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Image:
        return cls(
            name=data["name"],
            layers=tuple(data["layers"]),
            env=dict(data.get("env", {})),
            user=data.get("user", "user"),
            workdir=data.get("workdir", "/home/user"),
            oci_runtime=data.get("oci_runtime"),
            start_cmd=data.get("start_cmd"),
            ready_cmd=data.get("ready_cmd"),
        )


class LayerStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.layers_dir = root / "layers"
        self.images_dir = root / "images"
        self.tmp_dir = root / "tmp"
        for d in (self.layers_dir, self.images_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._sizes: dict[str, int] = {}

    def path(self, key: str) -> Path:
        return self.layers_dir / key

    def has(self, key: str) -> bool:
        return self.path(key).is_dir()

    @staticmethod
    def remake(key: str) -> str:
        """The key of ``key``'s layer made again: a new layer beside the old one, which
        sandboxes and images may stand on (a published layer never changes)."""
        return f"{key}-{time.time_ns()}"

    def newest(self, key: str) -> str | None:
        """The newest layer made for ``key``: ``key`` itself or its newest :meth:`remake`."""
        remakes = [
            p.name for p in self.layers_dir.glob(f"{key}-*") if p.name[len(key) + 1 :].isdigit()
        ]
        if remakes:
            return max(remakes, key=lambda name: int(name[len(key) + 1 :]))
        return key if self.has(key) else None

    def lock(self, key: str):  # type: ignore[no-untyped-def]
        """Held while a layer is being built, so two processes never build the same one."""
        return file_lock(self.root / "locks" / f"layer-{key}")

    def scratch(self, key: str) -> Path:
        """A fresh directory to build layer ``key`` in; publish it with :meth:`publish`."""
        path = self.tmp_dir / f"{key}.{os.getpid()}"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir()
        return path

    def publish(self, key: str, built: Path) -> Path:
        """Move a finished build into place as layer ``key`` (one rename: never half there)."""
        target = self.path(key)
        os.rename(built, target)
        return target

    def keep_upper(self, disk: Path, key: str) -> None:
        """Publish the upper directory on a stopped sandbox's ``disk`` as layer ``key``
        (unless ``key`` was made meanwhile, by another build of the same step)."""
        with self.lock(key):
            if self.has(key):
                return
            scratch = self.scratch(key)
            disk_fd = os.open(disk, _DIR)
            try:
                upper = os.open("upper", _DIR, dir_fd=disk_fd)
            finally:
                os.close(disk_fd)
            try:
                # Everything the sandbox changed: ownership, modes, xattrs, overlay's whiteouts.
                copy_tree(upper, scratch)
            except BaseException:
                shutil.rmtree(scratch, ignore_errors=True)
                raise
            finally:
                os.close(upper)
            _drop_empty_dir(scratch, "run", "bilik")  # the sandbox's control mount point
            self.publish(key, scratch)

    def snapshot_upper(self, disk: Path) -> str:
        """Publish a copy of the upper directory on a sandbox's ``disk`` (the caller keeps
        the sandbox from changing it meanwhile) as a new layer keyed by its content (the same
        files make the same layer); returns its key."""
        scratch = self.scratch(f"snapshot-{time.time_ns()}")
        try:
            disk_fd = os.open(disk, _DIR)
            try:
                upper = os.open("upper", _DIR, dir_fd=disk_fd)
            finally:
                os.close(disk_fd)
            try:
                copy_tree(upper, scratch)
            finally:
                os.close(upper)
            _drop_empty_dir(scratch, "run", "bilik")
            key = layer_key("snapshot", tree_digest(scratch))
            with self.lock(key):
                if self.has(key):
                    os.utime(self.path(key))  # (young again: collect_layers' grace)
                else:
                    self.publish(key, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return key

    def discard_scratch(self) -> None:
        """Remove build directories left by builds that died; they were never published.

        A scratch directory is named ``<key>.<pid>[.suffix]``; one whose process still lives
        belongs to a build in progress and is left alone.
        """
        for entry in self.tmp_dir.iterdir():
            parts = entry.name.split(".")
            pid = parts[1] if len(parts) > 1 and parts[1].isdigit() else ""
            if pid and Path(f"/proc/{pid}").exists():
                continue
            shutil.rmtree(entry, ignore_errors=True)

    def save_image(self, image: Image) -> None:
        write_json_atomic(self.images_dir / f"{_image_file(image.name)}.json", image.to_json())

    def image(self, name: str) -> Image:
        path = self.images_dir / f"{_image_file(name)}.json"
        try:
            image = Image.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise TemplateNotFound(name) from None
        if not all(self.has(key) for key in image.layers):
            raise TemplateNotFound(name)
        return image

    def size(self, key: str) -> int:
        """Bytes layer ``key`` takes on disk (a published layer never changes: counted once).
        The walk follows no link and stays on the layer's filesystem."""
        if key not in self._sizes:
            total = 0
            root = str(self.path(key))
            device = os.lstat(root).st_dev
            for path, dirs, files in os.walk(root):
                for name in dirs + files:
                    st = os.lstat(os.path.join(path, name))
                    total += st.st_blocks * 512
                dirs[:] = [d for d in dirs if os.lstat(os.path.join(path, d)).st_dev == device]
            self._sizes[key] = total
        return self._sizes[key]

    def images(self) -> list[Image]:
        found = []
        for path in self.images_dir.glob("*.json"):
            try:
                found.append(Image.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return found

    def unused(self, in_use: set[str]) -> list[str]:
        """Layers that no image names and that are not in ``in_use``."""
        named = {key for image in self.images() for key in image.layers}
        return sorted(p.name for p in self.layers_dir.iterdir() if p.name not in named | in_use)

    def remove(self, key: str) -> None:
        """Delete a layer: renamed away first, so it is gone at once, then removed."""
        doomed = self.tmp_dir / f"{key}.removed"
        self._sizes.pop(key, None)
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path(key), doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def remove_image(self, name: str) -> None:
        (self.images_dir / f"{_image_file(name)}.json").unlink(missing_ok=True)


def _image_file(name: str) -> str:
    # Template names may hold '/' and ':' (team/name:tag); keep them one flat file each.
    return name.replace("/", "%2F").replace(":", "%3A")


def tree_digest(root: Path) -> str:
    """A hash of a tree bilik copied (never a link followed): every entry's name, type, mode,
    owner, extended attributes, and its content or link target or device."""
    h = hashlib.sha256()
    top = os.fspath(root)
    for path, dirs, files in os.walk(top):
        dirs.sort()
        for name in [".", *sorted(dirs + files)]:
            full = os.path.join(path, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, top)
            h.update(f"{rel}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0".encode())
            if not stat.S_ISLNK(st.st_mode):
                for attr in sorted(os.listxattr(full, follow_symlinks=False)):
                    value = os.getxattr(full, attr, follow_symlinks=False)
                    h.update(attr.encode() + b"\0" + hashlib.sha256(value).digest())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.fsencode(os.readlink(full)))
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                h.update(str(st.st_rdev).encode())
            h.update(b"\n")
    return h.hexdigest()


class BadTree(Exception):
    """A tree that :func:`copy_tree` will not copy (changed while read, or too deep)."""


# Deeper trees are refused: each level holds two descriptors while its subtree is copied.
MAX_DEPTH = 256
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def copy_tree(source: int, target: Path) -> None:
    """Copy the directory open at descriptor ``source`` into the empty directory ``target``
    with ownership, modes, times, extended attributes (overlay's whiteouts and opaque marks
    among them), hard links and holes kept.

    Links are copied as links, never followed; sockets and device nodes other than overlay's
    whiteouts (character device 0:0) are left out; nothing on another file system is entered.
    """
    target_fd = os.open(target, _DIR)
    try:
        top = os.fstat(source)
        _copy_dir(_Walk(target_fd, top.st_dev), source, target_fd, "", 0)
        _meta_by_fd(source, target_fd, top)
    finally:
        os.close(target_fd)


@dataclasses.dataclass
class _Walk:
    target: int
    device: int
    # Hard links: the (device, inode) of a file already copied → its path in the target.
    copied: dict[tuple[int, int], str] = dataclasses.field(default_factory=dict)


def _copy_dir(walk: _Walk, src: int, dst: int, prefix: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise BadTree(f"{prefix}: deeper than {MAX_DEPTH} directories")
    with os.scandir(src) as entries:
        names = [entry.name for entry in entries]
    for name in names:
        st = os.stat(name, dir_fd=src, follow_symlinks=False)
        if st.st_dev != walk.device:
            continue  # (a mount: not part of the tree)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            os.mkdir(name, 0o700, dir_fd=dst)
            child_src = _open_same(name, src, _DIR, st)
            try:
                child_dst = os.open(name, _DIR, dir_fd=dst)
                try:
                    _copy_dir(walk, child_src, child_dst, f"{prefix}{name}/", depth + 1)
                    _meta_by_fd(child_src, child_dst, st)
                finally:
                    os.close(child_dst)
            finally:
                os.close(child_src)
        elif stat.S_ISREG(mode):
            seen = walk.copied.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None
            if seen is not None:
                os.link(seen, name, src_dir_fd=walk.target, dst_dir_fd=dst,
                        follow_symlinks=False)  # fmt: skip
                continue
            _copy_file(src, dst, name, st)
            if st.st_nlink > 1:
                walk.copied[(st.st_dev, st.st_ino)] = prefix + name
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(name, dir_fd=src), name, dir_fd=dst)
            _meta_by_name(src, dst, name, st)
        elif stat.S_ISFIFO(mode) or (stat.S_ISCHR(mode) and st.st_rdev == 0):
            os.mknod(name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=dst)
            _meta_by_name(src, dst, name, st)
        # (sockets, and devices other than whiteouts, are not part of an image)


def _open_same(name: str, src: int, flags: int, st: os.stat_result) -> int:
    """Open ``name`` (never through a link) and check it is still what was listed."""
    fd = os.open(name, flags, dir_fd=src)
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise BadTree(f"{name!r} changed while it was copied")
    return fd


def _copy_file(src: int, dst: int, name: str, st: os.stat_result) -> None:
    fd_in = _open_same(name, src, _FILE, st)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd_out = os.open(name, flags, 0o600, dir_fd=dst)
        try:
            _copy_data(fd_in, fd_out, st.st_size)
            _meta_by_fd(fd_in, fd_out, st)
        finally:
            os.close(fd_out)
    finally:
        os.close(fd_in)


def _copy_data(fd_in: int, fd_out: int, size: int) -> None:
    """Copy the data of a file, its holes left holes (a sparse file stays small)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd_in, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        end = min(os.lseek(fd_in, start, os.SEEK_HOLE), size)
        _copy_range(fd_in, fd_out, start, end - start)
        offset = end
    os.ftruncate(fd_out, size)


def _copy_range(fd_in: int, fd_out: int, offset: int, count: int) -> None:
    done = 0
    while done < count:
        at = offset + done
        try:
            n = os.copy_file_range(fd_in, fd_out, count - done, at, at)
        except OSError as e:  # (across file systems of different kinds: copied by sendfile)
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            os.lseek(fd_out, at, os.SEEK_SET)
            n = os.sendfile(fd_out, fd_in, at, count - done)
        if n == 0:
            raise BadTree("a file got shorter while it was copied")
        done += n


def _meta_by_fd(src: int, dst: int, st: os.stat_result) -> None:
    """Give the open copy ``dst`` the owner, mode, extended attributes and times of ``src``
    (``st``)."""
    os.fchown(dst, st.st_uid, st.st_gid)  # (before the mode: a chown clears set-id bits)
    os.fchmod(dst, stat.S_IMODE(st.st_mode))
    _copy_xattrs(src, dst)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _meta_by_name(src: int, dst: int, name: str, st: os.stat_result) -> None:
    """The same for what is not opened (links, fifos, whiteouts): ``name`` in the
    directories ``src`` and ``dst``, never followed."""
    os.chown(name, st.st_uid, st.st_gid, dir_fd=dst, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dst)
    # (the directory's /proc link leads to the directory itself; ``name`` is not followed)
    _copy_xattrs(f"/proc/self/fd/{src}/{name}", f"/proc/self/fd/{dst}/{name}")
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst, follow_symlinks=False)


def _copy_xattrs(src: int | str, dst: int | str) -> None:
    """Copy every extended attribute; a path (never a descriptor) is not followed."""
    follow = {} if isinstance(src, int) else {"follow_symlinks": False}
    try:
        names = os.listxattr(src, **follow)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for attr in names:
        with contextlib.suppress(OSError):  # (one the target cannot hold: as cp -a, go on)
            os.setxattr(dst, attr, os.getxattr(src, attr, **follow), **follow)


def _drop_empty_dir(root: Path, parent: str, name: str) -> None:
    """Remove ``root/parent/name`` if it is an empty directory (never through a link)."""
    with contextlib.suppress(OSError):
        fd = os.open(root / parent, _DIR)
        try:
            os.rmdir(name, dir_fd=fd)  # (fails on anything but an empty directory)
        finally:
            os.close(fd)
