"""Opening the store: the URL from settings, the engine, and migrations on open."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from . import keys, sandboxes, schema, templates


def database_url(data_dir: Path, url: str = "") -> str:
    """``url`` if given (``postgresql://…`` works as is), else SQLite in the data dir."""
    if not url:
        return f"sqlite+aiosqlite:///{data_dir / 'bilik.db'}"
    if url.startswith(("postgres://", "postgresql://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Write-ahead logging: readers never wait for the writer, and a commit is not an fsync
    # (the log is synced at checkpoints). A crash may lose the last commits, never corrupt.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class Store:
    """The database of one bilik installation. Open with :meth:`open`, close with :meth:`close`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.keys = keys.KeyStore(engine)
        self.sandboxes = sandboxes.SandboxStore(engine)
        self.templates = templates.TemplateStore(engine)

    @classmethod
    async def open(cls, url: str) -> Store:
        if url.startswith("sqlite"):
            path = url.split("///", 1)[1]
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url)
        if url.startswith("sqlite"):
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        async with engine.begin() as conn:
            await conn.run_sync(schema.migrate)
        if url.startswith("sqlite"):
            os.chmod(path, 0o600)  # it holds key hashes
        return cls(engine)

    async def close(self) -> None:
        await self.engine.dispose()
