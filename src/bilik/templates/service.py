"""Builds as the server runs them: in the background, one task each, status in the store."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..runtime import LocalRuntime, RuntimeFailure
from ..runtime.spec import Limits
from ..store import Store
from ..store.templates import BuildRow, TemplateRow
from . import host_settings
from .build import Builder, BuildFailed, BuildLog
from .defaults import DEFAULTS
from .files import FileStore

log = logging.getLogger("bilik.templates")


def build_image(template_id: str, build_id: str) -> str:
    """The name of the image one build of a template made."""
    return f"{template_id}:{build_id}"


class TemplateService:
    def __init__(self, runtime: LocalRuntime, store: Store, data_dir: Path) -> None:
        self.runtime = runtime
        self.store = store
        self.files = FileStore(data_dir)
        self.builder = Builder(runtime, self.files)
        self.logs_dir = data_dir / "builds"
        self._logs: dict[str, BuildLog] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._default_locks: dict[str, asyncio.Lock] = {}
        # The default templates' image names, worked out once per process: that reads the
        # host's pip settings (a pip run of a third of a second), which every create of a
        # default template would otherwise wait for. A change of them takes a restart.
        self._default_names: dict[str, str] = {}

    def log_of(self, build_id: str) -> BuildLog:
        if build_id not in self._logs:
            self._logs[build_id] = BuildLog(self.logs_dir / f"{build_id}.jsonl")
        return self._logs[build_id]

    def start(self, template: TemplateRow, build: BuildRow, spec: dict[str, Any]) -> None:
        task = asyncio.create_task(self._run(template, build, spec))
        self._tasks[build.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(build.id, None))

    async def _run(self, template: TemplateRow, build: BuildRow, spec: dict[str, Any]) -> None:
        build_log = self.log_of(build.id)
        await self.store.templates.set_status(build, "building")
        limits = Limits(cpu=template.cpu_count, memory_mb=template.memory_mb)
        try:
            base = spec.get("fromTemplate")
            if isinstance(base, str) and base != "base":
                # Another template of the same key, by id or name, with a finished build.
                row = await self.store.templates.get(base, template.key_id)
                if row is None or row.ready_build_id is None:
                    raise BuildFailed(f"template {base!r} not found (or never built)", "base")
                spec = {**spec, "fromTemplate": row.id}
            image = await self.builder.build(template.id, build.id, spec, limits, build_log)
        except BuildFailed as e:
            build_log(e.message, level="error", step=e.step)
            await self.store.templates.set_status(
                build, "error", {"message": e.message, "step": e.step}
            )
            return
        except Exception as e:
            log.exception("build %s failed", build.id)
            build_log(f"internal error: {e}", level="error")
            await self.store.templates.set_status(build, "error", {"message": str(e)})
            return
        # The template's image, and this build's own (what its tags name).
        for name in (template.id, build_image(template.id, build.id)):
            await asyncio.to_thread(
                self.runtime.layers.save_image, dataclasses.replace(image, name=name)
            )
        build_log("Build finished", step="finalize")
        await self.store.templates.set_status(build, "ready")

    async def ensure_default(self, name: str, log: Callable[[str], None] | None = None) -> str:
        """The image of the default template ``name`` as defined now (and with this host's
        settings), built first unless it exists; one build at a time: a create that asked for
        it waits, and so does any other."""
        if (image_name := await self.built_default(name)) is not None:
            return image_name
        lock = self._default_locks.setdefault(name, asyncio.Lock())
        async with lock:
            spec, bundles = await asyncio.to_thread(_with_host_settings, DEFAULTS[name])
            image_name = self._default_names[name] = _default_image_name(name, spec)
            for files_hash, bundle in bundles.items():
                path = self.files.path(image_name, files_hash)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(bundle)
            with contextlib.suppress(RuntimeFailure):
                await asyncio.to_thread(self.runtime.layers.image, image_name)
                return image_name
            build_log = self.log_of(f"default-{name}-{int(time.time())}")
            if log is not None:
                build_log.listeners.append(log)
            build_log(f"building the default template {name} (once)")
            # Shielded: a client that gives up waiting must not cut the build short.
            image = await asyncio.shield(
                self.builder.build(
                    image_name, "default", spec, Limits(cpu=2, memory_mb=2048), build_log
                )
            )
            await asyncio.to_thread(self.runtime.layers.save_image, image)
            # Older definitions' images go (their layers once no sandbox uses them).
            for old in self.runtime.layers.images():
                if old.name != image_name and (old.name == name or old.name.startswith(f"{name}:")):
                    self.runtime.layers.remove_image(old.name)
            build_log(f"default template {name} ready")
            return image_name

    async def built_default(self, name: str) -> str | None:
        """The image of the default template ``name`` as defined now, if it is built; builds
        nothing."""
        image_name = self._default_names.get(name)
        if image_name is None:
            spec, _ = await asyncio.to_thread(_with_host_settings, DEFAULTS[name])
            image_name = self._default_names[name] = _default_image_name(name, spec)
        try:
            await asyncio.to_thread(self.runtime.layers.image, image_name)
        except RuntimeFailure:
            return None
        return image_name

    def forget(self, template_id: str) -> None:
        """Remove the images of a template that is deleted (its layers go once unused)."""
        layers = self.runtime.layers
        for image in layers.images():
            if image.name == template_id or image.name.startswith(f"{template_id}:"):
                layers.remove_image(image.name)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            # Cancelled mid-build: the next start marks the build failed (abandon_unfinished).
            with contextlib.suppress(BaseException):
                await task


def _default_image_name(name: str, spec: dict[str, Any]) -> str:
    """A default template's image is named by its definition: a new one is a new image."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return f"{name}:{digest}"


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
