"""Driving an OCI runtime binary over its command line (runc's flags, which crun shares;
``backends`` holds what one runtime does differently).

runc is not offered: Debian 12's runc 1.1.5 cannot ``exec`` into a sandbox whose network
namespace belongs to the host (it joins the user namespace first, then fails to setns into the
network namespace with EPERM).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import StepFailed
from .fsutil import read_pid


class OciCli:
    """One OCI runtime binary, its state under ``state_root/<name>``. ``netns_dir`` holds each
    sandbox's network namespace (named by its id) and ``uid_base`` is root-inside's host uid
    (for a runtime that runs inside the sandbox's namespaces)."""

    def __init__(self, name: str, state_root: Path, *, uid_base: int, netns_dir: Path) -> None:
        binary = shutil.which(name)
        if binary is None:
            raise StepFailed("oci-runtime", f"{name} is not installed")
        self.name = name
        self.root = state_root / name
        self.root.mkdir(parents=True, exist_ok=True)
        self.uid_base = uid_base
        self.netns_dir = netns_dir
        self.base = [binary, "--root", str(self.root)]

    def _argv(self, netns_of: str | None = None, cgroup_procs: Sequence[Path] = ()) -> list[str]:
        """The runtime's argv (``netns_of``: the sandbox whose network namespace it needs;
        ``cgroup_procs``: the cgroups it is to run in, where bilik made them)."""
        return list(self.base)

    async def _run(self, step: str, *args: str, netns_of: str | None = None) -> str:
        proc = await asyncio.create_subprocess_exec(
            *self._argv(netns_of),
            *args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise StepFailed(
                step, err.decode(errors="replace").strip() or f"exit {proc.returncode}"
            )
        return out.decode(errors="replace")

    async def run_detached(
        self, sandbox_id: str, bundle: Path, log: Path, cgroup_procs: Sequence[Path] = ()
    ) -> int:
        """Start the container with PID 1's output going to ``log``; returns PID 1's host pid
        (under runsc: the Sentry's) once it runs. ``cgroup_procs``: the cgroups runsc is to
        run in.

        The runtime's own errors land in the same file (PID 1 inherits its stdio, so a pipe
        would never reach end of file), and are read back from there on failure.
        """
        pid_file = self.root / f"{sandbox_id}.pid"
        with open(log, "ab") as out:
            start = out.tell()
            args = ["run", "--bundle", str(bundle), "--detach", "--pid-file", str(pid_file)]
            args.append(sandbox_id)
            proc = await asyncio.create_subprocess_exec(
                *self._argv(sandbox_id, cgroup_procs),
                *args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
            code = await proc.wait()
        try:
            if code != 0:
                with open(log, "rb") as f:
                    f.seek(start)
                    raise StepFailed("oci-start", f.read(4096).decode(errors="replace").strip())
            return read_pid(pid_file)
        finally:
            pid_file.unlink(missing_ok=True)

    async def kill(self, sandbox_id: str) -> None:
        """SIGKILL the container's processes (its resources stay until :meth:`delete`)."""
        with contextlib.suppress(StepFailed):
            await self._run("oci-kill", "kill", sandbox_id, "KILL", netns_of=sandbox_id)

    async def delete(self, sandbox_id: str) -> None:
        """Remove the container, killing it if it still runs. A missing container is fine."""
        try:
            await self._run("oci-delete", *self._delete_args(sandbox_id))
        except StepFailed as e:
            if "does not exist" not in e.detail and "not found" not in e.detail.lower():
                raise

    def _delete_args(self, sandbox_id: str) -> list[str]:
        return ["delete", "--force", sandbox_id]

    async def state(self, sandbox_id: str) -> dict[str, Any] | None:
        try:
            out = await self._run("oci-state", "state", sandbox_id, netns_of=sandbox_id)
            state = json.loads(out)
        except (StepFailed, json.JSONDecodeError):
            return None
        return state if isinstance(state, dict) else None

    async def list(self) -> dict[str, str]:
        """Container id → status for every container under this runtime's state root."""
        out = await self._run("oci-list", "list", "--format", "json")
        try:
            items = json.loads(out or "[]") or []
        except json.JSONDecodeError:
            return {}
        return {item["id"]: item.get("status", "unknown") for item in items}

    def exec_argv(self, sandbox_id: str, process_file: Path, pid_file: Path) -> builtins.list[str]:
        """The argv that runs the process described by ``process_file`` in the sandbox and
        writes its pid to ``pid_file``."""
        return [
            *self.base,
            "exec",
            "--process",
            str(process_file),
            "--pid-file",
            str(pid_file),
            sandbox_id,
        ]
