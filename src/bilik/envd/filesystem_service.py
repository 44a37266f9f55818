"""The ``filesystem.Filesystem`` Connect service.

envd runs as the sandbox's root, but every operation acts as the requesting user: it runs in
one of that user's threads (``credentials``), so the kernel checks it with the user's
permissions, follows links as the user would, and gives what it creates to the user.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import os
import pwd
import secrets
import shutil
import stat
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from protobuf import Oneof
from protobuf.wkt.google.protobuf import timestamp_pb

from ..proto import filesystem_pb as pb
from ..proto.contract import EnvdConfig
from ..proto.filesystem_connect import Filesystem
from . import credentials
from .inotify import Change, Watch
from .process_service import keepalive_s, request_user
from .users import User, make_parents, resolve

METADATA_PREFIX = "user.e2b."
WATCHER_QUEUE = 10_000
EVENT_TYPES = {
    "create": pb.EventType.CREATE,
    "write": pb.EventType.WRITE,
    "remove": pb.EventType.REMOVE,
    "rename": pb.EventType.RENAME,
    "chmod": pb.EventType.CHMOD,
}

T = TypeVar("T")


def os_error(e: OSError, path: str) -> ConnectError:
    """The Connect error a failed file operation on ``path`` becomes."""
    if e.errno == errno.ENOENT:
        return ConnectError(Code.NOT_FOUND, f"path '{path}' does not exist")
    if e.errno == errno.EEXIST:
        return ConnectError(Code.ALREADY_EXISTS, f"path '{path}' already exists")
    if e.errno in (errno.ENOTDIR, errno.EISDIR, errno.EINVAL, errno.ENAMETOOLONG, errno.ELOOP):
        return ConnectError(Code.INVALID_ARGUMENT, f"path '{path}': {e.strerror}")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ConnectError(Code.PERMISSION_DENIED, f"path '{path}': {e.strerror}")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ConnectError(Code.RESOURCE_EXHAUSTED, f"path '{path}': no space left")
    return ConnectError(Code.INTERNAL, f"path '{path}': {e.strerror or e}")


def _name(lookup: Callable[[int], Any], ident: int) -> str:
    try:
        return str(lookup(ident)[0])
    except KeyError:
        return str(ident)


def metadata(path: str) -> dict[str, str]:
    found = {}
    with contextlib.suppress(OSError):
        for key in os.listxattr(path, follow_symlinks=False):
            if key.startswith(METADATA_PREFIX):
                with contextlib.suppress(OSError):
                    found[key[len(METADATA_PREFIX) :]] = os.getxattr(
                        path, key, follow_symlinks=False
                    ).decode(errors="replace")
    return found


def entry(path: str) -> pb.EntryInfo:
    """What is at ``path`` (a link is described as itself, with its target)."""
    st = os.lstat(path)
    target = None
    kind = pb.FileType.FILE
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(path)
        try:
            followed = os.stat(path)
            kind = pb.FileType.DIRECTORY if stat.S_ISDIR(followed.st_mode) else pb.FileType.FILE
        except OSError:
            kind = pb.FileType.SYMLINK
    elif stat.S_ISDIR(st.st_mode):
        kind = pb.FileType.DIRECTORY
    return pb.EntryInfo(
        name=os.path.basename(path) or "/",
        type=kind,
        path=path,
        size=st.st_size,
        mode=stat.S_IMODE(st.st_mode),
        permissions=stat.filemode(st.st_mode),
        owner=_name(pwd.getpwuid, st.st_uid),
        group=_name(grp.getgrgid, st.st_gid),
        modified_time=timestamp_pb.Timestamp(
            seconds=st.st_mtime_ns // 1_000_000_000, nanos=st.st_mtime_ns % 1_000_000_000
        ),
        symlink_target=target,
        metadata=metadata(path),
        is_symlink=target is not None,
    )


def _sorted_entries(directory: str) -> list[os.DirEntry[str]]:
    """What is in ``directory``, in the byte order of the names (Go's lexical order)."""
    with os.scandir(directory) as it:
        return sorted(it, key=lambda e: os.fsencode(e.name))


def _walk(top: list[os.DirEntry[str]], depth: int) -> list[pb.EntryInfo]:
    """The entries ``depth`` levels down from a directory's ``top`` ones, depth first in
    lexical order (a directory, what is in it, then its next sibling), as Go's
    ``filepath.WalkDir`` gives them to E2B's envd. Links are listed, never followed; what
    vanishes or may not be read on the way is left out."""
    found: list[pb.EntryInfo] = []
    # One iterator per directory being listed (no recursion: a tree may be deep).
    stack = [(iter(top), 1)]
    while stack:
        items, level = stack[-1]
        item = next(items, None)
        if item is None:
            stack.pop()
            continue
        with contextlib.suppress(OSError):
            found.append(entry(item.path))
            if level < depth and item.is_dir(follow_symlinks=False):
                stack.append((iter(_sorted_entries(item.path)), level + 1))
    return found


async def as_user(user: User, path: str, fn: Callable[[], T]) -> T:
    """``fn()`` with ``user``'s credentials; its OSError is the Connect error of ``path``."""
    try:
        return await credentials.run_as(user, fn)
    except OSError as e:
        raise os_error(e, path) from None


class _Watcher:
    """A watch, read by a thread with the watching user's credentials, and the events it saw
    (until someone takes them)."""

    def __init__(self, path: str, recursive: bool, include_entry: bool) -> None:
        self.include_entry = include_entry
        self.events: asyncio.Queue[pb.FilesystemEvent] = asyncio.Queue(WATCHER_QUEUE)
        self.loop = asyncio.get_running_loop()
        self.watch = Watch(path, recursive, self._deliver)

    async def start(self, user: User) -> None:
        """Start watching as ``user``; fails as the user's own watch would."""
        ready: asyncio.Future[BaseException | None] = self.loop.create_future()

        def settle(error: BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                self.loop.call_soon_threadsafe(_settle, ready, error)

        def failed(error: BaseException) -> None:
            self.watch.release()
            settle(error)

        def main() -> None:
            try:
                _check_watchable(self.watch.root)
                self.watch.open()
            except BaseException as e:
                failed(e)
                return
            settle(None)
            self.watch.run()

        credentials.thread_as(user, main, failed, "watch")
        try:
            error = await ready
        except BaseException:
            self.watch.close()  # the thread stops as soon as it is running
            raise
        if isinstance(error, OSError):
            raise os_error(error, self.watch.root)
        if error is not None:
            raise error

    def _deliver(self, changes: list[Change]) -> None:
        """In the watching thread (as the user): describe the changes, queue them in the loop."""
        events = [self._event(change) for change in changes]
        try:
            self.loop.call_soon_threadsafe(self._queue, events)
        except RuntimeError:  # envd is shutting down
            self.watch.close()

    def _event(self, change: Change) -> pb.FilesystemEvent:
        info = None
        if self.include_entry and change.kind not in ("remove", "rename"):
            with contextlib.suppress(OSError):
                info = entry(change.path)
        return pb.FilesystemEvent(
            name=os.path.relpath(change.path, self.watch.root),
            type=EVENT_TYPES[change.kind],
            entry=info,
        )

    def _queue(self, events: list[pb.FilesystemEvent]) -> None:
        for event in events:
            with contextlib.suppress(asyncio.QueueFull):  # nobody polls: drop, never grow
                self.events.put_nowait(event)

    def drain(self) -> list[pb.FilesystemEvent]:
        out = []
        while not self.events.empty():
            out.append(self.events.get_nowait())
        return out


def _settle(future: asyncio.Future[BaseException | None], error: BaseException | None) -> None:
    if not future.done():
        future.set_result(error)


def _check_watchable(path: str) -> None:
    if not os.path.isdir(path):
        if not os.path.lexists(path):
            raise ConnectError(Code.NOT_FOUND, f"path '{path}' does not exist")
        raise ConnectError(Code.INVALID_ARGUMENT, f"path '{path}' is not a directory")


def _watch_event(kind: str, value: object) -> pb.WatchDirResponse:
    return pb.WatchDirResponse(event=Oneof(kind, value))  # type: ignore[arg-type]


class FilesystemService(Filesystem):
    def __init__(self, config: EnvdConfig) -> None:
        self.config = config
        self.watchers: dict[str, _Watcher] = {}

    def _path(self, raw: str, ctx: RequestContext[Any, Any]) -> tuple[str, User]:
        user = request_user(self.config, ctx)
        if not raw:
            raise ConnectError(Code.INVALID_ARGUMENT, "path is required")
        if "\0" in raw:
            raise ConnectError(Code.INVALID_ARGUMENT, "a path holds no NUL character")
        return resolve(raw, user, self.config.default_workdir), user

    async def stat(
        self, request: pb.StatRequest, ctx: RequestContext[pb.StatRequest, pb.StatResponse]
    ) -> pb.StatResponse:
        path, user = self._path(request.path, ctx)
        return pb.StatResponse(entry=await as_user(user, path, lambda: entry(path)))

    async def make_dir(
        self, request: pb.MakeDirRequest, ctx: RequestContext[pb.MakeDirRequest, pb.MakeDirResponse]
    ) -> pb.MakeDirResponse:
        path, user = self._path(request.path, ctx)

        def make() -> pb.EntryInfo:
            if os.path.lexists(path):
                if os.path.isdir(path):
                    raise FileExistsError(errno.EEXIST, "exists")
                raise NotADirectoryError(errno.ENOTDIR, "a file is in the way")
            make_parents(path)
            os.mkdir(path)
            return entry(path)

        return pb.MakeDirResponse(entry=await as_user(user, path, make))

    async def move(
        self, request: pb.MoveRequest, ctx: RequestContext[pb.MoveRequest, pb.MoveResponse]
    ) -> pb.MoveResponse:
        source, user = self._path(request.source, ctx)
        destination, _ = self._path(request.destination, ctx)

        def move() -> pb.EntryInfo:
            os.lstat(source)
            make_parents(destination)
            os.rename(source, destination)
            return entry(destination)

        try:
            return pb.MoveResponse(entry=await credentials.run_as(user, move))
        except OSError as e:
            raise os_error(e, source if e.errno == errno.ENOENT else destination) from None

    async def list_dir(
        self, request: pb.ListDirRequest, ctx: RequestContext[pb.ListDirRequest, pb.ListDirResponse]
    ) -> pb.ListDirResponse:
        path, user = self._path(request.path, ctx)
        depth = request.depth or 1

        def walk() -> list[pb.EntryInfo]:
            if not os.path.isdir(path):
                os.lstat(path)  # missing: not_found
                raise NotADirectoryError(errno.ENOTDIR, "not a directory")
            # One the user may not read is an error, not an empty list.
            return _walk(_sorted_entries(path), depth)

        return pb.ListDirResponse(entries=await as_user(user, path, walk))

    async def remove(
        self, request: pb.RemoveRequest, ctx: RequestContext[pb.RemoveRequest, pb.RemoveResponse]
    ) -> pb.RemoveResponse:
        path, user = self._path(request.path, ctx)

        def remove() -> None:
            # As E2B's (Go's os.RemoveAll): recursive, and nothing there is no error.
            with contextlib.suppress(FileNotFoundError):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)

        await as_user(user, path, remove)
        return pb.RemoveResponse()

    async def _watcher(
        self, path: str, user: User, recursive: bool, include_entry: bool
    ) -> _Watcher:
        watcher = _Watcher(path, recursive, include_entry)
        await watcher.start(user)
        return watcher

    async def watch_dir(
        self,
        request: pb.WatchDirRequest,
        ctx: RequestContext[pb.WatchDirRequest, pb.WatchDirResponse],
    ) -> AsyncIterator[pb.WatchDirResponse]:
        path, user = self._path(request.path, ctx)
        watcher = await self._watcher(path, user, request.recursive, request.include_entry)
        keepalive = keepalive_s(ctx)
        try:
            yield _watch_event("start", pb.WatchDirResponse.StartEvent())
            while True:
                try:
                    event = await asyncio.wait_for(watcher.events.get(), keepalive)
                except TimeoutError:
                    yield _watch_event("keepalive", pb.WatchDirResponse.KeepAlive())
                    continue
                yield _watch_event("filesystem", event)
        finally:
            watcher.watch.close()

    async def create_watcher(
        self,
        request: pb.CreateWatcherRequest,
        ctx: RequestContext[pb.CreateWatcherRequest, pb.CreateWatcherResponse],
    ) -> pb.CreateWatcherResponse:
        path, user = self._path(request.path, ctx)
        watcher = await self._watcher(path, user, request.recursive, request.include_entry)
        watcher_id = secrets.token_hex(8)
        self.watchers[watcher_id] = watcher
        return pb.CreateWatcherResponse(watcher_id=watcher_id)

    def _find_watcher(self, watcher_id: str) -> _Watcher:
        watcher = self.watchers.get(watcher_id)
        if watcher is None:
            raise ConnectError(Code.NOT_FOUND, f"watcher '{watcher_id}' not found")
        return watcher

    async def get_watcher_events(
        self,
        request: pb.GetWatcherEventsRequest,
        ctx: RequestContext[pb.GetWatcherEventsRequest, pb.GetWatcherEventsResponse],
    ) -> pb.GetWatcherEventsResponse:
        return pb.GetWatcherEventsResponse(events=self._find_watcher(request.watcher_id).drain())

    async def remove_watcher(
        self,
        request: pb.RemoveWatcherRequest,
        ctx: RequestContext[pb.RemoveWatcherRequest, pb.RemoveWatcherResponse],
    ) -> pb.RemoveWatcherResponse:
        self._find_watcher(request.watcher_id).watch.close()
        del self.watchers[request.watcher_id]
        return pb.RemoveWatcherResponse()
