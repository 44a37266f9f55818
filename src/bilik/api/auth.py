"""API-key authentication: ``X-API-Key`` names the caller, and the caller sees only its own."""

from __future__ import annotations

from starlette.requests import Request

from ..store import ApiKey, Store
from .errors import ApiError


async def authenticate(request: Request) -> ApiKey:
    store: Store = request.app.state.store
    key = request.headers.get("x-api-key", "")
    if not key:
        raise ApiError(401, "missing API key: send it in the X-API-Key header")
    found = await store.keys.verify(key)
    if found is None:
        raise ApiError(401, "invalid API key")
    return found
