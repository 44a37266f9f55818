"""The store on both databases: migrations, and API keys stored only as hashes."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import sqlalchemy as sa

from bilik.store import KeyNotFound, Store, database_url
from bilik.store.schema import MIGRATIONS, api_keys, schema_version


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return database_url(tmp_path)
    return database_url(tmp_path, request.getfixturevalue("postgres_url"))


@pytest_asyncio.fixture
async def store(url: str) -> AsyncIterator[Store]:
    store = await Store.open(url)
    async with store.engine.begin() as conn:  # each test starts from an empty table
        await conn.execute(api_keys.delete())
    yield store
    await store.close()


async def test_migrations_run_once(url: str) -> None:
    for _ in range(2):  # opening again finds the schema current and changes nothing
        store = await Store.open(url)
        async with store.engine.connect() as conn:
            versions = (await conn.execute(sa.select(schema_version.c.version))).all()
        await store.close()
        assert [v.version for v in versions] == [len(MIGRATIONS)]


async def test_keys_are_e2b_shaped_and_stored_only_as_hashes(store: Store) -> None:
    record, key = await store.keys.create("ci")
    assert re.fullmatch(r"e2b_[0-9a-f]{40}", key)
    assert key.startswith(record.prefix) and record.active
    async with store.engine.connect() as conn:
        stored = (await conn.execute(sa.select(api_keys))).one()
    assert key not in [str(v) for v in stored]
    assert (await store.keys.verify(key)) == record
    assert [k.id for k in await store.keys.list()] == [record.id]


async def test_revoked_and_malformed_keys_do_not_verify(store: Store) -> None:
    record, key = await store.keys.create("soon revoked")
    other, other_key = await store.keys.create("stays")
    revoked = await store.keys.revoke(record.id)
    assert not revoked.active
    assert await store.keys.verify(key) is None
    assert await store.keys.verify(other_key) == other
    for bad in ("", "e2b_", key.upper(), key + "0", "x" * 10_000, "e2b_' OR 1=1 --" + "0" * 26):
        assert await store.keys.verify(bad) is None
    assert await store.keys.any_active()
    await store.keys.revoke(other.id)
    assert not await store.keys.any_active()
    assert (await store.keys.revoke(record.id)).revoked_at == revoked.revoked_at  # idempotent
    with pytest.raises(KeyNotFound, match="'nope' not found"):
        await store.keys.revoke("nope")
