"""``sandbox.commands`` and ``sandbox.pty``: processes in the sandbox, their output as it comes,
their input, signals and terminals (async; the sync SDK wraps this one)."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal, overload

from connectrpc.errors import ConnectError
from protobuf import Oneof

from bilik.proto import process_pb as pb
from bilik.sdk._handlers import call
from bilik.sdk.envd import DEFAULT_USER, Envd, rpc, rpc_error, timeout_ms
from bilik.sdk.exceptions import NotFoundException, SandboxException, TimeoutException
from bilik.sdk.models import CommandExitException, CommandResult, ProcessInfo, PtySize

OnOutput = Callable[[str], Any]
OnBytes = Callable[[bytes], Any]
Events = AsyncIterator[pb.StartResponse] | AsyncIterator[pb.ConnectResponse]


def _selector(pid: int) -> pb.ProcessSelector:
    return pb.ProcessSelector(selector=Oneof[Literal["pid"], int]("pid", pid))


def _input(data: str | bytes, *, pty: bool) -> pb.ProcessInput:
    payload = data.encode() if isinstance(data, str) else data
    if pty:
        return pb.ProcessInput(input=Oneof[Literal["pty"], bytes]("pty", payload))
    return pb.ProcessInput(input=Oneof[Literal["stdin"], bytes]("stdin", payload))


class AsyncCommandHandle:
    """A running command (or terminal): its output so far, :meth:`wait`, :meth:`kill`."""

    pid: int

    def __init__(
        self,
        pid: int,
        events: AsyncIterator[Any],
        kill: Callable[[], Awaitable[bool]],
        send_stdin: Callable[[str | bytes], Awaitable[None]] | None = None,
        on_stdout: OnOutput | None = None,
        on_stderr: OnOutput | None = None,
        on_pty: OnBytes | None = None,
        deadline: float | None = None,
    ) -> None:
        self.pid = pid
        # envd kills a process at its timeout: an end after ``deadline`` (the loop's clock) is
        # a timeout, not an exit.
        self._deadline = deadline
        self._events = events
        self._kill = kill
        self._send_stdin = send_stdin
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self._out = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._err = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._on_stdout = [on_stdout] if on_stdout else []
        self._on_stderr = [on_stderr] if on_stderr else []
        self._on_pty = [on_pty] if on_pty else []
        self._result: CommandResult | None = None
        self._task = asyncio.create_task(self._pump())
        # A handle no one waits for (a background command whose sandbox went away) fails
        # quietly: its error is for wait() to raise, not for the event loop to log.
        self._task.add_done_callback(lambda task: task.cancelled() or task.exception())

    @property
    def stdout(self) -> str:
        """The standard output so far."""
        return "".join(self._stdout)

    @property
    def stderr(self) -> str:
        """The standard error so far."""
        return "".join(self._stderr)

    @property
    def exit_code(self) -> int | None:
        """The exit code, once the command has ended."""
        return None if self._result is None else self._result.exit_code

    @property
    def error(self) -> str | None:
        return None if self._result is None else self._result.error

    async def _emit(self, kind: str, text: str) -> None:
        if not text:
            return
        (self._stdout if kind == "stdout" else self._stderr).append(text)
        for callback in self._on_stdout if kind == "stdout" else self._on_stderr:
            await call(callback, text)

    async def _pump(self) -> CommandResult:
        end = None
        try:
            async for response in self._events:
                match response.event.event if response.event else None:
                    case Oneof(field="data", value=data):
                        match data.output:
                            case Oneof(field="stdout", value=chunk):
                                await self._emit("stdout", self._out.decode(chunk))
                            case Oneof(field="stderr", value=chunk):
                                await self._emit("stderr", self._err.decode(chunk))
                            case Oneof(field="pty", value=chunk):
                                for callback in self._on_pty:
                                    await call(callback, chunk)
                    case Oneof(field="end", value=event):
                        end = event
        except ConnectError as e:
            raise rpc_error(e) from None
        finally:
            await self._emit("stdout", self._out.decode(b"", final=True))
            await self._emit("stderr", self._err.decode(b"", final=True))
        if end is None:
            raise SandboxException("the command's stream ended before the command did")
        late = self._deadline is not None and asyncio.get_running_loop().time() >= self._deadline
        if late and end.exit_code != 0:
            raise TimeoutException("the command ran past its timeout and was killed (timeout=)")
        self._result = CommandResult(self.stdout, self.stderr, end.exit_code, end.error)
        return self._result

    async def wait(
        self,
        on_pty: OnBytes | None = None,
        on_stdout: OnOutput | None = None,
        on_stderr: OnOutput | None = None,
    ) -> CommandResult:
        """Wait for the end; a non-zero exit raises :class:`CommandExitException`. Callbacks
        given here get the output so far, then the rest as it comes (in the order of E2B's
        sync ``wait``: a terminal's output first)."""
        for callback, kind in ((on_stdout, "stdout"), (on_stderr, "stderr")):
            if callback is not None:
                for text in list(self._stdout if kind == "stdout" else self._stderr):
                    await call(callback, text)
                (self._on_stdout if kind == "stdout" else self._on_stderr).append(callback)
        if on_pty is not None:
            self._on_pty.append(on_pty)
        result = await asyncio.shield(self._task)
        if result.exit_code != 0:
            raise CommandExitException(result)
        return result

    async def kill(self) -> bool:
        """Kill the command (SIGKILL); ``False`` if it was not running."""
        return await self._kill()

    async def send_stdin(self, data: str | bytes) -> None:
        """Send data to the command's standard input (or to its terminal)."""
        if self._send_stdin is None:
            raise SandboxException("this handle has no input")
        await self._send_stdin(data)

    async def disconnect(self) -> None:
        """Stop receiving output; the command goes on (reach it again with ``connect``)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        await _close(self._events)


async def _close(events: AsyncIterator[Any]) -> None:
    """End a process stream (its connection with it)."""
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


async def _started(events: AsyncIterator[Any], open_timeout: float | None) -> int:
    """The pid of the start event that opens every process stream."""
    try:
        first = await asyncio.wait_for(anext(events), open_timeout)
    except ConnectError as e:
        raise rpc_error(e) from None
    except TimeoutError:
        raise TimeoutException("the process did not start in time (request_timeout)") from None
    except StopAsyncIteration:
        raise SandboxException("the process stream ended before it started") from None
    match first.event.event if first.event else None:
        case Oneof(field="start", value=start):
            return int(start.pid)
    raise SandboxException(f"the process stream began with {first!r}, not a start event")


class AsyncCommands:
    """Run commands in the sandbox."""

    def __init__(self, envd: Envd) -> None:
        self._envd = envd

    def _ms(self, request_timeout: float | None) -> int | None:
        return timeout_ms(self._envd.config.timeout(request_timeout))

    async def _open(
        self,
        stream: AsyncIterator[Any],
        timeout: float | None,
        request_timeout: float | None,
        *,
        pty: bool,
        on_stdout: OnOutput | None = None,
        on_stderr: OnOutput | None = None,
        on_pty: OnBytes | None = None,
    ) -> AsyncCommandHandle:
        """The handle of a process stream (Start or Connect), once it says which pid."""
        # (from before the request goes out: envd's clock for the timeout starts later)
        sent = asyncio.get_running_loop().time()
        events = aiter(stream)
        try:
            pid = await _started(events, self._envd.config.timeout(request_timeout))
        except BaseException:
            await _close(events)
            raise
        return AsyncCommandHandle(
            pid,
            events,
            kill=lambda: self.kill(pid),
            send_stdin=lambda data: self._send_input(pid, data, pty=pty),
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            on_pty=on_pty,
            deadline=sent + timeout if timeout else None,
        )

    def _attach(self, pid: int, timeout: float | None) -> AsyncIterator[pb.ConnectResponse]:
        return self._envd.process.connect(
            pb.ConnectRequest(process=_selector(pid)),
            headers=self._envd.rpc_headers(keepalive=True),
            timeout_ms=timeout_ms(timeout),
        )

    async def _send_input(
        self, pid: int, data: str | bytes, request_timeout: float | None = None, *, pty: bool
    ) -> None:
        await rpc(
            self._envd.process.send_input(
                pb.SendInputRequest(process=_selector(pid), input=_input(data, pty=pty)),
                headers=self._envd.rpc_headers(),
                timeout_ms=self._ms(request_timeout),
            )
        )

    async def list(self, request_timeout: float | None = None) -> list[ProcessInfo]:
        """The processes envd started that still run."""
        response = await rpc(
            self._envd.process.list(
                pb.ListRequest(),
                headers=self._envd.rpc_headers(),
                timeout_ms=self._ms(request_timeout),
            )
        )
        return [
            ProcessInfo(
                pid=p.pid,
                tag=p.tag,
                cmd=p.config.cmd,
                args=list(p.config.args),
                envs=dict(p.config.envs),
                cwd=p.config.cwd,
            )
            for p in response.processes
            if p.config is not None
        ]

    async def kill(self, pid: int, request_timeout: float | None = None) -> bool:
        """Kill a process with SIGKILL; ``False`` if there was none."""
        try:
            await rpc(
                self._envd.process.send_signal(
                    pb.SendSignalRequest(process=_selector(pid), signal=pb.Signal.SIGKILL),
                    headers=self._envd.rpc_headers(),
                    timeout_ms=self._ms(request_timeout),
                )
            )
        except NotFoundException:
            return False
        return True

    async def send_stdin(
        self, pid: int, data: str | bytes, request_timeout: float | None = None
    ) -> None:
        """Send data to a process's standard input (it must have been started with stdin)."""
        await self._send_input(pid, data, request_timeout, pty=False)

    async def close_stdin(self, pid: int, request_timeout: float | None = None) -> None:
        """Close a process's standard input (it reads end of file)."""
        await rpc(
            self._envd.process.close_stdin(
                pb.CloseStdinRequest(process=_selector(pid)),
                headers=self._envd.rpc_headers(),
                timeout_ms=self._ms(request_timeout),
            )
        )

    @overload
    async def run(
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
    async def run(
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
    ) -> AsyncCommandHandle: ...
    @overload
    async def run(
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
    ) -> CommandResult | AsyncCommandHandle: ...
    async def run(
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
    ) -> CommandResult | AsyncCommandHandle:
        """Run a shell command (``bash -l -c``). In the foreground, wait for it: its result,
        or :class:`CommandExitException` for a non-zero exit. In the background, return its
        handle at once. ``timeout`` bounds how long it runs (0: no limit)."""
        stream = self._envd.process.start(
            pb.StartRequest(
                process=pb.ProcessConfig(
                    cmd="/bin/bash", args=["-l", "-c", cmd], envs=envs or {}, cwd=cwd
                ),
                stdin=stdin,
            ),
            headers=self._envd.rpc_headers(user or DEFAULT_USER, keepalive=True),
            timeout_ms=timeout_ms(timeout),
        )
        handle = await self._open(
            stream, timeout, request_timeout, pty=False, on_stdout=on_stdout, on_stderr=on_stderr
        )
        if background:
            return handle
        try:
            return await handle.wait()
        except asyncio.CancelledError:
            # The caller gave up (a Ctrl-C of the sync SDK, a timeout around the call): so does
            # the stream, and no callback runs after that. The command itself goes on, as on
            # E2B (kill it, or connect to it again, by its pid).
            await handle.disconnect()
            raise

    async def connect(
        self,
        pid: int,
        timeout: float | None = 60,
        request_timeout: float | None = None,
        on_stdout: OnOutput | None = None,
        on_stderr: OnOutput | None = None,
    ) -> AsyncCommandHandle:
        """Attach to a running process: its output from now on, its end."""
        return await self._open(
            self._attach(pid, timeout),
            timeout,
            request_timeout,
            pty=False,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )


class AsyncPty:
    """Interactive terminals in the sandbox."""

    def __init__(self, envd: Envd, commands: AsyncCommands) -> None:
        self._envd = envd
        self._commands = commands

    async def create(
        self,
        size: PtySize,
        on_data: OnBytes | None = None,
        user: str | None = None,
        cwd: str | None = None,
        envs: dict[str, str] | None = None,
        timeout: float | None = 60,
        request_timeout: float | None = None,
    ) -> AsyncCommandHandle:
        """Start an interactive login shell (``bash -i -l``) on a terminal of ``size``;
        ``on_data`` gets what it writes to the terminal."""
        env = {"TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", **(envs or {})}
        stream = self._envd.process.start(
            pb.StartRequest(
                process=pb.ProcessConfig(cmd="/bin/bash", args=["-i", "-l"], envs=env, cwd=cwd),
                pty=pb.PTY(size=pb.PTY.Size(rows=size.rows, cols=size.cols)),
            ),
            headers=self._envd.rpc_headers(user or DEFAULT_USER, keepalive=True),
            timeout_ms=timeout_ms(timeout),
        )
        return await self._commands._open(
            stream, timeout, request_timeout, pty=True, on_pty=on_data
        )

    async def connect(
        self,
        pid: int,
        on_data: OnBytes | None = None,
        timeout: float | None = 60,
        request_timeout: float | None = None,
    ) -> AsyncCommandHandle:
        """Attach to a running terminal."""
        return await self._commands._open(
            self._commands._attach(pid, timeout),
            timeout,
            request_timeout,
            pty=True,
            on_pty=on_data,
        )

    async def send_stdin(
        self, pid: int, data: str | bytes, request_timeout: float | None = None
    ) -> None:
        """Type into a terminal."""
        await self._commands._send_input(pid, data, request_timeout, pty=True)

    async def resize(self, pid: int, size: PtySize, request_timeout: float | None = None) -> None:
        """Tell a terminal its new size (its programs get SIGWINCH)."""
        await rpc(
            self._envd.process.update(
                pb.UpdateRequest(
                    process=_selector(pid),
                    pty=pb.PTY(size=pb.PTY.Size(rows=size.rows, cols=size.cols)),
                ),
                headers=self._envd.rpc_headers(),
                timeout_ms=self._commands._ms(request_timeout),
            )
        )

    async def kill(self, pid: int, request_timeout: float | None = None) -> bool:
        """Kill a terminal's shell."""
        return await self._commands.kill(pid, request_timeout)
