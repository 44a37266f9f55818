"""``bilik bench cli``: how long ``bilik`` commands take, run as a user runs them.

Goals (issue: the first hour): a command starts in ≤ 150 ms (``bilik --help``, and ``bilik
sandbox list`` on an idle host); a CLI ``sandbox create`` costs ≤ 2x an API create (``POST
/sandboxes`` to a running server, the same template, no warm pool). Each figure is the
median of ``samples`` runs, after one unrecorded run that warms the caches.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import httpx

from bilik.config import Settings

from .client import create, kill, serving

# As a user's shell runs it: the installed entry point, beside the interpreter.
BILIK = os.path.join(os.path.dirname(sys.executable), "bilik")


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def _env(settings: Settings, key: str = "") -> dict[str, str]:
    env = {
        **os.environ,
        "BILIK_DATA_DIR": str(settings.data_dir),
        "BILIK_INSTANCE": settings.instance,
        "BILIK_SUBNET": settings.subnet,
        # As an installed bilik runs: from compiled bytecode (kept apart from the sources,
        # where a checkout run with PYTHONDONTWRITEBYTECODE would otherwise compile every
        # module on every run).
        "PYTHONPYCACHEPREFIX": str(settings.data_dir / "bench-pycache"),
    }
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if key:
        env["BILIK_API_KEY"] = key
    return env


def _bilik(env: dict[str, str], *args: str) -> tuple[float, str]:
    """Run ``bilik ARGS``; its wall time (ms) and its stdout. A failure ends the bench."""
    start = time.perf_counter()
    done = subprocess.run([BILIK, *args], env=env, capture_output=True, text=True, timeout=300)
    elapsed = (time.perf_counter() - start) * 1000
    if done.returncode != 0:
        raise SystemExit(f"bilik {' '.join(args)} failed: {done.stderr.strip()}")
    return elapsed, done.stdout


def _median(run: Callable[[], float], samples: int) -> float:
    run()  # (warms the page cache and the bytecode)
    return statistics.median(run() for _ in range(samples))


def _line(label: str, ms: float, goal: str, ok: bool) -> None:
    print(f"  {label:34} median {ms:7.1f} ms   ({goal}: {_verdict(ok)})")


async def _api_create_kill(url: str, key: str, samples: int) -> tuple[float, float]:
    creates, kills = [], []
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for _ in range(samples + 1):
            start = time.perf_counter()
            sandbox = await create(client, key)
            creates.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            await kill(client, key, sandbox.id)
            kills.append((time.perf_counter() - start) * 1000)
    return statistics.median(creates[1:]), statistics.median(kills[1:])


def _cli_create_kill(env: dict[str, str], samples: int) -> tuple[float, float]:
    creates, kills = [], []
    for _ in range(samples + 1):
        ms, out = _bilik(env, "sandbox", "create", "--timeout", "3600")
        creates.append(ms)
        kills.append(_bilik(env, "sandbox", "kill", out.strip())[0])
    return statistics.median(creates[1:]), statistics.median(kills[1:])


async def _run(settings: Settings, samples: int) -> int:
    print(f"bilik bench cli: {samples} samples each, {BILIK}")
    env = _env(settings)
    help_ms = _median(lambda: _bilik(env, "--help")[0], samples)
    _line("bilik --help", help_ms, "goal ≤ 150 ms", help_ms <= 150)
    async with serving(settings) as (url, key):
        list_ms = _median(lambda: _bilik(env, "sandbox", "list")[0], samples)
        _line("bilik sandbox list", list_ms, "goal ≤ 150 ms", list_ms <= 150)
        api_create, api_kill = await _api_create_kill(url, key, samples)
        cli_create, cli_kill = await asyncio.to_thread(
            _cli_create_kill, {**_env(settings, key), "BILIK_URL": url}, samples
        )
        _line("API create (POST /sandboxes)", api_create, "the reference", True)
        _line(
            "bilik sandbox create",
            cli_create,
            f"{cli_create / api_create:.1f}x the API's, goal ≤ 2x",
            cli_create <= 2 * api_create,
        )
        _line("API kill (DELETE /sandboxes/ID)", api_kill, "the reference", True)
        _line("bilik sandbox kill", cli_kill, f"{cli_kill / api_kill:.1f}x the API's", True)
    return 0


def main(settings: Settings, *, samples: int) -> int:
    return asyncio.run(_run(settings, samples))
