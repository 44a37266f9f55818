"""Opening the store: the URL from settings, the engine, and migrations on open."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from . import keys, sandboxes, schema


def database_url(data_dir: Path, url: str = "") -> str:
    """``url`` if given (``postgresql://…`` works as is), else SQLite in the data dir."""
    if not url:
        return f"sqlite+aiosqlite:///{data_dir / 'bilik.db'}"
    if url.startswith(("postgres://", "postgresql://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    return url


class Store:
    """The database of one bilik installation. Open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.keys = keys.KeyStore(engine)
        self.sandboxes = sandboxes.SandboxStore(engine)

    @classmethod
    async def open(cls, url: str) -> Store:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[1]
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url)
        async with engine.begin() as conn:
            await conn.run_sync(schema.migrate)
        if url.startswith("sqlite"):
            os.chmod(path, 0o600)  # it holds key hashes
        return cls(engine)

    async def close(self) -> None:
        await self.engine.dispose()
