"""Callbacks users give (``on_stdout``, ``on_event``, …): plain functions or coroutine
functions, both welcome in the async SDK."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any


async def call(handler: Callable[[Any], Any] | None, value: Any) -> None:
    """Call ``handler`` with ``value`` (if there is one), awaiting what it returns if it is
    awaitable."""
    if handler is not None:
        result = handler(value)
        if isinstance(result, Awaitable):
            await result
