"""What a sandbox's timeout does, and how the server keeps one step per sandbox at a time.

E2B's lifecycle: at its timeout a sandbox is killed (``on_timeout="kill"``, the default) or
paused (``"pause"``), keeping its memory or only its files (``pause_memory``); a paused one
whose memory was kept may be resumed by the first request that reaches it (``auto_resume``).
A files-only pause never resumes by traffic: its resume boots the sandbox afresh, which a
request must not do behind its sender's back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Lifecycle:
    """What a create asked of its sandbox's timeout."""

    on_timeout: str = "kill"  # "kill" | "pause"
    pause_memory: bool = True  # (a pause at the timeout keeps its memory)
    auto_resume: bool = False

    def __post_init__(self) -> None:
        if self.on_timeout not in ("kill", "pause"):
            raise ValueError(f"on_timeout must be kill or pause, not {self.on_timeout!r}")
        if self.auto_resume and self.on_timeout != "pause":
            raise ValueError("auto-resume needs the timeout to pause the sandbox")
        if self.auto_resume and not self.pause_memory:
            raise ValueError(
                "auto-resume needs a pause that keeps memory: a files-only pause must be "
                "resumed with a connect"
            )


class SingleFlight(Generic[T]):
    """One run of a step per key at a time: a caller that comes while it runs waits for it and
    gets its result (or its error), however many come. The step runs to its end even if every
    caller goes away (a resume cut short would leave its sandbox half resumed)."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Task[T]] = {}

    def running(self, key: str) -> bool:
        return key in self._running

    async def run(self, key: str, step: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """The step's result, and whether this caller started it (False: it joined one)."""
        task = self._running.get(key)
        started = task is None
        if task is None:
            task = asyncio.ensure_future(step())
            self._running[key] = task
            task.add_done_callback(lambda _: self._running.pop(key, None))
        return await asyncio.shield(task), started


class Locks:
    """A lock per sandbox for the steps that change what it is (pause, resume, kill, fork),
    dropped once no one holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, sandbox_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(sandbox_id, (asyncio.Lock(), 0))
        self._locks[sandbox_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[sandbox_id]
            if users == 1:
                del self._locks[sandbox_id]
            else:
                self._locks[sandbox_id] = (lock, users - 1)
