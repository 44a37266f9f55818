"""Template calls to the server, written once (async); the sync ``Template`` runs them on the
SDK's portal loop.

A build: hash each COPY step's files, ask for a build (``POST /v3/templates``), upload the
files the server does not have yet (``GET /templates/{id}/files/{hash}``, then a ``PUT`` of a
tar to the self-authenticating URL it gives), start it with the steps (``POST
/v2/templates/{id}/builds/{build}``), and follow its status and logs until it ends.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from collections.abc import AsyncIterator, Callable
from typing import IO, Any
from urllib.parse import quote

import httpx

from bilik.sdk.api import ApiClient
from bilik.sdk.config import ApiParams, ConnectionConfig
from bilik.sdk.exceptions import (
    AuthenticationException,
    BuildException,
    FileUploadException,
    NotFoundException,
    RateLimitException,
    SandboxException,
    ServiceBusyException,
    TemplateException,
)
from bilik.sdk.template import files
from bilik.sdk.template.builder import GZIP, RESOLVE_SYMLINKS, TemplateBase, definition
from bilik.sdk.template.origin import Origin
from bilik.sdk.template.types import (
    BuildInfo,
    BuildStatusReason,
    InstructionType,
    LogEntry,
    LogEntryEnd,
    LogEntryStart,
    TemplateBuildStatus,
    TemplateBuildStatusResponse,
    TemplateInfo,
    TemplateTag,
    TemplateTagInfo,
    _parse_time,
)

LOGS_REFRESH_S = 0.2
UPLOAD_TIMEOUT_S = 3600.0
_UPLOAD_CHUNK = 1024 * 1024

OnLogs = Callable[[LogEntry], None]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _client(opts: ApiParams) -> ApiClient:
    return ApiClient(ConnectionConfig.resolve(**opts))


def _at(error: Exception, origin: Origin | None) -> Exception:
    """``error`` with the user's line as its traceback (the innermost frame shown)."""
    return error.with_traceback(origin.traceback) if origin is not None else error


def _path(value: str) -> str:
    return quote(value, safe="")


def _name(name: str | None, alias: str | None) -> str:
    chosen = name or alias
    if not chosen:
        raise TemplateException("a template needs a name: build(template, name=...)")
    return chosen


def _hashes(t: TemplateBase) -> dict[int, str]:
    """Each COPY step's files hash, by step index (blocking: reads the files)."""
    ignore = [*files.read_dockerignore(t._file_context_path), *t._file_ignore_patterns]
    out: dict[int, str] = {}
    for index, step in enumerate(t._steps):
        if step.type is not InstructionType.COPY:
            continue
        symlinks = RESOLVE_SYMLINKS if step.resolve_symlinks is None else step.resolve_symlinks
        try:
            out[index] = files.files_hash(
                step.args[0], step.args[1], t._file_context_path, ignore, symlinks
            )
        except (files.NoFilesMatched, OSError) as e:
            where = f"\n  at {step.origin} (step {index + 1}: {step.summary()})"
            raise _at(
                BuildException(f"COPY {step.args[0]}: {e}" + (where if step.origin else "")),
                step.origin,
            ) from None
    return out


async def _request(client: ApiClient, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """A build call; what the server refuses becomes a BuildException (a refused key, a rate
    limit or a busy server stay what they are: retrying later or a new key helps)."""
    try:
        return await client.request(method, path, **kwargs)
    except (AuthenticationException, RateLimitException, ServiceBusyException):
        raise
    except SandboxException as e:
        raise BuildException(str(e)) from e


async def _upload_chunks(archive: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(archive.read, _UPLOAD_CHUNK):
        yield chunk


async def _upload(
    t: TemplateBase,
    index: int,
    url: str,
    headers: dict[str, str],
    request_timeout: float | None,
) -> None:
    """PUT the step's files to ``url``: a plain client, no API key (the URL is the proof)."""
    step = t._steps[index]
    ignore = [*files.read_dockerignore(t._file_context_path), *t._file_ignore_patterns]
    symlinks = RESOLVE_SYMLINKS if step.resolve_symlinks is None else step.resolve_symlinks
    gzip = GZIP if step.gzip is None else step.gzip
    try:
        archive = await asyncio.to_thread(
            files.archive, step.args[0], t._file_context_path, ignore, symlinks, gzip
        )
        try:
            size = os.fstat(archive.fileno()).st_size
            sent = {k: v for k, v in headers.items() if k.lower() != "content-length"}
            # An explicit length: presigned-URL stores refuse chunked uploads.
            sent["Content-Length"] = str(size)
            timeout = UPLOAD_TIMEOUT_S if request_timeout is None else request_timeout
            async with httpx.AsyncClient(timeout=timeout or None) as plain:
                response = await plain.put(url, content=_upload_chunks(archive), headers=sent)
            response.raise_for_status()
        finally:
            archive.close()
    except (httpx.HTTPError, OSError) as e:
        raise _at(
            FileUploadException(f"uploading the files of COPY {step.args[0]} failed: {e}"),
            step.origin,
        ) from None


async def start_build(
    template: object,
    name: str | None,
    alias: str | None,
    tags: list[str] | None,
    cpu_count: int | None,
    memory_mb: int | None,
    skip_cache: bool,
    on_build_logs: OnLogs | None,
    opts: ApiParams,
) -> BuildInfo:
    """Hash, request, upload and start a build; returns as soon as the server has it."""
    t = definition(template)
    chosen = _name(name, alias)
    log = on_build_logs or (lambda entry: None)
    hashes = await asyncio.to_thread(_hashes, t)
    client = _client(opts)
    log(
        LogEntry.now(
            f"Requesting build for template: {chosen}"
            + (f" with tags: {', '.join(tags)}" if tags else "")
        )
    )
    body: dict[str, Any] = {"name": chosen}
    if tags:
        body["tags"] = list(tags)
    if cpu_count is not None:
        body["cpuCount"] = cpu_count
    if memory_mb is not None:
        body["memoryMB"] = memory_mb
    made = (await _request(client, "POST", "/v3/templates", json=body)).json()
    template_id, build_id = str(made["templateID"]), str(made["buildID"])
    log(LogEntry.now(f"Template created with ID: {template_id}, Build ID: {build_id}"))

    uploaded: set[str] = set()
    for index, files_hash in hashes.items():
        step = t._steps[index]
        src = step.args[0]
        if files_hash in uploaded:
            log(LogEntry.now(f"Skipping upload of '{src}', already cached"))
            continue
        try:
            link = (
                await client.request("GET", f"/templates/{_path(template_id)}/files/{files_hash}")
            ).json()
        except (AuthenticationException, RateLimitException, ServiceBusyException):
            raise
        except SandboxException as e:
            raise _at(FileUploadException(str(e)), step.origin) from e
        url = link.get("url")
        if url and (not link.get("present") or step.force_upload):
            headers = {str(k): str(v) for k, v in (link.get("headers") or {}).items()}
            await _upload(t, index, str(url), headers, opts.get("request_timeout"))
            log(LogEntry.now(f"Uploaded '{src}'"))
        else:
            log(LogEntry.now(f"Skipping upload of '{src}', already cached"))
        uploaded.add(files_hash)
    log(LogEntry.now("All file uploads completed"))

    spec = t._spec(hashes)
    if skip_cache:
        spec["force"] = True
    log(LogEntry.now("Starting building..."))
    await _request(
        client, "POST", f"/v2/templates/{_path(template_id)}/builds/{_path(build_id)}", json=spec
    )
    return BuildInfo(template_id, build_id, chosen, chosen, list(made.get("tags") or []))


async def build(
    template: object,
    name: str | None,
    alias: str | None,
    tags: list[str] | None,
    cpu_count: int | None,
    memory_mb: int | None,
    skip_cache: bool,
    on_build_logs: OnLogs | None,
    opts: ApiParams,
) -> BuildInfo:
    """Build and wait: logs go to ``on_build_logs`` as they come; a failure raises
    BuildException pointing at the user's line behind the failed step."""
    log = on_build_logs or (lambda entry: None)
    t = definition(template)
    log(LogEntryStart(_now(), "Build started"))
    try:
        info = await start_build(
            t, name, alias, tags, cpu_count, memory_mb, skip_cache, on_build_logs, opts
        )
        log(LogEntry.now("Waiting for logs..."))
        await wait_for_build(t, info, on_build_logs, opts)
        return info
    finally:
        log(LogEntryEnd(_now(), "Build finished"))


async def wait_for_build(
    t: TemplateBase, info: BuildInfo, on_build_logs: OnLogs | None, opts: ApiParams
) -> None:
    """Follow a build's log to its end; raise BuildException if it failed."""
    client = _client(opts)
    offset = 0
    while True:
        status = await _status(client, info, offset)
        offset += len(status.log_entries)
        for entry in status.log_entries:
            if on_build_logs is not None:
                on_build_logs(entry)
        if status.status in (TemplateBuildStatus.READY, TemplateBuildStatus.ERROR):
            # At most a page of entries per call: drain the rest before the verdict.
            if status.log_entries:
                continue
            if status.status is TemplateBuildStatus.READY:
                return
            raise _failure(t, status.reason)
        await asyncio.sleep(LOGS_REFRESH_S)


def _failure(t: TemplateBase, reason: BuildStatusReason | None) -> BuildException:
    message = reason.message if reason is not None else "the build failed"
    origin, label = t._origin_of(reason.step if reason is not None else None)
    if origin is not None:
        message += f"\n  at {origin} ({label})"
    error = BuildException(message)
    return error.with_traceback(origin.traceback) if origin is not None else error


async def _status(
    client: ApiClient, info: BuildInfo, offset: int | None
) -> TemplateBuildStatusResponse:
    params = {"logsOffset": offset} if offset is not None else None
    path = f"/templates/{_path(info.template_id)}/builds/{_path(info.build_id)}/status"
    data = (await _request(client, "GET", path, params=params)).json()
    raw_reason = data.get("reason")
    reason = None
    if isinstance(raw_reason, dict):
        step = raw_reason.get("step")
        reason = BuildStatusReason(
            message=str(raw_reason.get("message") or ""),
            step=None if step is None else str(step),
            log_entries=[LogEntry.from_json(e) for e in raw_reason.get("logEntries") or []],
        )
    return TemplateBuildStatusResponse(
        build_id=str(data.get("buildID", info.build_id)),
        template_id=str(data.get("templateID", info.template_id)),
        status=TemplateBuildStatus(data.get("status", "error")),
        log_entries=[LogEntry.from_json(e) for e in data.get("logEntries") or []],
        logs=[str(line) for line in data.get("logs") or []],
        reason=reason,
    )


async def build_status(
    info: BuildInfo, logs_offset: int | None, opts: ApiParams
) -> TemplateBuildStatusResponse:
    """A build's status and its log from ``logs_offset`` (a page at most)."""
    return await _status(_client(opts), info, logs_offset)


async def exists(name: str, opts: ApiParams) -> bool:
    """Whether the key has a template of that name."""
    try:
        await _client(opts).request("GET", f"/templates/aliases/{_path(name)}")
    except NotFoundException:
        return False
    return True


async def list_templates(opts: ApiParams) -> list[TemplateInfo]:
    """The key's templates."""
    response = await _client(opts).request("GET", "/templates")
    return [TemplateInfo.from_json(row) for row in response.json()]


async def delete(name: str, opts: ApiParams) -> None:
    """Delete a template (by name or id) and its builds; NotFoundException if none."""
    await _client(opts).request("DELETE", f"/templates/{_path(name)}")


async def assign_tags(target: str, tags: str | list[str], opts: ApiParams) -> TemplateTagInfo:
    """Point ``tags`` at the build ``target`` (``name:tag``) names."""
    body = {"target": target, "tags": [tags] if isinstance(tags, str) else list(tags)}
    data = (await _client(opts).request("POST", "/templates/tags", json=body)).json()
    return TemplateTagInfo(str(data["buildID"]), [str(x) for x in data.get("tags") or []])


async def remove_tags(name: str, tags: str | list[str], opts: ApiParams) -> None:
    """Take ``tags`` off the template ``name``."""
    body = {"name": name, "tags": [tags] if isinstance(tags, str) else list(tags)}
    await _client(opts).request("DELETE", "/templates/tags", json=body)


async def get_tags(template_id: str, opts: ApiParams) -> list[TemplateTag]:
    """A template's tags and the builds they name."""
    data = (await _client(opts).request("GET", f"/templates/{_path(template_id)}/tags")).json()
    return [
        TemplateTag(str(row["tag"]), str(row["buildID"]), _parse_time(row.get("createdAt")))
        for row in data
    ]
