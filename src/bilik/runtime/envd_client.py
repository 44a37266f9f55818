"""The runtime's own use of a sandbox's envd: start a process, run one to its end.

Used for what the runtime does inside sandboxes on its own behalf (a template's start command
and ready check, template build steps), over envd's socket (or address, under gVisor), with the
same protocol the SDKs speak.

A process's output is passed on as it comes and only its end is kept (``OUTPUT_KEPT``): what a
process in a sandbox prints is the sandbox's choice, and must not grow the server.
"""

from __future__ import annotations

import base64
import collections
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from .errors import StepFailed

ENVD_PORT = 49983
# The end of a process's output :meth:`EnvdClient.run` keeps (for error messages), characters.
OUTPUT_KEPT = 64 << 10
# The largest envelope taken from envd (its own are tens of KiB); envd answers from inside a
# sandbox, so one it did not send may claim any size.
MAX_FRAME = 4 << 20


@dataclass
class Finished:
    exit_code: int
    output: str  # the end of stdout and stderr, interleaved as they came (OUTPUT_KEPT)


def _envelope(message: dict[str, object]) -> bytes:
    payload = json.dumps(message).encode()
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
    def _process(cmd: str, cwd: str | None, env: dict[str, str] | None) -> dict[str, object]:
        process: dict[str, object] = {"cmd": "/bin/sh", "args": ["-c", cmd], "envs": env or {}}
        if cwd:
            process["cwd"] = cwd
        return process

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
        message: dict[str, object] = {"process": self._process(cmd, cwd, env)}
        async for frame in self._start_stream(message, self._headers(user, timeout_s)):
            event = frame.get("event") or {}
            data = event.get("data") or {}
            for stream in ("stdout", "stderr"):
                if stream in data:
                    text = base64.b64decode(data[stream]).decode(errors="replace")
                    output.append(text[-OUTPUT_KEPT:])
                    kept += len(output[-1])
                    while kept - len(output[0]) >= OUTPUT_KEPT:
                        kept -= len(output.popleft())
                    if on_output is not None:
                        on_output(text)
            if "end" in event:
                code = int(event["end"].get("exitCode", 0))
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
        message: dict[str, object] = {"process": self._process(cmd, cwd, env)}
        if tag:
            message["tag"] = tag
        async for frame in self._start_stream(message, self._headers(user, None)):
            start = (frame.get("event") or {}).get("start")
            if isinstance(start, dict):
                return int(start.get("pid", 0))
        raise StepFailed("envd", f"'{cmd}' did not start")

    async def _start_stream(
        self, message: dict[str, object], headers: dict[str, str]
    ) -> AsyncIterator[dict[str, Any]]:
        """``process.Process/Start``'s envelopes, each as it arrives; StepFailed on an error
        (the response's or the stream's)."""
        async with self._client.stream(
            "POST", "/process.Process/Start", content=_envelope(message), headers=headers
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
                    frame = json.loads(buffer[5 : 5 + size] or b"{}")
                    buffer = buffer[5 + size :]
                    if isinstance(frame.get("error"), dict):
                        raise StepFailed("envd", str(frame["error"].get("message", frame)))
                    yield frame

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
