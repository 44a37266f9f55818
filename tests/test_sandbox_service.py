"""The sandbox service's own decisions, against the real runtime and a real store: which state
moves it allows, that a create it cannot record leaves no sandbox, that racing repeats of one
Idempotency-Key get one sandbox, and that a start settles what a stop cut short."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from bilik.runtime import Limits, LocalRuntime, SandboxSpec
from bilik.sandboxes import CreateRequest, SandboxService, TransitionRefused, warm_pool
from bilik.sandboxes.states import CREATING, KILLED, RUNNING, transition
from bilik.store import Store, database_url, schema
from bilik.store.sandboxes import SandboxRow
from bilik.templates import TemplateService
from bilik.templates.defaults import BASE


def _admit(running: int, limits: Limits) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def _row(sandbox_id: str, state: str) -> SandboxRow:
    return SandboxRow(sandbox_id, "key1", "base", {}, "token", time.time(), state)


def _want(idempotency_key: str | None = None) -> CreateRequest:
    return CreateRequest(
        key_id="key1",
        template="base",
        timeout_s=60,
        access_token=secrets.token_hex(16),
        idempotency_key=idempotency_key,
    )


@pytest_asyncio.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else ""
    store = await Store.open(database_url(tmp_path, url))
    async with store.engine.begin() as conn:  # each test starts from empty tables
        for table in (schema.sandboxes, schema.idempotency):
            await conn.execute(table.delete())
    yield store
    await store.close()


@pytest_asyncio.fixture
async def service(runtime: LocalRuntime, store: Store, tmp_path: Path) -> SandboxService:
    return SandboxService(runtime, store, TemplateService(runtime, store, tmp_path))


async def _live_ids(runtime: LocalRuntime) -> set[str]:
    return {info.sandbox_id for info in await runtime.list()}


async def test_only_the_tables_moves_are_made(store: Store) -> None:
    await store.sandboxes.add(_row("sbx1", CREATING))
    for old, new in ((CREATING, CREATING), (RUNNING, CREATING), (KILLED, RUNNING)):
        with pytest.raises(TransitionRefused, match="not an allowed move"):
            await transition(store.sandboxes, "sbx1", old, new)  # type: ignore[arg-type]
    assert await store.sandboxes.states() == {"sbx1": CREATING}
    await transition(store.sandboxes, "sbx1", CREATING, RUNNING)
    assert await store.sandboxes.states() == {"sbx1": RUNNING}
    # Of two concurrent moves from one state, one is refused.
    with pytest.raises(TransitionRefused, match="no longer creating"):
        await transition(store.sandboxes, "sbx1", CREATING, RUNNING)
    await transition(store.sandboxes, "sbx1", RUNNING, KILLED)
    assert await store.sandboxes.states() == {}


class _Broken(Exception):
    pass


@pytest.mark.parametrize("failing", ["add", "set_state", "claim"])
async def test_a_create_whose_record_fails_leaves_no_sandbox(
    runtime: LocalRuntime,
    service: SandboxService,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    before = await _live_ids(runtime)

    async def broken(*args: object, **kwargs: object) -> None:
        raise _Broken(failing)

    monkeypatch.setattr(store.sandboxes, failing, broken)
    with pytest.raises(_Broken):
        await service.create(_want(idempotency_key="job"), _admit)
    monkeypatch.undo()
    assert await _live_ids(runtime) == before
    assert await store.sandboxes.states() == {}


async def test_a_cancelled_create_leaves_no_sandbox(
    runtime: LocalRuntime, service: SandboxService, store: Store
) -> None:
    before = await _live_ids(runtime)
    task = asyncio.create_task(service.create(_want(), _admit))
    while not await store.sandboxes.states():  # (recorded creating: the runtime is at work)
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _live_ids(runtime) == before
    assert await store.sandboxes.states() == {}


async def test_racing_repeats_of_an_idempotency_key_get_one_sandbox(
    runtime: LocalRuntime, service: SandboxService, store: Store
) -> None:
    before = await _live_ids(runtime)
    made = await asyncio.gather(
        *(service.create(_want(idempotency_key="race"), _admit) for _ in range(3)),
        return_exceptions=True,
    )
    ids = {m.info.sandbox_id for m in made if not isinstance(m, BaseException)}
    try:
        assert len(ids) == 1, made
        assert await _live_ids(runtime) - before == ids
        assert await store.sandboxes.states() == dict.fromkeys(ids, RUNNING)
        again = await service.create(_want(idempotency_key="race"), _admit)
        assert {again.info.sandbox_id} == ids
    finally:
        for sandbox_id in ids:
            await service.kill("key1", sandbox_id)
    assert await _live_ids(runtime) == before
    assert await store.sandboxes.states() == {}


async def test_a_start_settles_what_a_stop_cut_short(
    runtime: LocalRuntime, service: SandboxService, store: Store
) -> None:
    # A create a stop cut short after the runtime made its sandbox, one cut short before,
    # and a running sandbox the runtime no longer has: all forgotten, the first one killed.
    half_made = await runtime.create(SandboxSpec(timeout_s=60))
    await store.sandboxes.add(_row(half_made.sandbox_id, CREATING))
    await store.sandboxes.add(_row("notmadeyet01", CREATING))
    await store.sandboxes.add(_row("goneaway0001", RUNNING))
    # A running one the runtime has stays.
    kept = await service.create(_want(), _admit)
    try:
        await service.start()
        assert await store.sandboxes.states() == {kept.info.sandbox_id: RUNNING}
        assert not await runtime.is_running(half_made.sandbox_id)
        assert await runtime.is_running(kept.info.sandbox_id)
    finally:
        await service.kill("key1", kept.info.sandbox_id)
        with contextlib.suppress(Exception):
            await runtime.kill(half_made.sandbox_id)


async def test_a_pooled_sandbox_whose_record_fails_is_killed(
    runtime: LocalRuntime, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    templates = TemplateService(runtime, store, tmp_path)
    pool = warm_pool(runtime, templates, {BASE: 1}, print)
    service = SandboxService(runtime, store, templates, pool)
    before = await _live_ids(runtime)
    await service.start()
    try:
        deadline = time.monotonic() + 60
        while pool.ready() != {BASE: 1}:
            assert time.monotonic() < deadline, "the pool never filled"
            await asyncio.sleep(0.05)
        (member,) = await _live_ids(runtime) - before

        async def broken(*args: object, **kwargs: object) -> None:
            raise _Broken("add")

        monkeypatch.setattr(store.sandboxes, "add", broken)
        with pytest.raises(_Broken):
            await service.create(_want(), _admit)
        monkeypatch.undo()
        assert member not in await _live_ids(runtime)  # taken from the pool, then killed
        assert await store.sandboxes.states() == {}
        # The next create gets the successor.
        deadline = time.monotonic() + 60
        while pool.ready() != {BASE: 1}:
            assert time.monotonic() < deadline, "the pool never made a successor"
            await asyncio.sleep(0.05)
        (successor,) = await _live_ids(runtime) - before
        made = await service.create(_want(), _admit)
        assert made.info.sandbox_id == successor
        await service.kill("key1", successor)
    finally:
        await service.close()
    assert await _live_ids(runtime) == before
