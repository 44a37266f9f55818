"""E2B's sandbox lifecycle endpoints: create, get, list, kill, timeout, connect."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import urllib.parse
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..runtime import (
    Limits,
    LocalRuntime,
    RuntimeFailure,
    SandboxInfo,
    SandboxNotFound,
    SandboxSpec,
)
from ..runtime.pool import WarmPool
from ..store import ApiKey, Store
from ..store.sandboxes import SandboxRow
from ..templates import BuildFailed, TemplateService, build_image
from ..templates.defaults import DEFAULTS, default_limits
from .auth import authenticate
from .errors import ApiError, from_runtime
from .limits import CreateLimiter
from .parse import json_object, path_sandbox_id, template_ref

# The envd protocol version sandboxes answer to. The in-sandbox agent is not there yet; this is
# the lowest version the SDKs accept, and it grows with what envd implements.
ENVD_VERSION = "0.6.4"
CLIENT_ID = "bilik"
MAX_METADATA = 64 << 10
MAX_PAGE = 100


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def _strings(data: dict[str, Any], field: str) -> dict[str, str]:
    value = data.get(field)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ApiError(400, f"{field} must be an object of strings")
    return value


def _timeout(data: dict[str, Any], default: int | None) -> int | None:
    """The body's ``timeout``, else ``default``; given, it must be a number of seconds (a
    ``null`` is no number)."""
    if "timeout" not in data:
        return default
    value = data["timeout"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ApiError(400, f"timeout must be a whole number of seconds, at least 0; got {value!r}")
    return value


def _egress(data: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """E2B's ``network.allowOut`` and ``network.denyOut`` (checked in full by the runtime)."""
    network = data.get("network")
    network = {} if network is None else network
    if not isinstance(network, dict):
        raise ApiError(400, "network must be an object")
    rules = []
    for name in ("allowOut", "denyOut"):
        value = network.get(name)
        value = [] if value is None else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ApiError(400, f"network.{name} must be a list of strings")
        rules.append(tuple(value))
    return rules[0], rules[1]


def _limits(data: dict[str, Any], default: Limits) -> Limits:
    """CPU and memory a create asks for (bilik's extension: E2B takes them from the template,
    which gives the defaults)."""
    cpu, memory = data.get("cpuCount", default.cpu), data.get("memoryMB", default.memory_mb)
    for name, value in (("cpuCount", cpu), ("memoryMB", memory)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ApiError(400, f"{name} must be a whole number, at least 1; got {value!r}")
    return dataclasses.replace(default, cpu=cpu, memory_mb=memory)


def _sandbox(info: SandboxInfo, row: SandboxRow) -> dict[str, Any]:
    """E2B's ``Sandbox`` (create and connect)."""
    return {
        "templateID": row.template_id,
        "sandboxID": info.sandbox_id,
        "clientID": CLIENT_ID,
        "alias": row.template_id,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": row.envd_access_token,
        "domain": None,
    }


def _detail(info: SandboxInfo, row: SandboxRow) -> dict[str, Any]:
    """E2B's ``SandboxDetail`` / ``ListedSandbox``."""
    return {
        **_sandbox(info, row),
        "startedAt": _rfc3339(row.started_at),
        "endAt": _rfc3339(info.end_at),
        "cpuCount": info.limits.cpu,
        "memoryMB": info.limits.memory_mb,
        "diskSizeMB": info.limits.disk_mb,
        "state": "running",
        "metadata": row.metadata,
        "allowInternetAccess": info.internet,
    }


def _runtime(request: Request) -> LocalRuntime:
    runtime: LocalRuntime = request.app.state.runtime
    return runtime


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


async def _owned(request: Request, key: ApiKey | None = None) -> tuple[SandboxInfo, SandboxRow]:
    """The sandbox named in the path, if the caller's key owns it and it still runs."""
    key = key or await authenticate(request)
    sandbox_id = path_sandbox_id(request)
    row = await _store(request).sandboxes.get(sandbox_id, key.id)
    if row is None:
        raise ApiError(404, f"sandbox {sandbox_id!r} not found")
    try:
        info = await _runtime(request).inspect(sandbox_id)
    except SandboxNotFound:
        await _store(request).sandboxes.remove(sandbox_id)
        raise ApiError(404, f"sandbox {sandbox_id!r} not found") from None
    return info, row


async def _image_of(request: Request, key_id: str, template: str) -> tuple[str, Limits]:
    """The runtime image a create's ``templateID`` names, and the limits it starts with: the
    key's own template (by id or name, and tag) with a finished build, else one of bilik's
    defaults (built on first use)."""
    name, tag = template_ref(template, "templateID")
    row = await _store(request).templates.get(name, key_id)
    if row is None:
        if template not in DEFAULTS:
            raise ApiError(404, f"template {template!r} not found")
        try:
            image = await _templates(request).defaults.ensure(template)
        except BuildFailed as e:
            raise ApiError(500, f"the default template {template} did not build: {e}") from None
        return image, default_limits(template)
    if row.ready_build_id is None:
        raise ApiError(400, f"template {template!r} has no finished build yet")
    image = row.id
    if tag:
        build_id = await _store(request).templates.tagged(row.id, tag)
        if build_id is None:
            raise ApiError(404, f"template {name!r} has no build tagged {tag!r}")
        image = build_image(row.id, build_id)
    return image, dataclasses.replace(Limits(), cpu=row.cpu_count, memory_mb=row.memory_mb)


def _templates(request: Request) -> TemplateService:
    service: TemplateService = request.app.state.templates
    return service


async def create(request: Request) -> Response:
    key = await authenticate(request)
    store = _store(request)
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None and not 0 < len(idempotency_key) <= 200:
        raise ApiError(400, "Idempotency-Key must be 1 to 200 characters")
    if idempotency_key:
        if done := await _repeat(request, key.id, idempotency_key):
            return done
        # Its sandbox is gone (or there never was one): this create starts afresh.
        await store.sandboxes.forget_idempotency_key(key.id, idempotency_key)
    data = await json_object(request)
    template = data.get("templateID")
    if template is None or template == "":
        raise ApiError(400, "templateID is required")
    name, tag = template_ref(template, "templateID")  # (a 400 if it is no template's name)
    template = f"{name}:{tag}" if tag else name
    metadata = _strings(data, "metadata")
    if len(json.dumps(metadata)) > MAX_METADATA:
        raise ApiError(400, f"metadata is larger than {MAX_METADATA} bytes")
    internet = data.get("allow_internet_access", True)
    if not isinstance(internet, bool):
        raise ApiError(400, "allow_internet_access must be true or false")
    timeout = _timeout(data, 300)
    if timeout is None:
        raise ApiError(400, "timeout must be a whole number of seconds")
    recorded = await recorded_sandboxes(request, key.id)
    image, default = await _image_of(request, key.id, template)
    limits = _limits(data, default)
    limiter = _limiter(request)
    # Creates and builds of this key still under way count too, or concurrent ones could pass
    # the cap.
    limiter.check(key, recorded + limiter.under_way(key.id), timeout, limits.cpu, limits.memory_mb)
    allow_out, deny_out = _egress(data)
    spec = SandboxSpec(
        template=image,
        limits=limits,
        allow_out=allow_out,
        deny_out=deny_out,
        timeout_s=timeout,
        internet=internet,
        env=_strings(data, "envVars"),
        metadata=metadata,
        access_token=secrets.token_hex(16),
    )
    with limiter.creating(key.id):
        return await _create(request, key.id, template, spec, idempotency_key)


async def _create(
    request: Request,
    key_id: str,
    template: str,
    spec: SandboxSpec,
    idempotency_key: str | None,
) -> Response:
    """Make the sandbox and record who owns it (or make nothing)."""
    store = _store(request)
    runtime = _runtime(request)
    pool: WarmPool | None = request.app.state.pool
    token = spec.access_token
    try:
        # A sandbox made ahead for the warm pool, if one was made as this create asks (its
        # envd knows the token it was made with), else a new one.
        claimed = await pool.claim(spec) if pool is not None else None
        if claimed is not None:
            info, token = claimed.info, claimed.access_token
        else:
            info = await runtime.create(spec)
    except RuntimeFailure as e:
        raise from_runtime(e) from None
    row = SandboxRow(info.sandbox_id, key_id, template, spec.metadata, token, info.created_at)
    try:
        await store.sandboxes.add(row)
        if idempotency_key:
            winner = await store.sandboxes.claim(key_id, idempotency_key, info.sandbox_id)
            if winner != info.sandbox_id:  # a concurrent repeat got there first: keep its one
                raise _LostRace
    except BaseException as e:
        # A sandbox no one owns, or a duplicate, must not live on.
        with contextlib.suppress(RuntimeFailure):
            await runtime.kill(info.sandbox_id)
        await store.sandboxes.remove(info.sandbox_id)
        if not isinstance(e, _LostRace):
            raise
        if done := await _repeat(request, key_id, idempotency_key or ""):
            return done
        raise ApiError(
            409, "a concurrent create with this Idempotency-Key did not finish; try again"
        ) from None
    # (routed by the sandbox plane from now, before its next read of the store)
    request.app.state.plane.owned.add(info.sandbox_id, token, key_id)
    return JSONResponse(_sandbox(info, row), status_code=201)


class _LostRace(Exception):
    """Another create with the same Idempotency-Key claimed it first."""


async def _repeat(request: Request, key_id: str, idempotency_key: str) -> Response | None:
    """The answer to a create already made with this Idempotency-Key, if its sandbox lives."""
    store = _store(request)
    sandbox_id = await store.sandboxes.by_idempotency_key(key_id, idempotency_key)
    row = await store.sandboxes.get(sandbox_id, key_id) if sandbox_id else None
    if row is None:
        return None
    try:
        info = await _runtime(request).inspect(row.id)
    except SandboxNotFound:
        return None
    return JSONResponse(_sandbox(info, row), status_code=201)


async def get(request: Request) -> Response:
    info, row = await _owned(request)
    return JSONResponse(_detail(info, row))


async def kill(request: Request) -> Response:
    info, _row = await _owned(request)
    try:
        await _runtime(request).kill(info.sandbox_id)
    except SandboxNotFound:
        pass
    except RuntimeFailure as e:
        raise from_runtime(e) from None
    await _store(request).sandboxes.remove(info.sandbox_id)
    return Response(status_code=204)


async def set_timeout(request: Request) -> Response:
    key = await authenticate(request)
    info, _row = await _owned(request, key)
    timeout = _timeout(await json_object(request), None)
    if timeout is None:
        raise ApiError(400, "timeout is required")
    # The key's cap on a create's timeout caps every later one too.
    _limiter(request).check_size(key, timeout_s=timeout)
    try:
        await _runtime(request).set_timeout(info.sandbox_id, timeout)
    except RuntimeFailure as e:
        raise from_runtime(e) from None
    return Response(status_code=204)


async def connect(request: Request) -> Response:
    key = await authenticate(request)
    info, row = await _owned(request, key)
    timeout = _timeout(await json_object(request, required=False), None)
    if timeout is not None:
        _limiter(request).check_size(key, timeout_s=timeout)
        try:
            info = await _runtime(request).set_timeout(info.sandbox_id, timeout)
        except RuntimeFailure as e:
            raise from_runtime(e) from None
    return JSONResponse(_sandbox(info, row))


async def metrics(request: Request) -> Response:
    """E2B's ``[SandboxMetric]``: one sample, taken now, from the sandbox's cgroup and disk."""
    info, _row = await _owned(request)
    try:
        usage = await _runtime(request).usage(info.sandbox_id)
    except RuntimeFailure as e:
        raise from_runtime(e) from None
    now = datetime.now(UTC)
    return JSONResponse(
        [
            {
                "timestamp": now.isoformat().replace("+00:00", "Z"),
                "timestampUnix": int(now.timestamp()),
                "cpuCount": usage.cpu_count,
                "cpuUsedPct": usage.cpu_used_pct,
                "memUsed": usage.mem_used,
                "memTotal": usage.mem_total,
                "memCache": 0,
                "diskUsed": usage.disk_used,
                "diskTotal": usage.disk_total,
            }
        ]
    )


async def resume(request: Request) -> Response:
    """The legacy resume (SDK 2.0-2.5): sandboxes here never pause, so a live one is 409."""
    info, _row = await _owned(request)
    raise ApiError(409, f"sandbox {info.sandbox_id!r} is already running")


async def logs(request: Request) -> Response:
    """E2B's ``SandboxLogs``: what the sandbox's PID 1 wrote, a line each."""
    info, _row = await _owned(request)
    lines = await _runtime(request).console(info.sandbox_id)
    started = _rfc3339(info.created_at)
    return JSONResponse(
        {"logs": [{"timestamp": started, "line": line} for line in lines], "logEntries": []}
    )


async def _listed(
    request: Request, order: str = "asc", started_after: float | None = None
) -> AsyncIterator[dict[str, Any]]:
    """The caller's running sandboxes in start order, filtered by the ``metadata`` and
    ``template`` params; each is looked up in the runtime only when the caller gets to it."""
    key = await authenticate(request)
    store = _store(request)
    runtime = _runtime(request)
    wanted = dict(urllib.parse.parse_qsl(request.query_params.get("metadata", "")))
    template = request.query_params.get("template")
    rows = [
        r
        for r in await store.sandboxes.of_key(key.id)
        if all(r.metadata.get(k) == v for k, v in wanted.items())
        and (not template or r.template_id == template)
        and (started_after is None or r.started_at > started_after)
    ]
    rows.sort(key=lambda r: (r.started_at, r.id), reverse=order == "desc")
    for row in rows:
        try:
            info = await runtime.inspect(row.id)
        except SandboxNotFound:
            await store.sandboxes.remove(row.id)  # it is gone for good
            continue
        if info.state == "running":
            yield _detail(info, row)


def _recorded(request: Request, sandbox_id: str) -> bool:
    """Whether the runtime still knows the sandbox (running, or being created)."""
    return _runtime(request).records.load(sandbox_id) is not None


async def recorded_sandboxes(request: Request, key_id: str) -> int:
    """How many of the key's sandboxes the runtime still knows (creates and builds under way
    are the limiter's to count)."""
    rows = await _store(request).sandboxes.of_key(key_id)
    return sum(1 for r in rows if _recorded(request, r.id))


def _limiter(request: Request) -> CreateLimiter:
    limiter: CreateLimiter = request.app.state.limiter
    return limiter


async def list_v1(request: Request) -> Response:
    return JSONResponse([s async for s in _listed(request)])


async def list_v2(request: Request) -> Response:
    params = request.query_params
    states = {s for s in params.get("state", "running").split(",") if s}
    if not states <= {"running", "paused"}:
        raise ApiError(400, f"state must be running and/or paused, got {params.get('state')!r}")
    try:
        limit = int(params.get("limit", MAX_PAGE))
    except ValueError:
        raise ApiError(400, "limit must be a whole number") from None
    if not 1 <= limit <= MAX_PAGE:
        raise ApiError(400, f"limit must be between 1 and {MAX_PAGE}")
    order = params.get("order", "asc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "order must be asc or desc")
    since = None
    if after := params.get("startedAfter"):
        try:
            since = datetime.fromisoformat(after.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise ApiError(400, f"startedAfter is not an ISO 8601 time: {after!r}") from None
    cursor = params.get("nextToken")
    page: list[dict[str, Any]] = []
    more = False
    if "running" in states:
        found = cursor is None  # a cursor names the last item of the previous page
        async for sandbox in _listed(request, order, since):
            if not found:
                found = f"{sandbox['startedAt']}|{sandbox['sandboxID']}" == cursor
                continue
            if len(page) == limit:
                more = True
                break
            page.append(sandbox)
        if not found:
            raise ApiError(400, "nextToken is not valid (or its sandbox is gone)")
    headers = {"X-Next-Token": f"{page[-1]['startedAt']}|{page[-1]['sandboxID']}"} if more else {}
    return JSONResponse(page, headers=headers)


routes = [
    Route("/sandboxes", create, methods=["POST"]),
    Route("/v2/sandboxes", create, methods=["POST"]),
    Route("/sandboxes", list_v1, methods=["GET"]),
    Route("/v2/sandboxes", list_v2, methods=["GET"]),
    Route("/sandboxes/{sandbox_id}", get, methods=["GET"]),
    Route("/sandboxes/{sandbox_id}", kill, methods=["DELETE"]),
    Route("/sandboxes/{sandbox_id}/timeout", set_timeout, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/metrics", metrics, methods=["GET"]),
    Route("/sandboxes/{sandbox_id}/logs", logs, methods=["GET"]),
    Route("/sandboxes/{sandbox_id}/resume", resume, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/connect", connect, methods=["POST"]),
    Route("/v2/sandboxes/{sandbox_id}/connect", connect, methods=["POST"]),
]
