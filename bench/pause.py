"""``bilik bench pause``: pause, resume and fork as the official ``e2b`` SDK sees them, per OCI
runtime and pause mode, printed as a report.

Goals (issue: pause, resume, snapshots and fork): a memory pause and its resume on crun ≤ 20 ms
each; a filesystem resume (a cold boot on the kept disk) ≤ 150 ms. Each figure is one SDK call
against a real ``bilik serve``: ``pause()`` until its 204, ``Sandbox.connect(id)`` until the
resumed sandbox's answer, then the first ``commands.run("echo hi")`` after it; ``fork(count=N)``
until every child is answered for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any, Literal

from e2b import Sandbox

from bilik.config import Settings

from .client import serving
from .runtime import _percentile


def _ms(call: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = call()
    return (time.perf_counter() - start) * 1000, result


def _line(label: str, ms: list[float], goal_ms: float | None = None) -> None:
    median = statistics.median(ms)
    goal = "" if goal_ms is None else f"   (goal ≤ {goal_ms:.0f} ms: "
    if goal_ms is not None:
        goal += ("ok" if median <= goal_ms else "MISSED") + ")"
    print(
        f"  {label:36} median {median:7.1f} ms   p95 {_percentile(ms, 0.95):7.1f} ms"
        f"   (n={len(ms)}){goal}"
    )


# (the SDK's mode, what the report calls it, the goal for its pause and for its resume on crun)
MODES: tuple[tuple[Literal["full", "filesystem"], str, float | None, float], ...] = (
    ("full", "memory", 20.0, 20.0),
    ("filesystem", "filesystem", None, 150.0),
)


def _cycles(params: dict[str, Any], runtime: str, samples: int) -> None:
    sandbox = Sandbox.create("base", timeout=3600, **params)
    try:
        sandbox.commands.run("echo warm")
        for mode, label, pause_goal, resume_goal in MODES:
            paused, resumed, first = [], [], []
            for _ in range(samples):
                took, _ = _ms(lambda: sandbox.pause(mode=mode))  # noqa: B023
                paused.append(took)
                took, again = _ms(lambda: Sandbox.connect(sandbox.sandbox_id, **params))
                resumed.append(took)
                took, _ = _ms(lambda: again.commands.run("echo hi"))  # noqa: B023
                first.append(took)
            crun = runtime == "crun"
            _line(f"{runtime} {label} pause", paused, pause_goal if crun else None)
            _line(f"{runtime} {label} resume (connect)", resumed, resume_goal if crun else None)
            _line(f"{runtime} {label} first command after", first)
    finally:
        sandbox.kill()


def _forks(params: dict[str, Any], runtime: str, samples: int) -> None:
    parent = Sandbox.create("base", timeout=3600, **params)
    try:
        parent.files.write("/home/user/state.txt", "forked")
        for count in (1, 10):
            ms = []
            for _ in range(max(1, samples // count)):
                took, children = _ms(lambda: parent.fork(count=count))  # noqa: B023
                ms.append(took)
                failed = [c for c in children if isinstance(c, Exception)]
                if failed:
                    raise SystemExit(f"fork failed: {failed[0]}")
                for child in children:
                    child.kill()
            _line(f"{runtime} fork count={count}", ms)
    finally:
        parent.kill()


async def _run(settings: Settings, samples: int, runtimes: list[str]) -> int:
    print(f"bilik bench pause: {samples} cycles per mode, official e2b SDK as the client")
    for runtime in runtimes:
        async with serving(dataclasses.replace(settings, oci_runtime=runtime)) as (url, key):
            params: dict[str, Any] = {"api_key": key, "api_url": url, "sandbox_url": url}
            await asyncio.to_thread(_cycles, params, runtime, samples)
            await asyncio.to_thread(_forks, params, runtime, samples)
    return 0


def main(settings: Settings, *, samples: int, runtimes: list[str]) -> int:
    return asyncio.run(_run(settings, samples, runtimes))
