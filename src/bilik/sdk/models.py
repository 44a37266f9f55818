"""What the SDK hands back: sandboxes, metrics, files, processes (E2B's names and fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from bilik.sdk.exceptions import SandboxException


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass
class SandboxInfo:
    """A sandbox as the control plane describes it."""

    sandbox_id: str
    template_id: str
    name: str | None
    metadata: dict[str, str]
    started_at: datetime
    end_at: datetime
    state: str
    cpu_count: int
    memory_mb: int
    envd_version: str
    allow_internet_access: bool | None = None
    # What its timeout does and whether traffic resumes it once paused:
    # ``{"on_timeout": "kill" | "pause", "auto_resume": bool}`` (as E2B's SDK shows it).
    lifecycle: dict[str, Any] | None = None
    # A paused sandbox's: what its pause kept ("full": memory and files; "filesystem").
    pause_mode: str | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SandboxInfo:
        return cls(
            sandbox_id=body["sandboxID"],
            template_id=body["templateID"],
            name=body.get("alias"),
            metadata=body.get("metadata") or {},
            started_at=parse_time(body["startedAt"]),
            end_at=parse_time(body["endAt"]),
            state=body.get("state", "running"),
            cpu_count=body["cpuCount"],
            memory_mb=body["memoryMB"],
            envd_version=body.get("envdVersion", ""),
            allow_internet_access=body.get("allowInternetAccess"),
            lifecycle=(
                {
                    "on_timeout": body["lifecycle"]["onTimeout"],
                    "auto_resume": body["lifecycle"]["autoResume"],
                }
                if isinstance(body.get("lifecycle"), dict)
                else None
            ),
            pause_mode=body.get("pauseMode"),
        )


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot: a template holding a sandbox's files, that sandboxes are created from
    (``Sandbox.create(snapshot_id)``, or one of its ``names``)."""

    snapshot_id: str
    names: list[str]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SnapshotInfo:
        return cls(snapshot_id=body["snapshotID"], names=list(body.get("names") or []))


@dataclass
class SandboxQuery:
    """A filter for :meth:`Sandbox.list`: metadata to match and states."""

    metadata: dict[str, str] | None = None
    state: list[str] | None = None


@dataclass
class SandboxMetrics:
    """One sample of a sandbox's resource use (bytes and percent)."""

    cpu_count: int
    cpu_used_pct: float
    disk_total: int
    disk_used: int
    mem_total: int
    mem_used: int
    mem_cache: int
    timestamp: datetime

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> SandboxMetrics:
        return cls(
            cpu_count=body["cpuCount"],
            cpu_used_pct=body["cpuUsedPct"],
            disk_total=body["diskTotal"],
            disk_used=body["diskUsed"],
            mem_total=body["memTotal"],
            mem_used=body["memUsed"],
            mem_cache=body.get("memCache", 0),
            timestamp=parse_time(body["timestamp"]),
        )


@dataclass
class ResourceUsage:
    """A sandbox's use right now: CPU in percent of its share, memory in MiB."""

    cpu_used_pct: float
    cpu_count: int
    memory_used_mb: float
    memory_total_mb: float
    disk_used_mb: float
    disk_total_mb: float


class FileType(Enum):
    """What a filesystem entry is."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"


@dataclass
class WriteInfo:
    """A file written."""

    name: str
    type: FileType | None
    path: str


@dataclass
class EntryInfo:
    """A filesystem entry (``files.list``, ``files.get_info``)."""

    name: str
    type: FileType | None
    path: str
    size: int
    mode: int
    permissions: str
    owner: str
    group: str
    modified_time: datetime | None
    symlink_target: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


class FilesystemEventType(Enum):
    """What happened to a watched entry."""

    CHMOD = "chmod"
    CREATE = "create"
    REMOVE = "remove"
    RENAME = "rename"
    WRITE = "write"


@dataclass
class FilesystemEvent:
    """A change seen by ``files.watch_dir``."""

    name: str
    type: FilesystemEventType


@dataclass
class ProcessInfo:
    """A process running in the sandbox (``commands.list``)."""

    pid: int
    tag: str | None
    cmd: str
    args: list[str]
    envs: dict[str, str]
    cwd: str | None


@dataclass
class PtySize:
    """A terminal's size in character cells."""

    rows: int
    cols: int


@dataclass
class CommandResult:
    """A finished command: its output, its exit code, and an error message if any."""

    stdout: str
    stderr: str
    exit_code: int
    error: str | None = None


class CommandExitException(SandboxException):
    """A command ended with a non-zero exit code (its output and code are on the exception)."""

    def __init__(self, result: CommandResult) -> None:
        # (no standard error: what ended it, e.g. "signal: killed")
        detail = result.stderr or result.error or ""
        super().__init__(f"Command exited with code {result.exit_code} and error:\n{detail}")
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.exit_code = result.exit_code
        self.error = result.error
