"""Per-key caps: how many sandboxes at once, how many starts a minute, how long, how large.

Every path that starts or extends a sandbox goes through here: a create, a template build (its
build sandbox counts as one of the key's running sandboxes while the build runs, and its start
as one of the key's creates of the minute), and a timeout set by ``timeout`` or ``connect``
(which could otherwise move a sandbox's end past what the key may ask for at create).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import Iterator

from ..store import ApiKey
from .errors import ApiError

WINDOW_S = 60.0


class CreateLimiter:
    """Sliding one-minute windows of start times, one per key, and what each key has under way
    (this server's memory)."""

    def __init__(self) -> None:
        self._creates: dict[str, collections.deque[float]] = collections.defaultdict(
            collections.deque
        )
        # Creates under way, per key: not yet in the store, yet already running or about to.
        self.pending: collections.Counter[str] = collections.Counter()
        # Builds under way, per key: each runs build sandboxes until its task ends.
        self._builds: dict[str, set[asyncio.Task[None]]] = collections.defaultdict(set)

    @contextlib.contextmanager
    def creating(self, key_id: str) -> Iterator[None]:
        self.pending[key_id] += 1
        try:
            yield
        finally:
            self.pending[key_id] -= 1

    def building(self, key_id: str, task: asyncio.Task[None]) -> None:
        """Count the build ``task`` as one of ``key_id``'s running sandboxes until it ends."""
        tasks = self._builds[key_id]
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def under_way(self, key_id: str) -> int:
        """The key's creates and builds that the store does not list among its sandboxes."""
        return self.pending[key_id] + len(self._builds[key_id])

    def check_size(
        self,
        key: ApiKey,
        timeout_s: int | None = None,
        cpu: float | None = None,
        memory_mb: int | None = None,
    ) -> None:
        """Raise a 400 when what is asked for is more than ``key`` may ask for."""
        caps = key.caps
        for asked, cap, what in (
            (timeout_s, caps.max_timeout_s, "timeout (s)"),
            (cpu, caps.max_cpu, "vCPUs"),
            (memory_mb, caps.max_memory_mb, "memory (MiB)"),
        ):
            if asked is not None and cap is not None and asked > cap:
                raise ApiError(400, f"{what} {asked} is more than this key may ask for ({cap})")

    def check_start(self, key: ApiKey, running: int) -> None:
        """Raise a 429 when one more sandbox (or build) started by ``key``, which runs
        ``running`` now, would go past its caps; else count the start in its minute."""
        caps = key.caps
        if caps.max_sandboxes is not None and running >= caps.max_sandboxes:
            # Waiting helps only once a sandbox ends: tell clients not to retry on their own.
            raise ApiError(
                429,
                f"this key already runs {running} sandboxes (builds included), its cap",
                {"Should-Retry": "false"},
            )
        if caps.creates_per_minute is not None:
            now = time.monotonic()
            window = self._creates[key.team_id]
            while window and window[0] <= now - WINDOW_S:
                window.popleft()
            if len(window) >= caps.creates_per_minute:
                wait = math.ceil(window[0] + WINDOW_S - now)
                raise ApiError(
                    429,
                    f"this key may create {caps.creates_per_minute} sandboxes "
                    f"a minute (builds included); try again in {wait} s",
                    {"Retry-After": str(wait)},
                )
            window.append(now)

    def check(self, key: ApiKey, running: int, timeout_s: int, cpu: float, memory_mb: int) -> None:
        """Raise a 429 (or 400) when a create by ``key`` would go past one of its caps."""
        self.check_size(key, timeout_s, cpu, memory_mb)
        self.check_start(key, running)
