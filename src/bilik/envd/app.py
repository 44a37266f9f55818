"""envd's ASGI application: authentication, then plain HTTP or one of the Connect services.

``/files`` takes either the sandbox's access token (``X-Access-Token``: the holder may act as
any user, named by ``username`` or an ``Authorization: Basic`` header) or a signed URL. A signed
URL grants exactly what was signed: one operation (``read`` for GET, ``write`` for POST, from
the method alone), on one path, as one user (``username``; none signed means the sandbox's
default user), until the expiration if one was signed. The ``Authorization`` header is not
signed and is ignored; a signed upload writes only its path (``files.upload``).

The signature and what makes it unambiguous: ``signing``.
"""

from __future__ import annotations

import hmac
from typing import Any

from connectrpc.code import Code
from connectrpc.codec import Codec, proto_binary_codec, proto_json_codec
from connectrpc.errors import ConnectError
from protobuf import Message

from ..proto.contract import EnvdConfig
from ..proto.filesystem_connect import FilesystemASGIApplication
from ..proto.process_connect import ProcessASGIApplication
from . import files, metrics
from .filesystem_service import FilesystemService
from .http import Receive, Scope, Send, header, json_error, no_content, send_json
from .process_service import ProcessService
from .processes import ProcessTable
from .signing import UNAUTHORIZED, parse_query, signature_problem
from .users import UnknownUser, from_basic_auth, lookup


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
        try:
            query = parse_query(scope.get("query_string", b""))
        except ValueError as e:  # (UnicodeDecodeError too)
            await json_error(send, 400, f"malformed query: {e}")
            return
        path = query.get("path", "")
        if "\0" in path:
            await json_error(send, 400, "a path holds no NUL character")
            return
        signed_path = None
        if self._token_ok(scope):
            # The token's holder may act as anyone: the user it names, however it names it.
            name = query.get("username") or from_basic_auth(header(scope, "authorization"))
        else:
            operation = "read" if method == "GET" else "write"
            problem = signature_problem(query, operation, self.config.access_token)
            if problem is not None:
                await json_error(send, 401, problem)
                return
            name = query.get("username")
            signed_path = path
        try:
            user = lookup(name or self.config.default_user)
        except UnknownUser as e:
            await json_error(send, 401, str(e))
            return
        workdir = self.config.default_workdir
        if not path and (method == "GET" or signed_path is not None):
            await json_error(send, 400, "the path query parameter is required")
        elif method == "GET":
            await files.download(scope, send, path, user, workdir)
        else:
            await files.upload(scope, receive, send, path or None, user, workdir, signed_path)
