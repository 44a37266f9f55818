"""Every API error is a JSON body ``{"code": <http status>, "message": "..."}``."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..runtime import InvalidSpec, RuntimeFailure, SandboxExists, SandboxNotFound, TemplateNotFound
from ..runtime.errors import SandboxNotPaused, SandboxPaused, StartFailed

log = logging.getLogger("bilik.api")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"code": status, "message": message}, status_code=status, headers=headers)


def from_runtime(exc: RuntimeFailure) -> ApiError:
    """The API's answer to a runtime failure."""
    if isinstance(exc, TemplateNotFound):
        return ApiError(404, str(exc))
    if isinstance(exc, SandboxNotFound):
        return ApiError(404, f"sandbox {exc.sandbox_id!r} not found")
    if isinstance(exc, InvalidSpec):
        return ApiError(400, str(exc))
    if isinstance(exc, SandboxExists):
        return ApiError(409, str(exc))
    if isinstance(exc, SandboxPaused):
        return ApiError(409, f"sandbox {exc.sandbox_id!r} is paused (or being paused or resumed)")
    if isinstance(exc, SandboxNotPaused):
        return ApiError(409, f"sandbox {exc.sandbox_id!r} is not paused")
    if isinstance(exc, StartFailed):  # (the template's fault: its owner fixes it, not the server's)
        return ApiError(400, f"the template's start command failed: {exc}")
    log.error("runtime failure: %s", exc)
    return ApiError(500, f"the sandbox runtime failed: {exc}")


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, exc.headers)


async def handle_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}))


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal error")
