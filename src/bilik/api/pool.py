"""The server's warm pools (``BILIK_WARM_POOL``): which templates get one, the image and limits
a pooled sandbox is made with (those a create of the template with its defaults gets), and
what ready means for a code-interpreter sandbox."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from ..config import InvalidSettings, Settings
from ..runtime import Limits, LocalRuntime, SandboxInfo, StepFailed
from ..runtime.local import Log
from ..runtime.pool import WarmPool, WarmUp
from ..templates import TemplateService
from ..templates.defaults import CODE_INTERPRETER, DEFAULTS, default_limits

INTERPRETER_PORT = 49999


def pool_sizes(settings: Settings) -> dict[str, int]:
    """The pools ``settings`` ask for; only bilik's own templates can have one (a key's
    template is that key's alone, and no create of another key could take its sandboxes)."""
    sizes = settings.warm_pool_sizes()
    unknown = sorted(set(sizes) - set(DEFAULTS))
    if unknown:
        raise InvalidSettings(
            f"warm pool: {', '.join(unknown)}: only {', '.join(sorted(DEFAULTS))} can have a pool"
        )
    return sizes


def warm_pool(
    runtime: LocalRuntime, templates: TemplateService, sizes: dict[str, int], log: Log
) -> WarmPool:
    async def resolve(template: str) -> tuple[str, Limits] | None:
        # As a create of the template resolves it (``sandboxes._image_of``), minus the build.
        image = await templates.defaults.built(template)
        return (image, default_limits(template)) if image is not None else None

    timeout_s = runtime.settings.ready_timeout_s

    async def interpreter(info: SandboxInfo) -> None:
        await interpreter_ready(info, timeout_s)

    warm_up: dict[str, WarmUp] = {CODE_INTERPRETER: interpreter}
    return WarmPool(runtime, sizes, resolve, warm_up, log)


async def interpreter_ready(info: SandboxInfo, timeout_s: float) -> None:
    """Until the code interpreter in the sandbox has its default Python context. The template's
    ready check sees the interpreter's port open; the kernel starts just after, and a pooled
    sandbox is there so that its first ``run_code`` does not wait for it."""
    deadline = time.monotonic() + timeout_s
    url = f"http://{info.address}:{INTERPRETER_PORT}/contexts"
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        while True:
            try:
                response = await client.get(url)
                contexts: Any = response.json() if response.status_code == 200 else []
                if any(isinstance(c, dict) and c.get("language") == "python" for c in contexts):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise StepFailed(
                    "warm-up", f"the interpreter had no Python context within {timeout_s:.0f} s"
                )
            await asyncio.sleep(0.05)
