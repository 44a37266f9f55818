"""bilik's own templates (``defaults``) as this host builds them: each on first use, once, into
an image named by its definition (so a new definition is a new build) and by its plain name.

A template built on ``base`` (E2B's ``e2bdev/base``, a ``fromTemplate`` of one of bilik's
templates, or no base at all) gets base's image built first: ``resolve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from ..runtime import Runtime, RuntimeFailure, debian_image
from ..runtime.fsutil import lock_fd, try_lock_fd
from ..runtime.spec import Limits
from . import host_settings
from .build import Builder, BuildLog
from .defaults import BASE, DEFAULTS
from .files import FileStore

# Names the SDKs give E2B's own base image (the SDKs' default base): bilik's ``base``.
BASE_IMAGES = {"e2bdev/base", "e2bdev/base:latest", BASE}
# What a default template's build sandboxes get.
BUILD_LIMITS = Limits(cpu=2, memory_mb=2048)

Log = Callable[[str], None]


class DefaultBuilds:
    def __init__(self, builder: Builder, logs_dir: Path) -> None:
        self.builder = builder
        runtime = builder.runtime
        self.layers = runtime.layers
        self.logs_dir = logs_dir
        # Builds under way in this process, so that every create waiting for one waits for
        # the same build (and one that gives up waiting cuts it short for no one).
        self._building: dict[str, tuple[asyncio.Task[str], BuildLog]] = {}
        # Each definition with this host's settings, worked out once per process: that reads
        # the host's pip settings (a pip run of a third of a second), which every create of a
        # default template would otherwise wait for. A change of them takes a restart.
        self._specs: dict[str, tuple[dict[str, Any], dict[str, bytes]]] = {}
        # What the images also depend on: the host's Debian release and the uid shift.
        self._host = debian_image.recipe_key(runtime.settings.uid_base, debian_image.host_release())

    async def resolve(self, spec: dict[str, Any], log: Log) -> dict[str, Any]:
        """``spec`` with its base pointing at the image of the bilik template it is built on
        (built first unless it exists); ``spec`` itself if it is built on anything else."""
        name = _default_base(spec)
        if name is None:
            return spec
        image = await self.ensure(name, log)
        return {**_without_base(spec), "fromTemplate": image}

    async def ensure(self, name: str, log: Log | None = None, *, rebuild: bool = False) -> str:
        """The image of the default template ``name`` as defined now, built first unless it
        exists (every step again, from Debian up, on ``rebuild``). One build at a time: a
        create that asks for it meanwhile waits for the same build, and so does another
        process. The build's lines go to ``log`` (else the runtime's, the server's log) as
        well as to its log file."""
        if not rebuild and (image_name := await self.built(name)) is not None:
            return image_name
        if name in self._building and not rebuild:
            task, build_log = self._building[name]
        else:
            build_log = BuildLog(self.logs_dir / f"default-{name}-{time.time_ns()}.jsonl")
            task = asyncio.create_task(self._build(name, build_log, rebuild))
            self._building[name] = (task, build_log)
            task.add_done_callback(lambda done: self._forget(name, done))
        listener = log or self.builder.runtime.log
        build_log.listeners.append(listener)
        try:
            # Shielded: a client that gives up waiting must not cut the build short.
            return await asyncio.shield(task)
        finally:
            build_log.listeners.remove(listener)

    async def abandon_unfinished(self) -> None:
        """Undo what builds that a crash cut short left (those no process runs now)."""
        for name in DEFAULTS:
            lock = await asyncio.to_thread(try_lock_fd, self._lock_path(name))
            if lock is not None:
                try:
                    await self.builder.abandon(_build_id(name))
                finally:
                    os.close(lock)

    def _forget(self, name: str, done: asyncio.Task[str]) -> None:
        if self._building.get(name, (None,))[0] is done:
            del self._building[name]

    async def _build(self, name: str, build_log: BuildLog, rebuild: bool) -> str:
        spec, bundles = await self._spec(name)
        spec = await self.resolve(spec, build_log)
        image_name = self._image_name(name, spec)
        # Held by every bilik process that builds this template (a CLI beside the server).
        lock = await asyncio.to_thread(lock_fd, self._lock_path(name))
        try:
            if not rebuild and await self._has(image_name):  # (built while this waited)
                return image_name
            for files_hash, bundle in bundles.items():
                await asyncio.to_thread(self.builder.files.put, image_name, files_hash, bundle)
            build_log(f"building the default template {name}" + (" anew" if rebuild else ""))
            image = await self.builder.build(
                image_name,
                _build_id(name),
                {**spec, "force": True} if rebuild else spec,
                BUILD_LIMITS,
                build_log,
                rebuild_base=rebuild,
            )
            # The plain name first: once the definition's name is there, both are.
            for saved_as in (name, image_name):
                await asyncio.to_thread(
                    self.layers.save_image, dataclasses.replace(image, name=saved_as)
                )
        finally:
            os.close(lock)
        # Older definitions' images go (their layers once no sandbox or template uses them).
        for old in await asyncio.to_thread(self.layers.images):
            if old.name.startswith(f"{name}:") and old.name != image_name:
                await asyncio.to_thread(self.layers.remove_image, old.name)
        build_log(f"default template {name} ready")
        return image_name

    async def built(self, name: str) -> str | None:
        """The image of the default template ``name`` as defined now, if it is built; builds
        nothing."""
        spec, _ = await self._spec(name)
        if (base := _default_base(spec)) is not None:
            base_image = await self.built(base)
            if base_image is None:
                return None
            spec = {**_without_base(spec), "fromTemplate": base_image}
        image_name = self._image_name(name, spec)
        return image_name if await self._has(image_name) else None

    def _image_name(self, name: str, spec: dict[str, Any]) -> str:
        """A default template's image is named by its definition, its base's image and this
        host's Debian: a new one of any is a new image."""
        identity = json.dumps([spec, self._host], sort_keys=True).encode()
        return f"{name}:{hashlib.sha256(identity).hexdigest()[:16]}"

    def _lock_path(self, name: str) -> Path:
        return self.layers.root / "locks" / f"default-{name}"

    async def _spec(self, name: str) -> tuple[dict[str, Any], dict[str, bytes]]:
        if name not in self._specs:
            self._specs[name] = await asyncio.to_thread(_with_host_settings, DEFAULTS[name])
        return self._specs[name]

    async def _has(self, image_name: str) -> bool:
        try:
            await asyncio.to_thread(self.layers.image, image_name)
        except RuntimeFailure:
            return False
        return True


@contextlib.asynccontextmanager
async def outside_a_server(runtime: Runtime) -> AsyncIterator[DefaultBuilds]:
    """bilik's own templates for a started runtime with no server around it (the CLI, benches,
    tests), built as a server builds them."""
    data_dir = runtime.settings.data_dir
    dns = None
    # Builds resolve names through the gateway; a running server's forwarder serves them.
    with contextlib.suppress(OSError):
        dns = await runtime.serve_dns()
    try:
        yield DefaultBuilds(Builder(runtime, FileStore(data_dir)), data_dir / "builds")
    finally:
        if dns is not None:
            await dns.close()


def _build_id(name: str) -> str:
    return f"default-{name}"


def _default_base(spec: dict[str, Any]) -> str | None:
    """Which of bilik's templates ``spec`` is built on, if it is."""
    if (template := spec.get("fromTemplate")) is not None:
        return template if isinstance(template, str) and template in DEFAULTS else None
    image = spec.get("fromImage") or "e2bdev/base"
    return BASE if isinstance(image, str) and image in BASE_IMAGES else None


def _without_base(spec: dict[str, Any]) -> dict[str, Any]:
    base_keys = ("fromImage", "fromImageRegistry", "fromTemplate")
    return {k: v for k, v in spec.items() if k not in base_keys}


def _with_host_settings(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, bytes]]:
    """``spec`` with its host-settings COPY steps pointing at this host's settings, and those
    settings' archives by hash."""
    steps, bundles = [], {}
    for step in spec["steps"]:
        if step.get("hostPipSettings"):
            bundle = host_settings.pip_bundle()
            files_hash = host_settings.bundle_hash(bundle)
            bundles[files_hash] = bundle
            step = {k: v for k, v in step.items() if k != "hostPipSettings"}
            step["filesHash"] = files_hash
        steps.append(step)
    return {**spec, "steps": steps}, bundles
