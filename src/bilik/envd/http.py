"""The few ASGI helpers envd's plain-HTTP endpoints need."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def header(scope: Scope, name: str) -> str | None:
    key = name.encode()
    for k, v in scope["headers"]:
        if k.lower() == key:
            return str(v.decode("latin-1"))
    return None


async def send_json(send: Send, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def json_error(send: Send, status: int, message: str) -> None:
    """envd's plain-HTTP error body, which the SDKs map by status."""
    await send_json(send, status, {"code": status, "message": message})


async def no_content(send: Send) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})
