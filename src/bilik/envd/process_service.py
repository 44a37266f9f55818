"""The ``process.Process`` Connect service."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from protobuf import Oneof

from ..proto import process_pb as pb
from ..proto.contract import EnvdConfig
from ..proto.process_connect import Process
from .processes import End, Proc, ProcessTable, Spec
from .users import UnknownUser, User, from_basic_auth, lookup, resolve

# Upstream's keepalive period when the client asks for none.
DEFAULT_KEEPALIVE_S = 90.0

SIGNALS = {pb.Signal.SIGKILL: signal.SIGKILL, pb.Signal.SIGTERM: signal.SIGTERM}


def request_user(config: EnvdConfig, ctx: RequestContext[Any, Any]) -> User:
    name = from_basic_auth(ctx.request_headers.get("authorization")) or config.default_user
    try:
        return lookup(name)
    except UnknownUser as e:
        raise ConnectError(Code.UNAUTHENTICATED, str(e)) from None


def keepalive_s(ctx: RequestContext[Any, Any]) -> float:
    try:
        return max(1.0, float(ctx.request_headers.get("keepalive-ping-interval", "")))
    except ValueError:
        return DEFAULT_KEEPALIVE_S


def _event(kind: str, value: object) -> pb.ProcessEvent:
    return pb.ProcessEvent(event=Oneof(kind, value))  # type: ignore[arg-type]


class ProcessService(Process):
    def __init__(self, config: EnvdConfig, table: ProcessTable) -> None:
        self.config = config
        self.table = table

    def _find(self, selector: pb.ProcessSelector | None) -> Proc:
        match selector.selector if selector else None:
            case Oneof(field="pid", value=int() as pid):
                proc = self.table.find(pid=pid)
                what = f"process with pid {pid}"
            case Oneof(field="tag", value=str() as tag):
                proc = self.table.find(tag=tag)
                what = f"process with tag {tag}"
            case _:
                raise ConnectError(
                    Code.INVALID_ARGUMENT, "a process selector (pid or tag) is required"
                )
        if proc is None:
            raise ConnectError(Code.NOT_FOUND, f"{what} not found")
        return proc

    def _running(self, selector: pb.ProcessSelector | None) -> Proc:
        proc = self._find(selector)
        if proc.end is not None:
            raise ConnectError(Code.NOT_FOUND, f"process with pid {proc.pid} has exited")
        return proc

    async def list(
        self, request: pb.ListRequest, ctx: RequestContext[pb.ListRequest, pb.ListResponse]
    ) -> pb.ListResponse:
        return pb.ListResponse(
            processes=[
                pb.ProcessInfo(config=_config(p.spec), pid=p.pid, tag=p.spec.tag)
                for p in self.table.running.values()
            ]
        )

    async def start(
        self, request: pb.StartRequest, ctx: RequestContext[pb.StartRequest, pb.StartResponse]
    ) -> AsyncIterator[pb.StartResponse]:
        user = request_user(self.config, ctx)
        config = request.process
        if config is None or not config.cmd:
            raise ConnectError(Code.INVALID_ARGUMENT, "process.cmd is required")
        cwd = (
            resolve(config.cwd, user, self.config.default_workdir)
            if config.cwd
            else (self.config.default_workdir or user.home)
        )
        if not os.path.isdir(cwd):
            if config.cwd:
                raise ConnectError(Code.INVALID_ARGUMENT, f"cwd '{cwd}' does not exist")
            cwd = "/"
        size = request.pty.size if request.pty is not None else None
        timeout_ms = ctx.timeout_ms
        spec = Spec(
            cmd=config.cmd,
            args=list(config.args),
            envs=dict(config.envs),
            cwd=cwd,
            user=user,
            tag=request.tag,
            pty=(size.cols, size.rows)
            if size is not None
            else ((80, 24) if request.pty is not None else None),
            # Clients older than the stdin flag expect stdin open.
            stdin=True if request.stdin is None else request.stdin,
            timeout_s=timeout_ms / 1000 if timeout_ms else None,
        )
        try:
            proc = await self.table.start(spec, self.config.env)
        except (FileNotFoundError, PermissionError, NotADirectoryError) as e:
            raise ConnectError(
                Code.INVALID_ARGUMENT, f"cannot start '{config.cmd}': {e.strerror}"
            ) from None
        except OSError as e:
            raise ConnectError(Code.INTERNAL, f"cannot start '{config.cmd}': {e}") from None
        async for event in _stream(proc, keepalive_s(ctx), _deadline(timeout_ms)):
            yield pb.StartResponse(event=event)

    async def connect(
        self,
        request: pb.ConnectRequest,
        ctx: RequestContext[pb.ConnectRequest, pb.ConnectResponse],
    ) -> AsyncIterator[pb.ConnectResponse]:
        proc = self._find(request.process)
        async for event in _stream(proc, keepalive_s(ctx), _deadline(ctx.timeout_ms)):
            yield pb.ConnectResponse(event=event)

    async def update(
        self, request: pb.UpdateRequest, ctx: RequestContext[pb.UpdateRequest, pb.UpdateResponse]
    ) -> pb.UpdateResponse:
        proc = self._running(request.process)
        size = request.pty.size if request.pty is not None else None
        if size is not None:
            try:
                proc.resize(size.cols, size.rows)
            except ValueError as e:
                raise ConnectError(Code.INVALID_ARGUMENT, str(e)) from None
        return pb.UpdateResponse()

    async def _input(self, proc: Proc, data: pb.ProcessInput | None) -> None:
        try:
            match data.input if data else None:
                case Oneof(field="stdin", value=chunk):
                    await proc.write_stdin(chunk)
                case Oneof(field="pty", value=chunk):
                    await proc.write_pty(chunk)
        except ValueError as e:
            raise ConnectError(Code.FAILED_PRECONDITION, str(e)) from None
        except (BrokenPipeError, ConnectionResetError):
            raise ConnectError(
                Code.FAILED_PRECONDITION, f"process {proc.pid} no longer reads its input"
            ) from None

    async def send_input(
        self,
        request: pb.SendInputRequest,
        ctx: RequestContext[pb.SendInputRequest, pb.SendInputResponse],
    ) -> pb.SendInputResponse:
        await self._input(self._running(request.process), request.input)
        return pb.SendInputResponse()

    async def stream_input(
        self,
        request: AsyncIterator[pb.StreamInputRequest],
        ctx: RequestContext[pb.StreamInputRequest, pb.StreamInputResponse],
    ) -> pb.StreamInputResponse:
        proc: Proc | None = None
        async for message in request:
            match message.event:
                case Oneof(field="start", value=pb.StreamInputRequest.StartEvent() as start):
                    proc = self._running(start.process)
                case Oneof(field="data", value=pb.StreamInputRequest.DataEvent() as data):
                    if proc is None:
                        raise ConnectError(
                            Code.FAILED_PRECONDITION, "the first message must be start"
                        )
                    await self._input(proc, data.input)
        return pb.StreamInputResponse()

    async def send_signal(
        self,
        request: pb.SendSignalRequest,
        ctx: RequestContext[pb.SendSignalRequest, pb.SendSignalResponse],
    ) -> pb.SendSignalResponse:
        proc = self._running(request.process)
        signum = SIGNALS.get(request.signal)
        if signum is None:
            raise ConnectError(Code.INVALID_ARGUMENT, f"unsupported signal {request.signal}")
        proc.signal(signum)
        return pb.SendSignalResponse()

    async def close_stdin(
        self,
        request: pb.CloseStdinRequest,
        ctx: RequestContext[pb.CloseStdinRequest, pb.CloseStdinResponse],
    ) -> pb.CloseStdinResponse:
        try:
            self._running(request.process).close_stdin()
        except ValueError as e:
            raise ConnectError(Code.FAILED_PRECONDITION, str(e)) from None
        return pb.CloseStdinResponse()


def _deadline(timeout_ms: float | None) -> float | None:
    """When a stream whose request allows ``timeout_ms`` (``Connect-Timeout-Ms``) must end, on
    the loop's clock; None: never."""
    if not timeout_ms:
        return None
    return asyncio.get_running_loop().time() + timeout_ms / 1000


def _past(deadline: float | None) -> bool:
    return deadline is not None and asyncio.get_running_loop().time() >= deadline


async def _stream(
    proc: Proc, keepalive: float, deadline: float | None
) -> AsyncIterator[pb.ProcessEvent]:
    """Start, the process's output as it comes (keepalives while it is silent), end.

    A stream still open at its request's ``deadline`` ends with ``deadline_exceeded``, as E2B's
    envd ends it (the process it started is killed then, see ``Spec.timeout_s``): the SDKs
    raise their TimeoutException for that, where an end event would be an exit code.
    """
    yield _event("start", pb.ProcessEvent.StartEvent(pid=proc.pid))
    events = proc.follow()
    next_event: asyncio.Task[Any] | None = None
    try:
        while True:
            next_event = asyncio.ensure_future(anext(events))
            while True:
                wait = keepalive
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - asyncio.get_running_loop().time()))
                done, _ = await asyncio.wait([next_event], timeout=wait)
                if done:
                    break
                if _past(deadline):
                    raise ConnectError(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
                yield _event("keepalive", pb.ProcessEvent.KeepAlive())
            try:
                kind, value = next_event.result()
            except StopAsyncIteration:
                return
            next_event = None
            if isinstance(value, End):
                if _past(deadline):  # (killed for it, or ended just then: the deadline won)
                    raise ConnectError(Code.DEADLINE_EXCEEDED, "context deadline exceeded")
                yield _event(
                    "end",
                    pb.ProcessEvent.EndEvent(
                        exit_code=value.exit_code,
                        exited=value.exited,
                        status=value.status,
                        error=value.error,
                    ),
                )
                return
            yield _event("data", pb.ProcessEvent.DataEvent(output=Oneof(kind, value)))
    finally:
        if next_event is not None:
            next_event.cancel()
            with contextlib.suppress(BaseException):
                await next_event
        await events.aclose()


def _config(spec: Spec) -> pb.ProcessConfig:
    return pb.ProcessConfig(cmd=spec.cmd, args=spec.args, envs=spec.envs, cwd=spec.cwd)
