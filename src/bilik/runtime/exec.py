"""Processes the runtime starts in a sandbox through its OCI runtime's ``exec`` (the CLI's
``bilik sandbox exec``, tests, benchmarks; the SDKs go through envd instead)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from . import oci
from .backends import Backend
from .base import ExecResult, Process
from .errors import InvalidSpec
from .fsutil import read_beneath
from .records import SandboxRecord


async def start(
    backend: Backend,
    record: SandboxRecord,
    sandbox_dir: Path,
    layers: list[Path],
    argv: Sequence[str],
    *,
    user: str,
    env: dict[str, str] | None,
    cwd: str | None,
    stdin: bool,
) -> Process:
    """Start ``argv`` in the sandbox as ``user`` (a name from its template's /etc/passwd,
    ``layers`` being the template's layer directories)."""
    if not argv:
        raise InvalidSpec("a process needs at least one argument")
    uid, gid, home = lookup_user(layers, user)
    full_env = {**record.env, "HOME": home, "USER": user, "LOGNAME": user, **(env or {})}
    process = {
        "terminal": False,
        "user": {"uid": uid, "gid": gid},
        "args": backend.wrap(list(argv)),
        "env": [f"{k}={v}" for k, v in full_env.items()],
        "cwd": cwd or (home if user != "root" else "/"),
        "capabilities": oci.process_capabilities(uid),
        # As the sandbox's own processes: set-uid programs work (see oci.config).
        "noNewPrivileges": False,
    }
    name = f"exec-{os.urandom(6).hex()}"
    process_file = sandbox_dir / f"{name}.json"
    pid_file = backend.exec_pid_file(sandbox_dir, record.sandbox_id, name)
    process_file.write_text(json.dumps(process))
    proc = await asyncio.create_subprocess_exec(
        *backend.exec_argv(record.sandbox_id, process_file, pid_file),
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return Process(proc, pid_file, process_file, backend.process_killer(record.sandbox_id))


async def collect(proc: Process, input: bytes | None) -> ExecResult:
    """Feed ``input`` to the process (if any), and collect its output until it ends."""
    feeder = asyncio.create_task(_feed(proc.stdin, input)) if input is not None else None
    out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    async for name, chunk in proc.output():
        out[name].append(chunk)
    if feeder is not None:
        feeder.cancel()
    code = await proc.wait()
    return ExecResult(code, b"".join(out["stdout"]), b"".join(out["stderr"]))


async def _feed(writer: asyncio.StreamWriter | None, data: bytes) -> None:
    """Write ``data`` to a process's stdin while its output is being read (no pipe deadlock)."""
    if writer is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        writer.write(data)
        await writer.drain()
    writer.close()


def lookup_user(layers: list[Path], name: str) -> tuple[int, int, str]:
    """uid, gid and home of ``name`` from the template's /etc/passwd.

    Read from the read-only layers, never from the sandbox's own rootfs: that one is the
    sandbox's to change, and the host must not follow a link it planted.
    """
    for layer in reversed(layers):
        passwd = read_beneath(layer, "etc/passwd")
        if passwd is not None:
            for line in passwd.decode(errors="replace").splitlines():
                fields = line.split(":")
                if len(fields) >= 6 and fields[0] == name and fields[2].isdigit():
                    return int(fields[2]), int(fields[3] or 0), fields[5]
            break
    if name == "root":
        return 0, 0, "/root"
    raise InvalidSpec(f"user {name!r} does not exist in the sandbox")
