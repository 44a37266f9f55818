"""The warm pool: sandboxes made ahead of time, per template, each handed to a create that asks
for exactly what it was made with, then made again in the background.

A pooled sandbox is an ordinary sandbox marked ``pooled`` in its record: no one owns it, the
sandbox plane does not route to it, and its envd access token lives only in this process's
memory. So after a stop or a crash of the server every pooled sandbox left is of no use to
anyone: :meth:`WarmPool.start` releases them before filling the pool again.

The pool only makes and keeps sandboxes; handing one over to a create (and undoing that when
the create fails) is the sandbox service's, as every other step of a create is. Only bilik's
own templates can have a pool (``BILIK_WARM_POOL``): a key's template is that key's alone, and
no create of another key could take its sandboxes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from ..config import InvalidSettings, Settings
from ..proto.contract import INTERPRETER_PORT
from ..runtime import RuntimeFailure, SandboxInfo, SandboxSpec, StepFailed
from ..runtime.base import Log, Runtime
from ..templates.defaults import CODE_INTERPRETER, DEFAULTS
from ..templates.service import Resolved, TemplateService, TemplateUnavailable

# A template's image and the limits a create of it gets when it asks for none; None while the
# template is not built (a pool waits for a build someone else asked for, never starts one).
Resolve = Callable[[str], Awaitable[Resolved | None]]
# Waits until a new pooled sandbox is as ready as its first user wants it (beyond the
# template's own ready check); raises if it never gets there.
WarmUp = Callable[[SandboxInfo], Awaitable[None]]

# How often the pool looks at its members (gone ones are replaced) and at templates that
# were not built yet, besides right after every take.
CHECK_S = 5.0
# After a failed fill, a template's pool waits this long before it tries again.
RETRY_S = 30.0

# What a create asks for that decides what sandbox it gets (its timeout and metadata are set
# at hand-over): a pooled sandbox goes only to a create whose spec has the same shape.
Shape = tuple[object, ...]


def shape(spec: SandboxSpec) -> Shape:
    return (
        spec.template,
        spec.limits,
        spec.internet,
        tuple(sorted(spec.env.items())),
        spec.allow_out,
        spec.deny_out,
    )


@dataclasses.dataclass(frozen=True)
class Member:
    """A sandbox waiting in the pool."""

    sandbox_id: str
    access_token: str  # the token its envd was started with
    shape: Shape


class WarmPool:
    def __init__(
        self,
        runtime: Runtime,
        sizes: dict[str, int],
        resolve: Resolve,
        warm_up: dict[str, WarmUp] | None = None,
        log: Log | None = None,
    ) -> None:
        self.runtime = runtime
        self.sizes = {name: n for name, n in sizes.items() if n > 0}
        self.resolve = resolve
        self.warm_up = warm_up or {}
        self.log: Log = log or (lambda line: None)
        self._ready: dict[str, collections.deque[Member]] = collections.defaultdict(
            collections.deque
        )
        self._filling: collections.Counter[str] = collections.Counter()
        self._failed_at: dict[str, float] = {}
        self._fills: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def ready(self) -> dict[str, int]:
        """How many sandboxes wait ready to be handed over, per pooled template."""
        return {template: len(self._ready[template]) for template in self.sizes}

    async def start(self) -> None:
        """Release what an earlier server left in the pool, and begin filling it."""
        for info in await self.runtime.list():
            if info.pooled:
                self.log(f"warm pool: releasing {info.sandbox_id}, left by an earlier server")
                await self._release(info.sandbox_id)
        if self.sizes:
            self._task = asyncio.create_task(self._keep_filled())

    async def close(self) -> None:
        """Stop filling and kill every sandbox still in the pool (fills under way are undone)."""
        self._closed = True
        tasks = [t for t in (self._task, *self._fills) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        members = [m for queue in self._ready.values() for m in queue]
        self._ready.clear()
        await asyncio.gather(*(self._release(m.sandbox_id) for m in members))

    def take(self, spec: SandboxSpec) -> Member | None:
        """A pooled sandbox made as ``spec`` asks, out of the pool (no other create gets it,
        and from now it is the taker's to hand over or kill); None if there is none. Raises
        as a create would if ``spec`` would be refused, before a member is taken."""
        if self._closed:
            return None
        self.runtime.check(spec)
        wanted = shape(spec)
        for queue in self._ready.values():
            for member in queue:
                if member.shape == wanted:
                    queue.remove(member)
                    self._wake.set()  # make its successor now
                    return member
        return None

    async def _keep_filled(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._refill()
            except Exception as e:  # the pool must outlive any one failure
                self.log(f"warm pool: refill failed: {e!r}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), CHECK_S)

    async def _refill(self) -> None:
        for template, size in self.sizes.items():
            made = await self.resolve(template)
            if made is None:
                continue  # not built (yet)
            spec = SandboxSpec(
                template=made.image,
                limits=made.limits,
                timeout_s=self.runtime.settings.caps.lifetime_s,
                pooled=True,
            )
            queue = self._ready[template]
            for member in list(queue):
                # Made from an image the template no longer uses, or no longer running.
                stale = member.shape != shape(spec)
                if stale or not await self.runtime.is_running(member.sandbox_id):
                    with contextlib.suppress(ValueError):  # (a take may have taken it)
                        queue.remove(member)
                        await self._release(member.sandbox_id)
            if time.monotonic() - self._failed_at.get(template, -RETRY_S) < RETRY_S:
                continue
            for _ in range(size - len(queue) - self._filling[template]):
                self._filling[template] += 1
                task = asyncio.create_task(self._fill(template, spec))
                self._fills.add(task)
                task.add_done_callback(self._fills.discard)

    async def _fill(self, template: str, spec: SandboxSpec) -> None:
        """Make one sandbox for ``template``'s pool; on any failure (or cancel) it is undone."""
        token = secrets.token_hex(16)
        spec = dataclasses.replace(spec, access_token=token)
        info = None
        try:
            info = await self.runtime.create(spec)
            if warm_up := self.warm_up.get(template):
                await warm_up(info)
        except BaseException as e:
            self._filling[template] -= 1
            if info is not None:
                await self._release(info.sandbox_id)
            if not isinstance(e, Exception):
                raise
            self._failed_at[template] = time.monotonic()
            self.log(f"warm pool: making a {template} sandbox failed: {e}")
            return
        self._filling[template] -= 1
        self._ready[template].append(Member(info.sandbox_id, token, shape(spec)))

    async def _release(self, sandbox_id: str) -> None:
        with contextlib.suppress(RuntimeFailure):
            await self.runtime.kill(sandbox_id)


def pool_sizes(settings: Settings) -> dict[str, int]:
    """The pools ``settings`` ask for (InvalidSettings for a template that cannot have one)."""
    sizes = settings.warm_pool_sizes()
    unknown = sorted(set(sizes) - set(DEFAULTS))
    if unknown:
        raise InvalidSettings(
            f"warm pool: {', '.join(unknown)}: only {', '.join(sorted(DEFAULTS))} can have a pool"
        )
    return sizes


def warm_pool(
    runtime: Runtime, templates: TemplateService, sizes: dict[str, int], log: Log
) -> WarmPool:
    """The server's pool: each template's sandboxes made with the image and limits a create of
    it with its defaults gets; a code interpreter's ready once its Python kernel is."""

    async def resolve(template: str) -> Resolved | None:
        try:
            return await templates.resolve(template, build=False)
        except TemplateUnavailable:
            return None

    timeout_s = runtime.settings.ready_timeout_s

    async def interpreter(info: SandboxInfo) -> None:
        await interpreter_ready(info, timeout_s)

    return WarmPool(runtime, sizes, resolve, {CODE_INTERPRETER: interpreter}, log)


async def interpreter_ready(info: SandboxInfo, timeout_s: float) -> None:
    """Until the code interpreter in the sandbox has its default Python context. The template's
    ready check sees the interpreter's port open; the kernel starts just after, and a pooled
    sandbox is there so that its first ``run_code`` does not wait for it."""
    deadline = time.monotonic() + timeout_s
    url = f"http://{info.address}:{INTERPRETER_PORT}/contexts"
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        while True:
            try:
                response = await client.get(url)
                contexts: Any = response.json() if response.status_code == 200 else []
                if any(isinstance(c, dict) and c.get("language") == "python" for c in contexts):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise StepFailed(
                    "warm-up", f"the interpreter had no Python context within {timeout_s:.0f} s"
                )
            await asyncio.sleep(0.05)
