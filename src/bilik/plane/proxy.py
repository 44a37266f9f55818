"""Routing and the streaming reverse proxy to sandbox ports, on the server's one port.

A request belongs to a sandbox when it carries ``E2b-Sandbox-Id`` (and ``E2b-Sandbox-Port``), or
when its Host is ``{port}-{sandboxID}.{domain}``; everything else goes to the control plane.
Bodies are passed through chunk by chunk in both directions, never held whole.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import websockets.asyncio.client
import websockets.exceptions
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
    # Some SDKs (2.20's connect, for one) send the sandbox headers to the control plane too;
    # its calls carry the API key, which nothing bound for a sandbox does.
    if sandbox_id and "x-api-key" not in headers:
        port = headers.get("e2b-sandbox-port", str(ENVD_PORT))
        return sandbox_id, int(port) if port.isdigit() else -1
    host = headers.get("host", "").split(":")[0]
    match = _HOST_RE.match(host)
    if match and host.endswith(f".{domain}"):
        return match.group(2), int(match.group(1))
    return None


# Live sandboxes' envd access tokens, by sandbox id (from the store).
Tokens = Callable[[], Awaitable[dict[str, str]]]


def _timeout() -> httpx.Timeout:
    return httpx.Timeout(None, connect=5.0)


def signed_file_target(scope: Scope, tokens: dict[str, str]) -> str | None:
    """The sandbox a signed ``/files`` URL (which names none) was signed for: the one whose
    token reproduces the signature."""
    query = dict(urllib.parse.parse_qsl(scope.get("query_string", b"").decode("latin-1")))
    given = query.get("signature", "")
    operation = "read" if scope["method"] == "GET" else "write"
    for sandbox_id, token in tokens.items():
        raw = f"{query.get('path', '')}:{operation}:{query.get('username', '')}:{token}"
        if expiration := query.get("signature_expiration"):
            raw += f":{expiration}"
        digest = base64.b64encode(hashlib.sha256(raw.encode()).digest()).rstrip(b"=").decode()
        if hmac.compare_digest(given.encode(), f"v1_{digest}".encode()):
            return sandbox_id
    return None


class SandboxPlane:
    """ASGI middleware: sandbox traffic to the sandbox, the rest to ``app``."""

    def __init__(self, app: ASGIApp, runtime: LocalRuntime, domain: str, tokens: Tokens) -> None:
        self.app = app
        self.runtime = runtime
        self.domain = domain
        self.tokens = tokens
        # No connection to a sandbox's port is kept for reuse: addresses pass from killed
        # sandboxes to new ones, and a kept connection to a dead one would be reset by the new
        # one mid-request. (A connection over the veth costs a fraction of a millisecond.)
        self.client = httpx.AsyncClient(
            timeout=_timeout(),
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        # envd is reached over its unix socket: one pooled client per sandbox.
        self._envd: dict[str, httpx.AsyncClient] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            target = route(scope, self.domain)
            if target is None:
                await self.app(scope, receive, send)
            else:
                await self._websocket(scope, receive, send, *target)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        target = route(scope, self.domain)
        if target is None:
            sandbox_id = await self._envd_by_credentials(scope)
            target = (sandbox_id, ENVD_PORT) if sandbox_id else None
        if target is None:
            await self.app(scope, receive, send)
            return
        sandbox_id, port = target
        try:
            address = self.runtime.address(sandbox_id)
            socket_path = self.runtime.envd_socket(sandbox_id) if port == ENVD_PORT else None
        except SandboxNotFound:
            address = None
        if address is None or not 0 < port < 65536:
            await self._drop_envd(sandbox_id)
            await _not_found(send, sandbox_id)
            return
        if socket_path is not None:
            client = self._envd.get(sandbox_id)
            if client is None:
                client = self._envd[sandbox_id] = httpx.AsyncClient(
                    transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
                    timeout=_timeout(),
                    trust_env=False,
                )
            await self._proxy(scope, receive, send, sandbox_id, port, client, "http://envd")
        else:
            base = f"http://{address}:{port}"
            await self._proxy(scope, receive, send, sandbox_id, port, self.client, base)

    async def _envd_by_credentials(self, scope: Scope) -> str | None:
        """The sandbox whose envd a request names no sandbox for, yet proves it is meant for:
        a signed file URL, or (from SDKs that send no sandbox headers after a connect) the
        sandbox's own access token. Both are secrets of one sandbox."""
        if scope["path"] == "/files" and b"signature=" in scope.get("query_string", b""):
            return signed_file_target(scope, await self.tokens())
        headers = dict((k.lower(), v) for k, v in scope["headers"])
        token = headers.get(b"x-access-token")
        if not token or b"x-api-key" in headers:
            return None
        for sandbox_id, known in (await self.tokens()).items():
            if hmac.compare_digest(known.encode(), token):
                return sandbox_id
        return None

    async def _websocket(
        self, scope: Scope, receive: Receive, send: Send, sandbox_id: str, port: int
    ) -> None:
        """Relay a websocket to the sandbox's port, message by message, both ways."""
        await receive()  # websocket.connect
        try:
            address = self.runtime.address(sandbox_id)
        except SandboxNotFound:
            await send({"type": "websocket.close", "code": 1011, "reason": "sandbox not found"})
            return
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        query = scope.get("query_string", b"").decode("latin-1")
        url = f"ws://{address}:{port}{path}" + (f"?{query}" if query else "")
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.decode("latin-1").lower() not in HOP_BY_HOP
            and not k.lower().startswith(b"sec-websocket-")
        ]
        try:
            upstream = await websockets.asyncio.client.connect(
                url,
                additional_headers=headers,
                subprotocols=scope.get("subprotocols") or None,
                open_timeout=5,
                max_size=None,
                compression=None,
            )
        except (OSError, TimeoutError, websockets.exceptions.WebSocketException):
            await send({"type": "websocket.close", "code": 1011, "reason": "port is not open"})
            return
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})

        async def to_sandbox() -> None:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes")
                await upstream.send(data if data is not None else message.get("text", ""))

        async def to_client() -> None:
            with contextlib.suppress(websockets.exceptions.ConnectionClosed):
                async for data in upstream:
                    kind = "bytes" if isinstance(data, bytes) else "text"
                    await send({"type": "websocket.send", kind: data})
            await send({"type": "websocket.close", "code": upstream.close_code or 1000})

        tasks = [asyncio.ensure_future(to_sandbox()), asyncio.ensure_future(to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await upstream.close()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task

    async def _drop_envd(self, sandbox_id: str) -> None:
        client = self._envd.pop(sandbox_id, None)
        if client is not None:
            await client.aclose()

    async def _proxy(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        sandbox_id: str,
        port: int,
        client: httpx.AsyncClient,
        base: str,
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
        request = client.build_request(
            scope["method"], url, headers=headers, content=_body(receive) if has_body else None
        )
        try:
            try:
                response = await client.send(request, stream=True)
            except httpx.ConnectError:
                # Nothing was sent. An envd that died is started again, and asked once more.
                if client is self.client or not await self.runtime.revive_envd(sandbox_id):
                    raise
                response = await client.send(request, stream=True)
        except httpx.HTTPError as e:
            if not await self.runtime.is_running(sandbox_id):
                await self._drop_envd(sandbox_id)
                await _not_found(send, sandbox_id)
                return
            await _json(
                send,
                502,
                {
                    "sandboxId": sandbox_id,
                    "code": 502,
                    "message": "The sandbox is running but port is not open: "
                    + f"{type(e).__name__} {e}".strip(),
                    "port": port,
                },
            )
            return
        # A client that hangs up ends the request upstream too (the code interpreter stops
        # the code then): the server drops writes to a gone client without a word, so watch.
        relay = asyncio.ensure_future(_relay(response, send))
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait([relay, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (relay, gone):
                task.cancel()
            try:
                # (their ends, not this request's own cancellation, which goes on up)
                await asyncio.gather(relay, gone, return_exceptions=True)
            finally:
                await response.aclose()
        if relay.done() and not relay.cancelled() and (error := relay.exception()) is not None:
            raise error

    async def aclose(self) -> None:
        await self.client.aclose()
        for sandbox_id in list(self._envd):
            await self._drop_envd(sandbox_id)


async def _relay(response: httpx.Response, send: Send) -> None:
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


async def _disconnect(receive: Receive) -> None:
    """Return once the client has gone (the request's body was read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return
        if chunk := message.get("body", b""):
            yield chunk
        if not message.get("more_body", False):
            return


async def _not_found(send: Send, sandbox_id: str) -> None:
    await _json(
        send, 502, {"sandboxId": sandbox_id, "message": "The sandbox was not found", "code": 502}
    )


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
