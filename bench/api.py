"""``bilik bench api``: the control plane through a real ``bilik serve``, printed as a report.

Goals (issue: control plane): time to interactive (create → first output of
``commands.run("echo hi")``), sequential, no warm pool: median ≤ 100 ms; 50 creates at once:
all succeed, p99 ≤ 2 s; one server holding 500 running sandboxes answers list and get in
≤ 20 ms median.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx

from bilik.config import Settings

from .client import create, kill, serving
from .runtime import _percentile


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


async def _time_to_interactive(client: httpx.AsyncClient, key: str, n: int) -> None:
    samples = []
    for _ in range(n + 3):  # the first few warm caches
        start = time.perf_counter()
        sandbox = await create(client, key)
        samples.append((await sandbox.first_output("echo hi") - start) * 1000)
        await kill(client, key, sandbox.id)
    ms = samples[3:]
    median = statistics.median(ms)
    print(
        f"  time to interactive (sequential)   median {median:6.1f} ms"
        f"   p95 {_percentile(ms, 0.95):6.1f} ms   (n={len(ms)}, goal ≤ 100 ms: "
        f"{_verdict(median <= 100)})"
    )


async def _burst(url: str, key: str, count: int) -> None:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one() -> tuple[float, str | None]:
            start = time.perf_counter()
            response = await client.post(
                "/sandboxes", json={"templateID": "base"}, headers={"X-API-Key": key}
            )
            ok = response.status_code == 201
            return (time.perf_counter() - start) * 1000, response.json()[
                "sandboxID"
            ] if ok else None

        results = await asyncio.gather(*(one() for _ in range(count)))
        made = [i for _, i in results if i]
        ms = [t for t, _ in results]
        p99 = _percentile(ms, 0.99)
        print(
            f"  {count} creates at once: {len(made)}/{count} succeeded"
            f"   median {statistics.median(ms):6.0f} ms   p99 {p99:6.0f} ms"
            f"   (goal all, p99 ≤ 2000 ms: {_verdict(len(made) == count and p99 <= 2000)})"
        )
        await asyncio.gather(*(kill(client, key, i) for i in made))


async def _held(client: httpx.AsyncClient, key: str, count: int, samples: int) -> None:
    ids: list[str] = []
    try:
        for start in range(0, count, 10):
            batch = await asyncio.gather(
                *(create(client, key) for _ in range(min(10, count - start)))
            )
            ids += [s.id for s in batch]
        headers = {"X-API-Key": key}

        async def timed(path: str) -> float:
            start = time.perf_counter()
            response = await client.get(path, headers=headers)
            response.raise_for_status()
            return (time.perf_counter() - start) * 1000

        listed = [await timed("/v2/sandboxes?limit=100") for _ in range(samples)]
        got = [await timed(f"/sandboxes/{ids[i % len(ids)]}") for i in range(samples)]
        for label, ms in (("list (100 a page)", listed), ("get", got)):
            median = statistics.median(ms)
            print(
                f"  {label:18} with {len(ids)} running   median {median:6.2f} ms"
                f"   p95 {_percentile(ms, 0.95):6.2f} ms   (goal ≤ 20 ms: {_verdict(median <= 20)})"
            )
    finally:
        for start in range(0, len(ids), 20):
            await asyncio.gather(*(kill(client, key, i) for i in ids[start : start + 20]))


async def _run(settings: Settings, samples: int, burst: int, held: int) -> int:
    async with serving(settings) as (url, key):
        print(f"bilik bench api: {samples} samples, {burst} at once, {held} held")
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            await _time_to_interactive(client, key, samples)
            await _burst(url, key, burst)
            if held:
                await _held(client, key, held, samples)
    return 0


def main(settings: Settings, *, samples: int, burst: int, held: int) -> int:
    return asyncio.run(_run(settings, samples, burst, held))
