"""Sandbox ownership and what owners attach to sandboxes (metadata, the envd access token)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from .schema import idempotency, sandboxes


@dataclasses.dataclass(frozen=True)
class SandboxRow:
    id: str
    key_id: str
    template_id: str
    metadata: dict[str, str]
    envd_access_token: str
    started_at: float
    state: str = "running"  # (``bilik.sandboxes.states``)
    # E2B's lifecycle: what its timeout does ("kill" or "pause"), whether such a pause keeps
    # its memory, whether traffic resumes it once paused, and the timeout it was made with.
    on_timeout: str = "kill"
    auto_pause_memory: bool = True
    auto_resume: bool = False
    timeout_s: int = 300
    # While paused: since when, and whether its memory was kept.
    paused_at: float | None = None
    pause_memory: bool | None = None


def _row(row: Any) -> SandboxRow:
    return SandboxRow(
        row.id,
        row.key_id,
        row.template_id,
        json.loads(row.metadata),
        row.envd_access_token,
        row.started_at,
        row.state,
        row.on_timeout,
        bool(row.auto_pause_memory),
        bool(row.auto_resume),
        row.timeout_s,
        row.paused_at,
        None if row.pause_memory is None else bool(row.pause_memory),
    )


class SandboxStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def add(self, row: SandboxRow) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                sandboxes.insert().values(
                    id=row.id,
                    key_id=row.key_id,
                    template_id=row.template_id,
                    metadata=json.dumps(row.metadata),
                    envd_access_token=row.envd_access_token,
                    started_at=row.started_at,
                    state=row.state,
                    on_timeout=row.on_timeout,
                    auto_pause_memory=row.auto_pause_memory,
                    auto_resume=row.auto_resume,
                    timeout_s=row.timeout_s,
                )
            )

    async def set_state(
        self,
        sandbox_id: str,
        old: str,
        new: str,
        started_at: float | None = None,
        record: Mapping[str, Any] | None = None,
    ) -> bool:
        """Move the sandbox from state ``old`` to ``new`` (and its start time to
        ``started_at``, if given, and its other columns to ``record``); False if it was not
        in state ``old``."""
        values: dict[str, Any] = {**(record or {}), "state": new}
        if started_at is not None:
            values["started_at"] = started_at
        async with self.engine.begin() as conn:
            done = await conn.execute(
                sandboxes.update()
                .where(sandboxes.c.id == sandbox_id, sandboxes.c.state == old)
                .values(**values)
            )
        return bool(done.rowcount == 1)

    async def get(self, sandbox_id: str, key_id: str) -> SandboxRow | None:
        """The sandbox if ``key_id`` owns it; another key's sandbox is as good as missing."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(sandboxes).where(
                        sandboxes.c.id == sandbox_id, sandboxes.c.key_id == key_id
                    )
                )
            ).first()
        return _row(row) if row else None

    async def of_key(self, key_id: str) -> list[SandboxRow]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.select(sandboxes).where(sandboxes.c.key_id == key_id))
            return [_row(r) for r in rows]

    async def owners(self) -> dict[str, tuple[str, str]]:
        """Every made sandbox's envd access token and owning key, by sandbox id: running,
        paused or on the way between (one still being created is no one's to reach yet)."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(sandboxes.c.id, sandboxes.c.envd_access_token, sandboxes.c.key_id).where(
                    sandboxes.c.state != "creating"
                )
            )
            return {r.id: (r.envd_access_token, r.key_id) for r in rows}

    async def running(self) -> dict[str, float]:
        """Every running sandbox's start time, by sandbox id."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(sandboxes.c.id, sandboxes.c.started_at).where(
                    sandboxes.c.state == "running"
                )
            )
            return {r.id: r.started_at for r in rows}

    async def all(self) -> list[SandboxRow]:
        """Every recorded sandbox."""
        async with self.engine.connect() as conn:
            return [_row(r) for r in await conn.execute(sa.select(sandboxes))]

    async def by_id(self, sandbox_id: str) -> SandboxRow | None:
        """The sandbox, whoever owns it (for the server's own work, never a key's request)."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(sa.select(sandboxes).where(sandboxes.c.id == sandbox_id))
            ).first()
        return _row(row) if row else None

    async def states(self) -> dict[str, str]:
        """Every recorded sandbox's state, by sandbox id."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.select(sandboxes.c.id, sandboxes.c.state))
            return {r.id: r.state for r in rows}

    async def remove(self, *sandbox_ids: str) -> None:
        if not sandbox_ids:
            return
        async with self.engine.begin() as conn:
            await conn.execute(sandboxes.delete().where(sandboxes.c.id.in_(sandbox_ids)))

    async def claim(self, key_id: str, idempotency_key: str, sandbox_id: str) -> str:
        """Record that ``idempotency_key`` made ``sandbox_id``; returns the sandbox the key
        names, which is another one if a concurrent create claimed it first."""
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    idempotency.insert().values(
                        key_id=key_id,
                        idempotency_key=idempotency_key,
                        sandbox_id=sandbox_id,
                        created_at=time.time(),
                    )
                )
            return sandbox_id
        except sa.exc.IntegrityError:
            claimed = await self.by_idempotency_key(key_id, idempotency_key)
            return claimed or sandbox_id

    async def by_idempotency_key(self, key_id: str, idempotency_key: str) -> str | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(idempotency.c.sandbox_id).where(
                        idempotency.c.key_id == key_id,
                        idempotency.c.idempotency_key == idempotency_key,
                    )
                )
            ).first()
        return row.sandbox_id if row else None

    async def forget_idempotency_key(self, key_id: str, idempotency_key: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                idempotency.delete().where(
                    idempotency.c.key_id == key_id, idempotency.c.idempotency_key == idempotency_key
                )
            )
