"""The HTTP application: health, and the background work every server does (reconcile, reaper)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..config import Settings
from ..plane import SandboxPlane
from ..runtime import LocalRuntime
from ..sandboxes import SandboxService, pool_sizes, warm_pool
from ..store import Store, database_url
from ..templates import TemplateService
from . import keys, openapi, sandboxes, templates
from .errors import ApiError, handle_api_error, handle_http_error, handle_unexpected
from .limits import CreateLimiter

log = logging.getLogger("bilik")

REAP_INTERVAL_S = 0.5
# How often unused layers are looked for (each older than the runtime's grace goes).
COLLECT_INTERVAL_S = 60.0


async def ensure_first_key(store: Store, data_dir: Path) -> None:
    """On a first start (no active key), make one, print it once, and keep it in a 0600 file."""
    if await store.keys.any_active():
        return
    record, key = await store.keys.create("default")
    path = data_dir / "api-key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.chmod(path, 0o600)
    print(
        f"bilik: created API key {record.id} ({record.name}): {key}\n"
        f"bilik: it is also in {path}; this is the only time it is printed",
        flush=True,
    )


def create_app(settings: Settings) -> SandboxPlane:
    """The server: the sandbox plane in front of the control plane, on one port."""
    pool_sizes(settings)  # a bad setting stops the server before it starts
    # httpx logs every request it makes at INFO, and the server makes many of its own
    # (readiness polls, the sandbox plane's requests): they show only when logging at DEBUG.
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("httpx").setLevel(logging.WARNING)
    runtime = LocalRuntime(settings, log=log.info)

    async def reaper(service: SandboxService) -> None:
        collected_at = time.monotonic()
        while True:
            try:
                for sandbox_id in await service.reap():
                    log.info("sandbox %s reached its end time and was killed", sandbox_id)
                # Layers of failed builds and deleted templates go too (they count against
                # their key's layer cap until then).
                if time.monotonic() - collected_at > COLLECT_INTERVAL_S:
                    collected_at = time.monotonic()
                    for key in await asyncio.to_thread(runtime.collect_layers):
                        log.info("removed unused layer %s", key[:12])
            except Exception:  # the reaper must outlive any one failure
                log.exception("reaper pass failed")
            await asyncio.sleep(REAP_INTERVAL_S)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        store = await Store.open(database_url(settings.data_dir, settings.database_url))
        app.state.store = store
        await ensure_first_key(store, settings.data_dir)
        await runtime.start()
        await runtime.reconcile()
        app.state.templates = TemplateService(runtime, store, settings.data_dir)
        for build_id in await app.state.templates.abandon_unfinished():
            log.warning("build %s was cut short by a stop of the server", build_id)
        dns = await runtime.serve_dns()
        pool = warm_pool(runtime, app.state.templates, pool_sizes(settings), log.info)
        plane = app.state.plane
        service = SandboxService(
            runtime, store, app.state.templates, pool, plane.owned.add, plane.end, plane.cut
        )
        # The runtime's truth wins (the store is settled from it); then the pool fills, after
        # the DNS forwarder: a pooled sandbox's start command may resolve names.
        await service.start()
        app.state.sandboxes = service
        plane.gate = service.admit_traffic
        app.state.pool = pool
        # (one sampler of every sandbox's usage, for the metrics history)
        tasks = [
            asyncio.create_task(reaper(service)),
            asyncio.create_task(service.sample_forever()),
        ]
        app.state.ready = True
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await service.close()
            await app.state.templates.close()
            await dns.close()
            await runtime.close()
            await store.close()
            await app.state.plane.aclose()

    async def health(request: Request) -> JSONResponse:
        if not getattr(request.app.state, "ready", False):
            return JSONResponse({"code": 503, "message": "starting"}, status_code=503)
        # (How many pooled sandboxes wait ready: counts only, no ids, for operators and benches.)
        pool = request.app.state.pool
        return JSONResponse({"status": "ok", "warmPool": pool.ready() if pool else {}})

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/openapi.json", openapi.openapi),
            *sandboxes.routes,
            *templates.routes,
            *keys.routes,
        ],
        lifespan=lifespan,
        exception_handlers={
            ApiError: handle_api_error,
            HTTPException: handle_http_error,
            Exception: handle_unexpected,
        },
    )
    app.state.runtime = runtime
    app.state.limiter = CreateLimiter()
    app.state.pool = None  # (until the server has started)

    async def owners() -> dict[str, tuple[str, str]]:
        return await app.state.store.sandboxes.owners()  # type: ignore[no-any-return]

    plane = SandboxPlane(app, runtime, settings.domain, owners, settings.max_streams_per_key)
    app.state.plane = plane
    return plane
