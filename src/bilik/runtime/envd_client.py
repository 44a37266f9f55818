"""The runtime's own use of a sandbox's envd: start a process, run one to its end.

Used for what the runtime does inside sandboxes on its own behalf (a template's start command
and ready check, template build steps), over envd's socket (or address, under gVisor), with the
same protocol the SDKs speak.

A process's output is passed on as it comes and only its end is kept (``OUTPUT_KEPT``): what a
process in a sandbox prints is the sandbox's choice, and must not grow the server.

A template's start command is followed while it runs (:meth:`EnvdClient.follow`), so a create
learns at once that it ended, and with what; its ready check is run (:func:`wait_ready`) against
that end: a start command that fails is the template's fault (:class:`StartFailed`), told with
its exit code and its last lines, not after the whole ready timeout.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from connectrpc.codec import proto_json_codec
from protobuf import Oneof

from ..proto import process_pb as pb
from ..proto.contract import ENVD_PORT
from .errors import StartFailed, StepFailed

# The end of a process's output :meth:`EnvdClient.run` keeps (for error messages), characters.
OUTPUT_KEPT = 64 << 10
# Of a start command's output, the end a StartFailed quotes, characters.
QUOTED = 2000
# The largest envelope taken from envd (its own are tens of KiB); envd answers from inside a
# sandbox, so one it did not send may claim any size.
MAX_FRAME = 4 << 20


@dataclass
class Finished:
    exit_code: int
    output: str  # the end of stdout and stderr, interleaved as they came (OUTPUT_KEPT)


class Tail:
    """The last ``OUTPUT_KEPT`` characters of a process's output, as it comes."""

    def __init__(self) -> None:
        self._parts: collections.deque[str] = collections.deque()
        self._kept = 0

    def add(self, text: str) -> None:
        self._parts.append(text[-OUTPUT_KEPT:])
        self._kept += len(self._parts[-1])
        while self._kept - len(self._parts[0]) >= OUTPUT_KEPT:
            self._kept -= len(self._parts.popleft())

    def text(self) -> str:
        return "".join(self._parts)[-OUTPUT_KEPT:]


@dataclass
class Started:
    """A process :meth:`EnvdClient.follow` started: ``ended`` gives its end (StepFailed if
    its stream broke first); ``tail`` holds its output so far."""

    pid: int
    ended: asyncio.Task[Finished]
    tail: Tail


# Messages go out and come back in Connect's JSON codec, as the generated protobuf messages.
_CODEC = proto_json_codec()
_END_STREAM = 0x02


def _envelope(message: pb.StartRequest) -> bytes:
    payload = _CODEC.encode(message)
    return b"\0" + len(payload).to_bytes(4, "big") + payload


class EnvdClient:
    def __init__(self, socket_path: Path | None, address: str, token: str) -> None:
        transport = httpx.AsyncHTTPTransport(uds=str(socket_path)) if socket_path else None
        base = "http://envd" if socket_path else f"http://{address}:{ENVD_PORT}"
        self._client = httpx.AsyncClient(
            transport=transport,
            base_url=base,
            headers={"X-Access-Token": token},
            timeout=httpx.Timeout(None, connect=10),
            trust_env=False,
        )

    async def __aenter__(self) -> EnvdClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._client.aclose()

    def _headers(self, user: str, timeout_s: float | None) -> dict[str, str]:
        headers = {
            "Content-Type": "application/connect+json",
            "Authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode(),
        }
        if timeout_s:
            headers["Connect-Timeout-Ms"] = str(int(timeout_s * 1000))
        return headers

    @staticmethod
    def _request(
        cmd: str, cwd: str | None, env: dict[str, str] | None, tag: str | None = None
    ) -> pb.StartRequest:
        process = pb.ProcessConfig(cmd="/bin/sh", args=["-c", cmd], envs=env or {}, cwd=cwd)
        return pb.StartRequest(process=process, tag=tag)

    async def run(
        self,
        cmd: str,
        *,
        user: str = "root",
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float | None = None,
        on_output: Callable[[str], None] | None = None,
    ) -> Finished:
        """Run ``cmd`` with ``/bin/sh -c`` to its end; ``on_output`` gets its output (stdout
        and stderr) as it comes, the result keeps its last ``OUTPUT_KEPT`` characters."""
        tail = Tail()
        code = None
        request = self._request(cmd, cwd, env)
        async for event in self._start_stream(request, self._headers(user, timeout_s)):
            if event.field == "data" and event.value.output is not None:
                # (stdout, stderr and pty output alike)
                text = bytes(event.value.output.value).decode(errors="replace")
                tail.add(text)
                if on_output is not None:
                    on_output(text)
            elif event.field == "end":
                code = event.value.exit_code
        if code is None:
            raise StepFailed("envd", f"'{cmd}' ended without an exit status")
        return Finished(code, tail.text())

    async def follow(
        self,
        cmd: str,
        *,
        user: str = "root",
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        tag: str | None = None,
        on_output: Callable[[str, str], None],
    ) -> Started:
        """Start ``cmd`` and follow it (envd keeps it running when the stream goes); returns
        once it started. ``on_output`` gets each piece of its output with its stream's name
        (``stdout``, ``stderr``) as it comes. The client must stay open while it is followed."""
        pid: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        tail = Tail()
        request = self._request(cmd, cwd, env, tag or None)

        async def watch() -> Finished:
            code = None
            async for event in self._start_stream(request, self._headers(user, None)):
                if event.field == "start" and not pid.done():
                    pid.set_result(int(event.value.pid))
                elif event.field == "data" and event.value.output is not None:
                    text = bytes(event.value.output.value).decode(errors="replace")
                    tail.add(text)
                    on_output(event.value.output.field, text)
                elif event.field == "end":
                    code = event.value.exit_code
            if code is None:
                raise StepFailed("envd", f"'{cmd}' ended without an exit status")
            return Finished(code, tail.text())

        ended = asyncio.ensure_future(watch())
        first: set[asyncio.Future[Any]] = {pid, ended}
        try:
            await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            ended.cancel()
            raise
        if not pid.done():
            ended.result()  # (its StepFailed, if its stream failed)
            raise StepFailed("envd", f"'{cmd}' did not start")
        return Started(pid.result(), ended, tail)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _start_stream(
        self, request: pb.StartRequest, headers: dict[str, str]
    ) -> AsyncIterator[Oneof[Any, Any]]:
        """``process.Process/Start``'s events, each as it arrives; StepFailed on an error
        (the response's or the stream's)."""
        async with self._client.stream(
            "POST", "/process.Process/Start", content=_envelope(request), headers=headers
        ) as response:
            if response.status_code != 200:
                raise StepFailed("envd", (await response.aread()).decode(errors="replace"))
            buffer = b""
            async for chunk in response.aiter_raw():
                buffer += chunk
                while len(buffer) >= 5:
                    size = int.from_bytes(buffer[1:5], "big")
                    if size > MAX_FRAME:
                        raise StepFailed("envd", f"an envelope of {size} bytes is too large")
                    if len(buffer) < 5 + size:
                        break
                    flags, payload = buffer[0], buffer[5 : 5 + size]
                    buffer = buffer[5 + size :]
                    try:
                        if flags & _END_STREAM:
                            _raise_for_end(payload)
                            return
                        message = _CODEC.decode(payload, pb.StartResponse)
                    except ValueError as e:  # (envd answers from inside the sandbox)
                        raise StepFailed("envd", f"a bad message from envd: {e}") from None
                    if message.event is not None and message.event.event is not None:
                        yield message.event.event

    async def write(self, path: str, source: Path) -> None:
        """Write the file ``source`` (on the host) to ``path`` in the sandbox, as root."""

        async def chunks() -> AsyncIterator[bytes]:
            with open(source, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk

        response = await self._client.post(
            "/files",
            params={"path": path, "username": "root"},
            content=chunks(),
            headers={"Content-Type": "application/octet-stream"},
        )
        if response.status_code != 200:
            raise StepFailed("envd", response.text)


async def wait_ready(
    envd: EnvdClient,
    ready_cmd: str,
    user: str,
    workdir: str,
    timeout_s: float,
    start: Started,
) -> None:
    """Run ``ready_cmd`` until it succeeds, while the start command ``start`` runs; one run
    may take all the time left (E2B's ``wait_for_timeout(ms)`` is a ``sleep`` that must
    finish). StartFailed at once if the start command fails (a non-zero exit); if it ends
    well, the check decides (a run under way finishes, and one more runs after the end: a
    command that made what the check looks for and ended is ready); StartFailed too after
    ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    ended = start.ended
    while True:
        left = max(1.0, deadline - time.monotonic())
        check = asyncio.ensure_future(envd.run(ready_cmd, user=user, cwd=workdir, timeout_s=left))
        try:
            await asyncio.wait({check, ended}, return_when=asyncio.FIRST_COMPLETED)
            if ended.done() and not check.done() and ended.result().exit_code != 0:
                raise _start_failed(ready_cmd, ended.result(), None)
            last = await check
        finally:
            if not check.done():
                check.cancel()
                with contextlib.suppress(asyncio.CancelledError, StepFailed):
                    await check
        if last.exit_code == 0:
            return
        if ended.done():
            if ended.result().exit_code == 0:  # (one more check, begun after the end)
                last = await envd.run(ready_cmd, user=user, cwd=workdir, timeout_s=left)
                if last.exit_code == 0:
                    return
            raise _start_failed(ready_cmd, ended.result(), last)
        if time.monotonic() > deadline:
            raise StartFailed(
                f"its ready check '{ready_cmd}' did not succeed within {timeout_s:.0f} s "
                f"(last exit {last.exit_code}: {_quote(last.output)})",
                exit_code=None,
                output=_quote(start.tail.text()),
            )
        # (a start command that ends meanwhile ends the wait)
        await asyncio.wait({ended}, timeout=0.1)


def _start_failed(ready_cmd: str, ended: Finished, last: Finished | None) -> StartFailed:
    """What a start command that ended before its ready check passed is told as (after
    "the start command …")."""
    message = f"it exited with code {ended.exit_code}"
    if last is not None:
        message += f" (its ready check '{ready_cmd}' exited {last.exit_code})"
    return StartFailed(message, exit_code=ended.exit_code, output=_quote(ended.output))


def _quote(output: str) -> str:
    """The last lines of ``output``, at most QUOTED characters."""
    text = output.strip()
    return text[-QUOTED:] if len(text) > QUOTED else text


def _raise_for_end(payload: bytes) -> None:
    """StepFailed if a stream's end message (Connect's JSON) carries an error."""
    end = json.loads(payload or b"{}")
    error = end.get("error") if isinstance(end, dict) else None
    if isinstance(error, dict):
        raise StepFailed("envd", str(error.get("message", error)))
