"""``GET /files`` and ``POST /files``: whole files in and out, streamed, gzip both ways.

Each file is opened (and made, with its parents) in a thread with the requesting user's
credentials (``credentials``): the kernel decides, as for the user's own process, whether the
user may read or write it and every directory and link on the way. The bytes then flow through
the open descriptor.

A signed upload (``signed_path``) writes one file, at the path its URL was signed for: its body
is that file alone, or a multipart body of exactly one part named ``file``. Anything else is
refused, and what was already written of it removed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import urllib.parse
import zlib
from collections.abc import AsyncIterator
from typing import Any

from . import credentials, multipart
from .filesystem_service import METADATA_PREFIX
from .http import Receive, Scope, Send, header, json_error, send_json
from .users import User, make_parents, resolve

CHUNK = 256 * 1024
METADATA_HEADER = b"x-metadata-"


async def download(scope: Scope, send: Send, path: str, user: User, workdir: str) -> None:
    target = resolve(path, user, workdir)
    try:
        fd, size = await credentials.run_as(user, lambda: _open_for_reading(target))
    except IsADirectoryError:
        await json_error(send, 400, f"path '{target}' is a directory")
        return
    except OSError as e:
        await _file_error(send, e, target)
        return
    with os.fdopen(fd, "rb", buffering=0) as f:
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
            headers.append((b"content-length", str(size).encode()))
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


def _open_for_reading(target: str) -> tuple[int, int]:
    """A descriptor of ``target`` and its size (as the user: in one of the user's threads)."""
    # Not blocked by a FIFO nobody writes; refused below.
    fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory")
        _refuse_pipes(st)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _refuse_pipes(st: os.stat_result) -> None:
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file")


class _Refused(Exception):
    """A request the endpoint will not do (a 400, with this message)."""


async def upload(
    scope: Scope,
    receive: Receive,
    send: Send,
    path: str | None,
    user: User,
    workdir: str,
    signed_path: str | None = None,
) -> None:
    """Write the request's file(s) as ``user``; with ``signed_path`` (the path a signed URL
    names), exactly one file, there."""
    content_type = (header(scope, "content-type") or "").lower()
    meta = _metadata(scope)
    body = _body(receive)
    if "gzip" in (header(scope, "content-encoding") or "").lower():
        body = _gunzip(body)
    if signed_path is not None:
        path = signed_path
    written: list[dict[str, Any]] = []
    try:
        if content_type.startswith("multipart/form-data"):
            async for part, data in multipart.parts(body, multipart.boundary_of(content_type)):
                name: str | None
                if signed_path is not None:
                    name = _signed_part(part, signed_path, bool(written), user, workdir)
                elif part.name != "file":
                    continue
                else:
                    name = path if path and not written else part.filename
                if not name:
                    raise _Refused("a file part without a path")
                target = resolve(name, user, workdir)
                await _write(target, data, user, meta)
                written.append(_info(target, meta))
        else:
            if not path:
                raise _Refused("the path query parameter is required")
            target = resolve(path, user, workdir)
            await _write(target, body, user, meta)
            written.append(_info(target, meta))
    except (multipart.MultipartError, _Refused) as e:
        if signed_path is not None:
            await _discard(written, user)
        await json_error(send, 400, str(e))
        return
    except zlib.error as e:
        if signed_path is not None:
            await _discard(written, user)
        await json_error(send, 400, f"the body is not valid gzip: {e}")
        return
    except _Failed as e:
        await _file_error(send, e.error, e.path)
        return
    if not written:
        await json_error(send, 400, "no file in the request")
        return
    await send_json(send, 200, written)


def _metadata(scope: Scope) -> dict[str, str]:
    """The file metadata an upload sets, from its ``X-Metadata-<key>`` headers (as E2B's envd:
    keys lowercased, an empty key dropped, the first of repeated headers wins)."""
    meta: dict[str, str] = {}
    for name, value in scope["headers"]:
        if name.lower().startswith(METADATA_HEADER):
            key = name.decode(errors="replace").lower()[len(METADATA_HEADER) :]
            if key:
                meta.setdefault(key, value.decode(errors="replace"))
    return meta


def _signed_part(
    part: multipart.Part, signed_path: str, after_first: bool, user: User, workdir: str
) -> str:
    """Where a part of a signed upload goes: the signed path, for its one ``file`` part. Its
    file name is not a path (a bare name, as browsers send, is ignored)."""
    if part.name != "file" or after_first:
        raise _Refused("a signed upload URL takes one file part, named 'file', and nothing else")
    filename = part.filename or ""
    if ("/" in filename or filename.startswith("~")) and resolve(
        filename, user, workdir
    ) != resolve(signed_path, user, workdir):
        raise _Refused("a signed upload URL writes only the path it was signed for")
    return signed_path


async def _discard(written: list[dict[str, Any]], user: User) -> None:
    """Remove what a refused signed upload wrote: it is refused whole."""
    for info in written:
        target = str(info["path"])
        with contextlib.suppress(OSError):
            await credentials.run_as(user, functools.partial(os.unlink, target))


class _Failed(Exception):
    def __init__(self, error: OSError, path: str) -> None:
        self.error = error
        self.path = path


def _create(target: str, meta: dict[str, str]) -> int:
    """``target`` opened for writing, made (with its parents) if missing, its metadata set (as
    the user: in one of the user's threads)."""
    if os.path.isdir(target):
        raise IsADirectoryError(errno.EISDIR, "is a directory")
    make_parents(target)
    # Not blocked by a FIFO nobody reads (that is an error, ENXIO).
    fd = os.open(
        target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NONBLOCK, 0o644
    )
    try:
        _refuse_pipes(os.fstat(fd))
        os.set_blocking(fd, True)
        for key in os.listxattr(fd):
            if key.startswith(METADATA_PREFIX):
                os.removexattr(fd, key)
        for key, value in meta.items():
            os.setxattr(fd, METADATA_PREFIX + key, value.encode())
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise
    return fd


async def _write(target: str, data: AsyncIterator[bytes], user: User, meta: dict[str, str]) -> None:
    try:
        fd = await credentials.run_as(user, lambda: _create(target, meta))
    except OSError as e:
        raise _Failed(e, target) from None
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            try:
                async for chunk in data:
                    view = memoryview(chunk)
                    while view:
                        view = view[f.write(view) or 0 :]
            except OSError as e:
                raise _Failed(e, target) from None
    except BaseException:
        # A half-written file is worse than none when the upload failed or was cut off.
        with contextlib.suppress(OSError):
            await credentials.run_as(user, lambda: os.unlink(target))
        raise


def _info(target: str, meta: dict[str, str]) -> dict[str, Any]:
    """A written file as the upload's answer lists it: with the metadata set on it, if any."""
    info: dict[str, Any] = {"name": os.path.basename(target), "type": "file", "path": target}
    if meta:
        info["metadata"] = meta
    return info


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
    elif e.errno in (errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EINVAL, errno.ENXIO):
        await json_error(send, 400, f"path '{path}': {e.strerror}")
    elif e.errno == errno.EOPNOTSUPP:
        # (gVisor keeps no user xattrs: nothing was written; the request is one not honoured)
        await json_error(
            send, 400, f"path '{path}': this sandbox's filesystem cannot keep file metadata"
        )
    else:
        await json_error(send, 500, f"path '{path}': {e.strerror or e}")
