"""``bilik bench interpreter``: the code interpreter through a real ``bilik serve``.

Goals (issue: code interpreter): ``run_code("1+1")`` round trip on a warm context median
≤ 15 ms; a code-interpreter sandbox ready for its first ``run_code`` median ≤ 1 s from create,
and ≤ 150 ms when a warm pool has one ready (timed on a second server, with a pool of one,
each create once the pool is full again). The client speaks what the SDK speaks:
``POST /execute`` on port 49999 through the server.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx

from bilik.config import Settings

from .client import kill, serving
from .runtime import _percentile

TEMPLATE = "code-interpreter-v1"


async def _run_code(client: httpx.AsyncClient, sandbox: dict[str, str], code: str) -> str:
    headers = {
        "E2b-Sandbox-Id": sandbox["sandboxID"],
        "E2b-Sandbox-Port": "49999",
        "X-Access-Token": sandbox["envdAccessToken"],
    }
    response = await client.post("/execute", json={"code": code}, headers=headers)
    lines = [json.loads(line) for line in response.text.splitlines() if line]
    main = [i.get("text") for i in lines if i.get("type") == "result" and i.get("is_main_result")]
    if response.status_code != 200 or not main:
        raise SystemExit(f"run_code failed: {response.status_code} {response.text[:300]}")
    return str(main[0])


async def _create(client: httpx.AsyncClient, key: str) -> dict[str, str]:
    response = await client.post(
        "/sandboxes", json={"templateID": TEMPLATE, "timeout": 600}, headers={"X-API-Key": key}
    )
    if response.status_code != 201:
        raise SystemExit(f"create failed: {response.status_code} {response.text}")
    created: dict[str, str] = response.json()
    return created


async def _ready_ms(client: httpx.AsyncClient, key: str) -> float:
    """Create → first ``run_code("1+1")`` done, in ms (the sandbox is killed afterwards)."""
    start = time.perf_counter()
    sandbox = await _create(client, key)
    await _run_code(client, sandbox, "1+1")
    elapsed = (time.perf_counter() - start) * 1000
    await kill(client, key, sandbox["sandboxID"])
    return elapsed


async def _pool_full(client: httpx.AsyncClient) -> None:
    """Until the server's pool has a sandbox of the template ready."""
    for _ in range(1200):
        if (await client.get("/health")).json().get("warmPool", {}).get(TEMPLATE):
            return
        await asyncio.sleep(0.1)
    raise SystemExit("the warm pool never filled; see bench-server.log in the data dir")


async def _pooled(settings: Settings, creates: int) -> list[float]:
    async with (
        serving(settings, warm_pool=f"{TEMPLATE}=1") as (url, key),
        httpx.AsyncClient(base_url=url, timeout=900) as client,
    ):
        ready = []
        for _ in range(creates):
            await _pool_full(client)
            ready.append(await _ready_ms(client, key))
        return ready


async def _run(settings: Settings, samples: int) -> int:
    creates = max(5, samples // 20)
    async with serving(settings) as (url, key):
        print(f"bilik bench interpreter: {samples} round trips, {creates} creates (each way)")
        async with httpx.AsyncClient(base_url=url, timeout=900) as client:
            print("  (the first create builds the template unless it is built)")
            first = await _create(client, key)
            await kill(client, key, first["sandboxID"])
            ready = [await _ready_ms(client, key) for _ in range(creates)]
            sandbox = await _create(client, key)
            try:
                await _run_code(client, sandbox, "1+1")  # warm
                trips = []
                for _ in range(samples):
                    start = time.perf_counter()
                    assert await _run_code(client, sandbox, "1+1") == "2"
                    trips.append((time.perf_counter() - start) * 1000)
            finally:
                await kill(client, key, sandbox["sandboxID"])
    pooled = await _pooled(settings, creates)
    for label, ms, goal in (
        ('run_code("1+1"), warm context', trips, 15.0),
        ("create → first run_code done", ready, 1000.0),
        ("create → first run_code, pooled", pooled, 150.0),
    ):
        median = statistics.median(ms)
        print(
            f"  {label:32} median {median:7.1f} ms   p95 {_percentile(ms, 0.95):7.1f} ms"
            f"   (n={len(ms)}, goal ≤ {goal:.0f} ms: {'ok' if median <= goal else 'MISSED'})"
        )
    return 0


def main(settings: Settings, *, samples: int) -> int:
    return asyncio.run(_run(settings, samples))
