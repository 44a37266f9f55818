"""What a client sends, taken in with care: bodies read with a cap, ids checked for shape.

A body is read only once the caller is authenticated (handlers call ``authenticate`` first),
and never whole before its size is known: it is streamed and refused with a 413 the moment it
passes the cap, so a client without a key, or with one, cannot make the server hold more than
the cap. Ids from a path or a body are checked against the format bilik makes them in before
they are used for anything (a lookup, a log line, a path): a malformed one in a path is the
usual 404 (no such thing can exist), in a body a 400.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeGuard

from starlette.requests import ClientDisconnect, Request

from ..runtime.spec import is_sandbox_id
from .errors import ApiError

# The largest JSON body the control plane takes (a create with 64 KiB of metadata fits).
MAX_BODY = 1 << 20

# A template's name (what a key calls it, its alias) and its id (20 hex digits) are both this;
# so is a tag.
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
# A build id: a UUID as bilik writes it.
_BUILD_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def too_large(limit: int) -> ApiError:
    # The connection closes after the answer: the rest of the body is not worth reading.
    return ApiError(413, f"request body is larger than {limit} bytes", {"Connection": "close"})


def declared_length(request: Request) -> int | None:
    """The body length the request's Content-Length says (None: it says none)."""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    if not (declared.isascii() and declared.isdigit()):
        raise ApiError(400, "Content-Length must be a whole number")
    # (past 18 digits, no body bilik takes: not parsed into a huge int)
    return int(declared) if len(declared) <= 18 else 1 << 62


async def read_body(request: Request, limit: int = MAX_BODY) -> bytes:
    """The request's body, at most ``limit`` bytes: a 413 as soon as it says or proves longer."""
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise too_large(limit)
    body = bytearray()
    try:
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise too_large(limit)
            body += chunk
    except ClientDisconnect:
        raise ApiError(400, "the client went away before sending the whole body") from None
    return bytes(body)


async def json_object(request: Request, *, required: bool = True) -> dict[str, Any]:
    """The body as a JSON object (``{}`` for an empty body when not ``required``)."""
    body = await read_body(request)
    if not body and not required:
        return {}
    try:
        data = json.loads(body)
    except ValueError as e:  # (also bad UTF-8, and numbers too long to convert)
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


def is_template_name(text: object) -> TypeGuard[str]:
    """A template's name or id, or a tag: lowercase ASCII letters, digits, ``.``, ``_``, ``-``,
    starting with a letter or digit, at most 128."""
    return isinstance(text, str) and _NAME_RE.fullmatch(text) is not None


def is_build_id(text: object) -> TypeGuard[str]:
    return isinstance(text, str) and _BUILD_RE.fullmatch(text) is not None


def template_ref(text: object, field: str) -> tuple[str, str]:
    """``(name, tag)`` of a body's ``name[:tag]`` (tag "" if none); a 400 if malformed."""
    if isinstance(text, str):
        name, sep, tag = text.partition(":")
        if is_template_name(name) and (not sep or is_template_name(tag)):
            return name, tag
    raise ApiError(400, f"{field} must be a template name, optionally with :tag")


def path_sandbox_id(request: Request) -> str:
    sandbox_id = request.path_params["sandbox_id"]
    if not is_sandbox_id(sandbox_id):
        raise ApiError(404, "sandbox not found (malformed id)")
    return str(sandbox_id)


def path_template(request: Request, param: str = "template_id") -> str:
    """A template's id or name from the path."""
    value = request.path_params[param]
    if not is_template_name(value):
        raise ApiError(404, "template not found (malformed id)")
    return str(value)


def path_build_id(request: Request) -> str:
    build_id = request.path_params["build_id"]
    if not is_build_id(build_id):
        raise ApiError(404, "build not found (malformed id)")
    return str(build_id)
