"""Routing and the streaming reverse proxy to sandbox ports, on the server's one port.

A request belongs to a sandbox when it carries ``E2b-Sandbox-Id`` (and ``E2b-Sandbox-Port``), or
when its Host is ``{port}-{sandboxID}.{domain}``; everything else goes to the control plane.
Bodies are passed through chunk by chunk in both directions, never held whole.

Nothing here needs a key, so the plane is a boundary of its own:

- A sandbox id and port are parsed strictly (the id's shape is bilik's, ASCII digits for the
  port); anything else is a 400, before the id names a file or a route.
- Only sandboxes a key owns are routed to (the store's, see :class:`OwnedSandboxes`): a
  warm-pool sandbox not handed over yet, a template build's sandbox or no sandbox at all get one
  and the same answer, so the answer tells nothing about which it was.
- The upstream is the routed sandbox's own address, on the instance's network, and the URL is
  built from parts: the request's target is only ever a path (it must start with ``/``), never
  something that could name another host (``GET @127.0.0.1:80/``), and websockets are opened
  to that address and port whatever the URL or a redirect says.

A sandbox whose end has begun (a kill, or its timeout reached: the sandbox service says so
through :meth:`SandboxPlane.end` before the runtime kills it) is gone from that moment: new
requests get the 502 of a sandbox not found, and those under way are ended, as is a stream whose
sandbox side ends early. Once a response's headers are out, ending it means cutting it (the
client reads a body that stops short, which is how E2B's SDKs tell that a sandbox went away:
they then ask the sandbox's ``/health`` and hear the 502); that is normal, and one line in the
log, never an error.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import hmac
import json
import logging
import math
import re
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, NamedTuple, TypeVar

import httpx
import websockets.asyncio.client
import websockets.exceptions
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..envd import signing
from ..proto.contract import ENVD_PORT
from ..runtime import Runtime, SandboxNotFound
from ..runtime.base import Route
from ..runtime.errors import SandboxPaused
from ..runtime.spec import is_sandbox_id

log = logging.getLogger("bilik.plane")

T = TypeVar("T")

# The largest websocket message relayed from a sandbox (uvicorn's own limit for clients').
WEBSOCKET_MAX_MESSAGE = 16 << 20
# Headers that belong to one connection, not to the message (RFC 9110 §7.6.1), plus Host.
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
    "transfer-encoding", "upgrade", "host",
}  # fmt: skip
# Bytes a request target may not carry on as they are (not printable ASCII, or a fragment).
_UNSAFE_TARGET = re.compile(rb"[^\x21-\x7e]|#")

# Whether the plane cut the response of the request at hand on purpose. uvicorn closes the
# connection of a response left short, as it should, and logs that as an error; for a cut the
# plane made, the plane's own line says what happened. (The server awaits the application in
# the request's own task, so what the plane sets here is what uvicorn's log call sees.)
_CUT = contextvars.ContextVar("bilik_plane_cut", default=False)
_UVICORN_SHORT_RESPONSE = "ASGI callable returned without completing response."


class _QuietCuts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (_CUT.get() and record.getMessage() == _UVICORN_SHORT_RESPONSE)


_QUIET_CUTS = _QuietCuts()


class BadRoute(Exception):
    """A request for a sandbox that names its sandbox, port or path in a way no client does
    (answered 400, the same whatever sandbox it names)."""


def parse_sandbox_id(text: str) -> str:
    if not is_sandbox_id(text):
        raise BadRoute("Invalid sandbox id")
    return text


def parse_port(text: str) -> int:
    """A port from a header or a Host: ASCII digits only (``str.isdigit`` takes ``²``),
    1-65535."""
    if not (0 < len(text) <= 5 and text.isascii() and text.isdigit()):
        raise BadRoute("Invalid sandbox port")
    port = int(text)
    if not 0 < port < 65536:
        raise BadRoute("Invalid sandbox port")
    return port


def route(scope: Scope, domain: str) -> tuple[str, int] | None:
    """``(sandbox id, port)`` if the request is for a sandbox, else None; BadRoute if it is
    for a sandbox but names it (or its port) malformed."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    sandbox_id = headers.get("e2b-sandbox-id")
    # Some SDKs (2.20's connect, for one) send the sandbox headers to the control plane too;
    # its calls carry the API key, which nothing bound for a sandbox does.
    if sandbox_id and "x-api-key" not in headers:
        port = headers.get("e2b-sandbox-port")
        return parse_sandbox_id(sandbox_id), ENVD_PORT if port is None else parse_port(port)
    host = headers.get("host", "").rpartition(":")[0] or headers.get("host", "")
    label, dot, rest = host.lower().partition(".")
    port_text, dash, sandbox_id = label.partition("-")
    # {port}-{id}.{domain}: a first label that starts with digits (any digits: a malformed
    # port is this form's 400, not the control plane's) and a hyphen.
    if dot and rest == domain and dash and port_text.isdigit():
        return parse_sandbox_id(sandbox_id), parse_port(port_text)
    return None


def request_target(scope: Scope) -> bytes:
    """The path and query to ask the sandbox for: the request's own, in origin form (a path
    from ``/``); BadRoute for any other form (``@host:port/…``, ``http://host/…``, ``*``),
    which string-built URLs would read as another host."""
    raw = scope.get("raw_path")
    if raw is None:
        raw = urllib.parse.quote(scope["path"]).encode("ascii")
    if not raw.startswith(b"/"):
        raise BadRoute("The request target must be a path starting with /")
    if query := scope.get("query_string", b""):
        raw += b"?" + query
    # (bytes a client should have escaped are escaped: the URL is built, not pasted)
    return _UNSAFE_TARGET.sub(lambda m: b"%%%02X" % m.group()[0], raw)


def upstream_url(scheme: str, host: str, port: int | None, target: bytes) -> httpx.URL:
    """The URL to the sandbox, from parts: ``target`` is only ever its path and query."""
    try:
        return httpx.URL(scheme=scheme, host=host, port=port, raw_path=target)
    except (httpx.InvalidURL, UnicodeDecodeError) as e:
        raise BadRoute("Invalid request target") from e


class Owner(NamedTuple):
    """What the plane knows of a sandbox a key owns."""

    access_token: str
    key_id: str


# The store's live sandboxes: (envd access token, owning key) by sandbox id.
Owners = Callable[[], Awaitable[dict[str, tuple[str, str]]]]
# Asked before a request goes to a sandbox: whether it may go now (the sandbox runs, or was
# resumed for it), or not (it is paused, and only a connect resumes it).
Gate = Callable[[str], Awaitable[bool]]


class OwnedSandboxes:
    """The sandboxes keys own (the store's, made by a create), with their envd access tokens
    and keys: the only ones the plane routes to. A warm-pool sandbox not handed over, a
    template build's sandbox, one made from the command line: none is the store's, so none is
    reachable here.

    The store is read at most once per ``max_age_s``, whatever comes (a request for an id no
    one owns costs no query: anyone may send those); a create tells :meth:`add` what it made,
    so a sandbox routes as soon as its create returns. (A sandbox killed since the last read
    is found gone by the runtime.) One read at a time, shared by every request that waits."""

    def __init__(self, read: Owners, max_age_s: float = 1.0) -> None:
        self._read = read
        self.max_age_s = max_age_s
        self._owners: dict[str, Owner] = {}
        # Made since the read of ``_owners`` began: (when it was added, its owner).
        self._added: dict[str, tuple[float, Owner]] = {}
        self._read_at = -math.inf  # (monotonic time the read of ``_owners`` began)
        self._reading: asyncio.Future[None] | None = None
        # Ended since the read of ``_owners`` began (the store may list them a while yet): when.
        self._ended: dict[str, float] = {}

    def add(self, sandbox_id: str, access_token: str, key_id: str) -> None:
        """A sandbox the store has just recorded (routes before the next read)."""
        self._added[sandbox_id] = (time.monotonic(), Owner(access_token, key_id))

    def end(self, sandbox_id: str) -> None:
        """A sandbox whose end has begun (never routes again, whatever the store says)."""
        self._added.pop(sandbox_id, None)
        self._ended[sandbox_id] = time.monotonic()

    def ended(self, sandbox_id: str) -> bool:
        return sandbox_id in self._ended

    async def all(self) -> dict[str, Owner]:
        """Owners by sandbox id, read at most ``max_age_s`` ago, with those added since and
        without those ended since."""
        moment = time.monotonic() - self.max_age_s
        while self._read_at < moment:
            if self._reading is None:
                self._reading = asyncio.ensure_future(self._read_now())
            # (a waiter that goes away leaves the read to the others)
            await asyncio.shield(self._reading)
        if not self._added and not self._ended:
            return self._owners
        owners = {**self._owners, **{i: owner for i, (_, owner) in self._added.items()}}
        for sandbox_id in self._ended:
            owners.pop(sandbox_id, None)
        return owners

    async def owner(self, sandbox_id: str) -> Owner | None:
        return (await self.all()).get(sandbox_id)

    async def _read_now(self) -> None:
        started = time.monotonic()
        try:
            self._owners = {i: Owner(*row) for i, row in (await self._read()).items()}
            self._read_at = started
            # (what was added before this read began, it has read; what ended before it, it
            # no longer lists once its row is gone)
            self._added = {i: a for i, a in self._added.items() if a[0] >= started}
            self._ended = {
                i: at for i, at in self._ended.items() if at >= started or i in self._owners
            }
        finally:
            self._reading = None


def _timeout() -> httpx.Timeout:
    return httpx.Timeout(None, connect=5.0)


def signed_file_target(scope: Scope, owners: dict[str, Owner]) -> str | None:
    """The sandbox a signed ``/files`` URL (which names none) was signed for: the one whose
    token reproduces the signature, read exactly as envd reads it (``bilik.envd.signing``).
    An expired one is routed too: envd says it expired."""
    try:
        query = signing.parse_query(scope.get("query_string", b""))
    except ValueError:
        return None
    if signing.malformed(query):
        return None
    operation = "read" if scope["method"] == "GET" else "write"
    for sandbox_id, owner in owners.items():
        if signing.signed_with(query, operation, owner.access_token):
            return sandbox_id
    return None


class SandboxPlane:
    """ASGI middleware: sandbox traffic to the sandbox, the rest to ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        runtime: Runtime,
        domain: str,
        owners: Owners,
        max_streams_per_key: int,
    ) -> None:
        self.app = app
        self.runtime = runtime
        self.domain = domain.lower()
        self.owned = OwnedSandboxes(owners)
        self.max_streams_per_key = max_streams_per_key
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
        # Requests and websockets under way, by the key owning their sandbox.
        self._streams: collections.Counter[str] = collections.Counter()
        # Those under way by sandbox: each a future that is set when the sandbox's end begins.
        self._ends: dict[str, set[asyncio.Future[None]]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        # Set by the server once its sandbox service runs (paused sandboxes are held there).
        self.gate: Gate | None = None
        logging.getLogger("uvicorn.error").addFilter(_QUIET_CUTS)

    def end(self, sandbox_id: str) -> None:
        """The sandbox's end has begun: from now on it is not found, and whatever is under way
        to it ends."""
        self.owned.end(sandbox_id)
        self.cut(sandbox_id)

    def cut(self, sandbox_id: str) -> None:
        """The sandbox is being paused: whatever is under way to it ends (a frozen sandbox
        would never answer it); new requests meet the gate."""
        for ended in self._ends.pop(sandbox_id, ()):
            if not ended.done():
                ended.set_result(None)
        client = self._envd.pop(sandbox_id, None)
        if client is not None:
            task = asyncio.ensure_future(client.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    @contextlib.contextmanager
    def _watch_end(self, sandbox_id: str) -> Iterator[asyncio.Future[None]]:
        """A future set if the sandbox's end begins while the caller is under way."""
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ends.setdefault(sandbox_id, set()).add(ended)
        try:
            yield ended
        finally:
            waiting = self._ends.get(sandbox_id)
            if waiting is not None:
                waiting.discard(ended)
                if not waiting:
                    del self._ends[sandbox_id]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            target = route(scope, self.domain)
            if target is None and scope["type"] == "http":
                sandbox_id = await self._envd_by_credentials(scope)
                target = (sandbox_id, ENVD_PORT) if sandbox_id else None
            if target is None:
                await self.app(scope, receive, send)
                return
            path = request_target(scope)
        except BadRoute as e:
            await _deny(scope, receive, send, 400, {"code": 400, "message": str(e)})
            return
        sandbox_id, port = target
        owner = await self.owned.owner(sandbox_id)
        if owner is not None and self.gate is not None and not await self.gate(sandbox_id):
            await _deny(scope, receive, send, 502, _paused(sandbox_id))
            return
        # The one question to the runtime per request: where the sandbox is.
        where = self._where(sandbox_id) if owner is not None else None
        if owner is None or where is None:
            await self._drop_envd(sandbox_id)
            await _deny(scope, receive, send, 502, _not_found(sandbox_id))
            return
        if self._streams[owner.key_id] >= self.max_streams_per_key:
            message = (
                f"this key's sandboxes have {self.max_streams_per_key} requests under way "
                "through the server, its cap"
            )
            await _deny(scope, receive, send, 429, {"code": 429, "message": message})
            return
        self._streams[owner.key_id] += 1
        try:
            await self._route(scope, receive, send, sandbox_id, port, where, path)
        finally:
            self._streams[owner.key_id] -= 1
            if not self._streams[owner.key_id]:
                del self._streams[owner.key_id]

    async def _route(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        sandbox_id: str,
        port: int,
        where: Route,
        path: bytes,
    ) -> None:
        address, socket_path = where.address, where.envd_socket if port == ENVD_PORT else None
        try:
            if scope["type"] == "websocket":
                url = upstream_url("ws", address, port, path)
                await self._websocket(scope, receive, send, sandbox_id, address, port, url)
                return
            if socket_path is None:
                url = upstream_url("http", address, port, path)
                await self._proxy(scope, receive, send, sandbox_id, port, self.client, url)
                return
            url = upstream_url("http", "envd", None, path)
        except BadRoute as e:
            await _deny(scope, receive, send, 400, {"code": 400, "message": str(e)})
            return
        client = self._envd.get(sandbox_id)
        if client is None:
            client = self._envd[sandbox_id] = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
                timeout=_timeout(),
                trust_env=False,
            )
        await self._proxy(scope, receive, send, sandbox_id, port, client, url)

    def _where(self, sandbox_id: str) -> Route | None:
        """Where the sandbox is, if it is one to route to (None whichever the reason)."""
        try:
            return self.runtime.route(sandbox_id)
        except (SandboxNotFound, SandboxPaused):  # (paused since the gate let it by)
            return None

    async def _envd_by_credentials(self, scope: Scope) -> str | None:
        """The sandbox whose envd a request names no sandbox for, yet proves it is meant for:
        a signed file URL, or (from SDKs that send no sandbox headers after a connect) the
        sandbox's own access token. Both are secrets of one sandbox."""
        if scope["path"] == "/files" and b"signature=" in scope.get("query_string", b""):
            return signed_file_target(scope, await self.owned.all())
        headers = dict((k.lower(), v) for k, v in scope["headers"])
        token = headers.get(b"x-access-token")
        if not token or b"x-api-key" in headers:
            return None
        for sandbox_id, owner in (await self.owned.all()).items():
            if hmac.compare_digest(owner.access_token.encode(), token):
                return sandbox_id
        return None

    async def _websocket(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        sandbox_id: str,
        address: str,
        port: int,
        url: httpx.URL,
    ) -> None:
        """Relay a websocket to the sandbox's port, message by message, both ways."""
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.decode("latin-1").lower() not in HOP_BY_HOP
            and not k.lower().startswith(b"sec-websocket-")
        ]
        try:
            upstream = await websockets.asyncio.client.connect(
                str(url),
                additional_headers=headers,
                subprotocols=scope.get("subprotocols") or None,
                open_timeout=5,
                max_size=WEBSOCKET_MAX_MESSAGE,
                compression=None,
                # To the sandbox's address and port, whatever the URL or a redirect says (a
                # redirect elsewhere fails), and never through a proxy of the environment.
                proxy=None,
                host=address,
                port=port,
            )
        except (OSError, TimeoutError, ValueError, websockets.exceptions.WebSocketException) as e:
            log.debug("websocket to %s:%d failed: %s", sandbox_id, port, e)
            await _deny(scope, receive, send, 502, _port_closed(sandbox_id, port))
            return
        await receive()  # websocket.connect
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
        with self._watch_end(sandbox_id) as ended:
            try:
                await asyncio.wait([*tasks, ended], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await upstream.close()
                for task in tasks:
                    with contextlib.suppress(BaseException):
                        await task
            if ended.done() and not tasks[1].done():
                log.info("sandbox %s ended: its websocket to port %d closed", sandbox_id, port)
                with contextlib.suppress(OSError):
                    await send({"type": "websocket.close", "code": 1001})

    async def _drop_envd(self, sandbox_id: str) -> None:
        client = self._envd.pop(sandbox_id, None)
        if client is not None:
            await client.aclose()

    async def _send(
        self, sandbox_id: str, client: httpx.AsyncClient, request: httpx.Request
    ) -> httpx.Response:
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError:
            # Nothing was sent. An envd that died is started again, and asked once more.
            if client is self.client or not await self.runtime.revive_envd(sandbox_id):
                raise
            return await client.send(request, stream=True)

    async def _until_end(self, sandbox_id: str, step: Awaitable[T]) -> T | None:
        """``step``'s result; None (``step`` cancelled) if the sandbox's end begins first."""
        with self._watch_end(sandbox_id) as ended:
            task = asyncio.ensure_future(step)
            waits: list[asyncio.Future[Any]] = [task, ended]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
            return None if task.cancelled() else task.result()

    async def _proxy(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        sandbox_id: str,
        port: int,
        client: httpx.AsyncClient,
        url: httpx.URL,
    ) -> None:
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
        # Only what the client sent goes upstream, not httpx's own defaults: with its
        # Accept-Encoding, envd would gzip bodies for clients that cannot read gzip.
        for name in client.headers:
            if name not in names:
                del request.headers[name]
        try:
            # (a sandbox whose end begins while its answer is awaited answers no more: its
            # address may have gone without a word, and the wait would never end)
            response = await self._until_end(sandbox_id, self._send(sandbox_id, client, request))
        except httpx.HTTPError as e:
            # (what went wrong is the server's to know, not the client's)
            log.debug("request to %s:%d failed: %s %s", sandbox_id, port, type(e).__name__, e)
            if self.owned.ended(sandbox_id) or not await self.runtime.is_running(sandbox_id):
                await self._drop_envd(sandbox_id)
                await _json(send, 502, _not_found(sandbox_id))
                return
            await _json(send, 502, _port_closed(sandbox_id, port))
            return
        if response is None:
            await _json(send, 502, _not_found(sandbox_id))
            return
        # A client that hangs up ends the request upstream too (the code interpreter stops
        # the code then): the server drops writes to a gone client without a word, so watch.
        started = _Started(send)
        relay = asyncio.ensure_future(_relay(response, started))
        gone = asyncio.ensure_future(_disconnect(receive))
        with self._watch_end(sandbox_id) as ended:
            try:
                await asyncio.wait([relay, gone, ended], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (relay, gone):
                    task.cancel()
                try:
                    # (their ends, not this request's own cancellation, which goes on up)
                    await asyncio.gather(relay, gone, return_exceptions=True)
                finally:
                    await response.aclose()
        error = None if relay.cancelled() else relay.exception()
        if relay.done() and not relay.cancelled() and error is None:
            return  # the response is whole
        if ended.done():
            why = "the sandbox ended"
        elif error is None:
            return  # the client went away
        elif isinstance(error, httpx.HTTPError):
            why = f"the sandbox's side ended early ({type(error).__name__})"
        elif isinstance(error, OSError):
            return  # the client went away mid-response
        else:
            raise error
        log.info("sandbox %s: a response from port %d was cut: %s", sandbox_id, port, why)
        if not started.started:
            await _json(send, 502, _not_found(sandbox_id))
            return
        _CUT.set(True)  # (uvicorn closes the connection, the body left short)

    async def aclose(self) -> None:
        await self.client.aclose()
        for sandbox_id in list(self._envd):
            await self._drop_envd(sandbox_id)


class _Started:
    """A response's ``send``, which remembers whether the response has begun."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        self.started = True
        await self._send(message)


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


def _not_found(sandbox_id: str) -> dict[str, Any]:
    """The one answer for a sandbox that is not there to route to, whatever the reason."""
    return {"sandboxId": sandbox_id, "message": "The sandbox was not found", "code": 502}


def _paused(sandbox_id: str) -> dict[str, Any]:
    """A paused sandbox's answer (E2B's proxy's for one: not found, so the SDKs raise their
    "not running" error), saying that a connect resumes it."""
    return {
        "sandboxId": sandbox_id,
        "message": "The sandbox was not found: it is paused; connect to it to resume it",
        "code": 502,
    }


def _port_closed(sandbox_id: str, port: int) -> dict[str, Any]:
    return {
        "sandboxId": sandbox_id,
        "message": "The sandbox is running but port is not open",
        "code": 502,
        "port": port,
    }


async def _deny(
    scope: Scope, receive: Receive, send: Send, status: int, body: dict[str, Any]
) -> None:
    """Answer with an error instead of passing the request on: a JSON response, for a
    websocket too where the server can send one before the handshake (else a close)."""
    if scope["type"] == "http":
        await _json(send, status, body)
        return
    await receive()  # websocket.connect
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": body["message"][:100]})
        return
    await _json(send, status, body, kind="websocket.http")


async def _json(send: Send, status: int, body: dict[str, Any], kind: str = "http") -> None:
    """A JSON response; ``kind`` ``websocket.http`` answers a websocket handshake with it."""
    payload = json.dumps(body).encode()
    await send(
        {
            "type": f"{kind}.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": f"{kind}.response.body", "body": payload})
