"""``sandbox.files``: read, write, list and watch the sandbox's files (async; the sync SDK
wraps this one)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import time
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime
from typing import IO, Any, Literal, TypedDict, overload

import httpx
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from protobuf import Oneof

from bilik.proto import filesystem_pb as pb
from bilik.sdk._handlers import call
from bilik.sdk.api import error_message, http_client
from bilik.sdk.envd import Envd, rpc, rpc_error, timeout_ms
from bilik.sdk.exceptions import (
    AuthenticationException,
    FileNotFoundException,
    InvalidArgumentException,
    NotEnoughSpaceException,
    SandboxException,
    SandboxNotRunningException,
    TimeoutException,
)
from bilik.sdk.models import EntryInfo, FilesystemEvent, FilesystemEventType, FileType, WriteInfo

CHUNK = 64 * 1024
Data = str | bytes | IO[bytes] | IO[str]

_FILE_TYPES = {
    pb.FileType.FILE: FileType.FILE,
    pb.FileType.DIRECTORY: FileType.DIR,
    pb.FileType.SYMLINK: FileType.SYMLINK,
}
_EVENT_TYPES = {
    pb.EventType.CREATE: FilesystemEventType.CREATE,
    pb.EventType.WRITE: FilesystemEventType.WRITE,
    pb.EventType.REMOVE: FilesystemEventType.REMOVE,
    pb.EventType.RENAME: FilesystemEventType.RENAME,
    pb.EventType.CHMOD: FilesystemEventType.CHMOD,
}


class WriteEntry(TypedDict):
    """One file of ``write_files``: its path and its data (text, bytes or a file object)."""

    path: str
    data: Data


def entry_info(entry: pb.EntryInfo | None) -> EntryInfo:
    if entry is None:
        raise SandboxException("envd answered without the entry")
    stamp = entry.modified_time
    return EntryInfo(
        name=entry.name,
        type=_FILE_TYPES.get(entry.type),
        path=entry.path,
        size=entry.size,
        mode=entry.mode,
        permissions=entry.permissions,
        owner=entry.owner,
        group=entry.group,
        modified_time=(
            datetime.fromtimestamp(stamp.seconds + stamp.nanos / 1e9, UTC) if stamp else None
        ),
        symlink_target=entry.symlink_target,
        metadata=dict(entry.metadata),
    )


def signature(
    path: str, operation: str, user: str | None, token: str, expiration: int | None
) -> str:
    """envd's v1 signature of a file URL."""
    raw = f"{path}:{operation}:{user or ''}:{token}"
    if expiration is not None:
        raw += f":{expiration}"
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode()


def files_error(response: httpx.Response) -> Exception:
    message = error_message(response)
    status = response.status_code
    if status == 404:
        return FileNotFoundException(message)
    if status in (401, 403):
        return AuthenticationException(message)
    if status == 400:
        return InvalidArgumentException(message, status_code=status)
    if status == 507:
        return NotEnoughSpaceException(message, status_code=status)
    if status == 502:
        return SandboxNotRunningException(message, status_code=status)
    return SandboxException(f"{status}: {message}", status_code=status)


async def _chunks(data: Data) -> AsyncIterator[bytes]:
    if isinstance(data, str):
        yield data.encode()
    elif isinstance(data, bytes | bytearray | memoryview):
        yield bytes(data)
    else:
        while chunk := data.read(CHUNK):
            yield chunk.encode() if isinstance(chunk, str) else chunk


async def _gzipped(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    packer = zlib.compressobj(wbits=31)  # the gzip format
    async for chunk in chunks:
        if packed := packer.compress(chunk):
            yield packed
    yield packer.flush()


def _metadata_headers(metadata: dict[str, str] | None) -> dict[str, str]:
    """A file's metadata, kept as its ``user.e2b.*`` extended attributes."""
    return {f"X-Metadata-{name}": value for name, value in (metadata or {}).items()}


class AsyncWatchHandle:
    """A running ``watch_dir``: events go to its callback until :meth:`stop`."""

    def __init__(self) -> None:
        self._stopped = False
        self._task: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        """Stop watching."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class AsyncFilesystem:
    """The sandbox's files, as a user of the sandbox (``user`` by default)."""

    def __init__(self, envd: Envd) -> None:
        self._envd = envd

    def _timeout(self, request_timeout: float | None) -> float | None:
        return self._envd.config.timeout(request_timeout)

    # -- contents, over envd's /files --------------------------------------------------------

    def _files_params(self, path: str, user: str | None) -> dict[str, str]:
        params = {"path": path}
        if user:
            params["username"] = user
        return params

    @overload
    async def read(
        self,
        path: str,
        format: Literal["text"] = "text",
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> str: ...
    @overload
    async def read(
        self,
        path: str,
        format: Literal["bytes"],
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> bytearray: ...
    @overload
    async def read(
        self,
        path: str,
        format: Literal["stream"],
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> AsyncIterator[bytes]: ...
    async def read(
        self,
        path: str,
        format: Literal["text", "bytes", "stream"] = "text",
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> str | bytearray | AsyncIterator[bytes]:
        """Read a file: as text (UTF-8), as bytes, or as a stream of chunks."""
        request = http_client().build_request(
            "GET",
            self._envd.url + "/files",
            params=self._files_params(path, user),
            headers=self._envd.headers(),
            timeout=self._timeout(request_timeout),
        )
        try:
            response = await http_client().send(request, stream=True)
        except httpx.TimeoutException as e:
            raise TimeoutException(f"reading {path} timed out") from e
        if not response.is_success:
            await response.aread()
            await response.aclose()
            raise files_error(response)
        if format == "stream":
            return _stream(response, path)
        body = bytearray()
        async for chunk in _stream(response, path):
            body += chunk
        # (as E2B's: bytes that are not UTF-8 become U+FFFD, no error)
        return body.decode(errors="replace") if format == "text" else body

    async def write(
        self,
        path: str,
        data: Data,
        user: str | None = None,
        request_timeout: float | None = None,
        metadata: dict[str, str] | None = None,
        gzip: bool = False,
    ) -> WriteInfo:
        """Write a file (its parents are made); ``data`` may be text, bytes or a file object,
        which is streamed. ``metadata`` is kept with the file; ``gzip`` compresses the upload."""
        headers = {"Content-Type": "application/octet-stream", **_metadata_headers(metadata)}
        body = _chunks(data)
        if gzip:
            headers["Content-Encoding"] = "gzip"
            body = _gzipped(body)
        response = await self._post_files(
            self._files_params(path, user),
            content=body,
            headers=headers,
            request_timeout=request_timeout,
        )
        return _write_infos(response)[0]

    async def write_files(
        self,
        files: Iterable[WriteEntry],
        user: str | None = None,
        request_timeout: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> list[WriteInfo]:
        """Write several files in one request (``metadata`` is kept with each)."""
        entries = list(files)
        if not entries:
            return []
        parts: list[tuple[str, tuple[str, bytes]]] = []
        for entry in entries:
            body = b"".join([chunk async for chunk in _chunks(entry["data"])])
            parts.append(("file", (entry["path"], body)))
        params = {"username": user} if user else {}
        response = await self._post_files(
            params,
            files=parts,
            headers=_metadata_headers(metadata),
            request_timeout=request_timeout,
        )
        return _write_infos(response)

    async def _post_files(
        self, params: dict[str, str], *, request_timeout: float | None, **body: Any
    ) -> httpx.Response:
        headers = {**self._envd.headers(), **body.pop("headers", {})}
        try:
            response = await http_client().post(
                self._envd.url + "/files",
                params=params,
                headers=headers,
                timeout=self._timeout(request_timeout),
                **body,
            )
        except httpx.TimeoutException as e:
            raise TimeoutException("writing files timed out") from e
        if not response.is_success:
            raise files_error(response)
        return response

    # -- the tree, over Connect RPC ----------------------------------------------------------

    async def list(
        self,
        path: str,
        depth: int | None = 1,
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> list[EntryInfo]:
        """The entries of a directory, ``depth`` levels down (1: its children)."""
        if depth is not None and depth < 1:
            raise InvalidArgumentException("depth should be at least 1")
        response = await rpc(
            self._envd.filesystem.list_dir(
                pb.ListDirRequest(path=path, depth=depth or 1),
                headers=self._envd.rpc_headers(user or "user"),
                timeout_ms=timeout_ms(self._timeout(request_timeout)),
            ),
            FileNotFoundException,
        )
        return [entry_info(e) for e in response.entries]

    async def exists(
        self, path: str, user: str | None = None, request_timeout: float | None = None
    ) -> bool:
        """Whether a file or directory exists."""
        try:
            await self.get_info(path, user, request_timeout)
        except FileNotFoundException:
            return False
        return True

    async def get_info(
        self, path: str, user: str | None = None, request_timeout: float | None = None
    ) -> EntryInfo:
        """What a path is: type, size, mode, owner, modification time, metadata."""
        response = await rpc(
            self._envd.filesystem.stat(
                pb.StatRequest(path=path),
                headers=self._envd.rpc_headers(user or "user"),
                timeout_ms=timeout_ms(self._timeout(request_timeout)),
            ),
            FileNotFoundException,
        )
        return entry_info(response.entry)

    async def make_dir(
        self, path: str, user: str | None = None, request_timeout: float | None = None
    ) -> bool:
        """Make a directory and its parents; ``False`` if it was already there."""
        try:
            await self._envd.filesystem.make_dir(
                pb.MakeDirRequest(path=path),
                headers=self._envd.rpc_headers(user or "user"),
                timeout_ms=timeout_ms(self._timeout(request_timeout)),
            )
        except ConnectError as e:
            if e.code is Code.ALREADY_EXISTS:
                return False
            raise rpc_error(e, FileNotFoundException) from None
        return True

    async def rename(
        self,
        old_path: str,
        new_path: str,
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> EntryInfo:
        """Move a file or directory."""
        response = await rpc(
            self._envd.filesystem.move(
                pb.MoveRequest(source=old_path, destination=new_path),
                headers=self._envd.rpc_headers(user or "user"),
                timeout_ms=timeout_ms(self._timeout(request_timeout)),
            ),
            FileNotFoundException,
        )
        return entry_info(response.entry)

    async def remove(
        self, path: str, user: str | None = None, request_timeout: float | None = None
    ) -> None:
        """Remove a file or a directory with everything in it."""
        await rpc(
            self._envd.filesystem.remove(
                pb.RemoveRequest(path=path),
                headers=self._envd.rpc_headers(user or "user"),
                timeout_ms=timeout_ms(self._timeout(request_timeout)),
            ),
            FileNotFoundException,
        )

    async def watch_dir(
        self,
        path: str,
        on_event: Callable[[FilesystemEvent], Any],
        on_exit: Callable[[Exception | None], Any] | None = None,
        user: str | None = None,
        request_timeout: float | None = None,
        timeout: float = 60,
        recursive: bool = False,
    ) -> AsyncWatchHandle:
        """Watch a directory: ``on_event`` gets each change until the handle is stopped or
        ``timeout`` seconds pass (0: no limit); ``on_exit`` gets the error that ended it."""
        stream = self._envd.filesystem.watch_dir(
            pb.WatchDirRequest(path=path, recursive=recursive),
            headers=self._envd.rpc_headers(user or "user", keepalive=True),
            timeout_ms=timeout_ms(timeout),
        )
        events = aiter(stream)
        try:
            first = await asyncio.wait_for(anext(events), self._timeout(request_timeout))
        except ConnectError as e:
            raise rpc_error(e) from None
        except TimeoutError:
            raise TimeoutException(f"watching {path} did not start in time") from None
        if not isinstance(first.event, Oneof) or first.event.field != "start":
            raise SandboxException("the watch did not start with a start event")

        handle = AsyncWatchHandle()

        async def pump() -> None:
            error: Exception | None = None
            try:
                async for response in events:
                    event = response.event.value if response.event else None
                    if isinstance(event, pb.FilesystemEvent) and event.type in _EVENT_TYPES:
                        change = FilesystemEvent(event.name, _EVENT_TYPES[event.type])
                        await call(on_event, change)
            except ConnectError as e:
                error = None if handle._stopped else rpc_error(e)
            except Exception as e:
                error = e
            finally:
                if on_exit is not None:
                    await call(on_exit, error)

        handle._task = asyncio.create_task(pump())
        return handle

    # -- URLs that need no headers -------------------------------------------------------------

    def _url(self, path: str, operation: str, user: str | None, expires_in: int | None) -> str:
        query = {"path": path}
        if user:
            query["username"] = user
        token = self._envd.access_token
        if token:
            expiration = None if expires_in is None else int(time.time()) + expires_in
            query["signature"] = signature(path, operation, user, token, expiration)
            if expiration is not None:
                query["signature_expiration"] = str(expiration)
        elif expires_in is not None:
            raise InvalidArgumentException("a signature expiration needs a secured sandbox")
        return (
            f"{self._envd.url}/files?{urllib.parse.urlencode(query, quote_via=urllib.parse.quote)}"
        )

    def download_url(
        self, path: str, user: str | None = None, use_signature_expiration: int | None = None
    ) -> str:
        """A URL anyone holding it can GET the file from (for ``use_signature_expiration``
        seconds, when given)."""
        return self._url(path, "read", user, use_signature_expiration)

    def upload_url(
        self, path: str, user: str | None = None, use_signature_expiration: int | None = None
    ) -> str:
        """A URL anyone holding it can POST the file to (multipart/form-data)."""
        return self._url(path, "write", user, use_signature_expiration)


async def _stream(response: httpx.Response, path: str) -> AsyncIterator[bytes]:
    """A file's content as it comes; a cut-off transfer as the SDK's exception."""
    try:
        async for chunk in response.aiter_bytes():
            yield chunk
    except httpx.TimeoutException as e:
        raise TimeoutException(f"reading {path} stalled") from e
    except httpx.HTTPError as e:
        raise SandboxNotRunningException(f"reading {path} was cut off: {e}") from e
    finally:
        await response.aclose()


def _write_infos(response: httpx.Response) -> list[WriteInfo]:
    return [
        WriteInfo(
            name=item["name"],
            type=FileType(item["type"]) if item.get("type") in ("file", "dir") else None,
            path=item["path"],
        )
        for item in response.json()
    ]
