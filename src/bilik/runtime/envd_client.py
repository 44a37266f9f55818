"""The runtime's own use of a sandbox's envd: start a process, run one to its end.

Used for what the runtime does inside sandboxes on its own behalf (a template's start command
and ready check, template build steps), over envd's socket (or address, under gVisor), with the
same protocol the SDKs speak.

A process's output is passed on as it comes and only its end is kept (``OUTPUT_KEPT``): what a
process in a sandbox prints is the sandbox's choice, and must not grow the server.
"""

from __future__ import annotations

import asyncio
import base64
import collections
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
from .errors import StepFailed

# The end of a process's output :meth:`EnvdClient.run` keeps (for error messages), characters.
OUTPUT_KEPT = 64 << 10
# The largest envelope taken from envd (its own are tens of KiB); envd answers from inside a
# sandbox, so one it did not send may claim any size.
MAX_FRAME = 4 << 20


@dataclass
class Finished:
    exit_code: int
    output: str  # the end of stdout and stderr, interleaved as they came (OUTPUT_KEPT)


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
        output: collections.deque[str] = collections.deque()
        kept = 0
        code = None
        request = self._request(cmd, cwd, env)
        async for event in self._start_stream(request, self._headers(user, timeout_s)):
            if event.field == "data" and event.value.output is not None:
                # (stdout, stderr and pty output alike)
                text = bytes(event.value.output.value).decode(errors="replace")
                output.append(text[-OUTPUT_KEPT:])
                kept += len(output[-1])
                while kept - len(output[0]) >= OUTPUT_KEPT:
                    kept -= len(output.popleft())
                if on_output is not None:
                    on_output(text)
            elif event.field == "end":
                code = event.value.exit_code
        if code is None:
            raise StepFailed("envd", f"'{cmd}' ended without an exit status")
        return Finished(code, "".join(output)[-OUTPUT_KEPT:])

    async def start(
        self,
        cmd: str,
        *,
        user: str = "root",
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        tag: str | None = None,
    ) -> int:
        """Start ``cmd`` and leave it running (envd keeps it); returns its pid."""
        request = self._request(cmd, cwd, env, tag or None)
        async for event in self._start_stream(request, self._headers(user, None)):
            if event.field == "start":
                return int(event.value.pid)
        raise StepFailed("envd", f"'{cmd}' did not start")

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
    envd: EnvdClient, ready_cmd: str, user: str, workdir: str, timeout_s: float
) -> None:
    """Run ``ready_cmd`` until it succeeds; StepFailed after ``timeout_s``. One run may take
    all the time left (E2B's ``wait_for_timeout(ms)`` is a ``sleep`` that must finish)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = max(1.0, deadline - time.monotonic())
        last = await envd.run(ready_cmd, user=user, cwd=workdir, timeout_s=left)
        if last.exit_code == 0:
            return
        if time.monotonic() > deadline:
            raise StepFailed(
                "ready-check",
                f"'{ready_cmd}' did not succeed within {timeout_s:.0f} s "
                f"(last exit {last.exit_code}: {last.output.strip()[-500:]})",
            )
        await asyncio.sleep(0.1)


def _raise_for_end(payload: bytes) -> None:
    """StepFailed if a stream's end message (Connect's JSON) carries an error."""
    end = json.loads(payload or b"{}")
    error = end.get("error") if isinstance(end, dict) else None
    if isinstance(error, dict):
        raise StepFailed("envd", str(error.get("message", error)))
