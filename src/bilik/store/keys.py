"""API keys in E2B's format (``e2b_`` + 40 lowercase hex), so every SDK accepts them.

Only a SHA-256 of each key is stored; the key itself is returned once, by :meth:`KeyStore.create`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from .schema import api_keys

PREFIX = "e2b_"


class KeyNotFound(LookupError):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"API key {key_id!r} not found")
        self.key_id = key_id


@dataclasses.dataclass(frozen=True)
class KeyCaps:
    """What one key may do; None: no cap beyond the server's own."""

    max_sandboxes: int | None = None
    creates_per_minute: int | None = None
    max_timeout_s: int | None = None
    max_cpu: int | None = None
    max_memory_mb: int | None = None


@dataclasses.dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    prefix: str  # the first characters of the key, to tell keys apart in listings
    created_at: float
    revoked_at: float | None
    caps: KeyCaps = dataclasses.field(default_factory=lambda: KeyCaps())

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def generate_key() -> str:
    return PREFIX + secrets.token_hex(20)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _row(row: Any) -> ApiKey:
    caps = KeyCaps(
        row.max_sandboxes,
        row.creates_per_minute,
        row.max_timeout_s,
        row.max_cpu,
        row.max_memory_mb,
    )
    return ApiKey(row.id, row.name, row.prefix, row.created_at, row.revoked_at, caps)


_COLUMNS = (
    api_keys.c.id,
    api_keys.c.name,
    api_keys.c.prefix,
    api_keys.c.created_at,
    api_keys.c.revoked_at,
    api_keys.c.max_sandboxes,
    api_keys.c.creates_per_minute,
    api_keys.c.max_timeout_s,
    api_keys.c.max_cpu,
    api_keys.c.max_memory_mb,
)


class KeyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(self, name: str, caps: KeyCaps | None = None) -> tuple[ApiKey, str]:
        """Make a key; returns its record and the key itself (never stored, never shown again)."""
        key = generate_key()
        record = ApiKey(
            secrets.token_hex(8), name, key[: len(PREFIX) + 6], time.time(), None, caps or KeyCaps()
        )
        async with self.engine.begin() as conn:
            await conn.execute(
                api_keys.insert().values(
                    id=record.id,
                    name=record.name,
                    key_hash=_hash(key),
                    prefix=record.prefix,
                    created_at=record.created_at,
                    revoked_at=None,
                    **dataclasses.asdict(record.caps),
                )
            )
        return record, key

    async def list(self) -> list[ApiKey]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.select(*_COLUMNS).order_by(api_keys.c.created_at))
            return [_row(r) for r in rows]

    async def revoke(self, key_id: str) -> ApiKey:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
            if result.rowcount == 0:
                exists = await conn.execute(sa.select(api_keys.c.id).where(api_keys.c.id == key_id))
                if exists.first() is None:
                    raise KeyNotFound(key_id)
            row = (await conn.execute(sa.select(*_COLUMNS).where(api_keys.c.id == key_id))).one()
            return _row(row)

    async def verify(self, key: str) -> ApiKey | None:
        """The active key matching ``key``, or None. Malformed keys never reach the database."""
        if not (key.startswith(PREFIX) and len(key) == len(PREFIX) + 40):
            return None
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(*_COLUMNS).where(
                        api_keys.c.key_hash == _hash(key), api_keys.c.revoked_at.is_(None)
                    )
                )
            ).first()
            return _row(row) if row else None

    async def any_active(self) -> bool:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(api_keys.c.id).where(api_keys.c.revoked_at.is_(None)).limit(1)
                )
            ).first()
            return row is not None
