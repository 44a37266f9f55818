"""E2B's API-key management for the caller's own team: list, create, rename, delete.

A key made here joins the caller's team (it sees the same sandboxes and templates) with the
caller's caps, so no key can make one that may do more than itself. Its secret is in the
create's answer only; listings show a mask (E2B's prefix, length and ends). A key of another
team is never found. As on E2B, a key may delete itself (it stops working at once).
"""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..store import ApiKey, KeyNotFound, Store
from ..store.keys import PREFIX, KeyStore
from .auth import authenticate
from .errors import ApiError
from .parse import json_object
from .sandboxes import _rfc3339

# A key's id as the store makes it.
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
MAX_NAME = 200
# The characters of a key after its prefix (40 hex digits).
KEY_LENGTH = 40


def _keys(request: Request) -> KeyStore:
    store: Store = request.app.state.store
    return store.keys


def _mask(key: ApiKey) -> dict[str, Any]:
    """E2B's IdentifierMaskingDetails: what tells keys apart without giving them away."""
    return {
        "prefix": PREFIX,
        "valueLength": KEY_LENGTH,
        "maskedValuePrefix": key.prefix[len(PREFIX) :],
        "maskedValueSuffix": key.suffix,
    }


def _key_json(key: ApiKey) -> dict[str, Any]:
    """E2B's TeamAPIKey."""
    return {
        "id": key.id,
        "name": key.name,
        "mask": _mask(key),
        "createdAt": _rfc3339(key.created_at),
        "createdBy": None,
        "lastUsed": None,
    }


def _name(data: dict[str, Any]) -> str:
    name = data.get("name")
    if not isinstance(name, str) or not 0 < len(name.strip()) <= MAX_NAME:
        raise ApiError(400, f"name must be 1 to {MAX_NAME} characters")
    return name.strip()


def _path_key_id(request: Request) -> str:
    key_id = request.path_params["key_id"]
    if not isinstance(key_id, str) or _KEY_ID_RE.fullmatch(key_id) is None:
        raise ApiError(400, f"{key_id!r} is not an API key id")
    return key_id


async def list_keys(request: Request) -> Response:
    """``GET /api-keys``: the team's active keys, masked."""
    key = await authenticate(request)
    return JSONResponse([_key_json(k) for k in await _keys(request).list(key.team_id, active=True)])


async def create_key(request: Request) -> Response:
    """``POST /api-keys``: a new key of the caller's team; its secret is shown this once."""
    key = await authenticate(request)
    name = _name(await json_object(request))
    record, secret = await _keys(request).create(name, key.caps, key.team_id)
    return JSONResponse({**_key_json(record), "key": secret}, status_code=201)


async def rename_key(request: Request) -> Response:
    """``PATCH /api-keys/{id}``: a new name for one of the team's keys."""
    key = await authenticate(request)
    name = _name(await json_object(request))
    key_id = _path_key_id(request)
    try:
        await _keys(request).rename(key_id, key.team_id, name)
    except KeyNotFound:
        raise ApiError(404, f"API key {key_id!r} not found") from None
    return Response(status_code=200)


async def delete_key(request: Request) -> Response:
    """``DELETE /api-keys/{id}``: revoke one of the team's active keys."""
    key = await authenticate(request)
    key_id = _path_key_id(request)
    keys = _keys(request)
    if key_id not in {k.id for k in await keys.list(key.team_id, active=True)}:
        raise ApiError(404, f"API key {key_id!r} not found")
    await keys.revoke(key_id, key.team_id)
    return Response(status_code=204)


routes = [
    Route("/api-keys", list_keys, methods=["GET"]),
    Route("/api-keys", create_key, methods=["POST"]),
    Route("/api-keys/{key_id}", rename_key, methods=["PATCH"]),
    Route("/api-keys/{key_id}", delete_key, methods=["DELETE"]),
]
