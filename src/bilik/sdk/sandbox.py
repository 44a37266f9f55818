"""``Sandbox``: the sync SDK. Every call runs :class:`AsyncSandbox`'s on the SDK's own event
loop (see ``_portal``), so both behave the same; callbacks run on that loop's thread."""

from __future__ import annotations

import builtins
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any, Literal, overload

import httpx

from bilik.sdk._dual import dual
from bilik.sdk._portal import portal, run
from bilik.sdk.code import DEFAULT_RUN_TIMEOUT, Context, Execution
from bilik.sdk.commands import AsyncCommandHandle, OnBytes, OnOutput
from bilik.sdk.config import ConnectionConfig
from bilik.sdk.files import Data, WriteEntry
from bilik.sdk.models import (
    CommandResult,
    EntryInfo,
    FilesystemEvent,
    ProcessInfo,
    PtySize,
    ResourceUsage,
    SandboxInfo,
    SandboxMetrics,
    SandboxQuery,
    SnapshotInfo,
    WriteInfo,
)
from bilik.sdk.sandbox_async import (
    AsyncSandbox,
    AsyncSandboxPaginator,
    AsyncSnapshotPaginator,
    NetworkOpts,
    SandboxLifecycle,
)


class SandboxPaginator:
    """Pages of sandboxes: ``next_items()`` while ``has_next``; or iterate over it."""

    def __init__(self, inner: AsyncSandboxPaginator) -> None:
        self._inner = inner

    @property
    def has_next(self) -> bool:
        return self._inner.has_next

    @property
    def next_token(self) -> str | None:
        return self._inner.next_token

    def next_items(self) -> list[SandboxInfo]:
        """The next page."""
        return run(self._inner.next_items())

    def __iter__(self) -> Iterator[SandboxInfo]:
        while self.has_next:
            yield from self.next_items()


class SnapshotPaginator:
    """Pages of snapshots, newest first: ``next_items()`` while ``has_next``."""

    def __init__(self, inner: AsyncSnapshotPaginator) -> None:
        self._inner = inner

    @property
    def has_next(self) -> bool:
        return self._inner.has_next

    @property
    def next_token(self) -> str | None:
        return self._inner.next_token

    def next_items(self) -> list[SnapshotInfo]:
        """The next page."""
        return run(self._inner.next_items())

    def __iter__(self) -> Iterator[SnapshotInfo]:
        while self.has_next:
            yield from self.next_items()


class CommandHandle:
    """A running command or terminal: output so far, :meth:`wait`, :meth:`kill`, input."""

    def __init__(self, inner: AsyncCommandHandle) -> None:
        self._inner = inner

    @property
    def pid(self) -> int:
        return self._inner.pid

    @property
    def stdout(self) -> str:
        return self._inner.stdout

    @property
    def stderr(self) -> str:
        return self._inner.stderr

    @property
    def exit_code(self) -> int | None:
        return self._inner.exit_code

    @property
    def error(self) -> str | None:
        return self._inner.error

    def wait(
        self,
        on_pty: OnBytes | None = None,
        on_stdout: OnOutput | None = None,
        on_stderr: OnOutput | None = None,
    ) -> CommandResult:
        """Wait for the end; a non-zero exit raises ``CommandExitException``."""
        return run(self._inner.wait(on_pty, on_stdout, on_stderr))

    def kill(self) -> bool:
        """Kill the command (SIGKILL)."""
        return run(self._inner.kill())

    def send_stdin(self, data: str | bytes) -> None:
        """Send data to its standard input (or terminal)."""
        run(self._inner.send_stdin(data))

    def disconnect(self) -> None:
        """Stop receiving its output; it goes on running."""
        run(self._inner.disconnect())


class WatchHandle:
    """A running ``watch_dir``: collect events with :meth:`get_new_events`, end with
    :meth:`stop`."""

    def __init__(self) -> None:
        self._events: list[FilesystemEvent] = []
        self._lock = threading.Lock()
        self._stop: Callable[[], Any] | None = None

    def _add(self, event: FilesystemEvent) -> None:
        with self._lock:
            self._events.append(event)

    def get_new_events(self) -> list[FilesystemEvent]:
        """The events since the last call."""
        with self._lock:
            events, self._events = self._events, []
        return events

    def stop(self) -> None:
        """Stop watching."""
        if self._stop is not None:
            run(self._stop())


class Filesystem:
    """The sandbox's files (see ``AsyncFilesystem`` for each call)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._a = sandbox.files

    @overload
    def read(
        self,
        path: str,
        format: Literal["text"] = "text",
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> str: ...
    @overload
    def read(
        self,
        path: str,
        format: Literal["bytes"],
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> bytearray: ...
    @overload
    def read(
        self,
        path: str,
        format: Literal["stream"],
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> Iterator[bytes]: ...
    def read(
        self,
        path: str,
        format: Literal["text", "bytes", "stream"] = "text",
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> str | bytearray | Iterator[bytes]:
        """Read a file: as text, as bytes, or as an iterator of chunks."""
        if format == "stream":
            return portal().iterate(run(self._a.read(path, "stream", user, request_timeout)))
        if format == "bytes":
            return run(self._a.read(path, "bytes", user, request_timeout))
        return run(self._a.read(path, "text", user, request_timeout))

    def write(
        self,
        path: str,
        data: Data,
        user: str | None = None,
        request_timeout: float | None = None,
        metadata: dict[str, str] | None = None,
        gzip: bool = False,
    ) -> WriteInfo:
        """Write a file (text, bytes or a file object, streamed); parents are made."""
        return run(self._a.write(path, data, user, request_timeout, metadata, gzip))

    def write_files(
        self,
        files: Iterable[WriteEntry],
        user: str | None = None,
        request_timeout: float | None = None,
        metadata: dict[str, str] | None = None,
    ) -> list[WriteInfo]:
        """Write several files in one request."""
        return run(self._a.write_files(files, user, request_timeout, metadata))

    def list(
        self,
        path: str,
        depth: int | None = 1,
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> list[EntryInfo]:
        """A directory's entries, ``depth`` levels down."""
        return run(self._a.list(path, depth, user, request_timeout))

    def exists(
        self, path: str, user: str | None = None, request_timeout: float | None = None
    ) -> bool:
        """Whether a path exists."""
        return run(self._a.exists(path, user, request_timeout))

    def get_info(
        self, path: str, user: str | None = None, request_timeout: float | None = None
    ) -> EntryInfo:
        """What a path is."""
        return run(self._a.get_info(path, user, request_timeout))

    def make_dir(
        self, path: str, user: str | None = None, request_timeout: float | None = None
    ) -> bool:
        """Make a directory and its parents; ``False`` if it existed."""
        return run(self._a.make_dir(path, user, request_timeout))

    def rename(
        self,
        old_path: str,
        new_path: str,
        user: str | None = None,
        request_timeout: float | None = None,
    ) -> EntryInfo:
        """Move a file or directory."""
        return run(self._a.rename(old_path, new_path, user, request_timeout))

    def remove(
        self, path: str, user: str | None = None, request_timeout: float | None = None
    ) -> None:
        """Remove a file or a directory tree."""
        run(self._a.remove(path, user, request_timeout))

    def watch_dir(
        self,
        path: str,
        user: str | None = None,
        request_timeout: float | None = None,
        recursive: bool = False,
        timeout: float = 0,
    ) -> WatchHandle:
        """Watch a directory; read what changed with ``get_new_events()``. As on E2B, where
        the sync watch has no time limit, it runs until stopped unless ``timeout`` (seconds)
        is given."""
        handle = WatchHandle()
        inner = run(
            self._a.watch_dir(
                path,
                handle._add,
                user=user,
                request_timeout=request_timeout,
                timeout=timeout,
                recursive=recursive,
            )
        )
        handle._stop = inner.stop
        return handle

    def download_url(
        self, path: str, user: str | None = None, use_signature_expiration: int | None = None
    ) -> str:
        """A signed URL to GET the file from."""
        return self._a.download_url(path, user, use_signature_expiration)

    def upload_url(
        self, path: str, user: str | None = None, use_signature_expiration: int | None = None
    ) -> str:
        """A signed URL to POST the file to."""
        return self._a.upload_url(path, user, use_signature_expiration)


class Commands:
    """Commands in the sandbox (see ``AsyncCommands``)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._a = sandbox.commands

    @overload
    def run(
        self,
        cmd: str,
        background: Literal[False] = False,
        envs: dict[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        on_stdout: OnOutput | None = None,
        on_stderr: OnOutput | None = None,
        stdin: bool = False,
        timeout: float | None = 60,
        request_timeout: float | None = None,
    ) -> CommandResult: ...
    @overload
    def run(
        self,
        cmd: str,
        background: Literal[True],
        envs: dict[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        on_stdout: OnOutput | None = None,
        on_stderr: OnOutput | None = None,
        stdin: bool = False,
        timeout: float | None = 60,
        request_timeout: float | None = None,
    ) -> CommandHandle: ...
    @overload
    def run(
        self,
        cmd: str,
        background: bool,
        envs: dict[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        on_stdout: OnOutput | None = None,
        on_stderr: OnOutput | None = None,
        stdin: bool = False,
        timeout: float | None = 60,
        request_timeout: float | None = None,
    ) -> CommandResult | CommandHandle: ...
    def run(
        self,
        cmd: str,
        background: bool = False,
        envs: dict[str, str] | None = None,
        user: str | None = None,
        cwd: str | None = None,
        on_stdout: OnOutput | None = None,
        on_stderr: OnOutput | None = None,
        stdin: bool = False,
        timeout: float | None = 60,
        request_timeout: float | None = None,
    ) -> CommandResult | CommandHandle:
        """Run a shell command; wait for its result, or return its handle (``background``)."""
        result = run(
            self._a.run(
                cmd,
                background,
                envs,
                user,
                cwd,
                on_stdout,
                on_stderr,
                stdin,
                timeout,
                request_timeout,
            )
        )
        return CommandHandle(result) if isinstance(result, AsyncCommandHandle) else result

    def connect(
        self,
        pid: int,
        timeout: float | None = 60,
        request_timeout: float | None = None,
        on_stdout: OnOutput | None = None,
        on_stderr: OnOutput | None = None,
    ) -> CommandHandle:
        """Attach to a running process."""
        return CommandHandle(
            run(self._a.connect(pid, timeout, request_timeout, on_stdout, on_stderr))
        )

    def list(self, request_timeout: float | None = None) -> list[ProcessInfo]:
        """The running processes envd started."""
        return run(self._a.list(request_timeout))

    def kill(self, pid: int, request_timeout: float | None = None) -> bool:
        """Kill a process (SIGKILL)."""
        return run(self._a.kill(pid, request_timeout))

    def send_stdin(self, pid: int, data: str | bytes, request_timeout: float | None = None) -> None:
        """Send data to a process's standard input."""
        run(self._a.send_stdin(pid, data, request_timeout))

    def close_stdin(self, pid: int, request_timeout: float | None = None) -> None:
        """Close a process's standard input."""
        run(self._a.close_stdin(pid, request_timeout))


class Pty:
    """Terminals in the sandbox (see ``AsyncPty``)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._a = sandbox.pty

    # (``on_data`` by name only: E2B's sync ``create`` and ``connect`` have none, and their
    # positional arguments mean the same here)
    def create(
        self,
        size: PtySize,
        user: str | None = None,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
        timeout: float | None = 60,
        request_timeout: float | None = None,
        *,
        on_data: OnBytes | None = None,
    ) -> CommandHandle:
        """Start a login shell on a terminal of ``size``."""
        return CommandHandle(
            run(self._a.create(size, on_data, user, cwd, envs, timeout, request_timeout))
        )

    def connect(
        self,
        pid: int,
        timeout: float | None = 60,
        request_timeout: float | None = None,
        *,
        on_data: OnBytes | None = None,
    ) -> CommandHandle:
        """Attach to a running terminal."""
        return CommandHandle(run(self._a.connect(pid, on_data, timeout, request_timeout)))

    def send_stdin(self, pid: int, data: str | bytes, request_timeout: float | None = None) -> None:
        """Type into a terminal."""
        run(self._a.send_stdin(pid, data, request_timeout))

    def resize(self, pid: int, size: PtySize, request_timeout: float | None = None) -> None:
        """Resize a terminal."""
        run(self._a.resize(pid, size, request_timeout))

    def kill(self, pid: int, request_timeout: float | None = None) -> bool:
        """Kill a terminal's shell."""
        return run(self._a.kill(pid, request_timeout))


class Sandbox:
    """A sandbox (sync). ``Sandbox.create()`` makes one; ``with`` kills it at the end."""

    sandbox_id: str
    envd_version: str
    template_id: str
    connection_config: ConnectionConfig
    files: Filesystem
    commands: Commands
    pty: Pty

    def __init__(self, inner: AsyncSandbox) -> None:
        self._a = inner
        self.sandbox_id = inner.sandbox_id
        self.envd_version = inner.envd_version
        self.template_id = inner.template_id
        self.connection_config = inner.connection_config
        self._opts = inner._opts
        self.files = Filesystem(inner)
        self.commands = Commands(inner)
        self.pty = Pty(inner)

    def __repr__(self) -> str:
        return f"Sandbox(sandbox_id={self.sandbox_id!r}, template={self.template_id!r})"

    @property
    def envd_access_token(self) -> str | None:
        return self._a.envd_access_token

    @classmethod
    def create(
        cls,
        template: str | None = None,
        timeout: int | None = None,
        metadata: dict[str, str] | None = None,
        envs: dict[str, str] | None = None,
        secure: bool = True,
        allow_internet_access: bool = True,
        network: NetworkOpts | None = None,
        cpu_count: int | None = None,
        memory_mb: int | None = None,
        lifecycle: SandboxLifecycle | None = None,
        **opts: Any,
    ) -> Sandbox:
        """Create a sandbox (see ``AsyncSandbox.create``)."""
        return cls(
            run(
                AsyncSandbox.create(
                    template,
                    timeout,
                    metadata,
                    envs,
                    secure,
                    allow_internet_access,
                    network,
                    cpu_count,
                    memory_mb,
                    lifecycle,
                    **opts,
                )
            )
        )

    @classmethod
    def connect(cls, sandbox_id: str, timeout: int | None = None, **opts: Any) -> Sandbox:
        """Connect to a sandbox by id, resuming it if it is paused (see
        ``AsyncSandbox.connect``)."""
        return cls(run(AsyncSandbox.connect(sandbox_id, timeout, **opts)))

    @staticmethod
    def list(
        query: SandboxQuery | None = None,
        limit: int | None = None,
        next_token: str | None = None,
        **opts: Any,
    ) -> SandboxPaginator:
        """The caller's running sandboxes, a page at a time."""
        return SandboxPaginator(AsyncSandbox.list(query, limit, next_token, **opts))

    @dual
    def kill(cls, sandbox_id: str, /, **opts: Any) -> bool:
        """Kill the sandbox: ``sandbox.kill()`` or ``Sandbox.kill(sandbox_id)``."""
        return run(AsyncSandbox.kill(sandbox_id, **opts))

    @dual
    def pause(cls, sandbox_id: str, /, mode: str | None = None, **opts: Any) -> bool:
        """Pause the sandbox (see ``AsyncSandbox.pause``); ``False`` if it was paused."""
        return run(AsyncSandbox.pause(sandbox_id, mode, **opts))

    @dual
    def fork(
        cls, sandbox_id: str, /, timeout: int | None = None, count: int | None = None, **opts: Any
    ) -> builtins.list[Sandbox | Exception]:
        """New sandboxes with a copy of this one's files (see ``AsyncSandbox.fork``)."""
        made = run(AsyncSandbox.fork(sandbox_id, timeout, count, **opts))
        return [Sandbox(m) if isinstance(m, AsyncSandbox) else m for m in made]

    @dual
    def create_snapshot(
        cls, sandbox_id: str, /, name: str | None = None, mode: str | None = None, **opts: Any
    ) -> SnapshotInfo:
        """A snapshot of the sandbox's files (see ``AsyncSandbox.create_snapshot``)."""
        return run(AsyncSandbox.create_snapshot(sandbox_id, name, mode, **opts))

    @staticmethod
    def list_snapshots(
        sandbox_id: str | None = None,
        limit: int | None = None,
        next_token: str | None = None,
        name: str | None = None,
        **opts: Any,
    ) -> SnapshotPaginator:
        """The caller's snapshots, newest first, a page at a time."""
        return SnapshotPaginator(
            AsyncSandbox.list_snapshots(sandbox_id, limit, next_token, name, **opts)
        )

    @staticmethod
    def delete_snapshot(snapshot_id: str, **opts: Any) -> bool:
        """Delete a snapshot; ``False`` if there was none."""
        return run(AsyncSandbox.delete_snapshot(snapshot_id, **opts))

    @dual
    def set_timeout(cls, sandbox_id: str, /, timeout: int, **opts: Any) -> None:
        """Set how many seconds from now the sandbox lives."""
        run(AsyncSandbox.set_timeout(sandbox_id, timeout, **opts))

    @dual
    def get_info(cls, sandbox_id: str, /, **opts: Any) -> SandboxInfo:
        """The sandbox as the server describes it."""
        return run(AsyncSandbox.get_info(sandbox_id, **opts))

    @dual
    def get_metrics(
        cls,
        sandbox_id: str,
        /,
        start: datetime | None = None,
        end: datetime | None = None,
        **opts: Any,
    ) -> builtins.list[SandboxMetrics]:
        """Samples of the sandbox's CPU, memory and disk use."""
        return run(AsyncSandbox.get_metrics(sandbox_id, start, end, **opts))

    @dual
    def get_logs(cls, sandbox_id: str, /, **opts: Any) -> builtins.list[str]:
        """What the sandbox's start command wrote."""
        return run(AsyncSandbox.get_logs(sandbox_id, **opts))

    def get_resource_usage(self, request_timeout: float | None = None) -> ResourceUsage:
        """What the sandbox uses right now: CPU %, memory and disk in MiB."""
        return run(self._a.get_resource_usage(request_timeout))

    def is_running(self, request_timeout: float | None = None) -> bool:
        """Whether the sandbox's agent answers."""
        return run(self._a.is_running(request_timeout))

    def get_host(self, port: int, domain: str = "localhost") -> str:
        """``{port}-{sandbox_id}.{domain}`` on the server's port."""
        return self._a.get_host(port, domain)

    def port_headers(self, port: int) -> dict[str, str]:
        """Headers that send a request to the server's URL on to ``port`` in the sandbox."""
        return self._a.port_headers(port)

    def http_client(self, port: int, **kwargs: Any) -> httpx.Client:
        """An HTTP client whose requests go to ``port`` in the sandbox (close it when done)."""
        return httpx.Client(
            base_url=self.connection_config.sandbox_url, headers=self.port_headers(port), **kwargs
        )

    def run_code(
        self,
        code: str,
        language: str | None = None,
        context: Context | None = None,
        on_stdout: Callable[[Any], Any] | None = None,
        on_stderr: Callable[[Any], Any] | None = None,
        on_result: Callable[[Any], Any] | None = None,
        on_error: Callable[[Any], Any] | None = None,
        envs: dict[str, str] | None = None,
        timeout: float | None = DEFAULT_RUN_TIMEOUT,
        request_timeout: float | None = None,
    ) -> Execution:
        """Run code in a stateful context and return its results, logs and error."""
        return run(
            self._a.run_code(
                code,
                language,
                context,
                on_stdout,
                on_stderr,
                on_result,
                on_error,
                envs,
                timeout,
                request_timeout,
            )
        )

    def create_code_context(
        self,
        cwd: str | None = None,
        language: str | None = None,
        request_timeout: float | None = None,
    ) -> Context:
        """A new code context (a kernel of its own)."""
        return run(self._a.create_code_context(cwd, language, request_timeout))

    def list_code_contexts(self, request_timeout: float | None = None) -> builtins.list[Context]:
        """Every code context of the sandbox."""
        return run(self._a.list_code_contexts(request_timeout))

    def remove_code_context(
        self, context: Context | str, request_timeout: float | None = None
    ) -> None:
        """Stop a context's kernel and forget it."""
        run(self._a.remove_code_context(context, request_timeout))

    def restart_code_context(
        self, context: Context | str, request_timeout: float | None = None
    ) -> None:
        """Restart a context's kernel (its state is lost)."""
        run(self._a.restart_code_context(context, request_timeout))

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
