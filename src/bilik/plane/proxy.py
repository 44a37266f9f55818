"""Routing and the streaming reverse proxy to sandbox ports, on the server's one port.

A request belongs to a sandbox when it carries ``E2b-Sandbox-Id`` (and ``E2b-Sandbox-Port``), or
when its Host is ``{port}-{sandboxID}.{domain}``; everything else goes to the control plane.
Bodies are passed through chunk by chunk in both directions, never held whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..runtime import LocalRuntime, SandboxNotFound

ENVD_PORT = 49983
# Headers that belong to one connection, not to the message (RFC 9110 §7.6.1), plus Host.
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host",
}  # fmt: skip
_HOST_RE = re.compile(r"^(\d{1,5})-([a-z0-9]{8,32})\.")


def route(scope: Scope, domain: str) -> tuple[str, int] | None:
    """``(sandbox id, port)`` if the request is for a sandbox, else None."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    sandbox_id = headers.get("e2b-sandbox-id")
    if sandbox_id:
        port = headers.get("e2b-sandbox-port", str(ENVD_PORT))
        return sandbox_id, int(port) if port.isdigit() else -1
    host = headers.get("host", "").split(":")[0]
    match = _HOST_RE.match(host)
    if match and host.endswith(f".{domain}"):
        return match.group(2), int(match.group(1))
    return None


class SandboxPlane:
    """ASGI middleware: sandbox traffic to the sandbox, the rest to ``app``."""

    def __init__(self, app: ASGIApp, runtime: LocalRuntime, domain: str) -> None:
        self.app = app
        self.runtime = runtime
        self.domain = domain
        # No pooling across requests: each proxied request gets its own upstream connection,
        # so one sandbox's slow stream never holds another's.
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), trust_env=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = route(scope, self.domain) if scope["type"] == "http" else None
        if target is None:
            await self.app(scope, receive, send)
            return
        sandbox_id, port = target
        try:
            address = (await self.runtime.inspect(sandbox_id)).address
        except SandboxNotFound:
            address = None
        if address is None or not 0 < port < 65536:
            await _json(
                send,
                502,
                {"sandboxId": sandbox_id, "message": "The sandbox was not found", "code": 502},
            )
            return
        await self._proxy(scope, receive, send, sandbox_id, f"http://{address}:{port}")

    async def _proxy(
        self, scope: Scope, receive: Receive, send: Send, sandbox_id: str, base: str
    ) -> None:
        path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"")
        url = base + path.decode("latin-1") + (f"?{query.decode('latin-1')}" if query else "")
        names = {k.decode("latin-1").lower() for k, _ in scope["headers"]}
        headers = [
            (k, v) for k, v in scope["headers"] if k.decode("latin-1").lower() not in HOP_BY_HOP
        ]
        # A request without a body goes out without one: an empty chunked body that the server
        # never reads makes it reset the connection when it closes, cutting the response short.
        has_body = "content-length" in names or "transfer-encoding" in names
        request = self.client.build_request(
            scope["method"], url, headers=headers, content=_body(receive) if has_body else None
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as e:
            await _json(
                send,
                502,
                {
                    "sandboxId": sandbox_id,
                    "code": 502,
                    "message": f"The sandbox is running but port is not open: {e}",
                    "port": int(base.rsplit(":", 1)[1]),
                },
            )
            return
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [
                        (k, v)
                        for k, v in response.headers.raw
                        if k.decode("latin-1").lower() not in HOP_BY_HOP
                    ],
                }
            )
            # Once the headers are out, a failure can only cut the stream, not send an error.
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return
        if chunk := message.get("body", b""):
            yield chunk
        if not message.get("more_body", False):
            return


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
