"""API keys in E2B's format (``e2b_`` + 40 lowercase hex), so every SDK accepts them.

Only a SHA-256 of each key is stored; the key itself is returned once, by :meth:`KeyStore.create`.
Each key acts for a team (E2B's unit of ownership): sandboxes and templates belong to the team,
so every key of a team sees the same ones, and a team's caps are those of the key that made it
(a key made by a key copies its caps: no key can make one that may do more than itself).
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
    team_id: str = ""  # the team the key acts for ("": its own id, a team of its own)
    suffix: str = ""  # the key's last characters (not known for keys made before they were kept)

    def __post_init__(self) -> None:
        if not self.team_id:
            object.__setattr__(self, "team_id", self.id)

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
    return ApiKey(
        row.id, row.name, row.prefix, row.created_at, row.revoked_at, caps, row.team_id, row.suffix
    )


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
    api_keys.c.team_id,
    api_keys.c.suffix,
)
# How many of a key's last characters are kept (E2B's masked suffix).
SUFFIX_CHARS = 4


class KeyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(
        self, name: str, caps: KeyCaps | None = None, team_id: str | None = None
    ) -> tuple[ApiKey, str]:
        """Make a key (in ``team_id``'s team, else a team of its own); returns its record and
        the key itself (never stored, never shown again)."""
        key = generate_key()
        key_id = secrets.token_hex(8)
        record = ApiKey(
            key_id,
            name,
            key[: len(PREFIX) + 6],
            time.time(),
            None,
            caps or KeyCaps(),
            team_id or key_id,
            key[-SUFFIX_CHARS:],
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
                    team_id=record.team_id,
                    suffix=record.suffix,
                    **dataclasses.asdict(record.caps),
                )
            )
        return record, key

    async def list(self, team_id: str | None = None, *, active: bool = False) -> list[ApiKey]:
        """Every key (of ``team_id``'s team only, if given; the active ones only, if asked)."""
        query = sa.select(*_COLUMNS).order_by(api_keys.c.created_at)
        if team_id is not None:
            query = query.where(api_keys.c.team_id == team_id)
        if active:
            query = query.where(api_keys.c.revoked_at.is_(None))
        async with self.engine.connect() as conn:
            return [_row(r) for r in await conn.execute(query)]

    async def revoke(self, key_id: str, team_id: str | None = None) -> ApiKey:
        """Revoke a key (KeyNotFound unless it is in ``team_id``'s team, when given). Revoking a
        revoked key changes nothing."""
        owned = [api_keys.c.id == key_id]
        if team_id is not None:
            owned.append(api_keys.c.team_id == team_id)
        async with self.engine.begin() as conn:
            row = (await conn.execute(sa.select(*_COLUMNS).where(*owned))).first()
            if row is None:
                raise KeyNotFound(key_id)
            await conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
            row = (await conn.execute(sa.select(*_COLUMNS).where(*owned))).one()
            return _row(row)

    async def rename(self, key_id: str, team_id: str, name: str) -> ApiKey:
        """Give an active key of ``team_id``'s team a new name (KeyNotFound if there is none)."""
        owned = (
            api_keys.c.id == key_id,
            api_keys.c.team_id == team_id,
            api_keys.c.revoked_at.is_(None),
        )
        async with self.engine.begin() as conn:
            result = await conn.execute(api_keys.update().where(*owned).values(name=name))
            if result.rowcount == 0:
                raise KeyNotFound(key_id)
            return _row((await conn.execute(sa.select(*_COLUMNS).where(*owned))).one())

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
