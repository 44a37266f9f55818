"""The OpenAPI document of bilik's control plane (E2B's paths and shapes), served as JSON.

It describes every route the control plane serves, with every status each can answer, and
``tests/test_openapi_conformance.py`` holds the server to it: generated requests to every
operation, no 5xx, every answer as described here. Shapes are E2B's (its ``spec/openapi.yml``);
bilik's answers are supersets of them, so objects leave other properties open.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

_STR = {"type": "string"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_TIME = {"type": "string", "format": "date-time"}
_STRINGS = {"type": "array", "items": _STR}
_STR_MAP = {"type": "object", "additionalProperties": _STR}
_NULLABLE_TIME = {"type": "string", "format": "date-time", "nullable": True}
_NULLABLE_OBJECT = {"type": "object", "nullable": True}

_DESCRIPTIONS = {
    200: "ok",
    201: "created",
    202: "accepted",
    204: "done",
    400: "bad request",
    401: "no or an unknown API key",
    403: "forbidden",
    404: "not found",
    409: "conflict",
    413: "request body too large",
    429: "over a cap of the key",
    500: "server error",
    503: "starting",
}
_NEXT_TOKEN_HEADER = {
    "X-Next-Token": {"description": "where the next page starts (none: last page)", "schema": _STR}
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str] | None = None, **properties: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _array(item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": item}


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": _STR}


def _query(name: str, schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    param = {"name": name, "in": "query", "required": False, "schema": schema}
    if description:
        param["description"] = description
    return param


def _json_body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _op(
    summary: str,
    ok: int,
    body: dict[str, Any] | None = None,
    *,
    errors: tuple[int, ...],
    params: list[dict[str, Any]] | None = None,
    request: dict[str, Any] | None = None,
    headers: dict[str, Any] | None = None,
    security: list[Any] | None = None,
) -> dict[str, Any]:
    """One operation: its success (``ok``, with a JSON ``body`` or none) and the errors it
    answers (each a JSON Error)."""
    success: dict[str, Any] = {"description": _DESCRIPTIONS[ok]}
    if body is not None:
        success["content"] = {"application/json": {"schema": body}}
    if headers:
        success["headers"] = headers
    op: dict[str, Any] = {"summary": summary, "responses": {str(ok): success}}
    for code in errors:
        op["responses"][str(code)] = {
            "description": _DESCRIPTIONS[code],
            "content": {"application/json": {"schema": _ref("Error")}},
        }
    if params:
        op["parameters"] = params
    if request:
        op["requestBody"] = request
    if security is not None:
        op["security"] = security
    return op


_SANDBOX_ID = _path("sandboxID")
_TEMPLATE_ID = _path("templateID")
_BUILD_ID = _path("buildID")
_API_KEY_ID = _path("apiKeyID")
_LOG_LEVEL = {"type": "string", "enum": ["debug", "info", "warn", "error"]}
_PAGE_PARAMS = [
    _query("nextToken", _STR, "where the page starts (a previous page's X-Next-Token)"),
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 100}),
]
_TIMEOUT_BODY = _json_body(_obj(timeout={"type": "integer", "minimum": 0}), required=False)

_SCHEMAS: dict[str, Any] = {
    "Error": _obj(["code", "message"], code=_INT, message=_STR),
    # Sandboxes
    "NewSandbox": _obj(
        ["templateID"],
        templateID=_STR,
        timeout={"type": "integer", "minimum": 0, "default": 300},
        metadata=_STR_MAP,
        envVars=_STR_MAP,
        allow_internet_access={"type": "boolean", "default": True},
        secure=_BOOL,
        autoPause={**_BOOL, "description": "pause the sandbox at its timeout, not kill it"},
        autoPauseMemory={
            **_BOOL,
            "description": "that pause keeps its memory (default) or only its files",
        },
        autoResume=_ref("SandboxAutoResumeConfig"),
        lifecycle={
            "type": "object",
            "description": "the same as onTimeout/autoResume (not with the fields above)",
            "properties": {
                "onTimeout": {
                    "oneOf": [
                        {"type": "string", "enum": ["kill", "pause"]},
                        _obj(
                            ["action"],
                            action={"type": "string", "enum": ["kill", "pause"]},
                            mode={"type": "string", "enum": ["full", "filesystem"]},
                        ),
                    ]
                },
                "autoResume": _BOOL,
            },
        },
    ),
    "SandboxAutoResumeConfig": _obj(
        ["enabled"],
        enabled={**_BOOL, "description": "a request to the paused sandbox resumes it"},
    ),
    "SandboxLifecycle": _obj(
        ["onTimeout", "autoResume"],
        onTimeout={"type": "string", "enum": ["kill", "pause"]},
        autoResume=_BOOL,
    ),
    "BilikPause": _obj(
        ["mechanism", "memory", "durable", "memoryLost", "pausedAt"],
        mechanism={
            "type": "string",
            "description": "freezer (held in RAM), checkpoint (on disk) or disk (files only)",
        },
        memory=_BOOL,
        durable={**_BOOL, "description": "survives a restart of the machine"},
        memoryLost={**_BOOL, "description": "a memory pause whose memory a restart lost"},
        pausedAt=_TIME,
    ),
    "SandboxPauseRequest": _obj(
        memory={**_BOOL, "default": True}, requireHealthyGuest={**_BOOL, "default": False}
    ),
    "ConnectSandbox": _obj(
        timeout={"type": "integer", "minimum": 0},
        memory={
            **_BOOL,
            "description": "false: a fresh boot (only for a sandbox paused without memory)",
        },
    ),
    "ResumedSandbox": _obj(
        timeout={"type": "integer", "minimum": 0}, autoPause=_BOOL, memory=_BOOL, cpuCount=_INT
    ),
    "SandboxSnapshotRequest": _obj(name=_STR, memory=_BOOL),
    "SnapshotInfo": _obj(["snapshotID", "names"], snapshotID=_STR, names=_STRINGS),
    "CreatedSnapshot": {
        "allOf": [
            _ref("SnapshotInfo"),
            _obj(
                ["bilikSnapshot"],
                bilikSnapshot=_obj(
                    ["mode", "memory"],
                    mode={"type": "string", "enum": ["filesystem"]},
                    memory=_BOOL,
                    why=_STR,
                ),
            ),
        ]
    },
    "SandboxForkRequest": _obj(
        count={"type": "integer", "minimum": 1, "maximum": 20, "default": 1},
        timeout={"type": "integer", "minimum": 0},
    ),
    "SandboxForkResult": _obj(
        sandbox=_ref("Sandbox"),
        error=_ref("Error"),
        forkMode={"type": "string", "enum": ["filesystem"]},
    ),
    "Sandbox": _obj(
        ["templateID", "sandboxID", "clientID", "envdVersion"],
        templateID=_STR,
        sandboxID=_STR,
        clientID=_STR,
        alias=_STR,
        envdVersion=_STR,
        envdAccessToken=_STR,
        domain={"type": "string", "nullable": True},
    ),
    "SandboxDetail": {
        "allOf": [
            _ref("Sandbox"),
            _obj(
                ["startedAt", "endAt", "cpuCount", "memoryMB", "diskSizeMB", "state"],
                startedAt=_TIME,
                endAt=_TIME,
                cpuCount={"type": "number"},
                memoryMB=_INT,
                diskSizeMB=_INT,
                state={"type": "string", "enum": ["running", "paused"]},
                metadata=_STR_MAP,
                allowInternetAccess={"type": "boolean", "nullable": True},
                lifecycle=_ref("SandboxLifecycle"),
                pauseMode={"type": "string", "enum": ["full", "filesystem"]},
                bilikPause=_ref("BilikPause"),
            ),
        ]
    },
    "SandboxMetric": _obj(
        None,
        **{
            k: {"type": "number"}
            for k in (
                "timestampUnix",
                "cpuCount",
                "cpuUsedPct",
                "memUsed",
                "memTotal",
                "memCache",
                "diskUsed",
                "diskTotal",
            )
        },
    ),
    "SandboxLogs": _obj(
        ["logs"],
        logs=_array(_obj(["timestamp", "line"], timestamp=_STR, line=_STR)),
        logEntries=_array({"type": "object"}),
    ),
    "SandboxLogEntry": _obj(
        ["timestamp", "level", "message", "fields"],
        timestamp=_TIME,
        level=_LOG_LEVEL,
        message=_STR,
        fields=_STR_MAP,
    ),
    "SandboxLogsV2Response": _obj(["logs"], logs=_array(_ref("SandboxLogEntry"))),
    "SandboxesWithMetrics": _obj(
        ["sandboxes"], sandboxes={"type": "object", "additionalProperties": _ref("SandboxMetric")}
    ),
    # Templates
    "TemplateBuildRequestV3": _obj(
        name={**_STR, "description": "the template's name, optionally with ':tag'"},
        alias={**_STR, "deprecated": True},
        tags=_STRINGS,
        cpuCount={"type": "integer", "minimum": 1},
        memoryMB={"type": "integer", "minimum": 1},
    ),
    "TemplateRequestResponseV3": _obj(
        ["templateID", "buildID", "public", "aliases", "names", "tags"],
        templateID=_STR,
        buildID=_STR,
        public=_BOOL,
        names=_STRINGS,
        tags=_STRINGS,
        aliases=_STRINGS,
    ),
    "TemplateBuildFileUpload": _obj(["present"], present=_BOOL, url=_STR),
    "TemplateStep": _obj(
        ["type"], type=_STR, args=_STRINGS, filesHash=_STR, force=_BOOL, forceUpload=_BOOL
    ),
    "TemplateBuildStartV2": _obj(
        fromImage=_STR,
        fromTemplate=_STR,
        fromImageRegistry={"type": "object"},
        force=_BOOL,
        steps=_array(_ref("TemplateStep")),
        startCmd=_STR,
        readyCmd=_STR,
    ),
    "BuildLogEntry": _obj(
        ["timestamp", "message", "level"],
        timestamp=_TIME,
        message=_STR,
        level=_LOG_LEVEL,
        step=_STR,
    ),
    "TemplateBuildStatus": {"type": "string", "enum": ["building", "waiting", "ready", "error"]},
    "BuildStatusReason": _obj(
        ["message"], message=_STR, step=_STR, logEntries=_array(_ref("BuildLogEntry"))
    ),
    "TemplateBuildInfo": _obj(
        ["templateID", "buildID", "status", "logs", "logEntries"],
        templateID=_STR,
        buildID=_STR,
        status=_ref("TemplateBuildStatus"),
        logs=_STRINGS,
        logEntries=_array(_ref("BuildLogEntry")),
        reason=_ref("BuildStatusReason"),
    ),
    "TemplateBuildLogsResponse": _obj(["logs"], logs=_array(_ref("BuildLogEntry"))),
    "TemplateBuild": _obj(
        ["buildID", "status", "createdAt", "updatedAt", "cpuCount", "memoryMB"],
        buildID={"type": "string", "format": "uuid"},
        status=_ref("TemplateBuildStatus"),
        createdAt=_TIME,
        updatedAt=_TIME,
        finishedAt=_TIME,
        cpuCount=_INT,
        memoryMB=_INT,
        diskSizeMB=_INT,
        envdVersion=_STR,
    ),
    "Template": _obj(
        [
            "templateID",
            "buildID",
            "cpuCount",
            "memoryMB",
            "diskSizeMB",
            "public",
            "createdAt",
            "updatedAt",
            "createdBy",
            "lastSpawnedAt",
            "spawnCount",
            "buildCount",
            "envdVersion",
            "aliases",
            "names",
            "buildStatus",
        ],
        templateID=_STR,
        buildID=_STR,
        cpuCount=_INT,
        memoryMB=_INT,
        diskSizeMB=_INT,
        public=_BOOL,
        aliases=_STRINGS,
        names=_STRINGS,
        createdAt=_TIME,
        updatedAt=_TIME,
        createdBy=_NULLABLE_OBJECT,
        lastSpawnedAt=_NULLABLE_TIME,
        spawnCount=_INT,
        buildCount=_INT,
        envdVersion=_STR,
        buildStatus=_ref("TemplateBuildStatus"),
    ),
    "TemplateWithBuilds": {
        "allOf": [_ref("Template"), _obj(["builds"], builds=_array(_ref("TemplateBuild")))]
    },
    "TemplateAliasResponse": _obj(["templateID", "public"], templateID=_STR, public=_BOOL),
    "TemplateUpdateRequest": _obj(public=_BOOL),
    "TemplateUpdateResponse": _obj(["names"], names=_STRINGS),
    "AssignTemplateTagsRequest": _obj(["target", "tags"], target=_STR, tags=_STRINGS),
    "AssignedTemplateTags": _obj(["tags", "buildID"], tags=_STRINGS, buildID=_STR),
    "DeleteTemplateTagsRequest": _obj(["name", "tags"], name=_STR, tags=_STRINGS),
    "TemplateTag": _obj(["tag", "buildID", "createdAt"], tag=_STR, buildID=_STR, createdAt=_TIME),
    # API keys
    "IdentifierMaskingDetails": _obj(
        ["prefix", "valueLength", "maskedValuePrefix", "maskedValueSuffix"],
        prefix=_STR,
        valueLength=_INT,
        maskedValuePrefix=_STR,
        maskedValueSuffix=_STR,
    ),
    "TeamAPIKey": _obj(
        ["id", "name", "mask", "createdAt"],
        id=_STR,
        name=_STR,
        mask=_ref("IdentifierMaskingDetails"),
        createdAt=_TIME,
        createdBy=_NULLABLE_OBJECT,
        lastUsed=_NULLABLE_TIME,
    ),
    "CreatedTeamAPIKey": {
        "allOf": [_ref("TeamAPIKey"), _obj(["key"], key={**_STR, "description": "shown once"})]
    },
    "NewTeamAPIKey": _obj(["name"], name=_STR),
    "UpdateTeamAPIKey": _obj(["name"], name=_STR),
}

_CREATE = _op(
    "Create a sandbox",
    201,
    _ref("Sandbox"),
    errors=(400, 401, 404, 409, 413, 429),
    params=[{"name": "Idempotency-Key", "in": "header", "schema": _STR}],
    request=_json_body(_ref("NewSandbox")),
)
_LIST_PARAMS = [
    _query("metadata", _STR, "key=value pairs, URL-encoded"),
    _query("state", _STR, "running and/or paused, comma-separated"),
    _query("order", _STR),
    _query("startedAfter", _STR),
    _query("template", _STR),
    _query("nextToken", _STR),
    _query("limit", _INT),
]
_SANDBOXES = _array(_ref("SandboxDetail"))
_CONNECT = _op(
    "Connect to a sandbox: a running one's timeout only extends (200), a paused one resumes (201)",
    200,
    _ref("Sandbox"),
    errors=(400, 401, 404, 409, 413, 500),
    params=[_SANDBOX_ID],
    request=_json_body(_ref("ConnectSandbox"), required=False),
)
_CONNECT["responses"]["201"] = {
    "description": "Resumed",
    "content": {"application/json": {"schema": _ref("Sandbox")}},
}
_TEMPLATE_UPDATE = _json_body(_ref("TemplateUpdateRequest"))

_PATHS: dict[str, Any] = {
    "/health": {
        "get": _op("Ready?", 200, _obj(status=_STR), errors=(503,), security=[]),
    },
    "/openapi.json": {
        "get": _op("This document", 200, {"type": "object"}, errors=(), security=[]),
    },
    # Sandboxes
    "/sandboxes": {
        "post": _CREATE,
        "get": _op("List sandboxes (v1)", 200, _SANDBOXES, errors=(400, 401), params=_LIST_PARAMS),
    },
    "/v2/sandboxes": {
        "post": _CREATE,
        "get": _op(
            "List the caller's sandboxes, a page at a time",
            200,
            _SANDBOXES,
            errors=(400, 401),
            params=_LIST_PARAMS,
            headers=_NEXT_TOKEN_HEADER,
        ),
    },
    "/sandboxes/{sandboxID}": {
        "get": _op(
            "Get a sandbox", 200, _ref("SandboxDetail"), errors=(401, 404), params=[_SANDBOX_ID]
        ),
        "delete": _op("Kill a sandbox", 204, errors=(401, 404), params=[_SANDBOX_ID]),
    },
    "/sandboxes/{sandboxID}/timeout": {
        "post": _op(
            "Set the sandbox to end this many seconds from now",
            204,
            errors=(400, 401, 404, 413),
            params=[_SANDBOX_ID],
            request=_TIMEOUT_BODY,
        ),
    },
    "/sandboxes/{sandboxID}/metrics": {
        "get": _op(
            "CPU, memory and disk use",
            200,
            _array(_ref("SandboxMetric")),
            errors=(400, 401, 404),
            params=[
                _SANDBOX_ID,
                _query("start", {"type": "integer", "minimum": 0}),
                _query("end", {"type": "integer", "minimum": 0}),
            ],
        ),
    },
    "/sandboxes/metrics": {
        "get": _op(
            "The latest CPU, memory and disk use of several sandboxes",
            200,
            _ref("SandboxesWithMetrics"),
            errors=(400, 401),
            params=[
                {
                    "name": "sandbox_ids",
                    "in": "query",
                    "required": True,
                    "explode": False,
                    "schema": {"type": "array", "items": _STR, "maxItems": 100},
                }
            ],
        ),
    },
    "/sandboxes/{sandboxID}/refreshes": {
        "post": _op(
            "Keep the sandbox alive this many more seconds",
            204,
            errors=(400, 401, 404, 413),
            params=[_SANDBOX_ID],
            request=_json_body(
                _obj(duration={"type": "integer", "minimum": 0, "maximum": 3600}), required=False
            ),
        ),
    },
    "/v2/sandboxes/{sandboxID}/logs": {
        "get": _op(
            "What the sandbox's first process wrote, a page at a time",
            200,
            _ref("SandboxLogsV2Response"),
            errors=(400, 401, 404),
            params=[
                _SANDBOX_ID,
                _query("cursor", {"type": "integer", "minimum": 0}, "milliseconds since 1970"),
                _query("limit", {"type": "integer", "minimum": 0, "maximum": 1000}),
                _query("direction", {"type": "string", "enum": ["forward", "backward"]}),
                _query("level", _LOG_LEVEL),
                _query("search", {"type": "string", "maxLength": 256}),
            ],
        ),
    },
    "/sandboxes/{sandboxID}/logs": {
        "get": _op(
            "What the sandbox's first process wrote",
            200,
            _ref("SandboxLogs"),
            errors=(401, 404),
            params=[_SANDBOX_ID],
        ),
    },
    "/sandboxes/{sandboxID}/resume": {
        "post": _op(
            "Legacy resume: a paused sandbox resumed with its id; a running one is 409",
            201,
            _ref("Sandbox"),
            errors=(400, 401, 404, 409, 413, 500),
            params=[_SANDBOX_ID],
            request=_json_body(_ref("ResumedSandbox"), required=False),
        ),
    },
    "/sandboxes/{sandboxID}/pause": {
        "post": _op(
            "Pause a sandbox (409 if paused already)",
            204,
            errors=(400, 401, 404, 409, 413, 500, 503),
            params=[_SANDBOX_ID],
            request=_json_body(_ref("SandboxPauseRequest"), required=False),
        ),
    },
    "/sandboxes/{sandboxID}/snapshots": {
        "post": _op(
            "Snapshot the sandbox's files as a template of the team's",
            201,
            _ref("CreatedSnapshot"),
            errors=(400, 401, 404, 409, 413, 500),
            params=[_SANDBOX_ID],
            request=_json_body(_ref("SandboxSnapshotRequest"), required=False),
        ),
    },
    "/sandboxes/{sandboxID}/fork": {
        "post": _op(
            "New sandboxes with a copy of the sandbox's files, from one snapshot",
            201,
            _array(_ref("SandboxForkResult")),
            errors=(400, 401, 404, 409, 413, 429, 500),
            params=[_SANDBOX_ID],
            request=_json_body(_ref("SandboxForkRequest"), required=False),
        ),
    },
    "/snapshots": {
        "get": _op(
            "The team's snapshots, newest first, a page at a time",
            200,
            _array(_ref("SnapshotInfo")),
            errors=(400, 401),
            params=[
                _query("sandboxID", _STR, "only those of this sandbox"),
                _query("name", _STR, "only the one of this name or id"),
                *_PAGE_PARAMS,
            ],
            headers=_NEXT_TOKEN_HEADER,
        ),
    },
    "/sandboxes/{sandboxID}/connect": {"post": _CONNECT},
    "/v2/sandboxes/{sandboxID}/connect": {"post": _CONNECT},
    # Templates
    "/v3/templates": {
        "post": _op(
            "Request a build of a (new or the team's) template",
            202,
            _ref("TemplateRequestResponseV3"),
            errors=(400, 401, 413),
            request=_json_body(_ref("TemplateBuildRequestV3")),
        ),
    },
    "/templates": {
        "get": _op("The team's templates", 200, _array(_ref("Template")), errors=(401,)),
    },
    "/v2/templates": {
        "get": _op(
            "The team's templates, a page at a time",
            200,
            _array(_ref("Template")),
            errors=(400, 401),
            params=_PAGE_PARAMS,
            headers=_NEXT_TOKEN_HEADER,
        ),
    },
    "/templates/aliases/{alias}": {
        "get": _op(
            "Whether a template of this name exists (the team's, or bilik's own)",
            200,
            _ref("TemplateAliasResponse"),
            errors=(401, 404),
            params=[_path("alias")],
        ),
    },
    "/templates/{templateID}": {
        "get": _op(
            "A template with its builds (the newest first, a page at a time)",
            200,
            _ref("TemplateWithBuilds"),
            errors=(400, 401, 404),
            params=[_TEMPLATE_ID, *_PAGE_PARAMS],
            headers=_NEXT_TOKEN_HEADER,
        ),
        "patch": _op(
            "Update a template (public: true is refused: bilik has no public templates)",
            200,
            {"nullable": True},
            errors=(400, 401, 404, 413),
            params=[_TEMPLATE_ID],
            request=_TEMPLATE_UPDATE,
        ),
        "delete": _op(
            "Delete a template and its builds", 204, errors=(401, 404), params=[_TEMPLATE_ID]
        ),
    },
    "/v2/templates/{templateID}": {
        "patch": _op(
            "Update a template (public: true is refused: bilik has no public templates)",
            200,
            _ref("TemplateUpdateResponse"),
            errors=(400, 401, 404, 413),
            params=[_TEMPLATE_ID],
            request=_TEMPLATE_UPDATE,
        ),
    },
    "/templates/{templateID}/files/{hash}": {
        "get": _op(
            "Whether a COPY step's files are here, else where to upload them",
            201,
            _ref("TemplateBuildFileUpload"),
            errors=(400, 401, 404),
            params=[_TEMPLATE_ID, _path("hash")],
        ),
    },
    "/upload/{token}": {
        "put": {
            **_op(
                "Upload a COPY step's files (the token in the path is the authorization)",
                200,
                errors=(400, 403, 404, 413),
                params=[_path("token")],
                security=[],
            ),
            "requestBody": {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            },
        },
    },
    "/v2/templates/{templateID}/builds/{buildID}": {
        "post": _op(
            "Start a requested build with its steps",
            202,
            errors=(400, 401, 404, 409, 413, 429),
            params=[_TEMPLATE_ID, _BUILD_ID],
            request=_json_body(_ref("TemplateBuildStartV2")),
        ),
    },
    "/templates/{templateID}/builds/{buildID}/status": {
        "get": _op(
            "A build's status and its log from logsOffset",
            200,
            _ref("TemplateBuildInfo"),
            errors=(400, 401, 404),
            params=[
                _TEMPLATE_ID,
                _BUILD_ID,
                _query("logsOffset", {"type": "integer", "minimum": 0, "default": 0}),
                _query("limit", {"type": "integer", "minimum": 0, "maximum": 100}),
                _query("level", _LOG_LEVEL),
            ],
        ),
    },
    "/templates/{templateID}/builds/{buildID}/logs": {
        "get": _op(
            "A page of a build's log entries",
            200,
            _ref("TemplateBuildLogsResponse"),
            errors=(400, 401, 404),
            params=[
                _TEMPLATE_ID,
                _BUILD_ID,
                _query("cursor", {"type": "integer", "minimum": 0}, "milliseconds since 1970"),
                _query("limit", {"type": "integer", "minimum": 0, "maximum": 100}),
                _query("direction", {"type": "string", "enum": ["forward", "backward"]}),
                _query("level", _LOG_LEVEL),
                _query("source", {"type": "string", "enum": ["temporary", "persistent"]}),
            ],
        ),
    },
    "/templates/tags": {
        "post": _op(
            "Point tags at the build name:tag names",
            201,
            _ref("AssignedTemplateTags"),
            errors=(400, 401, 404, 413),
            request=_json_body(_ref("AssignTemplateTagsRequest")),
        ),
        "delete": _op(
            "Take tags off a template",
            204,
            errors=(400, 401, 404, 413),
            request=_json_body(_ref("DeleteTemplateTagsRequest")),
        ),
    },
    "/templates/{templateID}/tags": {
        "get": _op(
            "A template's tags",
            200,
            _array(_ref("TemplateTag")),
            errors=(401, 404),
            params=[_TEMPLATE_ID],
        ),
    },
    # API keys
    "/api-keys": {
        "get": _op("The team's API keys, masked", 200, _array(_ref("TeamAPIKey")), errors=(401,)),
        "post": _op(
            "A new API key of the team (its secret is shown this once)",
            201,
            _ref("CreatedTeamAPIKey"),
            errors=(400, 401, 413),
            request=_json_body(_ref("NewTeamAPIKey")),
        ),
    },
    "/api-keys/{apiKeyID}": {
        "patch": _op(
            "Rename one of the team's API keys",
            200,
            errors=(400, 401, 404, 413),
            params=[_API_KEY_ID],
            request=_json_body(_ref("UpdateTeamAPIKey")),
        ),
        "delete": _op(
            "Revoke one of the team's API keys (a key may revoke itself)",
            204,
            errors=(400, 401, 404),
            params=[_API_KEY_ID],
        ),
    },
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "bilik",
        "version": "0.1.0",
        "description": "Self-hosted sandboxes for AI agents, speaking E2B's protocol.",
    },
    "components": {
        "securitySchemes": {"ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        "schemas": _SCHEMAS,
    },
    "security": [{"ApiKeyAuth": []}],
    "paths": _PATHS,
}


async def openapi(request: Request) -> Response:
    return JSONResponse(DOCUMENT)
