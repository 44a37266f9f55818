"""A sandbox's agent (envd) as the SDK reaches it: through the server's sandbox plane, with
the sandbox's headers and access token, Connect RPC for processes and the filesystem."""

from __future__ import annotations

import base64
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from pyqwest import Client

from bilik.proto.filesystem_connect import FilesystemClient
from bilik.proto.process_connect import ProcessClient
from bilik.sdk.config import ENVD_PORT, ConnectionConfig
from bilik.sdk.exceptions import (
    AuthenticationException,
    InvalidArgumentException,
    NotEnoughSpaceException,
    NotFoundException,
    RateLimitException,
    SandboxException,
    SandboxNotRunningException,
    TimeoutException,
)

DEFAULT_USER = "user"
KEEPALIVE_HEADER = "Keepalive-Ping-Interval"
KEEPALIVE_S = 50

# One HTTP/2-capable pool for every sandbox (pyqwest runs its own I/O, on any loop), made in
# this process: pyqwest's I/O threads do not survive a fork.
_rpc_http: tuple[int, Client] | None = None


def _http() -> Client:
    global _rpc_http
    if _rpc_http is None:
        _rpc_http = (os.getpid(), Client())
    pid, client = _rpc_http
    if pid != os.getpid():
        raise SandboxException(
            "the SDK was used before this process was forked, and its connections do not "
            "survive a fork: use the 'spawn' start method of multiprocessing, or import and "
            "use the SDK only in the child"
        )
    return client


def timeout_ms(seconds: float | None) -> int | None:
    return None if not seconds else int(seconds * 1000)


class Envd:
    """The addresses, headers and RPC clients of one sandbox's envd."""

    def __init__(self, config: ConnectionConfig, sandbox_id: str, access_token: str | None) -> None:
        self.config = config
        self.sandbox_id = sandbox_id
        self.access_token = access_token
        self.url = config.sandbox_url
        self._process = ProcessClient(self.url, http_client=_http(), send_compression=None)
        self._filesystem = FilesystemClient(self.url, http_client=_http(), send_compression=None)

    @property
    def process(self) -> ProcessClient:
        _http()  # (refuses after a fork)
        return self._process

    @property
    def filesystem(self) -> FilesystemClient:
        _http()
        return self._filesystem

    def headers(self, port: int = ENVD_PORT, user: str | None = None) -> dict[str, str]:
        """What routes a request to a port of this sandbox (and, for envd, as which user)."""
        headers = {
            **self.config.headers,
            "E2b-Sandbox-Id": self.sandbox_id,
            "E2b-Sandbox-Port": str(port),
        }
        if self.access_token:
            headers["X-Access-Token"] = self.access_token
        if user is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:".encode()).decode()
        return headers

    def rpc_headers(
        self, user: str | None = DEFAULT_USER, *, keepalive: bool = False
    ) -> dict[str, str]:
        headers = self.headers(user=user)
        if keepalive:
            headers[KEEPALIVE_HEADER] = str(KEEPALIVE_S)
        return headers


_BY_CODE: dict[Code, Callable[[str], Exception]] = {
    Code.INVALID_ARGUMENT: InvalidArgumentException,
    Code.UNAUTHENTICATED: AuthenticationException,
    Code.PERMISSION_DENIED: AuthenticationException,
    Code.RESOURCE_EXHAUSTED: NotEnoughSpaceException,
    Code.DEADLINE_EXCEEDED: lambda m: TimeoutException(
        f"{m}: the call ran past its timeout (timeout= or request_timeout= sets it; 0 for none)"
    ),
    Code.CANCELED: lambda m: TimeoutException(f"{m}: the call was cancelled"),
}


def rpc_error(error: ConnectError, not_found: type[Exception] = NotFoundException) -> Exception:
    """The SDK's exception for an RPC error (``not_found``: what a missing thing is)."""
    message = error.message
    if error.code is Code.UNAVAILABLE or (
        error.code is Code.NOT_FOUND and "sandbox" in message.lower() and "not found" in message
    ):
        return SandboxNotRunningException(f"{message}: the sandbox is not running (any more)")
    if error.code is Code.RESOURCE_EXHAUSTED and "space" not in message.lower():
        return RateLimitException(message)
    if error.code is Code.NOT_FOUND:
        return not_found(message)
    make = _BY_CODE.get(error.code)
    return make(message) if make else SandboxException(f"{error.code.name.lower()}: {message}")


T = TypeVar("T")


async def rpc(call: Awaitable[T], not_found: type[Exception] = NotFoundException) -> T:
    """The answer of an RPC; its failure as the SDK's exception."""
    try:
        return await call
    except ConnectError as e:
        raise rpc_error(e, not_found) from None
