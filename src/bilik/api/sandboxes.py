"""E2B's sandbox lifecycle endpoints: create, get, list, kill, timeout, connect."""

from __future__ import annotations

import contextlib
import functools
import json
import secrets
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..runtime import Limits, RuntimeFailure
from ..sandboxes import CreateRequest, IdempotencyConflict, Listing, Sandbox, SandboxService
from ..store import Store
from ..templates.service import TemplateUnavailable
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


def _size(data: dict[str, Any], field: str) -> int | None:
    """CPU or memory a create asks for (bilik's extension: E2B takes them from the template,
    which gives them when the create does not)."""
    if field not in data:
        return None
    value = data[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, f"{field} must be a whole number, at least 1; got {value!r}")
    return value


def _sandbox(sandbox: Sandbox) -> dict[str, Any]:
    """E2B's ``Sandbox`` (create and connect)."""
    info, row = sandbox.info, sandbox.row
    return {
        "templateID": row.template_id,
        "sandboxID": info.sandbox_id,
        "clientID": CLIENT_ID,
        "alias": row.template_id,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": row.envd_access_token,
        "domain": None,
    }


def _detail(sandbox: Sandbox) -> dict[str, Any]:
    """E2B's ``SandboxDetail`` / ``ListedSandbox``."""
    info, row = sandbox.info, sandbox.row
    return {
        **_sandbox(sandbox),
        "startedAt": _rfc3339(row.started_at),
        "endAt": _rfc3339(info.end_at),
        "cpuCount": info.limits.cpu,
        "memoryMB": info.limits.memory_mb,
        "diskSizeMB": info.limits.disk_mb,
        "state": "running",
        "metadata": row.metadata,
        "allowInternetAccess": info.internet,
    }


def _service(request: Request) -> SandboxService:
    service: SandboxService = request.app.state.sandboxes
    return service


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _limiter(request: Request) -> CreateLimiter:
    limiter: CreateLimiter = request.app.state.limiter
    return limiter


@contextlib.contextmanager
def _answers() -> Iterator[None]:
    """What the sandbox service and the runtime raise, as the API answers it."""
    try:
        yield
    except RuntimeFailure as e:
        raise from_runtime(e) from None
    except TemplateUnavailable as e:
        status = {"missing": 404, "unbuilt": 400, "failed": 500}[e.reason]
        raise ApiError(status, e.message) from None
    except IdempotencyConflict as e:
        raise ApiError(409, str(e)) from None


def _handler(
    handle: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    @functools.wraps(handle)
    async def answered(request: Request) -> Response:
        with _answers():
            return await handle(request)

    return answered


@_handler
async def create(request: Request) -> Response:
    key = await authenticate(request)
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is not None and not 0 < len(idempotency_key) <= 200:
        raise ApiError(400, "Idempotency-Key must be 1 to 200 characters")
    data = await json_object(request)
    template = data.get("templateID")
    if template is None or template == "":
        raise ApiError(400, "templateID is required")
    name, tag = template_ref(template, "templateID")  # (a 400 if it is no template's name)
    metadata = _strings(data, "metadata")
    if len(json.dumps(metadata)) > MAX_METADATA:
        raise ApiError(400, f"metadata is larger than {MAX_METADATA} bytes")
    internet = data.get("allow_internet_access", True)
    if not isinstance(internet, bool):
        raise ApiError(400, "allow_internet_access must be true or false")
    timeout = _timeout(data, 300)
    if timeout is None:
        raise ApiError(400, "timeout must be a whole number of seconds")
    allow_out, deny_out = _egress(data)
    want = CreateRequest(
        key_id=key.id,
        template=name,
        tag=tag,
        timeout_s=timeout,
        cpu=_size(data, "cpuCount"),
        memory_mb=_size(data, "memoryMB"),
        internet=internet,
        env=_strings(data, "envVars"),
        metadata=metadata,
        allow_out=allow_out,
        deny_out=deny_out,
        access_token=secrets.token_hex(16),
        idempotency_key=idempotency_key or None,
    )
    limiter = _limiter(request)

    @contextlib.contextmanager
    def admit(running: int, limits: Limits) -> Iterator[None]:
        # Creates and builds of this key still under way count too, or concurrent ones could
        # pass the cap.
        limiter.check(
            key, running + limiter.under_way(key.id), timeout, limits.cpu, limits.memory_mb
        )
        with limiter.creating(key.id):
            yield

    sandbox = await _service(request).create(want, admit)
    return JSONResponse(_sandbox(sandbox), status_code=201)


@_handler
async def get(request: Request) -> Response:
    key = await authenticate(request)
    sandbox = await _service(request).get(key.id, path_sandbox_id(request))
    return JSONResponse(_detail(sandbox))


@_handler
async def kill(request: Request) -> Response:
    key = await authenticate(request)
    await _service(request).kill(key.id, path_sandbox_id(request))
    return Response(status_code=204)


@_handler
async def set_timeout(request: Request) -> Response:
    key = await authenticate(request)
    sandbox_id = path_sandbox_id(request)
    timeout = _timeout(await json_object(request), None)
    if timeout is None:
        raise ApiError(400, "timeout is required")
    # The key's cap on a create's timeout caps every later one too.
    _limiter(request).check_size(key, timeout_s=timeout)
    await _service(request).set_timeout(key.id, sandbox_id, timeout)
    return Response(status_code=204)


@_handler
async def connect(request: Request) -> Response:
    key = await authenticate(request)
    sandbox_id = path_sandbox_id(request)
    timeout = _timeout(await json_object(request, required=False), None)
    if timeout is not None:
        _limiter(request).check_size(key, timeout_s=timeout)
    sandbox = await _service(request).connect(key.id, sandbox_id, timeout)
    return JSONResponse(_sandbox(sandbox))


@_handler
async def metrics(request: Request) -> Response:
    """E2B's ``[SandboxMetric]``: one sample, taken now, from the sandbox's cgroup and disk."""
    key = await authenticate(request)
    usage = await _service(request).usage(key.id, path_sandbox_id(request))
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


@_handler
async def resume(request: Request) -> Response:
    """The legacy resume (SDK 2.0-2.5): sandboxes here never pause, so a live one is 409."""
    key = await authenticate(request)
    sandbox = await _service(request).get(key.id, path_sandbox_id(request))
    raise ApiError(409, f"sandbox {sandbox.info.sandbox_id!r} is already running")


@_handler
async def logs(request: Request) -> Response:
    """E2B's ``SandboxLogs``: what the sandbox's PID 1 wrote, a line each."""
    key = await authenticate(request)
    sandbox, lines = await _service(request).console(key.id, path_sandbox_id(request))
    started = _rfc3339(sandbox.info.created_at)
    return JSONResponse(
        {"logs": [{"timestamp": started, "line": line} for line in lines], "logEntries": []}
    )


async def _listed(
    request: Request, order: str = "asc", started_after: float | None = None
) -> AsyncIterator[dict[str, Any]]:
    """The caller's running sandboxes in start order, filtered by the ``metadata`` and
    ``template`` params."""
    key = await authenticate(request)
    wanted = Listing(
        metadata=dict(urllib.parse.parse_qsl(request.query_params.get("metadata", ""))),
        template=request.query_params.get("template"),
        started_after=started_after,
        newest_first=order == "desc",
    )
    async for sandbox in _service(request).list(key.id, wanted):
        yield _detail(sandbox)


async def recorded_sandboxes(request: Request, key_id: str) -> int:
    """How many of the key's sandboxes run (creates and builds under way are the limiter's to
    count)."""
    return await _service(request).count(key_id)


@_handler
async def list_v1(request: Request) -> Response:
    return JSONResponse([s async for s in _listed(request)])


@_handler
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
