"""Templates a key owns, and their builds."""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from .schema import template_builds, template_tags, templates


@dataclasses.dataclass(frozen=True)
class TemplateRow:
    id: str
    key_id: str
    name: str
    created_at: float
    cpu_count: int
    memory_mb: int
    ready_build_id: str | None
    source_sandbox_id: str | None = None  # a snapshot's: the sandbox it was taken of


@dataclasses.dataclass(frozen=True)
class BuildRow:
    id: str
    template_id: str
    status: str
    reason: dict[str, Any] | None
    created_at: float
    finished_at: float | None
    tags: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TagRow:
    tag: str
    build_id: str
    created_at: float


DEFAULT_TAG = "default"


def _template(row: Any) -> TemplateRow:
    return TemplateRow(
        row.id,
        row.key_id,
        row.name,
        row.created_at,
        row.cpu_count,
        row.memory_mb,
        row.ready_build_id,
        row.source_sandbox_id,
    )


def _build(row: Any) -> BuildRow:
    reason = json.loads(row.reason) if row.reason else None
    tags = tuple(json.loads(row.tags)) if row.tags else ()
    return BuildRow(
        row.id, row.template_id, row.status, reason, row.created_at, row.finished_at, tags
    )


class TemplateStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def request_build(
        self, key_id: str, name: str, cpu_count: int, memory_mb: int, tags: tuple[str, ...] = ()
    ) -> tuple[TemplateRow, BuildRow]:
        """The key's template called ``name`` (made now if new) and a new build of it."""
        for _ in range(3):  # a concurrent request for the same new name may win the insert
            template = await self.get(name, key_id)
            async with self.engine.begin() as conn:
                if template is None:
                    template = TemplateRow(
                        secrets.token_hex(10), key_id, name, time.time(), cpu_count, memory_mb, None
                    )
                    try:
                        await conn.execute(
                            templates.insert().values(**dataclasses.asdict(template))
                        )
                    except IntegrityError:
                        continue
                else:
                    await conn.execute(
                        templates.update()
                        .where(templates.c.id == template.id)
                        .values(cpu_count=cpu_count, memory_mb=memory_mb)
                    )
                    template = dataclasses.replace(
                        template, cpu_count=cpu_count, memory_mb=memory_mb
                    )
                build = BuildRow(
                    str(uuid.uuid4()), template.id, "waiting", None, time.time(), None, tags
                )
                values = dataclasses.asdict(build)
                values["reason"] = None
                values["tags"] = json.dumps(list(tags))
                await conn.execute(template_builds.insert().values(**values))
                return template, build
        raise RuntimeError(f"could not make template {name!r}")

    async def request_snapshot(
        self, key_id: str, name: str | None, source_sandbox_id: str, cpu_count: int, memory_mb: int
    ) -> tuple[TemplateRow, BuildRow, bool]:
        """The key's snapshot template called ``name`` (made now if new, named by its id if
        no name is given), a new build of it (``building``), and whether the template is new.
        A name a built template of the key holds is refused (ValueError): a snapshot never
        replaces a template's image."""
        for _ in range(3):  # a concurrent request for the same new name may win the insert
            template = await self.get(name, key_id) if name else None
            if template is not None and template.source_sandbox_id is None:
                raise ValueError(f"template {name!r} is a built template, not a snapshot")
            new = template is None
            async with self.engine.begin() as conn:
                if template is None:
                    template_id = secrets.token_hex(10)
                    template = TemplateRow(
                        template_id,
                        key_id,
                        name or template_id,
                        time.time(),
                        cpu_count,
                        memory_mb,
                        None,
                        source_sandbox_id,
                    )
                    try:
                        await conn.execute(
                            templates.insert().values(**dataclasses.asdict(template))
                        )
                    except IntegrityError:
                        continue
                else:
                    await conn.execute(
                        templates.update()
                        .where(templates.c.id == template.id)
                        .values(source_sandbox_id=source_sandbox_id)
                    )
                    template = dataclasses.replace(template, source_sandbox_id=source_sandbox_id)
                build = BuildRow(
                    str(uuid.uuid4()), template.id, "building", None, time.time(), None
                )
                values = dataclasses.asdict(build)
                values["reason"] = None
                values["tags"] = json.dumps([])
                await conn.execute(template_builds.insert().values(**values))
                return template, build, new
        raise RuntimeError(f"could not make snapshot {name!r}")

    async def snapshots(self, key_id: str) -> list[TemplateRow]:
        """The key's snapshots with a finished build, the newest first (then by id)."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(templates)
                .where(
                    templates.c.key_id == key_id,
                    templates.c.source_sandbox_id.is_not(None),
                    templates.c.ready_build_id.is_not(None),
                )
                .order_by(templates.c.created_at.desc(), templates.c.id)
            )
            return [_template(r) for r in rows]

    async def get(self, id_or_name: str, key_id: str) -> TemplateRow | None:
        """The key's template with this id or name."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(templates).where(
                        templates.c.key_id == key_id,
                        sa.or_(templates.c.id == id_or_name, templates.c.name == id_or_name),
                    )
                )
            ).first()
        return _template(row) if row else None

    async def of_key(self, key_id: str) -> list[TemplateRow]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.select(templates).where(templates.c.key_id == key_id))
            return [_template(r) for r in rows]

    async def remove(self, template_id: str) -> list[str]:
        """Delete a template with its builds and tags; returns the builds' ids."""
        async with self.engine.begin() as conn:
            builds = await conn.execute(
                sa.select(template_builds.c.id).where(template_builds.c.template_id == template_id)
            )
            build_ids = [row.id for row in builds]
            for table in (template_builds, template_tags):
                await conn.execute(table.delete().where(table.c.template_id == template_id))
            await conn.execute(templates.delete().where(templates.c.id == template_id))
        return build_ids

    async def builds(
        self, template_ids: list[str], *, offset: int = 0, limit: int | None = None
    ) -> list[BuildRow]:
        """The builds of these templates, the newest first (``limit`` of them from ``offset``)."""
        query = (
            sa.select(template_builds)
            .where(template_builds.c.template_id.in_(template_ids))
            .order_by(template_builds.c.created_at.desc(), template_builds.c.id)
            .offset(offset)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [_build(r) for r in await conn.execute(query)]

    async def build(self, build_id: str) -> BuildRow | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(template_builds).where(template_builds.c.id == build_id)
                )
            ).first()
        return _build(row) if row else None

    async def set_status(
        self, build: BuildRow, status: str, reason: dict[str, Any] | None = None
    ) -> None:
        """Move a build on; a ready build becomes its template's image."""
        finished = time.time() if status in ("ready", "error") else None
        async with self.engine.begin() as conn:
            await conn.execute(
                template_builds.update()
                .where(template_builds.c.id == build.id)
                .values(
                    status=status,
                    reason=json.dumps(reason) if reason else None,
                    finished_at=finished,
                )
            )
            if status == "ready":
                await conn.execute(
                    templates.update()
                    .where(templates.c.id == build.template_id)
                    .values(ready_build_id=build.id)
                )
                await self._tag(conn, build.template_id, build.id, (DEFAULT_TAG, *build.tags))

    async def _tag(self, conn: Any, template_id: str, build_id: str, tags: Any) -> None:
        for tag in dict.fromkeys(tags):
            await conn.execute(
                template_tags.delete().where(
                    template_tags.c.template_id == template_id, template_tags.c.tag == tag
                )
            )
            await conn.execute(
                template_tags.insert().values(
                    template_id=template_id, tag=tag, build_id=build_id, created_at=time.time()
                )
            )

    async def tag(self, template_id: str, build_id: str, tags: list[str]) -> None:
        """Point ``tags`` at ``build_id`` (moving them from any other build)."""
        async with self.engine.begin() as conn:
            await self._tag(conn, template_id, build_id, tags)

    async def untag(self, template_id: str, tags: list[str]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                template_tags.delete().where(
                    template_tags.c.template_id == template_id, template_tags.c.tag.in_(tags)
                )
            )

    async def tags(self, template_id: str) -> list[TagRow]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(template_tags)
                .where(template_tags.c.template_id == template_id)
                .order_by(template_tags.c.created_at)
            )
            return [TagRow(r.tag, r.build_id, r.created_at) for r in rows]

    async def tagged(self, template_id: str, tag: str) -> str | None:
        """The build ``tag`` names."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(template_tags.c.build_id).where(
                        template_tags.c.template_id == template_id, template_tags.c.tag == tag
                    )
                )
            ).first()
        return row.build_id if row else None

    async def abandon_unfinished(self) -> list[str]:
        """Fail builds a server that stopped left running; returns their ids."""
        async with self.engine.begin() as conn:
            rows = await conn.execute(
                sa.select(template_builds.c.id).where(
                    template_builds.c.status.in_(("waiting", "building"))
                )
            )
            ids = [r.id for r in rows]
            if ids:
                await conn.execute(
                    template_builds.update()
                    .where(template_builds.c.id.in_(ids))
                    .values(
                        status="error",
                        reason=json.dumps({"message": "the server stopped during the build"}),
                        finished_at=time.time(),
                    )
                )
        return ids
