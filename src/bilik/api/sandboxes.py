"""E2B's sandbox lifecycle endpoints: create, get, list, kill, timeout, connect, refresh, metrics
and logs; pause, resume, snapshots and forks.

What E2B's API takes and bilik cannot do yet (MCP, volumes, egress transforms, ...) is refused
with a 400 that names it, never dropped without a word; the values the SDKs send when nothing
is asked (``secure: true``) pass.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..runtime import Limits, RuntimeFailure
from ..runtime.base import LogLine
from ..runtime.errors import SandboxPaused
from ..runtime.spec import is_sandbox_id
from ..sandboxes import CreateRequest, IdempotencyConflict, Listing, Sandbox, SandboxService
from ..sandboxes.lifecycle import Lifecycle
from ..sandboxes.metrics import Sample
from ..sandboxes.service import shown_state, start_micros
from ..sandboxes.states import PAUSED, TransitionRefused
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
# E2B's refresh: a sandbox kept alive for less than this is kept alive this long.
REFRESH_MIN_S = 15
MAX_REFRESH_S = 3600
# E2B's v2 logs: the most entries one page holds, and the longest search.
MAX_LOG_PAGE = 1000
MAX_LOG_SEARCH = 256
LOG_LEVELS = ("debug", "info", "warn", "error")
_EPOCH = datetime.fromtimestamp(0, UTC)


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


def _flag(data: dict[str, Any], field: str) -> bool | None:
    value = data.get(field)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{field} must be true or false")
    return value


def _unsupported(what: str, field: str) -> ApiError:
    return ApiError(400, f"{what} ({field}) is not supported by this server yet")


def _lifecycle(data: dict[str, Any]) -> Lifecycle:
    """What a create asks of its sandbox's timeout: E2B's ``autoPause``, ``autoPauseMemory``
    and ``autoResume: {enabled}`` (what the SDKs send), and/or the ``lifecycle`` object its
    info shows (``onTimeout``: ``kill``, ``pause`` or ``{action, mode}``; ``autoResume``).
    Both forms given must agree; what cannot be (auto-resume of a files-only pause, a pause
    mode without a pause) is a 400."""
    pause = _flag(data, "autoPause")
    memory = _flag(data, "autoPauseMemory")
    resume_config = data.get("autoResume")
    resume: bool | None = None
    if resume_config is not None:
        if not isinstance(resume_config, dict):
            raise ApiError(400, "autoResume must be an object: {enabled: true | false}")
        resume = _flag(resume_config, "enabled")
    if memory is not None and not pause:
        raise ApiError(400, "autoPauseMemory is only for a sandbox that autoPause pauses")
    flat = _checked_lifecycle(pause, memory, resume)
    lifecycle = data.get("lifecycle")
    if lifecycle is None:
        return flat
    if not isinstance(lifecycle, dict):
        raise ApiError(400, "lifecycle must be an object")
    if unknown := sorted(set(lifecycle) - {"onTimeout", "autoResume"}):
        raise ApiError(400, f"lifecycle: unknown field(s): {', '.join(unknown)}")
    action = lifecycle.get("onTimeout")
    mode_memory: bool | None = None
    if isinstance(action, dict):
        if unknown := sorted(set(action) - {"action", "mode"}):
            raise ApiError(400, f"lifecycle.onTimeout: unknown field(s): {', '.join(unknown)}")
        mode = action.get("mode")
        if mode not in (None, "full", "filesystem"):
            raise ApiError(400, "lifecycle.onTimeout.mode must be full or filesystem")
        if mode is not None and action.get("action") != "pause":
            raise ApiError(400, "lifecycle.onTimeout.mode is only for action pause")
        mode_memory = None if mode is None else mode == "full"
        action = action.get("action")
    if action not in (None, "kill", "pause"):
        raise ApiError(400, "lifecycle.onTimeout must be kill or pause")
    nested = _checked_lifecycle(
        None if action is None else action == "pause",
        mode_memory,
        _flag(lifecycle, "autoResume"),
    )
    given_flat = pause is not None or memory is not None or resume is not None
    if given_flat and nested != flat:
        raise ApiError(
            400, "lifecycle and autoPause/autoPauseMemory/autoResume ask for different things"
        )
    return nested


def _checked_lifecycle(pause: bool | None, memory: bool | None, resume: bool | None) -> Lifecycle:
    try:
        return Lifecycle(
            on_timeout="pause" if pause else "kill",
            pause_memory=True if memory is None else memory,
            auto_resume=bool(resume),
        )
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def _refuse_unsupported(data: dict[str, Any]) -> None:
    """A 400 for each thing a create asks for that bilik cannot do yet, naming it. What an
    SDK sends when nothing is asked (a false, an empty list or object, a null) passes."""
    if _flag(data, "secure") is False:
        raise _unsupported("envd without an access token", "secure: false")
    if data.get("mcp") not in (None, {}):
        raise _unsupported("an MCP gateway in the sandbox", "mcp")
    if data.get("volumeMounts") not in (None, []):
        raise _unsupported("volumes", "volumeMounts")
    iam = data.get("iam")
    if iam not in (None, {}) and (not isinstance(iam, dict) or iam.get("tokens")):
        raise _unsupported("workload identity tokens", "iam")
    network = data.get("network")
    if isinstance(network, dict):
        if _flag(network, "allowPublicTraffic") is False:
            raise _unsupported("sandbox URLs that need a traffic token", "allowPublicTraffic")
        if network.get("dnsServers") is not None:  # (an empty list asks for no DNS at all)
            raise _unsupported("DNS servers of the sandbox's own choosing", "network.dnsServers")
        for field, what in (
            ("rules", "egress transform rules"),
            ("egressProxy", "an egress proxy"),
            ("maskRequestHost", "a host mask for sandbox requests"),
            ("httpsPorts", "HTTPS ports"),
        ):
            if network.get(field) not in (None, {}, [], ""):
                raise _unsupported(what, f"network.{field}")


def _size(data: dict[str, Any], field: str) -> int | None:
    """CPU or memory a create asks for (bilik's extension: E2B takes them from the template,
    which gives them when the create does not)."""
    if field not in data:
        return None
    value = data[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, f"{field} must be a whole number, at least 1; got {value!r}")
    return value


def _sandbox(sandbox: Sandbox, domain: str) -> dict[str, Any]:
    """E2B's ``Sandbox`` (create and connect)."""
    info, row = sandbox.info, sandbox.row
    return {
        "templateID": row.template_id,
        "sandboxID": info.sandbox_id,
        "clientID": CLIENT_ID,
        "alias": row.template_id,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": row.envd_access_token,
        "domain": domain,
    }


def _detail(sandbox: Sandbox, domain: str) -> dict[str, Any]:
    """E2B's ``SandboxDetail`` / ``ListedSandbox``; a paused one's says how its pause keeps
    it (``pauseMode``, and bilik's ``bilikPause``: by what mechanism, whether it lasts
    through a restart of the machine, whether its memory was lost to one)."""
    info, row = sandbox.info, sandbox.row
    detail = {
        **_sandbox(sandbox, domain),
        "startedAt": _rfc3339(row.started_at),
        "endAt": _rfc3339(info.end_at),
        "cpuCount": info.limits.cpu,
        "memoryMB": info.limits.memory_mb,
        "diskSizeMB": info.limits.disk_mb,
        "state": shown_state(row.state),
        "metadata": row.metadata,
        "allowInternetAccess": info.internet,
        "lifecycle": {"onTimeout": row.on_timeout, "autoResume": row.auto_resume},
    }
    if row.state == PAUSED:
        pause = info.pause
        memory = bool(row.pause_memory) and not (pause is not None and pause.memory_lost)
        detail["pauseMode"] = "full" if memory else "filesystem"
        if pause is not None:
            detail["bilikPause"] = {
                "mechanism": pause.mechanism,
                "memory": pause.memory,
                "durable": pause.durable,
                "memoryLost": pause.memory_lost,
                "pausedAt": _rfc3339(pause.paused_at),
            }
    return detail


def _domain(request: Request) -> str:
    """The domain under which the SDKs' ``get_host(port)`` names a sandbox's port
    (``{port}-{id}.{domain}``): the server's own, with the server's port unless it is HTTP's or
    HTTPS's default, so the name reaches the sandbox plane."""
    settings = _service(request).runtime.settings
    return settings.domain if settings.port in (80, 443) else f"{settings.domain}:{settings.port}"


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
    except TransitionRefused as e:
        # (another request moved the sandbox first: a pause racing a kill, say)
        raise ApiError(409, f"the sandbox changed state meanwhile: {e}") from None


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
    _refuse_unsupported(data)
    lifecycle = _lifecycle(data)
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
        key_id=key.team_id,
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
        lifecycle=lifecycle,
    )
    limiter = _limiter(request)

    @contextlib.contextmanager
    def admit(running: int, limits: Limits) -> Iterator[None]:
        # Creates and builds of this key still under way count too, or concurrent ones could
        # pass the cap.
        limiter.check(
            key, running + limiter.under_way(key.team_id), timeout, limits.cpu, limits.memory_mb
        )
        with limiter.creating(key.team_id):
            yield

    sandbox = await _service(request).create(want, admit)
    return JSONResponse(_sandbox(sandbox, _domain(request)), status_code=201)


@_handler
async def get(request: Request) -> Response:
    key = await authenticate(request)
    sandbox = await _service(request).get(key.team_id, path_sandbox_id(request))
    return JSONResponse(_detail(sandbox, _domain(request)))


@_handler
async def kill(request: Request) -> Response:
    key = await authenticate(request)
    await _service(request).kill(key.team_id, path_sandbox_id(request))
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
    await _service(request).set_timeout(key.team_id, sandbox_id, timeout)
    return Response(status_code=204)


# E2B's connect to a paused sandbox without a timeout: it runs this long once resumed.
CONNECT_TIMEOUT_S = 300


@_handler
async def connect(request: Request) -> Response:
    """E2B's connect: a running sandbox's end only ever moves later (200); a paused one is
    resumed with its id, ending ``timeout`` from now (201). ``memory: false`` asks for a
    fresh boot, which only a sandbox paused without its memory gets."""
    key = await authenticate(request)
    sandbox_id = path_sandbox_id(request)
    data = await json_object(request, required=False)
    _known_fields(data, {"timeout", "memory"})
    timeout = _timeout(data, None)
    memory = _flag(data, "memory")
    if timeout is not None:
        _limiter(request).check_size(key, timeout_s=timeout)
    service = _service(request)
    sandbox = await service.get(key.team_id, sandbox_id)
    if sandbox.row.state == "running":
        # (a connect only ever moves a running sandbox's end later)
        with contextlib.suppress(SandboxPaused):  # (paused meanwhile: resumed below)
            sandbox = await service.extend(key.team_id, sandbox_id, timeout)
            return JSONResponse(_sandbox(sandbox, _domain(request)))
    sandbox, resumed = await _resume(request, key.team_id, sandbox_id, timeout, memory)
    return JSONResponse(_sandbox(sandbox, _domain(request)), status_code=201 if resumed else 200)


async def _resume(
    request: Request, key_id: str, sandbox_id: str, timeout: int | None, memory: bool | None
) -> tuple[Sandbox, bool]:
    try:
        return await _service(request).resume(
            key_id,
            sandbox_id,
            CONNECT_TIMEOUT_S if timeout is None else timeout,
            memory=memory is not False,
        )
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def _known_fields(data: dict[str, Any], known: set[str]) -> None:
    """A 400 for a body field the endpoint does not know (one bilik would otherwise drop)."""
    if unknown := sorted(set(data) - known):
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)}")


@_handler
async def refresh(request: Request) -> Response:
    """E2B's refresh: the sandbox lives at least ``duration`` seconds more (15 at the least)."""
    key = await authenticate(request)
    sandbox_id = path_sandbox_id(request)
    data = await json_object(request, required=False)
    duration = data.get("duration", REFRESH_MIN_S)
    if isinstance(duration, bool) or not isinstance(duration, int):
        raise ApiError(400, f"duration must be a whole number of seconds; got {duration!r}")
    if not 0 <= duration <= MAX_REFRESH_S:
        raise ApiError(400, f"duration must be between 0 and {MAX_REFRESH_S}")
    duration = max(duration, REFRESH_MIN_S)
    _limiter(request).check_size(key, timeout_s=duration)
    await _service(request).extend(key.team_id, sandbox_id, duration)
    return Response(status_code=204)


def _metric(sample: Sample) -> dict[str, Any]:
    """E2B's ``SandboxMetric``."""
    return {
        "timestamp": _rfc3339(sample.timestamp),
        "timestampUnix": int(sample.timestamp),
        "cpuCount": sample.cpu_count,
        "cpuUsedPct": sample.cpu_used_pct,
        "memUsed": sample.mem_used,
        "memTotal": sample.mem_total,
        "memCache": 0,
        "diskUsed": sample.disk_used,
        "diskTotal": sample.disk_total,
    }


def _unix_param(request: Request, name: str) -> int | None:
    text = request.query_params.get(name)
    if text is None:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 15):
        raise ApiError(400, f"{name} must be a whole number, at least 0")
    return int(text)


@_handler
async def metrics(request: Request) -> Response:
    """E2B's ``[SandboxMetric]``: the sandbox's samples from ``start`` (its start, if not
    given) to ``end`` (now), unix seconds, oldest first."""
    key = await authenticate(request)
    sandbox_id = path_sandbox_id(request)
    _known_params(request, {"start", "end"})
    start, end = _unix_param(request, "start"), _unix_param(request, "end")
    start = 0 if start is None else start
    end = int(time.time()) + 1 if end is None else end
    if start > end:
        raise ApiError(400, "start must not be after end")
    samples = await _service(request).usage(key.team_id, sandbox_id, start, end)
    return JSONResponse([_metric(s) for s in samples])


@_handler
async def metrics_of_many(request: Request) -> Response:
    """E2B's ``SandboxesWithMetrics``: the latest sample of each sandbox asked for that is the
    caller's and runs."""
    key = await authenticate(request)
    _known_params(request, {"sandbox_ids"})
    text = request.query_params.get("sandbox_ids")
    if not text:
        raise ApiError(400, "sandbox_ids is required: sandbox ids, comma-separated")
    ids = text.split(",")
    if len(ids) > MAX_PAGE or len(set(ids)) != len(ids):
        raise ApiError(400, f"sandbox_ids must be at most {MAX_PAGE} ids, each once")
    if not all(is_sandbox_id(i) for i in ids):
        raise ApiError(400, "sandbox_ids holds something that is not a sandbox id")
    latest = await _service(request).latest_usage(key.team_id, ids)
    return JSONResponse({"sandboxes": {i: _metric(s) for i, s in latest.items()}})


@_handler
async def resume(request: Request) -> Response:
    """E2B's legacy resume (SDK 2.0-2.5): a paused sandbox resumed with its id (201); a
    running one is 409. ``autoPause`` sets what its next timeout does."""
    key = await authenticate(request)
    sandbox_id = path_sandbox_id(request)
    data = await json_object(request, required=False)
    _known_fields(data, {"timeout", "autoPause", "memory", "cpuCount"})
    if "cpuCount" in data:
        raise _unsupported("a new CPU count on resume", "cpuCount")
    timeout = _timeout(data, None)
    if timeout is not None:
        _limiter(request).check_size(key, timeout_s=timeout)
    if _flag(data, "autoPause") is not None:
        raise _unsupported("changing autoPause on resume", "autoPause")
    sandbox = await _service(request).get(key.team_id, sandbox_id)
    if sandbox.row.state == "running":
        raise ApiError(409, f"sandbox {sandbox_id!r} is already running")
    sandbox, _ = await _resume(request, key.team_id, sandbox_id, timeout, _flag(data, "memory"))
    return JSONResponse(_sandbox(sandbox, _domain(request)), status_code=201)


@_handler
async def pause(request: Request) -> Response:
    """E2B's pause: 204 once paused (keeping its memory unless ``memory: false``); 409 if it
    is paused already. ``requireHealthyGuest``: only if a process starts in it now."""
    key = await authenticate(request)
    sandbox_id = path_sandbox_id(request)
    data = await json_object(request, required=False)
    _known_fields(data, {"memory", "requireHealthyGuest"})
    memory = _flag(data, "memory")
    service = _service(request)
    if _flag(data, "requireHealthyGuest"):
        await service.running(key.team_id, sandbox_id)
        try:
            result = await asyncio.wait_for(service.runtime.run(sandbox_id, ["true"]), 10)
        except (TimeoutError, RuntimeFailure) as e:
            raise ApiError(503, f"the sandbox's guest is not healthy: {e or 'no answer'}") from None
        if result.exit_code != 0:
            raise ApiError(503, "the sandbox's guest is not healthy: a process failed to run")
    await service.pause(key.team_id, sandbox_id, memory=memory is not False)
    return Response(status_code=204)


@_handler
async def snapshot(request: Request) -> Response:
    """E2B's snapshot: a template of the caller's (``name``, or named by its id) that
    sandboxes are created from, holding the sandbox's files now (201). Only files: the
    response says so (``bilikSnapshot``), whatever ``memory`` asked."""
    key = await authenticate(request)
    sandbox_id = path_sandbox_id(request)
    data = await json_object(request, required=False)
    _known_fields(data, {"name", "memory"})
    memory = _flag(data, "memory")
    name = data.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise ApiError(400, "name must be a string")
        name, tag = template_ref(name, "name")
        if tag:
            raise _unsupported("a tag in a snapshot's name", "name")
    try:
        template = await _service(request).snapshot(key.team_id, sandbox_id, name or None)
    except ValueError as e:
        raise ApiError(409, str(e)) from None
    return JSONResponse(
        {
            "snapshotID": template.id,
            "names": [template.name],
            "bilikSnapshot": {
                "mode": "filesystem",
                "memory": False,
                "why": (
                    "memory snapshots are not possible on this server: a sandbox made from "
                    "the snapshot boots afresh with its files"
                    if memory is not False
                    else "a filesystem snapshot, as asked"
                ),
            },
        },
        status_code=201,
    )


@_handler
async def list_snapshots(request: Request) -> Response:
    """E2B's snapshot list: the caller's snapshots, newest first, of one sandbox
    (``sandboxID``) or with one name (``name``), ``limit`` at a time, ``X-Next-Token`` naming
    the next page."""
    key = await authenticate(request)
    params = request.query_params
    _known_params(request, {"sandboxID", "name", "limit", "nextToken"})
    limit = _whole(params.get("limit", str(MAX_PAGE)), "limit", 1, MAX_PAGE)
    token = params.get("nextToken")
    offset = 0
    if token:
        try:
            offset = int(base64.urlsafe_b64decode(token.encode("ascii")).decode())
        except (ValueError, binascii.Error, UnicodeError):
            raise ApiError(400, "nextToken is not valid") from None
        if offset < 0:
            raise ApiError(400, "nextToken is not valid")
    snapshots = await _store(request).templates.snapshots(key.team_id)
    if sandbox_id := params.get("sandboxID"):
        snapshots = [t for t in snapshots if t.source_sandbox_id == sandbox_id]
    if name := params.get("name"):
        # (E2B's "namespace/name:tag" form: bilik's snapshots have one build a tag, "default")
        base, _, tag = name.rpartition("/")[2].partition(":")
        if tag in ("", "default"):
            snapshots = [t for t in snapshots if base in (t.name, t.id)]
        else:
            snapshots = []
    page = snapshots[offset : offset + limit]
    more = offset + limit < len(snapshots)
    next_token = base64.urlsafe_b64encode(str(offset + limit).encode()).decode()
    return JSONResponse(
        [{"snapshotID": t.id, "names": [t.name]} for t in page],
        headers={"X-Next-Token": next_token} if more else {},
    )


MAX_FORKS = 20


@_handler
async def fork(request: Request) -> Response:
    """E2B's fork: ``count`` new sandboxes (1 to 20) with a copy of the sandbox's files, from
    one snapshot of them; a result each (``sandbox`` or ``error``), in order (201). The
    children boot afresh (``forkMode: filesystem``); the sandbox goes on."""
    key = await authenticate(request)
    sandbox_id = path_sandbox_id(request)
    data = await json_object(request, required=False)
    _known_fields(data, {"count", "timeout"})
    count = data.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_FORKS:
        raise ApiError(400, f"count must be a whole number from 1 to {MAX_FORKS}")
    timeout = _timeout(data, 300)
    assert timeout is not None
    limiter = _limiter(request)
    limiter.check_size(key, timeout_s=timeout)

    @contextlib.contextmanager
    def admit(running: int, limits: Limits) -> Iterator[None]:
        limiter.check(
            key, running + limiter.under_way(key.team_id), timeout, limits.cpu, limits.memory_mb
        )
        with limiter.creating(key.team_id):
            yield

    results = await _service(request).fork(key.team_id, sandbox_id, count, timeout, admit)
    domain = _domain(request)
    answer: list[dict[str, Any]] = []
    for result in results:
        if isinstance(result, Sandbox):
            answer.append({"sandbox": _sandbox(result, domain), "forkMode": "filesystem"})
            continue
        try:
            with _answers():
                raise result
        except ApiError as e:
            error = e
        except Exception:
            error = ApiError(500, "internal error")
        answer.append({"error": {"code": error.status, "message": error.message}})
    return JSONResponse(answer, status_code=201)


@_handler
async def logs(request: Request) -> Response:
    """E2B's ``SandboxLogs``: what the sandbox's PID 1 and its template's start command wrote,
    a line each, oldest first."""
    key = await authenticate(request)
    _, lines = await _service(request).logs(key.team_id, path_sandbox_id(request))
    return JSONResponse(
        {
            "logs": [{"timestamp": _rfc3339(e.timestamp), "line": e.line} for e in lines],
            "logEntries": [_log_entry(e) for e in lines],
        }
    )


@_handler
async def logs_v2(request: Request) -> Response:
    """E2B's ``SandboxLogsV2Response``: what the sandbox's PID 1 and its template's start
    command wrote, an ``info`` entry a line, paged by ``cursor`` (milliseconds) in
    ``direction`` (forward: from the cursor on, oldest first; backward: up to it, newest
    first), filtered by ``level`` and ``search``."""
    key = await authenticate(request)
    params = request.query_params
    _known_params(request, {"cursor", "limit", "direction", "level", "search"})
    cursor = _unix_param(request, "cursor")
    limit = _whole(params.get("limit", str(MAX_LOG_PAGE)), "limit", 0, MAX_LOG_PAGE)
    direction = params.get("direction", "forward")
    if direction not in ("forward", "backward"):
        raise ApiError(400, "direction must be forward or backward")
    level = params.get("level", "debug")
    if level not in LOG_LEVELS:
        raise ApiError(400, f"level must be one of {', '.join(LOG_LEVELS)}")
    search = params.get("search", "")
    if len(search) > MAX_LOG_SEARCH:
        raise ApiError(400, f"search must be at most {MAX_LOG_SEARCH} characters")
    _, lines = await _service(request).logs(key.team_id, path_sandbox_id(request))
    if LOG_LEVELS.index(level) > LOG_LEVELS.index("info"):
        lines = []
    if cursor is not None:
        forward = direction == "forward"
        lines = [e for e in lines if (_millis(e) >= cursor if forward else _millis(e) <= cursor)]
    lines = [e for e in lines if search in e.line]
    if direction == "backward":
        lines.reverse()
    return JSONResponse({"logs": [_log_entry(e) for e in lines[:limit]]})


def _millis(line: LogLine) -> int:
    return int(line.timestamp * 1000)


def _log_entry(line: LogLine) -> dict[str, Any]:
    """E2B's ``SandboxLogEntry``: every line at ``info``; ``fields.stream`` says whose it is
    (``console``: PID 1's; ``stdout``, ``stderr``: the start command's)."""
    return {
        "timestamp": _rfc3339(line.timestamp),
        "level": "info",
        "message": line.line,
        "fields": {"stream": line.stream},
    }


def _known_params(request: Request, known: set[str]) -> None:
    """A 400 for a query parameter the endpoint does not know: a filter bilik cannot apply
    is never ignored."""
    if unknown := sorted(set(request.query_params) - known):
        raise ApiError(400, f"unknown query parameter(s): {', '.join(unknown)}")


def _whole(text: str, name: str, low: int, high: int) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 6) or not low <= int(text) <= high:
        raise ApiError(400, f"{name} must be a whole number from {low} to {high}")
    return int(text)


def _metadata_filter(text: str | None) -> dict[str, str]:
    """E2B's ``metadata`` param: ``k=v`` pairs joined by ``&``, the whole escaped once more
    (as the SDKs send it), each key and value escaped too."""
    if not text:
        return {}
    filters = {}
    for pair in urllib.parse.unquote_plus(text).split("&"):
        parts = pair.split("=")
        if len(parts) != 2:
            raise ApiError(400, "metadata must be key=value pairs joined by &")
        filters[urllib.parse.unquote_plus(parts[0])] = urllib.parse.unquote_plus(parts[1])
    return filters


def _time_param(text: str, name: str) -> int:
    """An RFC 3339 time, in whole microseconds."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, f"{name} is not an RFC 3339 time: {text!r}") from None
    if when.tzinfo is None:
        raise ApiError(400, f"{name} must carry its UTC offset: {text!r}")
    return (when - _EPOCH) // timedelta(microseconds=1)


def _page_token(sandbox: Sandbox, oldest_first: bool) -> str:
    """E2B's next token: its last sandbox's start and id (and the order, when oldest first)."""
    started = _EPOCH + timedelta(microseconds=start_micros(sandbox.row.started_at))
    text = f"{started.isoformat().replace('+00:00', 'Z')}__{sandbox.row.id}"
    return base64.urlsafe_b64encode((text + ("__asc" if oldest_first else "")).encode()).decode()


def _page_cursor(token: str, oldest_first: bool) -> tuple[int, str]:
    try:
        parts = base64.urlsafe_b64decode(token.encode("ascii")).decode().split("__")
    except (ValueError, binascii.Error, UnicodeError):
        raise ApiError(400, "nextToken is not valid") from None
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "asc"):
        raise ApiError(400, "nextToken is not valid")
    if (len(parts) == 3) != oldest_first:
        raise ApiError(400, "nextToken was issued for the other order")
    return _time_param(parts[0], "nextToken"), parts[1]


async def recorded_sandboxes(request: Request, key_id: str) -> int:
    """How many of the key's sandboxes run (creates and builds under way are the limiter's to
    count)."""
    return await _service(request).count(key_id)


@_handler
async def list_v1(request: Request) -> Response:
    """The caller's sandboxes, running and paused, newest first, filtered by ``metadata``."""
    key = await authenticate(request)
    _known_params(request, {"metadata"})
    wanted = Listing(
        metadata=_metadata_filter(request.query_params.get("metadata")),
        states=frozenset({"running", "paused"}),
    )
    domain = _domain(request)
    return JSONResponse(
        [_detail(s, domain) async for s in _service(request).list(key.team_id, wanted)]
    )


@_handler
async def list_v2(request: Request) -> Response:
    """E2B's list: the caller's sandboxes in the ``state``s asked for (running and paused if
    none), newest first (or oldest first: ``order=asc``), filtered by
    ``metadata``, ``template`` and ``startedAfter`` (included), a page of ``limit`` at a time
    with ``X-Next-Token`` naming the next page."""
    key = await authenticate(request)
    params = request.query_params
    _known_params(
        request, {"metadata", "state", "order", "startedAfter", "template", "nextToken", "limit"}
    )
    states = set(params.get("state", "running,paused").split(","))
    if not states <= {"running", "paused"}:
        raise ApiError(400, f"state must be running and/or paused, got {params.get('state')!r}")
    limit = _whole(params.get("limit", str(MAX_PAGE)), "limit", 1, MAX_PAGE)
    order = params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "order must be asc or desc")
    oldest_first = order == "asc"
    after = params.get("startedAfter")
    token = params.get("nextToken")
    wanted = Listing(
        metadata=_metadata_filter(params.get("metadata")),
        template=params.get("template") or None,
        started_after=None if after is None else _time_param(after, "startedAfter"),
        oldest_first=oldest_first,
        after=_page_cursor(token, oldest_first) if token else None,
        states=frozenset(states),
    )
    page: list[Sandbox] = []
    more = False
    async for sandbox in _service(request).list(key.team_id, wanted):
        if len(page) == limit:
            more = True
            break
        page.append(sandbox)
    headers = {"X-Next-Token": _page_token(page[-1], oldest_first)} if more else {}
    return JSONResponse([_detail(s, _domain(request)) for s in page], headers=headers)


routes = [
    Route("/sandboxes", create, methods=["POST"]),
    Route("/v2/sandboxes", create, methods=["POST"]),
    Route("/sandboxes", list_v1, methods=["GET"]),
    Route("/sandboxes/metrics", metrics_of_many, methods=["GET"]),
    Route("/v2/sandboxes", list_v2, methods=["GET"]),
    Route("/sandboxes/{sandbox_id}", get, methods=["GET"]),
    Route("/sandboxes/{sandbox_id}", kill, methods=["DELETE"]),
    Route("/sandboxes/{sandbox_id}/timeout", set_timeout, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/refreshes", refresh, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/metrics", metrics, methods=["GET"]),
    Route("/sandboxes/{sandbox_id}/logs", logs, methods=["GET"]),
    Route("/v2/sandboxes/{sandbox_id}/logs", logs_v2, methods=["GET"]),
    Route("/sandboxes/{sandbox_id}/resume", resume, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/connect", connect, methods=["POST"]),
    Route("/v2/sandboxes/{sandbox_id}/connect", connect, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/pause", pause, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/snapshots", snapshot, methods=["POST"]),
    Route("/sandboxes/{sandbox_id}/fork", fork, methods=["POST"]),
    Route("/snapshots", list_snapshots, methods=["GET"]),
]
