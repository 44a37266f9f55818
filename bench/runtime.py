"""``bilik bench runtime``: sandbox start latency and idle cost, printed as a report.

Goals (issue: sandbox runtime): create → first process output, no pool, median ≤ 60 ms with
crun; host memory per idle sandbox ≤ 8 MiB before envd (since envd, ``bilik bench envd``
measures the idle cost with it); 500 idle sandboxes held at once.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

from bilik.config import Settings
from bilik.runtime import LocalRuntime, SandboxSpec, cgroups
from bilik.templates import default_builds
from bilik.templates.defaults import BASE


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _time_to_first_output(runtime: LocalRuntime, oci_runtime: str) -> float:
    start = time.perf_counter()
    info = await runtime.create(SandboxSpec(), oci_runtime=oci_runtime)
    proc = await runtime.exec(info.sandbox_id, ["echo", "hi"])
    async for _name, _chunk in proc.output():
        elapsed = time.perf_counter() - start
        break
    await proc.wait()
    await runtime.kill(info.sandbox_id)
    return elapsed


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


async def _idle_cost(runtime: LocalRuntime, count: int) -> dict[str, float]:
    ids: list[str] = []
    try:
        for _ in range(count):
            ids.append((await runtime.create(SandboxSpec(timeout_s=3600))).sandbox_id)
        await asyncio.sleep(1)
        instance = runtime.settings.instance
        pss = sum(_pss_kib(pid) for pid in cgroups.pids_in(instance)) / 1024
        charge = sum(cgroups.usage(instance, i)["memory_bytes"] for i in ids) / 2**20
        alive = [i.state for i in await runtime.list() if i.sandbox_id in set(ids)]
        return {
            "held": float(alive.count("running")),
            "pss_mib_each": pss / max(len(ids), 1),
            "charge_mib_each": charge / max(len(ids), 1),
        }
    finally:
        for chunk in range(0, len(ids), 20):
            await asyncio.gather(*(runtime.kill(i) for i in ids[chunk : chunk + 20]))


async def _run(settings: Settings, creates: int, idle: int, runtimes: list[str]) -> int:
    runtime = LocalRuntime(settings)
    await runtime.start()
    print(f"bilik bench runtime: {creates} creates per runtime, {idle} idle sandboxes")
    if creates or idle:
        async with default_builds.outside_a_server(runtime) as defaults:
            await defaults.ensure(BASE, log=print)
    for name in runtimes if creates else []:
        await _time_to_first_output(runtime, name)  # warm caches
        samples = [await _time_to_first_output(runtime, name) for _ in range(creates)]
        ms = [s * 1000 for s in samples]
        print(
            f"  create → first output [{name:5}]  median {statistics.median(ms):6.1f} ms"
            f"   p95 {_percentile(ms, 0.95):6.1f} ms   (n={len(ms)})"
        )
    if idle:
        cost = await _idle_cost(runtime, idle)
        print(
            f"  idle sandboxes held at once [{settings.oci_runtime}]: {int(cost['held'])}/{idle}"
            f"   PSS {cost['pss_mib_each']:.2f} MiB each"
            f"   cgroup charge {cost['charge_mib_each']:.2f} MiB each"
        )
    await runtime.close()
    return 0


def main(settings: Settings, *, creates: int, idle: int, runtimes: str) -> int:
    return asyncio.run(_run(settings, creates, idle, [r for r in runtimes.split(",") if r]))
