"""``bilik bench envd``: envd through a real ``bilik serve``, printed as a report.

Goals (issue: envd): ``commands.run("true")`` round trip through the server median ≤ 10 ms;
1 KiB file write + read median ≤ 10 ms; a 200 MB upload at ≥ 200 MB/s; an idle sandbox with
envd running ≤ 24 MiB of host memory in all; 500 such sandboxes held at once.

The client (``bench.client``) speaks the SDKs' wire protocol over keep-alive connections, as
an SDK does.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import AsyncIterator

import httpx

from bilik.config import Settings
from bilik.runtime import cgroups

from .client import create, kill, serving
from .runtime import _percentile, _pss_kib

UPLOAD_MB = 200


async def _timed(n: int, fn: object) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await fn()  # type: ignore[operator]
        out.append((time.perf_counter() - start) * 1000)
    return out


def _line(label: str, ms: list[float], goal: float) -> None:
    median = statistics.median(ms)
    verdict = "ok" if median <= goal else "MISSED"
    print(
        f"  {label:34} median {median:6.2f} ms   p95 {_percentile(ms, 0.95):6.2f} ms"
        f"   (n={len(ms)}, goal ≤ {goal:.0f} ms: {verdict})"
    )


async def _latency(client: httpx.AsyncClient, key: str, samples: int) -> None:
    sandbox = await create(client, key)
    try:
        kib = os.urandom(1024)

        async def write_read() -> None:
            await sandbox.write("/tmp/kib", kib)
            if await sandbox.read("/tmp/kib") != kib:
                raise SystemExit("1 KiB file came back different")

        await _timed(20, lambda: sandbox.run("true"))  # warm up
        _line('commands.run("true")', await _timed(samples, lambda: sandbox.run("true")), 10)
        _line("1 KiB write + read", await _timed(samples, write_read), 10)

        chunk = os.urandom(1 << 20)

        async def body() -> AsyncIterator[bytes]:
            for _ in range(UPLOAD_MB):
                yield chunk

        start = time.perf_counter()
        await sandbox.write("/tmp/big", body())
        up = UPLOAD_MB / (time.perf_counter() - start)
        start = time.perf_counter()
        received = 0
        async with client.stream(
            "GET",
            "/files",
            params={"path": "/tmp/big"},
            headers={**sandbox.headers, "Accept-Encoding": "identity"},
        ) as response:
            async for piece in response.aiter_raw():
                received += len(piece)
        down = UPLOAD_MB / (time.perf_counter() - start)
        if received != UPLOAD_MB << 20:
            raise SystemExit(f"download returned {received} bytes")
        verdict = "ok" if up >= 200 else "MISSED"
        print(
            f"  {UPLOAD_MB} MB upload {up:7.1f} MB/s (goal ≥ 200: {verdict})"
            f"   download {down:7.1f} MB/s"
        )
    finally:
        await kill(client, key, sandbox.id)


async def _idle(client: httpx.AsyncClient, key: str, settings: Settings, count: int) -> None:
    ids: list[str] = []
    try:
        for _ in range(count):
            ids.append((await create(client, key)).id)
        await asyncio.sleep(2)
        instance = settings.instance
        pss = sum(_pss_kib(pid) for pid in cgroups.pids_in(instance)) / 1024 / len(ids)
        charge = sum(cgroups.usage(instance, i)["memory_bytes"] for i in ids) / 2**20 / len(ids)
        answering = 0
        for sandbox_id in ids:
            health = await client.get(
                "/health", headers={"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983"}
            )
            answering += health.status_code == 204
        verdict = "ok" if max(pss, charge) <= 24 and answering == count else "MISSED"
        print(
            f"  idle sandboxes with envd: {answering}/{count} answering"
            f"   PSS {pss:.2f} MiB each   cgroup charge {charge:.2f} MiB each"
            f"   (goal ≤ 24 MiB, {count} held: {verdict})"
        )
    finally:
        for start in range(0, len(ids), 20):
            await asyncio.gather(*(kill(client, key, i) for i in ids[start : start + 20]))


async def _run(settings: Settings, samples: int, idle: int) -> int:
    async with serving(settings) as (url, key):
        print(f"bilik bench envd: {samples} samples each, {idle} idle sandboxes")
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
        timeout = httpx.Timeout(120.0)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as c:
            await _latency(c, key, samples)
            if idle:
                await _idle(c, key, settings, idle)
    return 0


def main(settings: Settings, *, samples: int, idle: int) -> int:
    return asyncio.run(_run(settings, samples, idle))
