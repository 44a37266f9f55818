"""Starting envd in crun sandboxes through the zygote (``bilik.envd.zygote``).

The zygote is this process's child: it imports envd once, then forks one per sandbox that
joins the sandbox as strictly as ``crun exec`` would. It dies with this process (and when this
process closes its end of the socket pair); the envds it started do not.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import json
import signal
import socket
from pathlib import Path

from . import agent_python, oci
from .errors import StepFailed

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class EnvdZygote:
    def __init__(self, agents_dir: Path, seccomp_filter: Path) -> None:
        """``seccomp_filter``: the sandboxes' filter, compiled (``seccomp.compile_bpf``)."""
        self.agents_dir = agents_dir
        self.seccomp_filter = seccomp_filter
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def _start(self) -> None:
        ours, theirs = socket.socketpair()
        fd = theirs.fileno()
        try:
            # Entry for entry what the sandboxes see at /.bilik (``zygote.IN_SANDBOX_PATH``).
            stdlib = agent_python.stdlib()
            path = [str(self.agents_dir), str(stdlib), str(stdlib / "lib-dynload")]
            boot = f"import sys; sys.path[:] = {path!r}; from bilik.envd.zygote import main; main()"
            self._proc = await asyncio.create_subprocess_exec(
                str(agent_python.interpreter()),
                "-I",
                "-S",
                "-c",
                boot,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                pass_fds=(fd,),
                preexec_fn=_die_with_parent,
                start_new_session=True,
            )
        finally:
            theirs.close()
        assert self._proc.stdin is not None and self._proc.stdout is not None
        config = {
            "fd": fd,
            "capabilities": oci.CAPABILITIES,
            "seccomp_bpf": base64.b64encode(self.seccomp_filter.read_bytes()).decode(),
        }
        self._proc.stdin.write(json.dumps(config).encode() + b"\n")
        await self._proc.stdin.drain()
        ready = await self._proc.stdout.readline()
        if ready.strip() != b"ready":
            await self._proc.wait()
            code = self._proc.returncode
            raise StepFailed("envd-zygote", f"the zygote did not start (exit {code})")
        self._reader, self._writer = await asyncio.open_connection(sock=ours)

    async def spawn(
        self, init_pid: int, init_start: int, control_dir: str, socket: Path, log: Path
    ) -> int:
        """Start envd in the sandbox whose PID 1 is ``init_pid`` (started at ``init_start``,
        clock ticks after boot), listening on the unix socket made at ``socket`` and writing
        its log to ``log`` (both host paths in directories the sandbox cannot change); returns
        envd's host pid."""
        async with self._lock:
            if self._proc is None or self._proc.returncode is not None:
                await self._start()
            assert self._reader is not None and self._writer is not None
            request = {
                "pid": init_pid,
                "start": init_start,
                "control_dir": control_dir,
                "socket": str(socket),
                "log": str(log),
            }
            self._writer.write(json.dumps(request).encode() + b"\n")
            await self._writer.drain()
            line = await self._reader.readline()
        if not line:
            raise StepFailed("start-envd", "the envd zygote exited")
        answer = json.loads(line)
        if "error" in answer:
            raise StepFailed("start-envd", answer["error"])
        return int(answer["pid"])

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
