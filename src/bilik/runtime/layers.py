"""The layer store: content-addressed, read-only rootfs layers, and the images made of them.

A layer is a directory ``layers/<key>`` holding a filesystem tree; ``key`` is a hash of what
made it (its parent layer, the step, and the files the step copied), so an unchanged step is
never rebuilt. An image is an ordered list of layers plus the config sandboxes start with; a
template name points at an image. Layers are only ever published whole, by renaming a finished
build directory into place, so nothing half-built is ever used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
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
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path(key), doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def remove_image(self, name: str) -> None:
        (self.images_dir / f"{_image_file(name)}.json").unlink(missing_ok=True)


def _image_file(name: str) -> str:
    # Template names may hold '/' and ':' (team/name:tag); keep them one flat file each.
    return name.replace("/", "%2F").replace(":", "%3A")
