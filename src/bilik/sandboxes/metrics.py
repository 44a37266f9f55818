"""Each running sandbox's usage over its life, as E2B keeps it: a sample every 5 seconds.

E2B answers ``GET /sandboxes/{id}/metrics?start&end`` from a history, so a client asking about
the last minute gets the last minute, and one asking about a time before the sandbox existed
gets nothing. Here one sampler (:meth:`.SandboxService.sample_forever`) reads every running
sandbox's counters in one pass (``Runtime.counters``: cgroup files and a ``statvfs`` each), and
the samples are kept in memory, in compact arrays, for the sandbox's life only: a server that
restarts starts its histories afresh, and a killed sandbox's history goes with it.

Memory is bounded twice: per sandbox by the longest life a sandbox may have (one sample per
:data:`BUCKET_S`), and in total by ``max_samples``; past the total, the longest histories lose
their oldest samples first, so every sandbox keeps its recent past.
"""

from __future__ import annotations

import array
import bisect
import dataclasses
import math
from collections.abc import Iterable

from ..runtime.base import Counters

# Seconds between two samples of a sandbox (E2B's bucket).
BUCKET_S = 5.0
# All samples of all sandboxes at once (28 bytes each: about 28 MB).
MAX_SAMPLES = 1_000_000


@dataclasses.dataclass(frozen=True)
class Sample:
    """A sandbox's usage at one moment (E2B's ``SandboxMetric``); CPU % is of its own CPUs,
    averaged since the sample before."""

    timestamp: float
    cpu_count: float
    cpu_used_pct: float
    mem_used: int
    mem_total: int
    disk_used: int
    disk_total: int


class _History:
    """One sandbox's samples, oldest first, in parallel arrays; and what the next sample needs
    of the last reading (its CPU time) and what does not change between samples."""

    def __init__(self, counters: Counters, at: float, created_at: float) -> None:
        self.times = array.array("d")
        self.cpu_pct = array.array("f")
        self.mem_used = array.array("q")
        self.disk_used = array.array("q")
        self.totals = counters
        self.begun_at = at
        # The first sample's CPU % is the average since the sandbox started.
        self.cpu_ns, self.read_at = 0, min(created_at, at)

    def __len__(self) -> int:
        return len(self.times)

    def add(self, counters: Counters, at: float) -> None:
        elapsed_ns = max(at - self.read_at, 1e-3) * 1e9
        busy_ns = max(0, counters.cpu_ns - self.cpu_ns)
        pct = 100 * busy_ns / elapsed_ns / max(counters.cpu_count, 1e-3)
        self.cpu_ns, self.read_at, self.totals = counters.cpu_ns, at, counters
        self.times.append(at)
        self.cpu_pct.append(round(pct, 2))
        self.mem_used.append(counters.mem_used)
        self.disk_used.append(counters.disk_used)

    def drop_oldest(self, count: int) -> None:
        for column in (self.times, self.cpu_pct, self.mem_used, self.disk_used):
            del column[:count]

    def sample(self, i: int) -> Sample:
        t = self.totals
        return Sample(
            timestamp=self.times[i],
            cpu_count=t.cpu_count,
            cpu_used_pct=float(self.cpu_pct[i]),
            mem_used=self.mem_used[i],
            mem_total=t.mem_total,
            disk_used=self.disk_used[i],
            disk_total=t.disk_total,
        )


class MetricsHistory:
    """The samples of every running sandbox, by sandbox id."""

    def __init__(self, lifetime_s: float, max_samples: int = MAX_SAMPLES) -> None:
        # (one more than a whole life needs: the first sample comes at the start)
        self.per_sandbox = int(lifetime_s // BUCKET_S) + 2
        self.max_samples = max_samples
        self._histories: dict[str, _History] = {}
        self._total = 0

    def record(self, sandbox_id: str, counters: Counters, at: float, created_at: float) -> None:
        """Add a sample of the sandbox, read at ``at`` (a sandbox's first: it was made at
        ``created_at``)."""
        history = self._histories.get(sandbox_id)
        if history is None:
            history = self._histories[sandbox_id] = _History(counters, at, created_at)
        history.add(counters, at)
        self._total += 1
        if len(history) > self.per_sandbox:
            history.drop_oldest(len(history) - self.per_sandbox)
            self._total -= 1
        if self._total > self.max_samples:
            self._shrink()

    def _shrink(self) -> None:
        """Trim the longest histories to an equal share of ``max_samples``."""
        share = max(1, self.max_samples // max(1, len(self._histories)))
        for history in self._histories.values():
            if len(history) > share:
                self._total -= len(history) - share
                history.drop_oldest(len(history) - share)

    def has(self, sandbox_id: str) -> bool:
        return sandbox_id in self._histories

    def samples(self, sandbox_id: str, start: float, end: float) -> list[Sample]:
        """The sandbox's samples from ``start`` to ``end`` in whole seconds, both included (as
        E2B's ``timestampUnix`` reads a sample's time), oldest first."""
        history = self._histories.get(sandbox_id)
        if history is None:
            return []
        first = bisect.bisect_left(history.times, math.ceil(start))
        last = bisect.bisect_left(history.times, math.floor(end) + 1)
        return [history.sample(i) for i in range(first, last)]

    def latest(self, sandbox_id: str) -> Sample | None:
        history = self._histories.get(sandbox_id)
        return history.sample(len(history) - 1) if history else None

    def forget(self, sandbox_id: str) -> None:
        history = self._histories.pop(sandbox_id, None)
        if history is not None:
            self._total -= len(history)

    def keep_only(self, sandbox_ids: Iterable[str], listed_at: float) -> None:
        """Forget every sandbox but ``sandbox_ids``, the running ones at ``listed_at`` (those
        whose history began after that were not there to list)."""
        keep = set(sandbox_ids)
        for sandbox_id, history in list(self._histories.items()):
            if sandbox_id not in keep and history.begun_at < listed_at:
                self.forget(sandbox_id)
