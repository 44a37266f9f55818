"""No write lost over many pauses and resumes, through the official ``e2b`` SDK and the API.

A writer in the sandbox appends sequence numbers to a file while the client writes files of
its own (each acknowledged by the API). Cycles of pause and resume go through each way a
sandbox is paused (a request, its timeout) and resumed (a connect, a request reaching it), in
each mode, under each OCI runtime (a server each). After every resume each acknowledged file
is there, whole, and the sequence has no gap nor repeat; after a memory pause the same writer
goes on, after a files-only one a new writer goes on from the last number on disk.

Cycles: 100 for each runtime (crun, runsc) and each of memory by request + connect, memory by
timeout + connect, memory by request + resume by traffic, files only by request + connect,
files only by timeout + connect (E2B never resumes a files-only pause on traffic): 1000 in
all. Each combination's cycles run on ``SANDBOXES`` sandboxes at once (each with its own
writer and ledger, ``CYCLES // SANDBOXES`` cycles each), so pauses and resumes of different
sandboxes also overlap. On two cores the module takes about 7.5 min, two thirds of it
runsc's files-only cycles (each resume a cold boot of gVisor, bound by the CPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from e2b import FileNotFoundException, Sandbox, SandboxLifecycle, SnapshotMode

from server import BilikServer

SEQ = "/home/user/seq"
# Appends 1, 2, 3, ... (one write each, no fsync: a pause must keep what is in caches too);
# from the file's last number on if it has one. Python, not a shell loop: a shell's `sleep`
# is an exec a turn, which under gVisor on ten sandboxes at once would take the CPU. (Run with
# no time limit: a command's default limit, 60 s, would end it mid-test.)
_WRITER_PY = f"""
import os, time
try:
    numbers = open({SEQ!r}).read().split()
except FileNotFoundError:
    numbers = []
n = int(numbers[-1]) if numbers else 0
fd = os.open({SEQ!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
while True:
    n += 1
    os.write(fd, b'%d\\n' % n)
    time.sleep(0.01)
"""
WRITER = f"python3 -c 'exec(bytes.fromhex(\"{_WRITER_PY.encode().hex()}\").decode())'"

# Cycles for each runtime and (mode, trigger).
CYCLES = 100
# How many sandboxes share a combination's cycles (a divisor of CYCLES).
SANDBOXES = 10
# (mode, how it is paused, how it is resumed).
COMBINATIONS = [
    ("memory", "request", "connect"),
    ("memory", "timeout", "connect"),
    ("memory", "request", "traffic"),
    ("filesystem", "request", "connect"),
    ("filesystem", "timeout", "connect"),
]


@pytest.fixture(scope="module", params=["crun", "runsc"])
def server(request: pytest.FixtureRequest) -> Iterator[BilikServer]:
    """A server whose sandboxes run under the one runtime (one server at a time)."""
    srv = BilikServer(env={"BILIK_OCI_RUNTIME": request.param})
    try:
        srv.start()
        yield srv
    finally:
        srv.finish()


def state(server: BilikServer, sandbox_id: str) -> str:
    got = httpx.get(
        f"{server.url}/sandboxes/{sandbox_id}", headers={"X-API-Key": server.key}, timeout=30
    )
    assert got.status_code == 200, got.text
    return str(got.json()["state"])


def wait_paused(server: BilikServer, sandbox_id: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        got = httpx.get(
            f"{server.url}/sandboxes/{sandbox_id}", headers={"X-API-Key": server.key}, timeout=30
        )
        # (gone: killed at its timeout, which was to pause it)
        assert got.status_code == 200, ("not paused at its timeout but killed", got.text)
        if got.json()["state"] == "paused":
            return
        assert time.monotonic() < deadline, "the timeout never paused it"
        time.sleep(0.1)


class Ledger:
    """What the client was told was written, and what the writer had written at each check."""

    def __init__(self, sbx: Sandbox) -> None:
        self.sbx = sbx
        self.acked: dict[str, str] = {}
        self.last = 0

    def write(self, n: int) -> None:
        """Write a file through the API; only a write the API answered counts as
        acknowledged. (A request the connection failed under, before any answer, was never
        acknowledged: it is sent again. The server can close an idle keep-alive connection
        just as the client reuses it; that is not what this suite is about.)"""
        path = f"/home/user/acked-{n}"
        for attempt in range(3):
            try:
                self.sbx.files.write(path, f"write {n}")
                break
            except httpx.TransportError:
                if attempt == 2:
                    raise
        self.acked[path] = f"write {n}"

    def check(self, *, going_on: bool) -> None:
        """Every acknowledged file whole; the sequence 1..N without a gap; and with
        ``going_on``, the writer past what it had written at the last check."""
        for path, text in self.acked.items():
            assert self.sbx.files.read(path) == text, path
        numbers = self.sequence()
        assert numbers == list(range(1, len(numbers) + 1)), "the sequence has a gap or repeat"
        assert len(numbers) >= self.last
        if going_on:
            deadline = time.monotonic() + 30
            while len(numbers) <= self.last:
                assert time.monotonic() < deadline, (
                    "the writer does not go on",
                    self.last,
                    len(self.acked),
                    self.sbx.commands.run("ps -ef").stdout,
                )
                time.sleep(0.02)
                numbers = self.sequence()
            assert numbers == list(range(1, len(numbers) + 1)), "a gap or repeat"
        self.last = len(numbers)

    def sequence(self) -> list[int]:
        try:
            text = self.sbx.files.read(SEQ)
        except FileNotFoundException:  # (the writer has not written yet)
            return []
        lines = text.split("\n")
        complete = lines[:-1]  # (the last is empty, or a line being written)
        return [int(line) for line in complete]


def cycles(
    count: int,
    pause: Callable[[], None],
    resume: Callable[[], None],
    ledger: Ledger,
    *,
    memory: bool,
) -> None:
    for _ in range(count):
        ledger.write(len(ledger.acked))
        pause()
        resume()
        if not memory:  # (a fresh boot: a new writer goes on from the last number on disk)
            ledger.sbx.commands.run(WRITER, background=True, timeout=0)
        ledger.check(going_on=True)


def one_sandbox(
    server: BilikServer, runtime: str, mode: str, paused_by: str, resumed_by: str, count: int
) -> int:
    """``count`` cycles on a sandbox of its own; how many acknowledged writes it checked."""
    p = server.sdk_params()
    memory = mode == "memory"
    pause_mode: SnapshotMode = "full" if memory else "filesystem"
    lifecycle: SandboxLifecycle = {
        "on_timeout": {"action": "pause", "mode": pause_mode},
        # Only a resume by traffic is let resume it so: elsewhere the connect must resume it.
        "auto_resume": resumed_by == "traffic",
    }
    sbx = Sandbox.create("base", timeout=300, lifecycle=lifecycle, **p)
    try:
        # (gVisor's kernel calls itself 4.4.0: the sandbox runs under the server's runtime)
        kernel = sbx.commands.run("uname -r").stdout.strip()
        assert (kernel == "4.4.0") == (runtime == "runsc"), (runtime, kernel)
        sbx.commands.run(WRITER, background=True, timeout=0)
        ledger = Ledger(sbx)
        ledger.check(going_on=True)

        def by_request() -> None:
            assert sbx.pause(mode=pause_mode) is True

        def by_timeout() -> None:
            sbx.set_timeout(1)
            wait_paused(server, sbx.sandbox_id)

        def by_connect() -> None:
            connected = Sandbox.connect(sbx.sandbox_id, timeout=300, **p)
            assert connected.sandbox_id == sbx.sandbox_id

        def by_traffic() -> None:
            # The ledger's own next read is what resumes it.
            assert state(server, sbx.sandbox_id) == "paused"

        pause = by_request if paused_by == "request" else by_timeout
        resume = by_connect if resumed_by == "connect" else by_traffic
        cycles(count, pause, resume, ledger, memory=memory)
        return len(ledger.acked)
    finally:
        sbx.kill()


@pytest.mark.parametrize(("mode", "paused_by", "resumed_by"), COMBINATIONS)
def test_no_write_lost_over_pauses(
    server: BilikServer, mode: str, paused_by: str, resumed_by: str
) -> None:
    runtime = server.extra_env["BILIK_OCI_RUNTIME"]
    assert CYCLES % SANDBOXES == 0
    with ThreadPoolExecutor(max_workers=SANDBOXES) as pool:
        runs = [
            pool.submit(
                one_sandbox, server, runtime, mode, paused_by, resumed_by, CYCLES // SANDBOXES
            )
            for _ in range(SANDBOXES)
        ]
    assert sum(run.result() for run in runs) == CYCLES
