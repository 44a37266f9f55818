"""Builds as the server runs them: in the background, one task each, status in the store."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

from ..runtime import LocalRuntime
from ..runtime.spec import Limits
from ..store import Store
from ..store.templates import BuildRow, TemplateRow
from .build import Builder, BuildFailed, BuildLog
from .default_builds import DefaultBuilds
from .defaults import DEFAULTS, default_limits
from .files import FileStore

log = logging.getLogger("bilik.templates")

# Logs of builds that ended kept in memory (for status calls); older ones are read again.
LOGS_KEPT = 16


def build_image(template_id: str, build_id: str) -> str:
    """The name of the image one build of a template made."""
    return f"{template_id}:{build_id}"


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What a sandbox of a template starts from: the runtime image, and the limits it gets
    unless its create asks for others."""

    image: str
    limits: Limits


class TemplateUnavailable(Exception):
    """A template name no sandbox can start from now: ``missing`` (no such template, or no
    build with that tag), ``unbuilt`` (no finished build yet) or ``failed`` (one of bilik's
    own did not build)."""

    def __init__(self, reason: Literal["missing", "unbuilt", "failed"], message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class TemplateService:
    def __init__(self, runtime: LocalRuntime, store: Store, data_dir: Path) -> None:
        self.runtime = runtime
        self.store = store
        caps = runtime.settings.caps
        self.files = FileStore(
            data_dir, max_file_bytes=caps.upload_mb << 20, max_key_bytes=caps.uploads_mb << 20
        )
        self.builder = Builder(runtime, self.files)
        self.logs_dir = data_dir / "builds"
        self._logs: dict[str, BuildLog] = {}
        # The layers each key's builds made (by key id), counted against its layer cap until
        # they are gone.
        self._made: dict[str, set[str]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.defaults = DefaultBuilds(self.builder, self.logs_dir)

    def log_of(self, build_id: str) -> BuildLog:
        build_log = self._logs.pop(build_id, None)
        if build_log is None:
            build_log = BuildLog(self.logs_dir / f"{build_id}.jsonl")
        self._logs[build_id] = build_log  # (the most recently used last)
        ended = [b for b in self._logs if b not in self._tasks]
        for old in ended[: max(0, len(ended) - LOGS_KEPT)]:
            del self._logs[old]
        return build_log

    async def resolve(
        self, name: str, tag: str = "", *, key_id: str | None = None, build: bool = True
    ) -> Resolved:
        """What a sandbox of the template ``name`` (its build tagged ``tag``, if given) starts
        from: ``key_id``'s own template (by id or name) with a finished build, else one of
        bilik's own, built first on ``build`` (a build the caller waits for). Every create,
        the warm pool and a build's ``fromTemplate`` ask here."""
        ref = f"{name}:{tag}" if tag else name
        row = await self.store.templates.get(name, key_id) if key_id is not None else None
        if row is None:
            if tag or name not in DEFAULTS:
                raise TemplateUnavailable("missing", f"template {ref!r} not found")
            if build:
                try:
                    image = await self.defaults.ensure(name)
                except BuildFailed as e:
                    raise TemplateUnavailable(
                        "failed", f"the default template {name} did not build: {e}"
                    ) from None
            elif (built := await self.defaults.built(name)) is not None:
                image = built
            else:
                raise TemplateUnavailable("unbuilt", f"template {ref!r} is not built yet")
            return Resolved(image, default_limits(name))
        if row.ready_build_id is None:
            raise TemplateUnavailable("unbuilt", f"template {ref!r} has no finished build yet")
        image = row.id
        if tag:
            build_id = await self.store.templates.tagged(row.id, tag)
            if build_id is None:
                raise TemplateUnavailable(
                    "missing", f"template {name!r} has no build tagged {tag!r}"
                )
            image = build_image(row.id, build_id)
        return Resolved(image, Limits(cpu=row.cpu_count, memory_mb=row.memory_mb))

    def running(self, build_id: str) -> bool:
        """Whether this server runs the build now."""
        return build_id in self._tasks

    def start(
        self, template: TemplateRow, build: BuildRow, spec: dict[str, Any]
    ) -> asyncio.Task[None]:
        """Run the build of ``spec`` (already through ``build.check_spec``) in the background;
        the task ends when the build does (the API counts it against the key's caps)."""
        task = asyncio.create_task(self._run(template, build, spec))
        self._tasks[build.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(build.id, None))
        return task

    async def _run(self, template: TemplateRow, build: BuildRow, spec: dict[str, Any]) -> None:
        build_log = self.log_of(build.id)
        await self.store.templates.set_status(build, "building")
        limits = Limits(cpu=template.cpu_count, memory_mb=template.memory_mb)
        try:
            base = spec.get("fromTemplate")
            if isinstance(base, str) and base not in DEFAULTS:
                # Another template of the same key, by id or name, with a finished build (one
                # of bilik's own is built, with this build's log, by ``defaults.resolve``).
                try:
                    found = await self.resolve(base, key_id=template.key_id, build=False)
                except TemplateUnavailable:
                    raise BuildFailed(
                        f"template {base!r} not found (or never built)", "base"
                    ) from None
                spec = {**spec, "fromTemplate": found.image}
            spec = await self.defaults.resolve(spec, build_log)
            cap = self.runtime.settings.caps.layers_mb << 20
            made = self._made.setdefault(template.key_id, set())
            names = await self._images_of(template.key_id)
            kept = await asyncio.to_thread(self.layer_usage, names, made)
            if kept >= cap:
                raise BuildFailed(
                    f"this key's templates and builds keep {kept >> 20} MiB of layers, its cap "
                    f"is {cap >> 20} MiB: delete templates it no longer needs (the layers of "
                    "deleted templates and failed builds are freed within minutes)",
                    "base",
                )
            image = await self.builder.build(
                template.id,
                build.id,
                spec,
                limits,
                build_log,
                layer_budget=cap - kept,
                made_layers=made,
            )
        except BuildFailed as e:
            build_log(e.message, level="error", step=e.step)
            await self.store.templates.set_status(
                build, "error", {"message": e.message, "step": e.step}
            )
            return
        except Exception as e:
            log.exception("build %s failed", build.id)
            # (Some errors say nothing of themselves: their kind at least says what failed.)
            message = f"internal error: {type(e).__name__}" + (f": {e}" if str(e) else "")
            build_log(message, level="error")
            await self.store.templates.set_status(build, "error", {"message": message})
            return
        # The template's image, and this build's own (what its tags name).
        for name in (template.id, build_image(template.id, build.id)):
            await asyncio.to_thread(
                self.runtime.layers.save_image, dataclasses.replace(image, name=name)
            )
        build_log("Build finished", step="finalize")
        await self.store.templates.set_status(build, "ready")

    async def _images_of(self, key_id: str) -> set[str]:
        """Every image name of the key's templates (the template's, and each build's)."""
        ids = {t.id for t in await self.store.templates.of_key(key_id)}
        images = await asyncio.to_thread(self.runtime.layers.images)
        return {i.name for i in images if i.name.split(":", 1)[0] in ids}

    def layer_usage(self, names: set[str], made: set[str]) -> int:
        """Bytes of the layers the images ``names`` keep, and of those the key's builds
        ``made`` that are still on disk (a failed build's, a deleted template's, until the
        runtime collects them), less those another image uses (a layer another key's
        template, or bilik's own, stands on is not this key's cost). Prunes ``made``."""
        layers = self.runtime.layers
        made.difference_update({k for k in made if not layers.has(k)})
        images = layers.images()
        mine = {k for i in images if i.name in names for k in i.layers}
        others = {k for i in images if i.name not in names for k in i.layers}
        return sum(layers.size(k) for k in (mine | made) - others if layers.has(k))

    async def abandon_unfinished(self) -> list[str]:
        """Fail the builds a stopped server left unfinished (their ids) and undo what they
        left (``Builder.abandon``), and the same for bilik's own templates' builds."""
        build_ids = await self.store.templates.abandon_unfinished()
        for build_id in build_ids:
            await self.builder.abandon(build_id)
        await self.defaults.abandon_unfinished()
        return build_ids

    def forget(self, template_id: str, build_ids: list[str]) -> None:
        """Remove what a deleted template leaves: its images (its layers go once unused), the
        files uploaded for it, its builds' logs."""
        layers = self.runtime.layers
        for image in layers.images():
            if image.name == template_id or image.name.startswith(f"{template_id}:"):
                layers.remove_image(image.name)
        self.files.forget(template_id)
        for build_id in build_ids:
            self._logs.pop(build_id, None)
            (self.logs_dir / f"{build_id}.jsonl").unlink(missing_ok=True)

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        for task in list(self._tasks.values()):
            # Cancelled mid-build: the next start marks the build failed (abandon_unfinished).
            with contextlib.suppress(BaseException):
                await task
