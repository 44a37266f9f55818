"""Processes envd started: their output fanned out to every stream that follows them.

A process outlives the stream that started it. Output produced while no stream follows it is
kept (up to ``BACKLOG_BYTES``, oldest dropped first) and handed to the next stream that connects;
a slow stream slows the process down (its pipe fills) instead of growing envd's memory. An
exited process is remembered for a while so a late ``Connect`` still gets its end.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct
import termios
import time
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from .users import User

CHUNK = 32 * 1024
BACKLOG_BYTES = 4 << 20
# A stream that has this many chunks queued pauses the process's output.
QUEUE_CHUNKS = 64
# After the process exits, output still in flight is read until the pipes close or fall quiet
# (a background child may keep them open forever).
DRAIN_QUIET_S = 0.2
# Starts a process as another user (GNU chroot, copied beside the agents' Python). Switching
# users in the child would make Python fork instead of vfork, which costs envd milliseconds.
SETUID_HELPER = "/.bilik/python/bin/chroot"
KEEP_EXITED = 256
KEEP_EXITED_S = 600.0


@dataclass
class End:
    exit_code: int
    exited: bool
    status: str
    error: str | None


@dataclass
class Spec:
    cmd: str
    args: list[str]
    envs: dict[str, str]
    cwd: str
    user: User
    tag: str | None = None
    pty: tuple[int, int] | None = None  # cols, rows
    stdin: bool = True
    timeout_s: float | None = None


# An event: ("stdout" | "stderr" | "pty", bytes) or ("end", End).
Event = tuple[str, "bytes | End"]


@dataclass
class Proc:
    pid: int
    spec: Spec
    _child: asyncio.subprocess.Process
    _master: int | None = None
    _stdin: asyncio.StreamWriter | None = None
    end: End | None = None
    ended_at: float = 0.0
    _followers: list[asyncio.Queue[Event]] = field(default_factory=list)
    _backlog: deque[Event] = field(default_factory=deque)
    _backlog_bytes: int = 0
    _room: asyncio.Event = field(default_factory=asyncio.Event)
    _last_output: float = 0.0

    # -- output ---------------------------------------------------------------------------

    async def _publish(self, event: Event) -> None:
        self._last_output = time.monotonic()
        while any(q.qsize() >= QUEUE_CHUNKS for q in self._followers):
            self._room.clear()
            await self._room.wait()
        if self._followers:
            for q in self._followers:
                q.put_nowait(event)
            return
        self._backlog.append(event)
        if isinstance(event[1], bytes):
            self._backlog_bytes += len(event[1])
            while self._backlog_bytes > BACKLOG_BYTES and len(self._backlog) > 1:
                _, old = self._backlog.popleft()
                if isinstance(old, bytes):
                    self._backlog_bytes -= len(old)

    async def follow(self) -> AsyncGenerator[Event, None]:
        """This process's events from now on (after any backlog nobody received), ending
        with its end."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        while self._backlog:
            queue.put_nowait(self._backlog.popleft())
        self._backlog_bytes = 0
        if self.end is not None:
            queue.put_nowait(("end", self.end))
        else:
            self._followers.append(queue)
        try:
            while True:
                event = await queue.get()
                self._room.set()
                yield event
                if event[0] == "end":
                    return
        finally:
            if queue in self._followers:
                self._followers.remove(queue)
                self._room.set()

    # -- input and control ----------------------------------------------------------------

    async def write_stdin(self, data: bytes) -> None:
        if self._stdin is None:
            raise ValueError("stdin is not open for this process (start it with stdin enabled)")
        self._stdin.write(data)
        await self._stdin.drain()

    async def write_pty(self, data: bytes) -> None:
        if self._master is None:
            raise ValueError("this process has no terminal")
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._master, view)
            except BlockingIOError:
                await asyncio.sleep(0.005)
                continue
            view = view[n:]

    def close_stdin(self) -> None:
        if self._master is not None:
            raise ValueError("a terminal has no stdin to close: send Ctrl-D (0x04) as input")
        if self._stdin is not None:
            self._stdin.close()
            self._stdin = None

    def resize(self, cols: int, rows: int) -> None:
        if self._master is None:
            raise ValueError("this process has no terminal")
        _set_size(self._master, cols, rows)

    def signal(self, signum: int) -> None:
        """Signal the process's whole group: a shell's children go too."""
        if self.end is not None:
            return
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


class ProcessTable:
    def __init__(self) -> None:
        self.running: dict[int, Proc] = {}
        self.exited: dict[int, Proc] = {}

    def find(self, pid: int | None = None, tag: str | None = None) -> Proc | None:
        for table in (self.running, self.exited):
            if pid is not None and pid in table:
                return table[pid]
            if tag is not None:
                for proc in table.values():
                    if proc.spec.tag == tag:
                        return proc
        return None

    async def start(self, spec: Spec, base_env: dict[str, str]) -> Proc:
        env = {**spec.user.env(), **base_env, **spec.envs}
        user = spec.user
        argv = [_executable(spec.cmd, spec.cwd, env.get("PATH", "")), *spec.args]
        ids: dict[str, object] = {}
        if os.getuid() == 0 and user.uid != 0:
            if os.path.exists(SETUID_HELPER):
                groups = ",".join(str(g) for g in user.groups)
                argv[:0] = [
                    SETUID_HELPER,
                    "--skip-chdir",
                    f"--userspec={user.uid}:{user.gid}",
                    f"--groups={groups}",
                    "/",
                ]
            else:
                ids = {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}
        master: int | None = None
        if spec.pty is not None:
            master, slave = os.openpty()
            _set_size(master, *spec.pty)
            try:
                child = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    cwd=spec.cwd,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_take_terminal,
                    **ids,  # type: ignore[arg-type]
                )
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)
            os.set_blocking(master, False)
        else:
            child = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if spec.stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=spec.cwd,
                env=env,
                start_new_session=True,
                **ids,  # type: ignore[arg-type]
            )
        proc = Proc(pid=child.pid, spec=spec, _child=child, _master=master, _stdin=child.stdin)
        self.running[proc.pid] = proc
        asyncio.get_running_loop().create_task(self._supervise(proc))
        return proc

    async def _supervise(self, proc: Proc) -> None:
        child = proc._child
        if proc._master is not None:
            readers = [asyncio.ensure_future(_read_fd(proc, proc._master))]
        else:
            assert child.stdout is not None and child.stderr is not None
            readers = [
                asyncio.ensure_future(_read_stream(proc, "stdout", child.stdout)),
                asyncio.ensure_future(_read_stream(proc, "stderr", child.stderr)),
            ]
        deadline = None
        if proc.spec.timeout_s:
            deadline = asyncio.get_running_loop().call_later(
                proc.spec.timeout_s, proc.signal, signal.SIGKILL
            )
        try:
            code = await child.wait()
            await _drain(proc, readers)
        finally:
            if deadline is not None:
                deadline.cancel()
            for reader in readers:
                reader.cancel()
            if proc._master is not None:
                os.close(proc._master)
                proc._master = None
            if proc._stdin is not None:
                proc._stdin.close()
                proc._stdin = None
        proc.end = _end(code)
        proc.ended_at = time.monotonic()
        for q in proc._followers:
            q.put_nowait(("end", proc.end))
        if not proc._followers:
            proc._backlog.append(("end", proc.end))
        self.running.pop(proc.pid, None)
        self.exited[proc.pid] = proc
        self._forget_old()

    def _forget_old(self) -> None:
        now = time.monotonic()
        for pid, proc in list(self.exited.items()):
            if len(self.exited) > KEEP_EXITED or now - proc.ended_at > KEEP_EXITED_S:
                del self.exited[pid]


async def _read_stream(proc: Proc, name: str, stream: asyncio.StreamReader) -> None:
    while chunk := await stream.read(CHUNK):
        await proc._publish((name, chunk))


async def _read_fd(proc: Proc, fd: int) -> None:
    loop = asyncio.get_running_loop()
    while True:
        readable = loop.create_future()
        loop.add_reader(fd, readable.set_result, None)
        try:
            await readable
        finally:
            loop.remove_reader(fd)
        try:
            chunk = os.read(fd, CHUNK)
        except BlockingIOError:
            continue
        except OSError:  # EIO: the terminal's last holder closed it
            return
        if not chunk:
            return
        await proc._publish(("pty", chunk))


async def _drain(proc: Proc, readers: Sequence[asyncio.Future[None]]) -> None:
    """Wait for the readers to reach the end of the output, unless it stops coming."""
    while True:
        _, pending = await asyncio.wait(readers, timeout=DRAIN_QUIET_S)
        if not pending or time.monotonic() - proc._last_output >= DRAIN_QUIET_S:
            return


def _end(code: int) -> End:
    if code >= 0:
        status = f"exit status {code}"
        return End(code, True, status, status if code else None)
    name = signal.strsignal(-code) or f"signal {-code}"
    status = f"signal: {name.lower()}"
    return End(-1, False, status, status)


def _executable(cmd: str, cwd: str, path: str) -> str:
    """``cmd`` as exec would find it (PATH for a bare name); FileNotFoundError if nowhere."""
    if "/" in cmd:
        candidates = [os.path.join(cwd, cmd)]
    else:
        candidates = [os.path.join(d or ".", cmd) for d in path.split(":")]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return cmd if "/" in cmd else candidate
    raise FileNotFoundError(2, "No such file or directory", cmd)


def _set_size(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows or 24, cols or 80, 0, 0))


def _take_terminal() -> None:
    """In the child, after setsid: make the terminal on stdin the controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
