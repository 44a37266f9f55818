"""Per-key caps on creates: how many sandboxes at once, how many creates a minute, how long."""

from __future__ import annotations

import collections
import contextlib
import math
import time
from collections.abc import Iterator

from ..store import ApiKey
from .errors import ApiError

WINDOW_S = 60.0


class CreateLimiter:
    """Sliding one-minute windows of create times, one per key (this server's memory)."""

    def __init__(self) -> None:
        self._creates: dict[str, collections.deque[float]] = collections.defaultdict(
            collections.deque
        )
        # Creates under way, per key: not yet in the store, yet already running or about to.
        self.pending: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def creating(self, key_id: str) -> Iterator[None]:
        self.pending[key_id] += 1
        try:
            yield
        finally:
            self.pending[key_id] -= 1

    def check(self, key: ApiKey, running: int, timeout_s: int, cpu: float, memory_mb: int) -> None:
        """Raise a 429 (or 400) when a create by ``key`` would go past one of its caps."""
        caps = key.caps
        for asked, cap, what in (
            (timeout_s, caps.max_timeout_s, "timeout (s)"),
            (cpu, caps.max_cpu, "vCPUs"),
            (memory_mb, caps.max_memory_mb, "memory (MiB)"),
        ):
            if cap is not None and asked > cap:
                raise ApiError(400, f"{what} {asked} is more than this key may ask for ({cap})")
        if caps.max_sandboxes is not None and running >= caps.max_sandboxes:
            # Waiting helps only once a sandbox ends: tell clients not to retry on their own.
            raise ApiError(
                429,
                f"this key already runs {running} sandboxes, its cap",
                {"Should-Retry": "false"},
            )
        if caps.creates_per_minute is not None:
            now = time.monotonic()
            window = self._creates[key.id]
            while window and window[0] <= now - WINDOW_S:
                window.popleft()
            if len(window) >= caps.creates_per_minute:
                wait = math.ceil(window[0] + WINDOW_S - now)
                raise ApiError(
                    429,
                    f"this key may create {caps.creates_per_minute} sandboxes "
                    f"a minute; try again in {wait} s",
                    {"Retry-After": str(wait)},
                )
            window.append(now)
