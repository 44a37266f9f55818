"""The HTTP application: health, and the background work every server does (reconcile, reaper)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..config import Settings
from ..runtime import LocalRuntime

log = logging.getLogger("bilik")

REAP_INTERVAL_S = 0.5


def create_app(settings: Settings) -> Starlette:
    runtime = LocalRuntime(settings, log=log.info)

    async def reaper() -> None:
        while True:
            try:
                for sandbox_id in await runtime.reap_expired():
                    log.info("sandbox %s reached its end time and was killed", sandbox_id)
            except Exception:  # the reaper must outlive any one failure
                log.exception("reaper pass failed")
            await asyncio.sleep(REAP_INTERVAL_S)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.start()
        await runtime.reconcile()
        dns = await runtime.serve_dns()
        task = asyncio.create_task(reaper())
        app.state.ready = True
        try:
            yield
        finally:
            task.cancel()
            await dns.close()

    async def health(request: Request) -> JSONResponse:
        if not getattr(request.app.state, "ready", False):
            return JSONResponse({"code": 503, "message": "starting"}, status_code=503)
        return JSONResponse({"status": "ok"})

    app = Starlette(routes=[Route("/health", health)], lifespan=lifespan)
    app.state.runtime = runtime
    return app
