"""The sandbox service: every sandbox's lifecycle, between the API and the runtime.

A create makes several decisions: which image and limits its template gives, whether a pooled
sandbox fits or a new one is made, whether a concurrent repeat with the same Idempotency-Key
got there first, what to undo when a step after the runtime's fails. And the store (who owns
what) must follow the runtime (what runs). Each is decided here, once, so that the API's
handlers only parse, make one call and render, and a reader follows a create from the handler
to the runtime without meeting the same decision twice. Every move between states goes
through :func:`.states.transition`, where the states later features add plug in.

A sandbox's end (a kill, or its timeout reached) begins here too: from that moment it is gone
to its clients (the sandbox plane is told at once, before the runtime is asked to kill it), so
a client that probes it while the kill is under way hears that it is gone.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from ..runtime import (
    Limits,
    RuntimeFailure,
    SandboxInfo,
    SandboxNotFound,
    SandboxSpec,
    new_sandbox_id,
)
from ..runtime.base import LogLine, Runtime
from ..store import Store
from ..store.sandboxes import SandboxRow
from ..templates.service import TemplateService
from . import states
from .metrics import BUCKET_S, MetricsHistory, Sample
from .pool import WarmPool
from .states import CREATING, KILLED, RUNNING, State

log = logging.getLogger("bilik.sandboxes")

T = TypeVar("T")

# Called once a create is recorded as its key's: (sandbox id, envd access token, key id). The
# sandbox plane routes to it from then on, before its next read of the store.
Owned = Callable[[str, str, str], None]
# Called (with its id) the moment a sandbox's end begins: the sandbox plane stops routing to it.
Ending = Callable[[str], None]
# Entered once a create knows how many sandboxes its key runs and what it asks for: raises
# (nothing is made) if the key's caps refuse it, else counts the create as under way until
# it is over.
Admit = Callable[[int, Limits], AbstractContextManager[None]]


@dataclasses.dataclass(frozen=True)
class CreateRequest:
    key_id: str
    template: str  # a template's name or id
    tag: str = ""  # the template's build tagged so ("" for its latest)
    timeout_s: int = 300
    cpu: float | None = None  # None: the template's
    memory_mb: int | None = None
    disk_mb: int | None = None
    internet: bool = True
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    allow_out: tuple[str, ...] = ()
    deny_out: tuple[str, ...] = ()
    access_token: str = ""  # what its envd is to ask of clients (a pooled one has its own)
    idempotency_key: str | None = None


@dataclasses.dataclass(frozen=True)
class Sandbox:
    """A key's sandbox: what the runtime says of it, and what the store keeps for its owner."""

    info: SandboxInfo
    row: SandboxRow


_EPOCH = datetime.fromtimestamp(0, UTC)


def start_micros(started_at: float) -> int:
    """A start time in whole microseconds, as E2B's RFC 3339 times carry it: what lists sort,
    page and filter by."""
    return (datetime.fromtimestamp(started_at, UTC) - _EPOCH) // timedelta(microseconds=1)


@dataclasses.dataclass(frozen=True)
class Listing:
    """Which of a key's sandboxes a list wants, and in which order: newest first (E2B's
    default) or oldest first, by start time then id."""

    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    template: str | None = None
    started_after: int | None = None  # (microseconds, included)
    oldest_first: bool = False
    # Only those after this (start microseconds, id) in the order: a page's last, whether or
    # not it still runs.
    after: tuple[int, str] | None = None

    def key(self, row: SandboxRow) -> tuple[int, str]:
        """Where ``row`` sorts (the lower, the earlier)."""
        micros = start_micros(row.started_at)
        return (micros if self.oldest_first else -micros, row.id)

    def wants(self, row: SandboxRow) -> bool:
        return (
            all(row.metadata.get(k) == v for k, v in self.metadata.items())
            and (not self.template or row.template_id == self.template)
            and (self.started_after is None or start_micros(row.started_at) >= self.started_after)
            and (self.after is None or self.key(row) > self._cursor_key(self.after))
        )

    def _cursor_key(self, after: tuple[int, str]) -> tuple[int, str]:
        micros, sandbox_id = after
        return (micros if self.oldest_first else -micros, sandbox_id)


class IdempotencyConflict(Exception):
    """A concurrent create with the same Idempotency-Key won, and its sandbox is gone."""


class _LostRace(Exception):
    """Another create with the same Idempotency-Key claimed it first."""


class SandboxService:
    def __init__(
        self,
        runtime: Runtime,
        store: Store,
        templates: TemplateService,
        pool: WarmPool | None = None,
        owned: Owned | None = None,
        ending: Ending | None = None,
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.templates = templates
        self.pool = pool
        self.owned: Owned = owned or (lambda sandbox_id, token, key_id: None)
        self.ending: Ending = ending or (lambda sandbox_id: None)
        self.metrics = MetricsHistory(runtime.settings.caps.lifetime_s)
        # Sandboxes whose end has begun: gone to every caller, though the runtime may still
        # be killing them.
        self._ending: set[str] = set()

    # -- the server's own work -----------------------------------------------------------

    async def start(self) -> None:
        """Settle the store from the runtime's truth, then fill the warm pool. A sandbox left
        ``creating`` by a stop was never answered for: it is killed. One the runtime no longer
        has is forgotten."""
        live = {info.sandbox_id for info in await self.runtime.list()}
        for sandbox_id, state in (await self.store.sandboxes.states()).items():
            if state == CREATING:
                log.warning("sandbox %s was cut short mid-create by a stop: killed", sandbox_id)
                await self._undo(sandbox_id, CREATING, made=sandbox_id in live)
            elif sandbox_id not in live:
                await states.transition(self.store.sandboxes, sandbox_id, RUNNING, KILLED)
        if self.pool is not None:
            await self.pool.start()

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def reap(self) -> list[str]:
        """Kill the sandboxes past their end time; their ids. A key's sandbox ends for its
        clients before the runtime kills it, and once its end has come it is killed even if
        its end moves meanwhile (a timeout set in that moment comes too late)."""
        now = time.time()
        due = [i.sandbox_id for i in await self.runtime.list() if i.end_at <= now]
        owned = set(await self.store.sandboxes.running()) if due else set()
        due = [sandbox_id for sandbox_id in due if sandbox_id in owned]
        for sandbox_id in due:
            self._end(sandbox_id)
        reaped = await self.runtime.reap_expired()
        for sandbox_id in set(due) - set(reaped):
            with contextlib.suppress(SandboxNotFound):
                await self.runtime.kill(sandbox_id)
            reaped.append(sandbox_id)
        for sandbox_id in reaped:
            await states.transition(self.store.sandboxes, sandbox_id, RUNNING, KILLED)
            self._ending.discard(sandbox_id)
        return reaped

    def _end(self, sandbox_id: str) -> None:
        """The sandbox's end begins: no caller reaches it from now on."""
        self._ending.add(sandbox_id)
        self.ending(sandbox_id)
        self.metrics.forget(sandbox_id)

    async def sample(self) -> None:
        """Add a sample of every running sandbox's usage to its history."""
        listed_at = time.time()
        started = await self.store.sandboxes.running()
        await self._sample(started)
        self.metrics.keep_only(started, listed_at)

    async def _sample(self, started: dict[str, float]) -> None:
        """Sample the sandboxes ``started`` names (with their start times)."""
        found = await self.runtime.counters(list(started))
        at = time.time()
        for sandbox_id, counters in found.items():
            if sandbox_id not in self._ending:
                self.metrics.record(sandbox_id, counters, at, started[sandbox_id])

    async def sample_forever(self) -> None:
        """:meth:`sample` every :data:`.metrics.BUCKET_S` for as long as the server runs."""
        while True:
            began = time.monotonic()
            try:
                await self.sample()
            except Exception:  # the sampler must outlive any one failure
                log.exception("metrics sampler pass failed")
            await asyncio.sleep(max(0.0, BUCKET_S - (time.monotonic() - began)))

    # -- create ----------------------------------------------------------------------------

    async def create(self, want: CreateRequest, admit: Admit) -> Sandbox:
        """The sandbox ``want`` asks for, recorded as its key's; or, for a repeat of a create
        with the same Idempotency-Key whose sandbox still runs, that sandbox."""
        ikey = want.idempotency_key
        if ikey:
            if done := await self._repeat(want.key_id, ikey):
                return done
            # Its sandbox is gone (or there never was one): this create starts afresh.
            await self.store.sandboxes.forget_idempotency_key(want.key_id, ikey)
        running = await self.count(want.key_id)
        found = await self.templates.resolve(want.template, want.tag, key_id=want.key_id)
        limits = dataclasses.replace(
            found.limits,
            cpu=found.limits.cpu if want.cpu is None else want.cpu,
            memory_mb=found.limits.memory_mb if want.memory_mb is None else want.memory_mb,
            disk_mb=found.limits.disk_mb if want.disk_mb is None else want.disk_mb,
        )
        spec = SandboxSpec(
            template=found.image,
            limits=limits,
            allow_out=want.allow_out,
            deny_out=want.deny_out,
            timeout_s=want.timeout_s,
            internet=want.internet,
            env=want.env,
            metadata=want.metadata,
            access_token=want.access_token,
        )
        with admit(running, limits):
            return await self._create(want, spec)

    async def _create(self, want: CreateRequest, spec: SandboxSpec) -> Sandbox:
        """Make the sandbox, from the pool or anew, and record who owns it; or make nothing.
        Each attempt is recorded ``creating`` before it acts, so a crash leaves a row that the
        next start settles."""
        template = f"{want.template}:{want.tag}" if want.tag else want.template
        while True:
            member = self.pool.take(spec) if self.pool is not None else None
            sandbox_id = member.sandbox_id if member else new_sandbox_id()
            token = member.access_token if member else spec.access_token
            row = SandboxRow(
                sandbox_id, want.key_id, template, spec.metadata, token, time.time(), CREATING
            )
            # (A pool member runs already: out of the pool, it is this create's to undo.)
            made = member is not None
            state: State = CREATING
            try:
                await self.store.sandboxes.add(row)
                if member is not None:
                    handing = self.runtime.hand_over(sandbox_id, spec.timeout_s, spec.metadata)
                    info = await _finish(handing)
                else:
                    info = await self.runtime.create(dataclasses.replace(spec, sandbox_id=row.id))
                    made = True
                await states.transition(
                    self.store.sandboxes, row.id, CREATING, RUNNING, started_at=info.created_at
                )
                state = RUNNING
                row = dataclasses.replace(row, state=state, started_at=info.created_at)
                if want.idempotency_key:
                    winner = await self.store.sandboxes.claim(
                        want.key_id, want.idempotency_key, sandbox_id
                    )
                    if winner != sandbox_id:  # a concurrent repeat got there first: keep its one
                        raise _LostRace
            except SandboxNotFound as e:
                await _shielded(self._undo(sandbox_id, state, made=made))
                if member is not None and e.sandbox_id == sandbox_id:
                    # It died (or the reaper took it) while it waited: try the next.
                    log.info("warm pool: %s no longer runs; dropped", sandbox_id)
                    continue
                raise
            except BaseException as e:
                # A sandbox no one owns, or a duplicate, must not live on.
                await _shielded(self._undo(sandbox_id, state, made=made))
                if not isinstance(e, _LostRace):
                    raise
                if done := await self._repeat(want.key_id, want.idempotency_key or ""):
                    return done
                raise IdempotencyConflict(
                    "a concurrent create with this Idempotency-Key did not finish; try again"
                ) from None
            self.owned(sandbox_id, token, want.key_id)
            return Sandbox(info, row)

    async def _undo(self, sandbox_id: str, state: State, *, made: bool) -> None:
        """Kill a sandbox whose create failed (if it was made) and forget it: the only undo
        above the runtime's own (a failed ``runtime.create`` leaves nothing). Reports, never
        raises: the create's own failure is what its caller hears of."""
        if made:
            try:
                await self.runtime.kill(sandbox_id)
            except SandboxNotFound:
                pass
            except RuntimeFailure as e:
                log.error("undoing the create of %s: the kill failed: %s", sandbox_id, e)
        try:
            await states.transition(self.store.sandboxes, sandbox_id, state, KILLED)
        except Exception:
            # (its row, if any is left, is settled by the next start)
            log.exception("undoing the create of %s: its record stays", sandbox_id)

    async def _repeat(self, key_id: str, idempotency_key: str) -> Sandbox | None:
        """The sandbox a create with this Idempotency-Key made, if it still runs."""
        sandbox_id = await self.store.sandboxes.by_idempotency_key(key_id, idempotency_key)
        if sandbox_id is None:
            return None
        try:
            return await self.get(key_id, sandbox_id)
        except SandboxNotFound:
            return None

    # -- a key's sandboxes -----------------------------------------------------------------

    async def get(self, key_id: str, sandbox_id: str) -> Sandbox:
        """The sandbox, if ``key_id`` owns it and the runtime still has it; else
        SandboxNotFound (another key's sandbox is as good as missing)."""
        row = await self.store.sandboxes.get(sandbox_id, key_id)
        live = row is not None and row.state == RUNNING and sandbox_id not in self._ending
        info = await self._live(row) if row is not None and live else None
        if row is None or info is None:
            raise SandboxNotFound(sandbox_id)
        return Sandbox(info, row)

    async def _live(self, row: SandboxRow) -> SandboxInfo | None:
        """What the runtime says of a running sandbox's row; None, and the row forgotten, if
        the runtime no longer has it (killed from the command line, reaped by another
        process): the one place the store follows the runtime while the server runs."""
        try:
            return await self.runtime.inspect(row.id)
        except SandboxNotFound:
            await states.transition(self.store.sandboxes, row.id, RUNNING, KILLED)
            return None

    async def count(self, key_id: str) -> int:
        """How many of the key's sandboxes the runtime still has (creates under way are the
        caller's to count)."""
        rows = await self.store.sandboxes.of_key(key_id)
        return sum([await self._live(r) is not None for r in rows if r.state == RUNNING])

    async def list(self, key_id: str, wanted: Listing) -> AsyncIterator[Sandbox]:
        """The key's running sandboxes that ``wanted`` asks for, in its order; each is looked
        up in the runtime only when the caller gets to it."""
        rows = [
            r
            for r in await self.store.sandboxes.of_key(key_id)
            if r.state == RUNNING and r.id not in self._ending and wanted.wants(r)
        ]
        rows.sort(key=wanted.key)
        for row in rows:
            info = await self._live(row)
            if info is not None and info.state == "running":
                yield Sandbox(info, row)

    async def kill(self, key_id: str, sandbox_id: str) -> None:
        sandbox = await self.get(key_id, sandbox_id)
        self._end(sandbox_id)
        try:
            with contextlib.suppress(SandboxNotFound):
                await self.runtime.kill(sandbox_id)
            await states.transition(self.store.sandboxes, sandbox.row.id, RUNNING, KILLED)
        finally:
            self._ending.discard(sandbox_id)

    async def set_timeout(self, key_id: str, sandbox_id: str, timeout_s: int) -> Sandbox:
        """The sandbox, ending ``timeout_s`` from now (sooner or later than it would)."""
        sandbox = await self.get(key_id, sandbox_id)
        info = await self.runtime.set_timeout(sandbox_id, timeout_s)
        return Sandbox(info, sandbox.row)

    async def extend(self, key_id: str, sandbox_id: str, timeout_s: int | None) -> Sandbox:
        """The sandbox, ending no sooner than ``timeout_s`` from now (if that is given): a
        connect or a refresh only ever moves a sandbox's end later, as on E2B."""
        sandbox = await self.get(key_id, sandbox_id)
        if timeout_s is None or time.time() + timeout_s <= sandbox.info.end_at:
            return sandbox
        info = await self.runtime.set_timeout(sandbox_id, timeout_s)
        return Sandbox(info, sandbox.row)

    async def usage(
        self, key_id: str, sandbox_id: str, start: float, end: float
    ) -> builtins.list[Sample]:
        """The sandbox's usage samples from ``start`` to ``end`` (unix seconds), oldest first.
        A sandbox not sampled yet is sampled now, so a first look finds its usage."""
        await self._sampled(await self.get(key_id, sandbox_id))
        return self.metrics.samples(sandbox_id, start, end)

    async def latest_usage(self, key_id: str, sandbox_ids: Collection[str]) -> dict[str, Sample]:
        """The latest usage sample of each of ``sandbox_ids`` that is the key's and runs (the
        others are left out)."""
        found: dict[str, Sample] = {}
        for sandbox_id in sandbox_ids:
            try:
                await self._sampled(await self.get(key_id, sandbox_id))
            except SandboxNotFound:
                continue
            if (latest := self.metrics.latest(sandbox_id)) is not None:
                found[sandbox_id] = latest
        return found

    async def _sampled(self, sandbox: Sandbox) -> None:
        """Sample the sandbox now if the sampler has not yet."""
        if not self.metrics.has(sandbox.row.id):
            await self._sample({sandbox.row.id: sandbox.row.started_at})

    async def logs(self, key_id: str, sandbox_id: str) -> tuple[Sandbox, builtins.list[LogLine]]:
        """The sandbox, and its log: what its PID 1 and its start command wrote, oldest first."""
        sandbox = await self.get(key_id, sandbox_id)
        return sandbox, await self.runtime.logs(sandbox_id)


async def _finish(step: Awaitable[T]) -> T:
    """``step``'s result; if the caller is cancelled meanwhile, ``step`` still runs to its end
    first (its caller's undo then knows what it did), and the cancel goes on."""
    task = asyncio.ensure_future(step)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


async def _shielded(undo: Awaitable[None]) -> None:
    """Run an undo to its end even if the create is cancelled again meanwhile."""
    await _finish(undo)
