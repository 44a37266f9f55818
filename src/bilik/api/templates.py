"""E2B's template API: request a build, upload COPY files, start it, follow its logs; list,
read, update and delete templates. Templates belong to the caller's team; bilik's own templates
(``base``, ``code-interpreter-v1``) exist for every team, as E2B's public ones do."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..runtime.spec import Limits
from ..store import ApiKey
from ..store.templates import DEFAULT_TAG, BuildRow, TemplateRow
from ..templates import BadUpload, BuildFailed, TemplateService
from ..templates.build import LogEntry, check_spec
from ..templates.defaults import DEFAULTS, default_limits
from ..templates.files import DRAIN_BYTES, TooLarge
from .auth import authenticate
from .errors import ApiError
from .parse import (
    declared_length,
    json_object,
    path_build_id,
    path_template,
    tag_list,
    template_ref,
)
from .sandboxes import ENVD_VERSION, _limiter, _rfc3339, _store, recorded_sandboxes

# At most this many log entries per status or logs call, templates or builds per listing page
# (as E2B's API).
LOGS_PAGE = 100
PAGE = 100
# Log levels, least severe first (a logs call's ``level`` is the least it returns).
LEVELS = ("debug", "info", "warn", "error")


def _service(request: Request) -> TemplateService:
    service: TemplateService = request.app.state.templates
    return service


def _positive(data: dict[str, Any], name: str, default: int) -> int:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, f"{name} must be a whole number, at least 1; got {value!r}")
    return value


async def request_build(request: Request) -> Response:
    """``POST /v3/templates``: a template (new, or the team's one of that name) and a build.
    The name may carry a tag (``my-app:v1``), as if it were one of ``tags``."""
    key = await authenticate(request)
    data = await json_object(request)
    given = data.get("name") if data.get("name") is not None else data.get("alias")
    if given is None or given == "":
        raise ApiError(400, "name is required")
    name, tag = template_ref(given, "name")
    if name in DEFAULTS:
        raise ApiError(400, f"{name!r} is bilik's own template; pick another name")
    default = Limits()
    cpu = _positive(data, "cpuCount", int(default.cpu))
    memory = _positive(data, "memoryMB", default.memory_mb)
    _limiter(request).check_size(key, cpu=cpu, memory_mb=memory)
    tags = tag_list([] if data.get("tags") is None else data["tags"])
    if tag:
        tags = list(dict.fromkeys([tag, *tags]))
    template, build = await _store(request).templates.request_build(
        key.team_id, name, cpu, memory, tuple(tags)
    )
    return JSONResponse(
        {
            "templateID": template.id,
            "buildID": build.id,
            "public": False,
            "names": [template.name],
            "tags": tags,
            "aliases": [template.name],
        },
        status_code=202,
    )


async def _named(
    request: Request, key: ApiKey, name: object, field: str
) -> tuple[TemplateRow, str]:
    """The key's template and tag a body's ``name[:tag]`` refers to (the tag "default" if
    none)."""
    base, tag = template_ref(name, field)
    template = await _store(request).templates.get(base, key.team_id)
    if template is None:
        raise ApiError(404, f"template {base!r} not found")
    return template, tag or DEFAULT_TAG


async def assign_tags(request: Request) -> Response:
    """``POST /templates/tags``: point tags at the build ``target`` (``name:tag``) names."""
    key = await authenticate(request)  # (before reading a byte of the body)
    data = await json_object(request)
    target, tags = data.get("target"), tag_list(data.get("tags"))
    if not isinstance(target, str) or not tags:
        raise ApiError(400, "target (name:tag) and tags are required")
    template, tag = await _named(request, key, target, "target")
    store = _store(request).templates
    build_id = await store.tagged(template.id, tag)
    if build_id is None:
        raise ApiError(404, f"template {target!r} has no build tagged {tag!r}")
    await store.tag(template.id, build_id, tags)
    return JSONResponse({"buildID": build_id, "tags": tags}, status_code=201)


async def remove_tags(request: Request) -> Response:
    """``DELETE /templates/tags``: take tags off a template."""
    key = await authenticate(request)  # (before reading a byte of the body)
    data = await json_object(request)
    name, tags = data.get("name"), tag_list(data.get("tags"))
    if not isinstance(name, str) or not tags:
        raise ApiError(400, "name and tags are required")
    template, _ = await _named(request, key, name, "name")
    await _store(request).templates.untag(template.id, tags)
    return Response(status_code=204)


async def list_tags(request: Request) -> Response:
    template = await _template(request)
    return JSONResponse(
        [
            {"tag": t.tag, "buildID": t.build_id, "createdAt": _rfc3339(t.created_at)}
            for t in await _store(request).templates.tags(template.id)
        ]
    )


async def _template(request: Request, key: ApiKey | None = None) -> TemplateRow:
    """The caller's template the path names (by id or name)."""
    key = key or await authenticate(request)
    template_id = path_template(request)
    template = await _store(request).templates.get(template_id, key.team_id)
    if template is None:
        raise ApiError(404, f"template {template_id!r} not found")
    return template


async def file_upload_link(request: Request) -> Response:
    """``GET /templates/{id}/files/{hash}``: whether the files are here, else where to PUT
    them: a URL for one upload, into this template's own slot of that name (the hash is the
    client's; the server hashes what arrives, see ``templates.files``)."""
    template = await _template(request)
    files = _service(request).files
    files_hash = request.path_params["files_hash"]
    try:
        present = await asyncio.to_thread(files.present, template.id, files_hash)
        body: dict[str, Any] = {"present": present}
        if not present:
            token = files.upload_token(template.key_id, template.id, files_hash)
            body["url"] = str(request.base_url).rstrip("/") + f"/upload/{token}"
    except BadUpload as e:
        raise ApiError(400, str(e)) from None
    return JSONResponse(body, status_code=201)


async def upload(request: Request) -> Response:
    """``PUT /upload/{token}``: the files of a COPY step. The token is the authorization, for
    one upload to the slot it names; an upload over a cap (one file, or all of the key's) is
    refused with 413 and nothing of it is kept."""
    files = _service(request).files
    try:
        grant = files.redeem(request.path_params["token"])
    except BadUpload as e:
        raise ApiError(403, str(e)) from None
    store = _store(request).templates
    if await store.get(grant.template_id, grant.key_id) is None:  # (deleted since)
        raise ApiError(404, f"template {grant.template_id!r} not found")
    scopes = [t.id for t in await store.of_key(grant.key_id)]
    chunks = request.stream()
    async with files.key_lock(grant.key_id):
        try:
            with files.receiving(grant, scopes) as receiver:
                declared = declared_length(request)
                if declared is not None:
                    receiver.check(declared)  # (before a byte is read)
                async for chunk in chunks:
                    receiver.write(chunk)
        except TooLarge as e:
            # The rest is read and dropped (up to a bound), so the client gets to read why.
            drained = 0
            with contextlib.suppress(ClientDisconnect):
                async for chunk in chunks:
                    drained += len(chunk)
                    if drained > DRAIN_BYTES:
                        break
            raise ApiError(413, str(e)) from None
    return Response(status_code=200)


async def start_build(request: Request) -> Response:
    """``POST /v2/templates/{id}/builds/{buildID}``: the steps; the build runs from here.

    A build runs build sandboxes (network on, large disk, long steps): it starts under the
    key's caps like a create, and counts as one of the key's sandboxes until it ends."""
    key = await authenticate(request)
    template = await _template(request, key)
    build_id = path_build_id(request)
    build = await _store(request).templates.build(build_id)
    if build is None or build.template_id != template.id:
        raise ApiError(404, f"build {build_id!r} not found")
    if build.status != "waiting":
        raise ApiError(409, f"build {build.id} has already started ({build.status})")
    service = _service(request)
    limiter = _limiter(request)
    try:
        spec = await json_object(request)
        try:
            check_spec(spec)
        except BuildFailed as e:
            raise ApiError(400, e.message) from None
        if spec.get("fromTemplate") is not None:
            template_ref(spec["fromTemplate"], "fromTemplate")
        running = await recorded_sandboxes(request, key.team_id)
        # (No await from these checks to the start: concurrent starts of one build cannot both
        # find it waiting, nor concurrent starts of one key both pass a full cap.)
        if service.running(build.id):
            raise ApiError(409, f"build {build.id} has already started (building)")
        limiter.check_start(key, running + limiter.under_way(key.team_id))
    except ApiError as e:
        # A build whose own request is wrong never runs: it shows failed, and why, never
        # waiting for good. One refused by a cap (429) may be started again later.
        if e.status == 400 and not service.running(build.id):
            await _store(request).templates.set_status(build, "error", {"message": e.message})
        raise
    limiter.building(key.team_id, service.start(template, build, spec))
    return Response(status_code=202)


async def _build_of(request: Request) -> tuple[TemplateRow, BuildRow]:
    """The caller's template and its build the path names."""
    template = await _template(request)
    build_id = path_build_id(request)
    build = await _store(request).templates.build(build_id)
    if build is None or build.template_id != template.id:
        raise ApiError(404, f"build {build_id!r} not found")
    return template, build


def _query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    """A whole-number query parameter within ``[low, high]`` (a 400 otherwise)."""
    text = request.query_params.get(name)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 18) or not low <= int(text) <= high:
        raise ApiError(400, f"{name} must be a whole number from {low} to {high}")
    return int(text)


def _query_choice(request: Request, name: str, choices: tuple[str, ...]) -> str | None:
    value = request.query_params.get(name)
    if value is not None and value not in choices:
        raise ApiError(400, f"{name} must be one of {', '.join(choices)}")
    return value


async def build_status(request: Request) -> Response:
    """``GET /templates/{id}/builds/{buildID}/status``: status and logs from ``logsOffset``."""
    template, build = await _build_of(request)
    offset = _query_int(request, "logsOffset", 0, 0, 1 << 31)
    limit = _query_int(request, "limit", LOGS_PAGE, 0, LOGS_PAGE)
    level = _query_choice(request, "level", LEVELS)
    entries = _at_least(_service(request).log_of(build.id).entries, level)
    entries = entries[offset : offset + limit]
    body: dict[str, Any] = {
        "templateID": template.id,
        "buildID": build.id,
        "status": build.status,
        "logs": [e.message for e in entries],
        "logEntries": [e.to_json() for e in entries],
    }
    if build.reason:
        body["reason"] = build.reason
    return JSONResponse(body)


def _at_least(entries: list[LogEntry], level: str | None) -> list[LogEntry]:
    if level is None:
        return entries
    wanted = set(LEVELS[LEVELS.index(level) :])
    return [e for e in entries if e.level in wanted]


def _millis(entry: LogEntry) -> int:
    return int(datetime.fromisoformat(entry.timestamp).timestamp() * 1000)


async def build_logs(request: Request) -> Response:
    """``GET /templates/{id}/builds/{buildID}/logs``: a page of the build's log entries from
    ``cursor`` (milliseconds since the epoch) on, ``forward`` in time or ``backward`` from it
    (the newest first), at ``level`` or above. (``source``: bilik keeps one log, both answer
    it.)"""
    _, build = await _build_of(request)
    cursor = _query_int(request, "cursor", -1, 0, 1 << 62)
    limit = _query_int(request, "limit", LOGS_PAGE, 0, LOGS_PAGE)
    direction = _query_choice(request, "direction", ("forward", "backward")) or "forward"
    level = _query_choice(request, "level", LEVELS)
    _query_choice(request, "source", ("temporary", "persistent"))
    entries = _at_least(_service(request).log_of(build.id).entries, level)
    if direction == "forward":
        page = [e for e in entries if cursor < 0 or _millis(e) >= cursor][:limit]
    else:
        page = [e for e in reversed(entries) if cursor < 0 or _millis(e) <= cursor][:limit]
    return JSONResponse({"logs": [e.to_json() for e in page]})


async def by_alias(request: Request) -> Response:
    """``GET /templates/aliases/{alias}``: 200 when the team has a template of that name, or
    it is one of bilik's own (public, as E2B's are)."""
    key = await authenticate(request)
    alias = path_template(request, "alias")
    template = await _store(request).templates.get(alias, key.team_id)
    if template is None:
        if alias in DEFAULTS:
            return JSONResponse({"templateID": alias, "public": True})
        raise ApiError(404, f"template {alias!r} not found")
    return JSONResponse({"templateID": template.id, "public": False})


def _build_json(template: TemplateRow, build: BuildRow) -> dict[str, Any]:
    """E2B's TemplateBuild."""
    body: dict[str, Any] = {
        "buildID": build.id,
        "status": build.status,
        "createdAt": _rfc3339(build.created_at),
        "updatedAt": _rfc3339(build.finished_at or build.created_at),
        "cpuCount": template.cpu_count,
        "memoryMB": template.memory_mb,
        "diskSizeMB": Limits().disk_mb,
        "envdVersion": ENVD_VERSION,
    }
    if build.finished_at is not None:
        body["finishedAt"] = _rfc3339(build.finished_at)
    return body


def _template_json(template: TemplateRow, builds: list[BuildRow]) -> dict[str, Any]:
    """E2B's Template, from the template and its builds (the newest first)."""
    latest = builds[0] if builds else None
    updated = max([template.created_at, *(b.finished_at or b.created_at for b in builds)])
    return {
        "templateID": template.id,
        "buildID": template.ready_build_id or (latest.id if latest else ""),
        "cpuCount": template.cpu_count,
        "memoryMB": template.memory_mb,
        "diskSizeMB": Limits().disk_mb,
        "public": False,
        "aliases": [template.name],
        "names": [template.name],
        "createdAt": _rfc3339(template.created_at),
        "updatedAt": _rfc3339(updated),
        "createdBy": None,
        "lastSpawnedAt": None,
        "spawnCount": 0,
        "buildCount": len(builds),
        "envdVersion": ENVD_VERSION,
        "buildStatus": latest.status if latest else "waiting",
    }


async def _listing(request: Request, key: ApiKey, offset: int, limit: int | None) -> list[Any]:
    """The team's templates (the oldest first), as E2B lists them."""
    store = _store(request).templates
    rows = sorted(await store.of_key(key.team_id), key=lambda t: (t.created_at, t.id))
    rows = rows[offset : None if limit is None else offset + limit]
    builds = await store.builds([t.id for t in rows])
    return [_template_json(t, [b for b in builds if b.template_id == t.id]) for t in rows]


async def list_templates(request: Request) -> Response:
    """``GET /templates``: all of the team's templates."""
    key = await authenticate(request)
    return JSONResponse(await _listing(request, key, 0, None))


def _page(request: Request) -> tuple[int, int]:
    """``(offset, limit)`` of a paged listing: ``nextToken`` is where the last page ended."""
    limit = _query_int(request, "limit", PAGE, 1, PAGE)
    token = request.query_params.get("nextToken") or "0"
    if not (token.isascii() and token.isdigit() and len(token) <= 9):
        raise ApiError(400, "nextToken is not one this server gave")
    return int(token), limit


def _paged(body: Any, offset: int, limit: int, more: bool) -> JSONResponse:
    """A page, with ``X-Next-Token`` (where the next one starts) when there is more."""
    headers = {"X-Next-Token": str(offset + limit)} if more else {}
    return JSONResponse(body, headers=headers)


async def list_templates_v2(request: Request) -> Response:
    """``GET /v2/templates``: the team's templates, a page at a time."""
    key = await authenticate(request)
    offset, limit = _page(request)
    page = await _listing(request, key, offset, limit + 1)
    return _paged(page[:limit], offset, limit, len(page) > limit)


async def get_template(request: Request) -> Response:
    """``GET /templates/{id}``: a template with its builds (the newest first, a page at a
    time). bilik's own templates answer too, public and with no builds of the team's."""
    key = await authenticate(request)
    offset, limit = _page(request)
    name = path_template(request)
    store = _store(request).templates
    template = await store.get(name, key.team_id)
    if template is None:
        if name not in DEFAULTS:
            raise ApiError(404, f"template {name!r} not found")
        return JSONResponse(await _default_json(request, name))
    every = await store.builds([template.id])
    body = _template_json(template, every)
    page = every[offset : offset + limit]
    body["builds"] = [_build_json(template, b) for b in page]
    return _paged(body, offset, limit, len(every) > offset + limit)


async def _default_json(request: Request, name: str) -> dict[str, Any]:
    """One of bilik's own templates, as E2B shows a public template."""
    built = await _service(request).defaults.built(name) is not None
    limits = default_limits(name)
    return {
        "templateID": name,
        "buildID": "",
        "cpuCount": int(limits.cpu),
        "memoryMB": limits.memory_mb,
        "diskSizeMB": limits.disk_mb,
        "public": True,
        "aliases": [name],
        "names": [name],
        "createdAt": _rfc3339(0),
        "updatedAt": _rfc3339(0),
        "createdBy": None,
        "lastSpawnedAt": None,
        "spawnCount": 0,
        "buildCount": 0,
        "envdVersion": ENVD_VERSION,
        "buildStatus": "ready" if built else "waiting",
        "builds": [],
    }


async def _update(request: Request) -> TemplateRow:
    """A PATCH of a template (E2B's TemplateUpdateRequest): ``public`` is the one field. bilik
    has no public templates (a template is its team's alone), so ``public: true`` is refused
    rather than ignored."""
    template = await _template(request)
    data = await json_object(request)
    public = data.get("public")
    if public is not None and not isinstance(public, bool):
        raise ApiError(400, "public must be true or false")
    if public:
        raise ApiError(
            400,
            "bilik has no public templates: a template is its team's alone (other teams "
            "cannot start sandboxes from it); give another team's key its own build",
        )
    return template


async def update_template(request: Request) -> Response:
    """``PATCH /templates/{id}`` (E2B's older route): 200 with no template."""
    await _update(request)
    return JSONResponse(None)


async def update_template_v2(request: Request) -> Response:
    """``PATCH /v2/templates/{id}``: 200 with the template's names."""
    template = await _update(request)
    return JSONResponse({"names": [template.name]})


async def delete_template(request: Request) -> Response:
    template = await _template(request)
    build_ids = await _store(request).templates.remove(template.id)
    await asyncio.to_thread(_service(request).forget, template.id, build_ids)
    return Response(status_code=204)


routes = [
    Route("/v3/templates", request_build, methods=["POST"]),
    Route("/templates", list_templates, methods=["GET"]),
    Route("/v2/templates", list_templates_v2, methods=["GET"]),
    Route("/templates/aliases/{alias}", by_alias, methods=["GET"]),
    Route("/templates/tags", assign_tags, methods=["POST"]),
    Route("/templates/tags", remove_tags, methods=["DELETE"]),
    Route("/templates/{template_id}/tags", list_tags, methods=["GET"]),
    Route("/templates/{template_id}", get_template, methods=["GET"]),
    Route("/templates/{template_id}", update_template, methods=["PATCH"]),
    Route("/templates/{template_id}", delete_template, methods=["DELETE"]),
    Route("/v2/templates/{template_id}", update_template_v2, methods=["PATCH"]),
    Route("/templates/{template_id}/files/{files_hash}", file_upload_link, methods=["GET"]),
    Route("/upload/{token}", upload, methods=["PUT"]),
    Route("/v2/templates/{template_id}/builds/{build_id}", start_build, methods=["POST"]),
    Route("/templates/{template_id}/builds/{build_id}/status", build_status, methods=["GET"]),
    Route("/templates/{template_id}/builds/{build_id}/logs", build_logs, methods=["GET"]),
]
