"""E2B's template build API: request a build, upload COPY files, start it, follow its logs."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..runtime.spec import Limits
from ..store import ApiKey
from ..store.templates import DEFAULT_TAG, TemplateRow
from ..templates import BadUpload, BuildFailed, TemplateService
from ..templates.build import check_spec
from ..templates.defaults import DEFAULTS
from ..templates.files import DRAIN_BYTES, TooLarge
from .auth import authenticate
from .errors import ApiError
from .parse import (
    declared_length,
    is_template_name,
    json_object,
    path_build_id,
    path_template,
    template_ref,
)
from .sandboxes import _limiter, _rfc3339, _store, recorded_sandboxes

# At most this many log entries per status call (as E2B's API).
LOGS_PAGE = 100


def _service(request: Request) -> TemplateService:
    service: TemplateService = request.app.state.templates
    return service


def _positive(data: dict[str, Any], name: str, default: int) -> int:
    value = data.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, f"{name} must be a whole number, at least 1; got {value!r}")
    return value


async def request_build(request: Request) -> Response:
    """``POST /v3/templates``: a template (new, or the key's one of that name) and a build."""
    key = await authenticate(request)
    data = await json_object(request)
    name = data.get("name") or data.get("alias")
    if not is_template_name(name):
        raise ApiError(400, "name must be 1-128 of lowercase letters, digits, '.', '_' and '-'")
    if name in DEFAULTS:
        raise ApiError(400, f"{name!r} is bilik's own template; pick another name")
    default = Limits()
    cpu = _positive(data, "cpuCount", int(default.cpu))
    memory = _positive(data, "memoryMB", default.memory_mb)
    _limiter(request).check_size(key, cpu=cpu, memory_mb=memory)
    tags = _tags([] if data.get("tags") is None else data["tags"])
    template, build = await _store(request).templates.request_build(
        key.id, name, cpu, memory, tuple(tags)
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


def _tags(value: object) -> list[str]:
    if not isinstance(value, list) or not all(is_template_name(t) for t in value):
        raise ApiError(400, "tags must be a list of names (lowercase letters, digits, . _ -)")
    return list(dict.fromkeys(value))


async def _named(
    request: Request, key: ApiKey, name: object, field: str
) -> tuple[TemplateRow, str]:
    """The key's template and tag a body's ``name[:tag]`` refers to (the tag "default" if
    none)."""
    base, tag = template_ref(name, field)
    template = await _store(request).templates.get(base, key.id)
    if template is None:
        raise ApiError(404, f"template {base!r} not found")
    return template, tag or DEFAULT_TAG


async def assign_tags(request: Request) -> Response:
    """``POST /templates/tags``: point tags at the build ``target`` (``name:tag``) names."""
    key = await authenticate(request)  # (before reading a byte of the body)
    data = await json_object(request)
    target, tags = data.get("target"), _tags(data.get("tags"))
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
    name, tags = data.get("name"), _tags(data.get("tags"))
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
    template = await _store(request).templates.get(template_id, key.id)
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
    spec = await json_object(request)
    try:
        check_spec(spec)
    except BuildFailed as e:
        raise ApiError(400, e.message) from None
    if spec.get("fromTemplate") is not None:
        template_ref(spec["fromTemplate"], "fromTemplate")
    limiter = _limiter(request)
    running = await recorded_sandboxes(request, key.id)
    # (No await from these checks to the start: concurrent starts of one build cannot both
    # find it waiting, nor concurrent starts of one key both pass a full cap.)
    service = _service(request)
    if service.running(build.id):
        raise ApiError(409, f"build {build.id} has already started (building)")
    limiter.check_start(key, running + limiter.under_way(key.id))
    limiter.building(key.id, service.start(template, build, spec))
    return Response(status_code=202)


async def build_status(request: Request) -> Response:
    """``GET /templates/{id}/builds/{buildID}/status``: status and logs from ``logsOffset``."""
    template = await _template(request)
    build_id = path_build_id(request)
    build = await _store(request).templates.build(build_id)
    if build is None or build.template_id != template.id:
        raise ApiError(404, f"build {build_id!r} not found")
    try:
        offset = max(0, int(request.query_params.get("logsOffset", "0")))
        limit = min(LOGS_PAGE, max(1, int(request.query_params.get("limit", LOGS_PAGE))))
    except ValueError:
        raise ApiError(400, "logsOffset and limit must be whole numbers") from None
    entries = _service(request).log_of(build.id).entries[offset : offset + limit]
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


async def by_alias(request: Request) -> Response:
    """``GET /templates/aliases/{alias}``: 200 when the key has a template of that name."""
    key = await authenticate(request)
    alias = path_template(request, "alias")
    template = await _store(request).templates.get(alias, key.id)
    if template is None:
        raise ApiError(404, f"template {alias!r} not found")
    return JSONResponse({"templateID": template.id, "public": False})


async def list_templates(request: Request) -> Response:
    key = await authenticate(request)
    rows = await _store(request).templates.of_key(key.id)
    return JSONResponse(
        [
            {
                "templateID": t.id,
                "buildID": t.ready_build_id or "",
                "cpuCount": t.cpu_count,
                "memoryMB": t.memory_mb,
                "public": False,
                "aliases": [t.name],
                "names": [t.name],
                "createdAt": _rfc3339(t.created_at),
                "updatedAt": _rfc3339(t.created_at),
                "buildStatus": "ready" if t.ready_build_id else "waiting",
            }
            for t in rows
        ]
    )


async def delete_template(request: Request) -> Response:
    template = await _template(request)
    build_ids = await _store(request).templates.remove(template.id)
    await asyncio.to_thread(_service(request).forget, template.id, build_ids)
    return Response(status_code=204)


routes = [
    Route("/v3/templates", request_build, methods=["POST"]),
    Route("/templates", list_templates, methods=["GET"]),
    Route("/templates/aliases/{alias}", by_alias, methods=["GET"]),
    Route("/templates/tags", assign_tags, methods=["POST"]),
    Route("/templates/tags", remove_tags, methods=["DELETE"]),
    Route("/templates/{template_id}/tags", list_tags, methods=["GET"]),
    Route("/templates/{template_id}", delete_template, methods=["DELETE"]),
    Route("/templates/{template_id}/files/{files_hash}", file_upload_link, methods=["GET"]),
    Route("/upload/{token}", upload, methods=["PUT"]),
    Route("/v2/templates/{template_id}/builds/{build_id}", start_build, methods=["POST"]),
    Route("/templates/{template_id}/builds/{build_id}/status", build_status, methods=["GET"]),
]
