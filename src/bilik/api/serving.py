"""The server's connections: how long a client may take to send a request, how many it may hold.

uvicorn's h11 protocol times out only the idle wait between two requests (``timeout_keep_alive``),
and that timer stops at the first byte of the next one. A client that sends its headers a byte
at a time, or stops halfway through a body, holds its connection (and its slot) for as long as
it likes: a few hundred of them are a slowloris. So each connection here runs under a clock:

- headers: from the connection (or the end of the previous response) to the end of the next
  request's headers, at most ``header_timeout_s``, however slowly bytes trickle in; past it the
  client gets a JSON 408 and the connection closes.
- body: while the client still owes body bytes, at most ``body_timeout_s`` without one; time the
  server itself is not reading (the application has not taken what came) does not count.
- connections: past ``max_connections`` at once (websockets included), a connection's requests
  are answered with a JSON 503 and it is closed. The timeouts are what keep slow clients from
  holding those slots.

Websockets never reach a keyed endpoint (the control plane has none; the sandbox plane relays
them to sandbox ports), so there is no per-key websocket cap here.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..config import Settings


def _raw_json(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 response that closes the connection, for when no request is there to
    answer through the application."""
    body = json.dumps({"code": status, "message": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


async def _busy(scope: Scope, receive: Receive, send: Send) -> None:
    """The answer on a connection made past the cap."""
    body = json.dumps({"code": 503, "message": "the server has too many connections"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                (b"retry-after", b"1"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# How long a client may go on sending a body the server answered without reading.
UNREAD_BODY_GRACE_S = 2.0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a body inactivity timeout and a cap on
    connections (the class attributes; ``guarded_protocol`` makes a class with them set)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        # When the current request's headers are due (None: not waiting for headers).
        self._headers_due: float | None = None
        self._last_data = 0.0
        # Whether part of the awaited request came (a connection that sent nothing is closed
        # without an answer: a client reusing an idle one must not read a 408 as its reply).
        self._partial = False
        self._over_cap = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._over_cap = len(self.connections) > self.max_connections
        if self._over_cap:
            # (this connection's requests only; the others go on as they were)
            self.app = _busy
        self._last_data = self.loop.time()
        self._watch()

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        self._partial = True
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            # Answered before its body was read (a 401, a 404, a 413): what is left of the body
            # is no one's. The client has a moment to finish sending it (so it reads the
            # answer, not a reset), then the connection goes, however slowly bytes come.
            self._stop()
            self._timer = self.loop.call_later(UNREAD_BODY_GRACE_S, self._drop_unread)
            return
        self._watch()

    def _drop_unread(self) -> None:
        self._timer = None
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self.logger.debug("closing a connection whose unread request body went on")
            self.transport.close()
        else:
            self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        # The websocket protocol takes the transport over (with its own ping timeouts), and
        # would run the application whatever the cap: refuse here.
        self._stop()
        if self._over_cap:
            self.transport.write(_raw_json(503, "Service Unavailable", "too many connections"))
            self.transport.close()
            return
        super().handle_websocket_upgrade(event)

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._headers_due = None

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(max(delay, 0.0), self._check)

    def _watch(self) -> None:
        """Set the clock for what the connection waits for now."""
        if self.transport is None or self.transport.is_closing():
            self._stop()
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            # Waiting for a request's headers: one deadline, which bytes do not move.
            if self._headers_due is None:
                self._headers_due = self.loop.time() + self.header_timeout_s
                self._partial = bool(self.conn.trailing_data[0])
                self._arm(self.header_timeout_s)
        elif state is h11.SEND_BODY:
            self._headers_due = None
            if self._timer is None:
                self._arm(self.body_timeout_s)
        else:  # the request is in (or the connection is ending): nothing to wait for
            self._stop()

    def _check(self) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        now = self.loop.time()
        state = self.conn.their_state
        if state is h11.IDLE and self._headers_due is not None:
            if now < self._headers_due:
                self._arm(self._headers_due - now)
                return
            self.logger.debug("closing a connection that sent no whole request in time")
            if self._partial:
                self.transport.write(
                    _raw_json(
                        408,
                        "Request Timeout",
                        f"the request's headers took longer than {self.header_timeout_s:g} s",
                    )
                )
            self.transport.close()
        elif state is h11.SEND_BODY:
            if self.flow.read_paused:
                # The application has not taken what came: the client cannot send, and is
                # not the one to blame.
                self._last_data = now
            idle = now - self._last_data
            if idle < self.body_timeout_s:
                self._arm(self.body_timeout_s - idle)
                return
            self.logger.debug("closing a connection whose request body stalled")
            self.transport.close()
        else:
            self._watch()


def guarded_protocol(settings: Settings) -> type[GuardedH11Protocol]:
    """The protocol class ``bilik serve`` runs with, under ``settings``' timeouts and cap."""
    return type(
        "BilikH11Protocol",
        (GuardedH11Protocol,),
        {
            "header_timeout_s": float(settings.header_timeout_s),
            "body_timeout_s": float(settings.body_timeout_s),
            "max_connections": settings.max_connections,
        },
    )


SHUTDOWN_GRACE_S = 10


def serve(app: ASGIApp, settings: Settings) -> None:
    """Run ``app`` on the settings' address until stopped (SIGINT, SIGTERM)."""
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        http=guarded_protocol(settings),
        # A stop waits this long for requests under way (a client's stream may never end
        # by itself), then ends them.
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
