"""envd's ASGI application: authentication, then plain HTTP or one of the Connect services."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import urllib.parse
from typing import Any

from connectrpc.code import Code
from connectrpc.codec import Codec, proto_binary_codec, proto_json_codec
from connectrpc.errors import ConnectError
from protobuf import Message

from ..proto.filesystem_connect import FilesystemASGIApplication
from ..proto.process_connect import ProcessASGIApplication
from . import files, metrics
from .config import EnvdConfig
from .filesystem_service import FilesystemService
from .http import Receive, Scope, Send, header, json_error, no_content, send_json
from .process_service import ProcessService
from .processes import ProcessTable
from .users import UnknownUser, from_basic_auth, lookup

UNAUTHORIZED = (
    "unauthorized access, please provide a valid access token or method signing if supported"
)


def signature(path: str, operation: str, user: str, token: str, expiration: str | None) -> str:
    raw = f"{path}:{operation}:{user}:{token}" + (f":{expiration}" if expiration else "")
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode()


class _Strict(Codec[Message, Any]):
    """A codec whose undecodable input is the client's error (``invalid_argument``), not
    envd's (the library reports ``unknown``, a 500)."""

    def __init__(self, inner: Codec[Message, Any]) -> None:
        self.inner = inner

    def name(self) -> str:
        return self.inner.name()

    def encode(self, message: Message) -> bytes:
        return self.inner.encode(message)

    def decode(self, data: bytes | bytearray, message_class: type[Any]) -> Any:
        try:
            return self.inner.decode(data, message_class)
        except Exception as e:
            raise ConnectError(Code.INVALID_ARGUMENT, f"malformed request: {e}") from None


CODECS = [_Strict(proto_binary_codec()), _Strict(proto_json_codec())]


class Envd:
    def __init__(self, config: EnvdConfig) -> None:
        self.config = config
        self.table = ProcessTable()
        self.process = ProcessASGIApplication(ProcessService(config, self.table), codecs=CODECS)
        self.filesystem = FilesystemASGIApplication(FilesystemService(config), codecs=CODECS)

    def _token_ok(self, scope: Scope) -> bool:
        token = self.config.access_token
        given = header(scope, "x-access-token") or ""
        return not token or hmac.compare_digest(given.encode(), token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/health":
            await no_content(send)
        elif path == "/files":
            await self._files(scope, receive, send)
        elif not self._token_ok(scope):
            await json_error(send, 401, UNAUTHORIZED)
        elif path.startswith("/process.Process/"):
            await self.process(scope, receive, send)
        elif path.startswith("/filesystem.Filesystem/"):
            await self.filesystem(scope, receive, send)
        elif path == "/envs" and method == "GET":
            await send_json(send, 200, self.config.env)
        elif path == "/metrics" and method == "GET":
            await send_json(send, 200, metrics.snapshot(self.config))
        else:
            await json_error(send, 404, f"no such endpoint: {method} {path}")

    async def _files(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method not in ("GET", "POST"):
            await json_error(send, 405, f"method {method} is not allowed on /files")
            return
        query = dict(urllib.parse.parse_qsl(scope.get("query_string", b"").decode()))
        path = query.get("path")
        username = query.get("username") or ""
        if not self._token_ok(scope):
            given = query.get("signature")
            expiration = query.get("signature_expiration")
            operation = "read" if method == "GET" else "write"
            want = signature(path or "", operation, username, self.config.access_token, expiration)
            if not given or not hmac.compare_digest(given.encode(), want.encode()):
                await json_error(send, 401, UNAUTHORIZED)
                return
            if expiration and (not expiration.isdigit() or int(expiration) < time.time()):
                await json_error(send, 401, "signature is already expired")
                return
        name = username or from_basic_auth(header(scope, "authorization"))
        try:
            user = lookup(name or self.config.default_user)
        except UnknownUser as e:
            await json_error(send, 401, str(e))
            return
        workdir = self.config.default_workdir
        if method == "GET":
            if not path:
                await json_error(send, 400, "the path query parameter is required")
                return
            await files.download(scope, send, path, user, workdir)
        else:
            await files.upload(scope, receive, send, path, user, workdir)
