"""``GET /files`` and ``POST /files``: whole files in and out, streamed, gzip both ways."""

from __future__ import annotations

import contextlib
import errno
import os
import urllib.parse
import zlib
from collections.abc import AsyncIterator
from typing import Any

from . import multipart
from .filesystem_service import METADATA_PREFIX
from .http import Receive, Scope, Send, header, json_error, send_json
from .users import User, make_parents, own, resolve

CHUNK = 256 * 1024


async def download(scope: Scope, send: Send, path: str, user: User, workdir: str) -> None:
    target = resolve(path, user, workdir)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        await _file_error(send, e, target)
        return
    with os.fdopen(fd, "rb", buffering=0) as f:
        if os.path.isdir(target):
            await json_error(send, 400, f"path '{target}' is a directory")
            return
        gzip = "gzip" in (header(scope, "accept-encoding") or "")
        headers = [
            (b"content-type", b"application/octet-stream"),
            (
                b"content-disposition",
                b"attachment; filename*=UTF-8''"
                + urllib.parse.quote(os.path.basename(target)).encode(),
            ),
        ]
        if gzip:
            headers.append((b"content-encoding", b"gzip"))
        else:
            headers.append((b"content-length", str(os.fstat(fd).st_size).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        packer = zlib.compressobj(6, zlib.DEFLATED, 31) if gzip else None
        while chunk := f.read(CHUNK):
            if packer is not None:
                chunk = packer.compress(chunk)
                if not chunk:
                    continue
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        tail = packer.flush() if packer is not None else b""
        await send({"type": "http.response.body", "body": tail, "more_body": False})


async def upload(
    scope: Scope, receive: Receive, send: Send, path: str | None, user: User, workdir: str
) -> None:
    content_type = (header(scope, "content-type") or "").lower()
    meta = {
        name.decode().lower()[len("x-metadata-") :]: value.decode(errors="replace")
        for name, value in scope["headers"]
        if name.lower().startswith(b"x-metadata-")
    }
    body = _body(receive)
    if "gzip" in (header(scope, "content-encoding") or "").lower():
        body = _gunzip(body)
    written: list[dict[str, Any]] = []
    try:
        if content_type.startswith("multipart/form-data"):
            async for part, data in multipart.parts(body, multipart.boundary_of(content_type)):
                if part.name != "file":
                    continue
                name = path if path and not written else part.filename
                if not name:
                    await json_error(send, 400, "a file part without a path")
                    return
                target = resolve(name, user, workdir)
                await _write(target, data, user, meta)
                written.append(_info(target))
        else:
            if not path:
                await json_error(send, 400, "the path query parameter is required")
                return
            target = resolve(path, user, workdir)
            await _write(target, body, user, meta)
            written.append(_info(target))
    except multipart.MultipartError as e:
        await json_error(send, 400, str(e))
        return
    except zlib.error as e:
        await json_error(send, 400, f"the body is not valid gzip: {e}")
        return
    except _Failed as e:
        await _file_error(send, e.error, e.path)
        return
    if not written:
        await json_error(send, 400, "no file in the request")
        return
    await send_json(send, 200, written)


class _Failed(Exception):
    def __init__(self, error: OSError, path: str) -> None:
        self.error = error
        self.path = path


async def _write(target: str, data: AsyncIterator[bytes], user: User, meta: dict[str, str]) -> None:
    try:
        if os.path.isdir(target):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        make_parents(target, user)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise _Failed(e, target) from None
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            try:
                own(target, user)
                for key in os.listxattr(fd):
                    if key.startswith(METADATA_PREFIX):
                        os.removexattr(fd, key)
                for key, value in meta.items():
                    os.setxattr(fd, METADATA_PREFIX + key, value.encode())
                async for chunk in data:
                    view = memoryview(chunk)
                    while view:
                        view = view[f.write(view) or 0 :]
            except OSError as e:
                raise _Failed(e, target) from None
    except BaseException:
        # A half-written file is worse than none when the upload failed or was cut off.
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise


def _info(target: str) -> dict[str, Any]:
    return {"name": os.path.basename(target), "type": "file", "path": target}


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("the client went away mid-upload")
        if message.get("body"):
            yield message["body"]
        if not message.get("more_body"):
            return


async def _gunzip(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    unpacker = zlib.decompressobj(47)  # gzip or zlib header, detected
    async for chunk in chunks:
        while chunk:
            out = unpacker.decompress(chunk, CHUNK)
            chunk = unpacker.unconsumed_tail
            if out:
                yield out
    if tail := unpacker.flush():
        yield tail


async def _file_error(send: Send, e: OSError, path: str) -> None:
    if e.errno == errno.ENOENT:
        await json_error(send, 404, f"path '{path}' does not exist")
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
        await json_error(send, 507, f"not enough disk space to write '{path}'")
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        await json_error(send, 403, f"permission denied: '{path}'")
    elif e.errno in (errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EINVAL):
        await json_error(send, 400, f"path '{path}': {e.strerror}")
    else:
        await json_error(send, 500, f"path '{path}': {e.strerror or e}")
