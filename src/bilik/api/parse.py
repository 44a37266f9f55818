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
from ..store.templates import DEFAULT_TAG
from .errors import ApiError

# The largest JSON body the control plane takes (a create with 64 KiB of metadata fits).
MAX_BODY = 1 << 20

# E2B's rules: a template's name (its alias) is lowercase letters, digits, "-" and "_" (an id,
# 20 hex digits, is one too); a tag may also hold ".", and is never a UUID. bilik keeps each to
# 128 characters (what its database holds).
_NAME_RE = re.compile(r"[a-z0-9_-]{1,128}")
_TAG_RE = re.compile(r"[a-z0-9._-]{1,128}")
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
    """A template's name or id: lowercase ASCII letters, digits, ``-`` and ``_``, at most 128."""
    return isinstance(text, str) and _NAME_RE.fullmatch(text) is not None


def is_tag(text: object) -> TypeGuard[str]:
    """A tag: lowercase ASCII letters, digits, ``.``, ``-`` and ``_``, at most 128, not a UUID
    (E2B keeps those for build ids), and not only dots (``.``, ``..``: names that mean a
    directory wherever a tag ends up in a path or a URL)."""
    return (
        isinstance(text, str)
        and _TAG_RE.fullmatch(text) is not None
        and not is_build_id(text)
        and text.strip(".") != ""
    )


def is_build_id(text: object) -> TypeGuard[str]:
    return isinstance(text, str) and _BUILD_RE.fullmatch(text) is not None


def template_ref(text: object, field: str) -> tuple[str, str]:
    """``(name, tag)`` of a ``name[:tag]`` as E2B reads it: trimmed and lowercased, the tag ""
    when there is none or it is "default"; a 400 that says what is wrong if it is malformed."""
    if not isinstance(text, str):
        raise ApiError(400, f"{field} must be a template name, optionally with :tag")
    name, sep, tag = (part.strip().lower() for part in text.strip().partition(":"))
    if not is_template_name(name):
        raise ApiError(
            400,
            f"{field} {text!r}: a template name must be 1-128 lowercase letters, digits, "
            "'-' or '_'" + (" (a tag needs a name before its ':')" if sep and not name else ""),
        )
    if sep and not is_tag(tag):
        raise ApiError(
            400,
            f"{field} {text!r}: a tag after ':' must be 1-128 lowercase letters, digits, '.', "
            "'-' or '_', not only dots, and not a UUID",
        )
    return name, "" if tag == DEFAULT_TAG else tag


def tag_list(value: object, field: str = "tags") -> list[str]:
    """A body's list of tags, trimmed, lowercased and without repeats (as E2B takes them)."""
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ApiError(400, f"{field} must be a list of tags")
    tags = [t.strip().lower() for t in value]
    for tag in tags:
        if not is_tag(tag):
            raise ApiError(
                400,
                f"{field}: {tag!r} is not a tag (1-128 lowercase letters, digits, '.', '-' or "
                "'_', not only dots, and not a UUID)",
            )
    return list(dict.fromkeys(tags))


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
