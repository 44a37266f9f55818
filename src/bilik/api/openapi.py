"""The OpenAPI document of bilik's control plane (E2B's paths and shapes), served as JSON."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

_ERROR = {"$ref": "#/components/schemas/Error"}
_ID = {"name": "sandboxID", "in": "path", "required": True, "schema": {"type": "string"}}


def _errors(*codes: int) -> dict[str, Any]:
    return {
        str(c): {"description": "error", "content": {"application/json": {"schema": _ERROR}}}
        for c in codes
    }


def _json(schema: dict[str, Any], description: str = "ok") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_CREATE = {
    "summary": "Create a sandbox",
    "parameters": [{"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}],
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewSandbox"}}},
    },
    "responses": {
        "201": _json({"$ref": "#/components/schemas/Sandbox"}, "created"),
        **_errors(400, 401, 404, 413, 429, 500),
    },
}
_LIST = {
    "summary": "List the caller's running sandboxes",
    "parameters": [
        {"name": n, "in": "query", "schema": {"type": t}}
        for n, t in (
            ("metadata", "string"),
            ("state", "string"),
            ("order", "string"),
            ("startedAfter", "string"),
            ("template", "string"),
            ("nextToken", "string"),
            ("limit", "integer"),
        )
    ],
    "responses": {
        "200": _json({"type": "array", "items": {"$ref": "#/components/schemas/SandboxDetail"}}),
        **_errors(400, 401),
    },
}
_TIMEOUT_BODY = {
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"timeout": {"type": "integer", "minimum": 0}},
            }
        }
    }
}
_CONNECT = {
    "summary": "Connect to a running sandbox (and optionally set its timeout)",
    "parameters": [_ID],
    "requestBody": _TIMEOUT_BODY,
    "responses": {
        "200": _json({"$ref": "#/components/schemas/Sandbox"}),
        **_errors(400, 401, 404, 413),
    },
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "bilik", "version": "0.1.0",
             "description": "Self-hosted sandboxes for AI agents, speaking E2B's protocol."},
    "components": {
        "securitySchemes": {"ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        "schemas": {
            "Error": {"type": "object", "required": ["code", "message"], "properties": {
                "code": {"type": "integer"}, "message": {"type": "string"}}},
            "NewSandbox": {"type": "object", "required": ["templateID"], "properties": {
                "templateID": {"type": "string"},
                "timeout": {"type": "integer", "minimum": 0, "default": 300},
                "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                "envVars": {"type": "object", "additionalProperties": {"type": "string"}},
                "allow_internet_access": {"type": "boolean", "default": True},
                "secure": {"type": "boolean"}, "autoPause": {"type": "boolean"}}},
            "Sandbox": {"type": "object",
                        "required": ["templateID", "sandboxID", "clientID", "envdVersion"],
                        "properties": {
                            "templateID": {"type": "string"}, "sandboxID": {"type": "string"},
                            "clientID": {"type": "string"}, "alias": {"type": "string"},
                            "envdVersion": {"type": "string"},
                            "envdAccessToken": {"type": "string"},
                            "domain": {"type": "string", "nullable": True}}},
            "SandboxDetail": {"allOf": [{"$ref": "#/components/schemas/Sandbox"}, {
                "type": "object",
                "required": ["startedAt", "endAt", "cpuCount", "memoryMB", "diskSizeMB", "state"],
                "properties": {
                    "startedAt": {"type": "string", "format": "date-time"},
                    "endAt": {"type": "string", "format": "date-time"},
                    "cpuCount": {"type": "number"}, "memoryMB": {"type": "integer"},
                    "diskSizeMB": {"type": "integer"},
                    "state": {"type": "string", "enum": ["running", "paused"]},
                    "metadata": {"type": "object",
                                 "additionalProperties": {"type": "string"}},
                    "allowInternetAccess": {"type": "boolean"}}}]},
            "SandboxMetric": {"type": "object", "properties": {
                k: {"type": "number"} for k in (
                    "timestampUnix", "cpuCount", "cpuUsedPct", "memUsed", "memTotal",
                    "memCache", "diskUsed", "diskTotal")}},
        },
    },
    "security": [{"ApiKeyAuth": []}],
    "paths": {
        "/health": {"get": {"summary": "Ready?", "security": [],
                            "responses": {"200": {"description": "ready"}, **_errors(503)}}},
        "/sandboxes": {"post": _CREATE, "get": {**_LIST, "summary": "List sandboxes (v1)"}},
        "/v2/sandboxes": {"post": _CREATE, "get": _LIST},
        "/sandboxes/{sandboxID}": {
            "get": {"summary": "Get a sandbox", "parameters": [_ID], "responses": {
                "200": _json({"$ref": "#/components/schemas/SandboxDetail"}),
                **_errors(401, 404)}},
            "delete": {"summary": "Kill a sandbox", "parameters": [_ID], "responses": {
                "204": {"description": "killed"}, **_errors(401, 404)}},
        },
        "/sandboxes/{sandboxID}/timeout": {"post": {
            "summary": "Set the sandbox to end this many seconds from now",
            "parameters": [_ID], "requestBody": _TIMEOUT_BODY,
            "responses": {"204": {"description": "set"}, **_errors(400, 401, 404, 413)}}},
        "/sandboxes/{sandboxID}/metrics": {"get": {
            "summary": "Current CPU, memory and disk use", "parameters": [_ID],
            "responses": {"200": _json({"type": "array", "items": {
                "$ref": "#/components/schemas/SandboxMetric"}}), **_errors(401, 404)}}},
        "/sandboxes/{sandboxID}/logs": {"get": {
            "summary": "What the sandbox's first process wrote", "parameters": [_ID],
            "responses": {"200": _json({"type": "object", "properties": {"logs": {
                "type": "array", "items": {"type": "object", "properties": {
                    "timestamp": {"type": "string"}, "line": {"type": "string"}}}}}}),
                **_errors(401, 404)}}},
        "/sandboxes/{sandboxID}/resume": {"post": {
            "summary": "Legacy resume: sandboxes never pause here, so a live one is 409",
            "parameters": [_ID], "responses": _errors(401, 404, 409)}},
        "/sandboxes/{sandboxID}/connect": {"post": _CONNECT},
        "/v2/sandboxes/{sandboxID}/connect": {"post": _CONNECT},
    },
}  # fmt: skip


async def openapi(request: Request) -> Response:
    return JSONResponse(DOCUMENT)
