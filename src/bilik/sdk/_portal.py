"""The sync SDK runs the async one on an event loop of its own, in a daemon thread.

One implementation serves both: a sync call submits the coroutine to this loop and waits for it.
It also works where an event loop already runs in the calling thread (a Jupyter notebook).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class Portal:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="bilik-sdk", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the portal's loop and wait for its result (or exception)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a sync SDK call from inside one of its own callbacks")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            # Ctrl-C while waiting: stop the work too.
            future.cancel()
            raise

    def iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        """An async iterator, consumed from sync code."""
        try:
            while True:
                try:
                    yield self.call(_anext(iterator))
                except StopAsyncIteration:
                    return
        finally:
            aclose: Callable[[], Awaitable[None]] | None = getattr(iterator, "aclose", None)
            if aclose is not None:
                self.call(_awaited(aclose))


async def _anext(iterator: AsyncIterator[T]) -> T:
    return await iterator.__anext__()


async def _awaited(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


_portal: Portal | None = None
_lock = threading.Lock()


def portal() -> Portal:
    """The process's portal, started on first use (and again in a forked child)."""
    global _portal
    with _lock:
        if _portal is None:
            _portal = Portal()
        return _portal


def _forget_after_fork() -> None:
    global _portal, _lock
    _portal, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the process's portal and return its result."""
    return portal().call(coro)
