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
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import TypeVar, cast

from ..runtime import (
    Limits,
    RuntimeFailure,
    SandboxInfo,
    SandboxNotFound,
    SandboxSpec,
    new_sandbox_id,
)
from ..runtime.base import LogLine, Runtime
from ..runtime.errors import SandboxNotPaused, SandboxPaused
from ..runtime.faults import fault
from ..store import Store
from ..store.sandboxes import SandboxRow
from ..store.templates import BuildRow, TemplateRow
from ..templates.service import TemplateService, build_image
from . import states
from .lifecycle import Lifecycle, Locks, SingleFlight
from .metrics import BUCKET_S, MetricsHistory, Sample
from .pool import WarmPool
from .states import CREATING, KILLED, PAUSED, PAUSING, RESUMING, RUNNING, State

log = logging.getLogger("bilik.sandboxes")

T = TypeVar("T")

# Called once a create is recorded as its key's: (sandbox id, envd access token, key id). The
# sandbox plane routes to it from then on, before its next read of the store.
Owned = Callable[[str, str, str], None]
# Called (with its id) the moment a sandbox's end begins: the sandbox plane stops routing to it.
# Also the type of the call made when a pause begins: what is under way to it is cut.
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
    lifecycle: Lifecycle = dataclasses.field(default_factory=Lifecycle)


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
    # (E2B's states: "running" covers one on its way to or from a pause too)
    states: frozenset[str] = frozenset({"running"})
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
            shown_state(row.state) in self.states
            and all(row.metadata.get(k) == v for k, v in self.metadata.items())
            and (not self.template or row.template_id == self.template)
            and (self.started_after is None or start_micros(row.started_at) >= self.started_after)
            and (self.after is None or self.key(row) > self._cursor_key(self.after))
        )

    def _cursor_key(self, after: tuple[int, str]) -> tuple[int, str]:
        micros, sandbox_id = after
        return (micros if self.oldest_first else -micros, sandbox_id)


def shown_state(state: str) -> str:
    """A sandbox's state as E2B's API names it: ``paused`` once its pause is done, else
    ``running`` (one pausing is paused only once that is certain; one resuming still is)."""
    return "paused" if state in (PAUSED, RESUMING) else "running"


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
        pausing: Ending | None = None,
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.templates = templates
        self.pool = pool
        self.owned: Owned = owned or (lambda sandbox_id, token, key_id: None)
        self.ending: Ending = ending or (lambda sandbox_id: None)
        self.pausing: Ending = pausing or (lambda sandbox_id: None)
        self.metrics = MetricsHistory(runtime.settings.caps.lifetime_s)
        # Sandboxes whose end has begun: gone to every caller, though the runtime may still
        # be killing them.
        self._ending: set[str] = set()
        # Sandboxes not running (pausing, paused, resuming): the sandbox plane asks
        # :meth:`admit_traffic` of these only, so a running sandbox's request costs no query.
        self._held: set[str] = set()
        self._locks = Locks()
        self._resumes: SingleFlight[Sandbox] = SingleFlight()
        # How many times the runtime was asked to resume a sandbox (operators, and the tests
        # that check that many requests at once make one resume).
        self.resumes = 0
        self.paused_retention_s = runtime.settings.paused_retention_s

    # -- the server's own work -----------------------------------------------------------

    async def start(self) -> None:
        """Settle the store from the runtime's truth, then fill the warm pool. A sandbox left
        ``creating`` by a stop was never answered for: it is killed. One left ``pausing`` or
        ``resuming`` is what the runtime says it is (paused, running, or gone). One the
        runtime no longer has is forgotten."""
        live = {info.sandbox_id: info for info in await self.runtime.list()}
        for sandbox_id, recorded in (await self.store.sandboxes.states()).items():
            info = live.get(sandbox_id)
            state = cast(State, recorded)
            if state == CREATING:
                log.warning("sandbox %s was cut short mid-create by a stop: killed", sandbox_id)
                await self._undo(sandbox_id, CREATING, made=info is not None)
            elif info is None:
                if state != RUNNING:
                    log.warning(
                        "sandbox %s (%s) is gone from the runtime: forgotten", sandbox_id, state
                    )
                await states.transition(self.store.sandboxes, sandbox_id, state, KILLED)
            else:
                await self._settle(sandbox_id, state, info)
        if self.pool is not None:
            await self.pool.start()

    async def _settle(self, sandbox_id: str, state: State, info: SandboxInfo) -> None:
        """Make the row of a sandbox the runtime has say what the runtime says of it."""
        paused = info.state == "paused"
        if paused and state != PAUSED:
            pause = info.pause
            log.warning("sandbox %s was left %s by a stop: it is paused", sandbox_id, state)
            record = {
                "paused_at": pause.paused_at if pause else time.time(),
                "pause_memory": bool(pause.memory and not pause.memory_lost) if pause else False,
            }
            if state == RUNNING:  # (a pause no one recorded: record it in two moves)
                await states.transition(self.store.sandboxes, sandbox_id, RUNNING, PAUSING)
                state = PAUSING
            await states.transition(self.store.sandboxes, sandbox_id, state, PAUSED, record=record)
        elif not paused and state != RUNNING:
            log.warning("sandbox %s was left %s by a stop: it runs", sandbox_id, state)
            if state == PAUSED:
                await states.transition(self.store.sandboxes, sandbox_id, PAUSED, RESUMING)
                state = RESUMING
            await states.transition(
                self.store.sandboxes, sandbox_id, state, RUNNING, record=_RESUMED
            )
        if paused:
            self._held.add(sandbox_id)
            if info.pause is not None and info.pause.memory_lost:
                log.warning(
                    "sandbox %s: its memory did not survive the machine's restart; its files "
                    "did, and its resume boots it afresh",
                    sandbox_id,
                )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def reap(self) -> list[str]:
        """Kill the sandboxes past their end time; their ids. A sandbox made to pause at its
        timeout is paused instead (and killed only if that fails), and a paused one is killed
        once kept the retention. A key's sandbox ends for its clients before the runtime
        kills it, and once its end has come it is killed even if its end moves meanwhile (a
        timeout set in that moment comes too late)."""
        now = time.time()
        listed = await self.runtime.list()
        due = [i.sandbox_id for i in listed if i.end_at <= now and i.state == "running"]
        rows = {r.id: r for r in await self.store.sandboxes.all()}
        for sandbox_id in due:
            row = rows.get(sandbox_id)
            if row is not None and row.state == RUNNING and row.on_timeout == "pause":
                await self._pause_at_timeout(row)
        expired = [
            r
            for r in rows.values()
            if r.state == PAUSED and (r.paused_at or now) + self.paused_retention_s <= now
        ]
        for row in expired:
            log.warning(
                "sandbox %s was kept paused %d s, the retention: killed",
                row.id,
                self.paused_retention_s,
            )
            with contextlib.suppress(SandboxNotFound):
                await self._kill(row.id)
        owned = set(await self.store.sandboxes.running()) if due else set()
        due = [
            sandbox_id
            for sandbox_id in due
            if sandbox_id in owned and rows.get(sandbox_id, _NO_ROW).on_timeout != "pause"
        ]
        for sandbox_id in due:
            self._end(sandbox_id)
        # (one whose timeout pauses it is never the runtime's to kill, even if its end came
        # after ``now``: the next pass pauses it)
        pauses = {r.id for r in rows.values() if r.on_timeout == "pause"}
        reaped = await self.runtime.reap_expired(keep=pauses)
        for sandbox_id in set(due) - set(reaped):
            with contextlib.suppress(SandboxNotFound):
                await self.runtime.kill(sandbox_id)
            reaped.append(sandbox_id)
        for sandbox_id in reaped:
            await states.transition(self.store.sandboxes, sandbox_id, RUNNING, KILLED)
            self._ending.discard(sandbox_id)
        return reaped

    async def _pause_at_timeout(self, row: SandboxRow) -> None:
        """Pause a sandbox its timeout pauses; kill it if that fails (as a timeout would)."""
        try:
            await self._pause(row.id, memory=row.auto_pause_memory, why="its timeout")
        except (SandboxPaused, states.TransitionRefused):
            pass  # (paused already, or another step moved it first)
        except SandboxNotFound:
            pass
        except RuntimeFailure as e:
            log.error("sandbox %s: its pause at its timeout failed (%s): killed", row.id, e)
            with contextlib.suppress(SandboxNotFound):
                await self._kill(row.id)

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

    async def _create(
        self, want: CreateRequest, spec: SandboxSpec, *, pooled: bool = True
    ) -> Sandbox:
        """Make the sandbox, from the pool or anew, and record who owns it; or make nothing.
        Each attempt is recorded ``creating`` before it acts, so a crash leaves a row that the
        next start settles."""
        template = f"{want.template}:{want.tag}" if want.tag else want.template
        while True:
            member = self.pool.take(spec) if self.pool is not None and pooled else None
            sandbox_id = member.sandbox_id if member else new_sandbox_id()
            token = member.access_token if member else spec.access_token
            row = SandboxRow(
                sandbox_id,
                want.key_id,
                template,
                spec.metadata,
                token,
                time.time(),
                CREATING,
                on_timeout=want.lifecycle.on_timeout,
                auto_pause_memory=want.lifecycle.pause_memory,
                auto_resume=want.lifecycle.auto_resume,
                timeout_s=want.timeout_s,
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
        """The sandbox, running or paused (or on its way between), if ``key_id`` owns it and
        the runtime still has it; else SandboxNotFound (another key's sandbox is as good as
        missing)."""
        row = await self.store.sandboxes.get(sandbox_id, key_id)
        live = row is not None and row.state != CREATING and sandbox_id not in self._ending
        info = await self._live(row) if row is not None and live else None
        if row is None or info is None:
            raise SandboxNotFound(sandbox_id)
        return Sandbox(info, row)

    async def running(self, key_id: str, sandbox_id: str) -> Sandbox:
        """The sandbox, as :meth:`get`, if it runs; SandboxPaused if it is paused (or on its
        way to or from a pause): what needs it running is refused, never resumes it."""
        sandbox = await self.get(key_id, sandbox_id)
        if sandbox.row.state != RUNNING:
            raise SandboxPaused(sandbox_id)
        return sandbox

    async def _live(self, row: SandboxRow) -> SandboxInfo | None:
        """What the runtime says of a made sandbox's row; None, and the row forgotten, if
        the runtime no longer has it (killed from the command line, reaped by another
        process): the one place the store follows the runtime while the server runs."""
        try:
            return await self.runtime.inspect(row.id)
        except SandboxNotFound:
            with contextlib.suppress(states.TransitionRefused):
                await states.transition(
                    self.store.sandboxes, row.id, cast(State, row.state), KILLED
                )
            self._held.discard(row.id)
            return None

    async def count(self, key_id: str) -> int:
        """How many of the key's sandboxes run (as E2B counts against a team's cap: a paused
        one does not; creates under way are the caller's to count)."""
        rows = await self.store.sandboxes.of_key(key_id)
        counted = (RUNNING, PAUSING, RESUMING)
        return sum([await self._live(r) is not None for r in rows if r.state in counted])

    async def list(self, key_id: str, wanted: Listing) -> AsyncIterator[Sandbox]:
        """The key's sandboxes that ``wanted`` asks for, in its order; each is looked up in
        the runtime only when the caller gets to it."""
        rows = [
            r
            for r in await self.store.sandboxes.of_key(key_id)
            if r.state != CREATING and r.id not in self._ending and wanted.wants(r)
        ]
        rows.sort(key=wanted.key)
        for row in rows:
            info = await self._live(row)
            if info is not None and info.state in ("running", "paused"):
                yield Sandbox(info, row)

    async def kill(self, key_id: str, sandbox_id: str) -> None:
        """Kill the sandbox, running or paused (a pause or resume under way ends first)."""
        await self.get(key_id, sandbox_id)
        await self._kill(sandbox_id)

    async def _kill(self, sandbox_id: str) -> None:
        async with self._locks.hold(sandbox_id):
            row = await self.store.sandboxes.by_id(sandbox_id)
            if row is None or sandbox_id in self._ending:
                raise SandboxNotFound(sandbox_id)
            self._end(sandbox_id)
            try:
                with contextlib.suppress(SandboxNotFound):
                    await self.runtime.kill(sandbox_id)
                await states.transition(
                    self.store.sandboxes, sandbox_id, cast(State, row.state), KILLED
                )
            finally:
                self._ending.discard(sandbox_id)
                self._held.discard(sandbox_id)

    async def set_timeout(self, key_id: str, sandbox_id: str, timeout_s: int) -> Sandbox:
        """The sandbox, ending ``timeout_s`` from now (sooner or later than it would)."""
        sandbox = await self.running(key_id, sandbox_id)
        info = await self.runtime.set_timeout(sandbox_id, timeout_s)
        return Sandbox(info, sandbox.row)

    async def extend(self, key_id: str, sandbox_id: str, timeout_s: int | None) -> Sandbox:
        """The sandbox, ending no sooner than ``timeout_s`` from now (if that is given): a
        connect or a refresh only ever moves a sandbox's end later, as on E2B."""
        sandbox = await self.running(key_id, sandbox_id)
        if timeout_s is None or time.time() + timeout_s <= sandbox.info.end_at:
            return sandbox
        info = await self.runtime.set_timeout(sandbox_id, timeout_s)
        return Sandbox(info, sandbox.row)

    # -- pause and resume ------------------------------------------------------------------

    async def pause(self, key_id: str, sandbox_id: str, *, memory: bool = True) -> Sandbox:
        """Pause the sandbox: keeping its memory (its processes go on where they were on a
        resume) or only its files (a resume boots it afresh). SandboxPaused if it is paused
        already (or on its way to or from a pause)."""
        await self.get(key_id, sandbox_id)
        return await self._pause(sandbox_id, memory=memory, why="a request")

    async def _pause(self, sandbox_id: str, *, memory: bool, why: str) -> Sandbox:
        async with self._locks.hold(sandbox_id):
            row = await self.store.sandboxes.by_id(sandbox_id)
            if row is None or sandbox_id in self._ending:
                raise SandboxNotFound(sandbox_id)
            if row.state != RUNNING:
                raise SandboxPaused(sandbox_id)
            await states.transition(
                self.store.sandboxes, sandbox_id, RUNNING, PAUSING, record={"pause_memory": memory}
            )
            # From here the plane holds new requests until the pause is done, and what is
            # under way to the sandbox is cut (its answer would never come while it is frozen).
            self._held.add(sandbox_id)
            self.pausing(sandbox_id)
            self.metrics.forget(sandbox_id)
            fault("pause:record")
            try:
                info = await _finish(self.runtime.pause(sandbox_id, memory=memory))
            except SandboxNotFound:
                await states.transition(self.store.sandboxes, sandbox_id, PAUSING, KILLED)
                self._held.discard(sandbox_id)
                self.ending(sandbox_id)
                raise
            except SandboxPaused:
                info = await self.runtime.inspect(sandbox_id)
            except BaseException:
                log.exception("sandbox %s: its pause failed; it runs on", sandbox_id)
                await _shielded(
                    states.transition(self.store.sandboxes, sandbox_id, PAUSING, RUNNING)
                )
                self._held.discard(sandbox_id)
                raise
            fault("pause:recorded")
            pause = info.pause
            record = {
                "paused_at": pause.paused_at if pause else time.time(),
                "pause_memory": pause.memory if pause else memory,
            }
            await states.transition(
                self.store.sandboxes, sandbox_id, PAUSING, PAUSED, record=record
            )
            mechanism = pause.mechanism if pause else "?"
            log.info(
                "sandbox %s paused (%s, %s) by %s",
                sandbox_id,
                "memory" if record["pause_memory"] else "files only",
                mechanism,
                why,
            )
            row = dataclasses.replace(
                row,
                state=PAUSED,
                paused_at=float(record["paused_at"]),
                pause_memory=bool(record["pause_memory"]),
            )
            return Sandbox(info, row)

    async def resume(
        self, key_id: str, sandbox_id: str, timeout_s: int, *, memory: bool = True
    ) -> tuple[Sandbox, bool]:
        """The sandbox running, resumed with its id if it was paused (then ending
        ``timeout_s`` from now: time paused is not counted), and whether it was resumed (by
        this call or one it joined). Concurrent resumes of one sandbox make one resume of the
        runtime. ``memory=False`` asks for a fresh boot, which only a files-only pause gives
        (the runtime cannot drop a kept memory): otherwise SandboxPaused's sibling, a
        ValueError."""
        sandbox = await self.get(key_id, sandbox_id)
        if sandbox.row.state == RUNNING and not self._resumes.running(sandbox_id):
            return sandbox, False
        if not memory and sandbox.row.pause_memory and sandbox.row.state == PAUSED:
            raise ValueError(
                "this sandbox was paused with its memory; resuming it with a fresh boot "
                "(memory: false) is not supported by this server"
            )
        return await self._resume(sandbox_id, timeout_s, why="a request")

    async def _resume(self, sandbox_id: str, timeout_s: int, *, why: str) -> tuple[Sandbox, bool]:
        async def step() -> Sandbox:
            async with self._locks.hold(sandbox_id):
                return await self._resume_locked(sandbox_id, timeout_s, why)

        sandbox, _ = await self._resumes.run(sandbox_id, step)
        return sandbox, True

    async def _resume_locked(self, sandbox_id: str, timeout_s: int, why: str) -> Sandbox:
        row = await self.store.sandboxes.by_id(sandbox_id)
        if row is None or sandbox_id in self._ending:
            raise SandboxNotFound(sandbox_id)
        if row.state == RUNNING:  # (resumed by another step meanwhile)
            return Sandbox(await self.runtime.inspect(sandbox_id), row)
        if row.state != PAUSED:
            raise SandboxNotPaused(sandbox_id)
        await states.transition(self.store.sandboxes, sandbox_id, PAUSED, RESUMING)
        fault("resume:record")
        self.resumes += 1
        try:
            info = await _finish(self.runtime.resume(sandbox_id, timeout_s))
        except SandboxNotFound:
            await states.transition(self.store.sandboxes, sandbox_id, RESUMING, KILLED)
            self._held.discard(sandbox_id)
            self.ending(sandbox_id)
            raise
        except SandboxNotPaused:
            info = await self.runtime.inspect(sandbox_id)
        except BaseException:
            log.exception("sandbox %s: its resume failed; it stays paused", sandbox_id)
            await _shielded(states.transition(self.store.sandboxes, sandbox_id, RESUMING, PAUSED))
            raise
        fault("resume:recorded")
        await states.transition(
            self.store.sandboxes, sandbox_id, RESUMING, RUNNING, record=_RESUMED
        )
        self._held.discard(sandbox_id)
        log.info("sandbox %s resumed by %s", sandbox_id, why)
        row = dataclasses.replace(row, state=RUNNING, paused_at=None, pause_memory=None)
        return Sandbox(info, row)

    async def admit_traffic(self, sandbox_id: str) -> bool:
        """Whether the sandbox plane may pass a request on to the sandbox now: yes if it runs
        (after waiting out a pause or resume under way); a paused one made to resume on
        traffic (and paused with its memory) is resumed first, one resume however many
        requests come; any other paused one: no."""
        if sandbox_id not in self._held:
            return True
        # (a pause under way ends first: then the request meets what it left)
        async with self._locks.hold(sandbox_id):
            row = await self.store.sandboxes.by_id(sandbox_id)
        if row is None:
            return False
        if row.state == RUNNING:
            return True
        if row.state != PAUSED or not (row.auto_resume and row.pause_memory):
            return False
        try:
            await self._resume(sandbox_id, row.timeout_s, why="a request to it")
        except (RuntimeFailure, states.TransitionRefused) as e:
            log.error("sandbox %s: its resume by a request failed: %s", sandbox_id, e)
            return False
        return True

    def paused_now(self, sandbox_id: str) -> bool:
        """Whether the sandbox plane knows the sandbox as held (paused or on the way)."""
        return sandbox_id in self._held

    # -- snapshots and forks ---------------------------------------------------------------

    async def snapshot(self, key_id: str, sandbox_id: str, name: str | None) -> TemplateRow:
        """A snapshot of the sandbox's files (running or paused, it stays so): a template of
        the key's (``name``, or named by its id) whose one new build's image is the
        runtime's snapshot of the sandbox, which sandboxes are then created from. Only files
        are kept: no runtime here keeps a snapshot's memory (the API says so)."""
        sandbox = await self.get(key_id, sandbox_id)
        limits = sandbox.info.limits
        async with self._locks.hold(sandbox_id):
            template, build, new = await self.store.templates.request_snapshot(
                key_id, name, sandbox_id, max(1, round(limits.cpu)), limits.memory_mb
            )
            image_name = build_image(template.id, build.id)
            fault("snapshot:record")
            try:
                image = await _finish(self.runtime.snapshot(sandbox_id, image_name))
                for saved in (image_name, template.id):
                    await asyncio.to_thread(
                        self.runtime.layers.save_image, dataclasses.replace(image, name=saved)
                    )
            except BaseException as e:
                await _shielded(self._drop_snapshot(template, build, new, e))
                raise
            await self.store.templates.set_status(build, "ready")
        log.info("sandbox %s: snapshot %s (%s) taken", sandbox_id, template.id, template.name)
        return dataclasses.replace(template, ready_build_id=build.id)

    async def _drop_snapshot(
        self, template: TemplateRow, build: BuildRow, new: bool, error: BaseException
    ) -> None:
        """Undo a snapshot that failed: its build fails, a template made for it goes."""
        await self.store.templates.set_status(build, "error", {"message": str(error)})
        if new:
            build_ids = await self.store.templates.remove(template.id)
            await asyncio.to_thread(self.templates.forget, template.id, build_ids)

    async def fork(
        self, key_id: str, sandbox_id: str, count: int, timeout_s: int, admit: Admit
    ) -> builtins.list[Sandbox | Exception]:
        """``count`` new sandboxes, each with a copy of the sandbox's files (it keeps
        running, or paused), from one snapshot of them: each booted afresh from it (their
        processes are not the sandbox's), with its limits, network rules, environment,
        metadata and lifecycle, each independent of the others. Each succeeds or fails on its
        own (its error in its place). The snapshot's image goes once they are made (their
        layers stay for as long as a sandbox stands on them)."""
        parent = await self.get(key_id, sandbox_id)
        info, row = parent.info, parent.row
        allow_out, deny_out = info.allow_out, info.deny_out
        image_name = f"fork-{sandbox_id}-{secrets.token_hex(6)}"
        async with self._locks.hold(sandbox_id):
            fault("fork:record")
            await _finish(self.runtime.snapshot(sandbox_id, image_name))
        lifecycle = Lifecycle(row.on_timeout, row.auto_pause_memory, row.auto_resume)
        try:

            async def child() -> Sandbox:
                want = CreateRequest(
                    key_id=key_id,
                    template=row.template_id,
                    timeout_s=timeout_s,
                    internet=info.internet,
                    env=dict(info.env),
                    metadata=dict(row.metadata),
                    allow_out=allow_out,
                    deny_out=deny_out,
                    access_token=secrets.token_hex(16),
                    lifecycle=lifecycle,
                )
                spec = SandboxSpec(
                    template=image_name,
                    limits=info.limits,
                    allow_out=allow_out,
                    deny_out=deny_out,
                    timeout_s=timeout_s,
                    internet=info.internet,
                    env=want.env,
                    metadata=want.metadata,
                    access_token=want.access_token,
                )
                with admit(await self.count(key_id), info.limits):
                    return await self._create(want, spec, pooled=False)

            made = await asyncio.gather(*(child() for _ in range(count)), return_exceptions=True)
        finally:
            with contextlib.suppress(OSError, KeyError):
                await asyncio.to_thread(self.runtime.layers.remove_image, image_name)
        results: builtins.list[Sandbox | Exception] = []
        for result in made:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
            results.append(result)
        log.info(
            "sandbox %s forked: %s",
            sandbox_id,
            ", ".join(r.row.id if isinstance(r, Sandbox) else f"failed ({r})" for r in results),
        )
        return results

    # -- usage and logs --------------------------------------------------------------------

    async def usage(
        self, key_id: str, sandbox_id: str, start: float, end: float
    ) -> builtins.list[Sample]:
        """The sandbox's usage samples from ``start`` to ``end`` (unix seconds), oldest first.
        A sandbox not sampled yet is sampled now, so a first look finds its usage. A paused
        sandbox has none while it is paused (E2B answers the same: no samples)."""
        sandbox = await self.get(key_id, sandbox_id)
        if sandbox.row.state == RUNNING:
            await self._sampled(sandbox)
        return self.metrics.samples(sandbox_id, start, end)

    async def latest_usage(self, key_id: str, sandbox_ids: Collection[str]) -> dict[str, Sample]:
        """The latest usage sample of each of ``sandbox_ids`` that is the key's and runs (the
        others are left out)."""
        found: dict[str, Sample] = {}
        for sandbox_id in sandbox_ids:
            try:
                await self._sampled(await self.running(key_id, sandbox_id))
            except (SandboxNotFound, SandboxPaused):
                continue
            if (latest := self.metrics.latest(sandbox_id)) is not None:
                found[sandbox_id] = latest
        return found

    async def _sampled(self, sandbox: Sandbox) -> None:
        """Sample the sandbox now if the sampler has not yet."""
        if not self.metrics.has(sandbox.row.id):
            await self._sample({sandbox.row.id: sandbox.row.started_at})

    async def logs(self, key_id: str, sandbox_id: str) -> tuple[Sandbox, builtins.list[LogLine]]:
        """The sandbox, and its log: what its PID 1 and its start command wrote, oldest first
        (a paused sandbox's too: its log is on disk)."""
        sandbox = await self.get(key_id, sandbox_id)
        return sandbox, await self.runtime.logs(sandbox_id)


# What a resume clears of a paused sandbox's row.
_RESUMED = {"paused_at": None, "pause_memory": None}
_NO_ROW = SandboxRow("", "", "", {}, "", 0.0)


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
