"""Driving an OCI runtime binary (crun, or gVisor's runsc) over its command line.

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
from pathlib import Path
from typing import Any

from .errors import StepFailed

RUNTIMES = ("crun", "runsc")


class OciCli:
    def __init__(self, name: str, state_root: Path) -> None:
        if name not in RUNTIMES:
            raise ValueError(f"unknown OCI runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
        binary = shutil.which(name)
        if binary is None:
            raise StepFailed("oci-runtime", f"{name} is not installed")
        self.name = name
        self.root = state_root / name
        self.root.mkdir(parents=True, exist_ok=True)
        self.base = [binary, "--root", str(self.root)]
        if name == "crun":
            self.base.append("--cgroup-manager=cgroupfs")
        if name == "runsc":
            # gVisor's own netstack refuses to start in this build ("cannot run with network
            # enabled in root network namespace"); its host mode hands sockets to the host
            # kernel, inside the sandbox's own network namespace that bilik filters.
            self.base += ["--network=host"]

    async def _run(self, step: str, *args: str, stdin: int | None = subprocess.DEVNULL) -> str:
        proc = await asyncio.create_subprocess_exec(
            *self.base, *args, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise StepFailed(
                step, err.decode(errors="replace").strip() or f"exit {proc.returncode}"
            )
        return out.decode(errors="replace")

    async def run_detached(self, sandbox_id: str, bundle: Path, log: Path) -> int:
        """Start the container with PID 1's output going to ``log``; returns PID 1's host pid
        once it runs.

        The runtime's own errors land in the same file (PID 1 inherits its stdio, so a pipe
        would never reach end of file), and are read back from there on failure.
        """
        with open(log, "ab") as out:
            start = out.tell()
            pid_file = bundle / "init.pid"
            args = ["run", "--bundle", str(bundle), "--detach", "--pid-file", str(pid_file)]
            args.append(sandbox_id)
            proc = await asyncio.create_subprocess_exec(
                *self.base, *args, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
            code = await proc.wait()
        if code != 0:
            with open(log, "rb") as f:
                f.seek(start)
                raise StepFailed("oci-start", f.read(4096).decode(errors="replace").strip())
        return int(pid_file.read_text())

    async def kill(self, sandbox_id: str) -> None:
        with contextlib.suppress(StepFailed):
            await self._run("oci-kill", "kill", sandbox_id, "KILL")

    async def delete(self, sandbox_id: str) -> None:
        """Remove the container, killing it if it still runs. A missing container is fine."""
        args = (
            ["delete", "--force", sandbox_id]
            if self.name != "runsc"
            else ["delete", "-force", sandbox_id]
        )
        try:
            await self._run("oci-delete", *args)
        except StepFailed as e:
            if "does not exist" not in e.detail and "not found" not in e.detail.lower():
                raise

    async def state(self, sandbox_id: str) -> dict[str, Any] | None:
        try:
            state = json.loads(await self._run("oci-state", "state", sandbox_id))
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
        writes its host pid to ``pid_file``."""
        dash = "-" if self.name == "runsc" else "--"
        return [
            *self.base,
            "exec",
            f"{dash}process",
            str(process_file),
            f"{dash}pid-file",
            str(pid_file),
            sandbox_id,
        ]
