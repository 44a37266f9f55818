"""What template calls return: build info, status and logs, tags, listings (named as E2B's)."""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass, field
from typing import Any, Literal

LogEntryLevel = Literal["debug", "info", "warn", "error"]


class InstructionType(enum.StrEnum):
    """The kinds of build step the server runs."""

    COPY = "COPY"
    ENV = "ENV"
    RUN = "RUN"
    WORKDIR = "WORKDIR"
    USER = "USER"


@dataclass
class LogEntry:
    """One line of a build's log; ``step`` is the step it belongs to ("base", "1", …,
    "finalize"), when it belongs to one."""

    timestamp: datetime.datetime
    level: LogEntryLevel
    message: str
    step: str | None = None

    def __str__(self) -> str:
        return f"[{self.timestamp.isoformat()}] [{self.level}] {self.message}"

    @classmethod
    def now(cls, message: str, level: LogEntryLevel = "info") -> LogEntry:
        """An entry made by the SDK itself."""
        return cls(datetime.datetime.now(datetime.UTC), level, message)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LogEntry:
        """An entry of the status endpoint's ``logEntries``."""
        level = data.get("level")
        step = data.get("step")
        return cls(
            timestamp=_parse_time(data.get("timestamp")),
            level=level if level in ("debug", "info", "warn", "error") else "info",
            message=str(data.get("message", "")),
            step=None if step is None else str(step),
        )


@dataclass
class LogEntryStart(LogEntry):
    """The first entry of :meth:`Template.build`'s logs."""

    level: LogEntryLevel = field(default="debug", init=False)


@dataclass
class LogEntryEnd(LogEntry):
    """The last entry of :meth:`Template.build`'s logs, whether the build worked or not."""

    level: LogEntryLevel = field(default="debug", init=False)


class TemplateBuildStatus(enum.StrEnum):
    """Where a build is."""

    BUILDING = "building"
    WAITING = "waiting"
    READY = "ready"
    ERROR = "error"


@dataclass
class BuildInfo:
    """The template and build a build request made."""

    template_id: str
    build_id: str
    name: str
    # E2B's older name for ``name``.
    alias: str
    tags: list[str] = field(default_factory=list)


@dataclass
class BuildStatusReason:
    """Why a build failed: the message, and the step ("base", a number, "finalize")."""

    message: str
    step: str | None = None
    log_entries: list[LogEntry] = field(default_factory=list)


@dataclass
class TemplateBuildStatusResponse:
    """A build's status and a page of its log."""

    build_id: str
    template_id: str
    status: TemplateBuildStatus
    log_entries: list[LogEntry]
    logs: list[str]
    reason: BuildStatusReason | None = None


@dataclass
class TemplateTag:
    """A tag of a template and the build it names."""

    tag: str
    build_id: str
    created_at: datetime.datetime


@dataclass
class TemplateTagInfo:
    """Tags just assigned, and the build they name."""

    build_id: str
    tags: list[str]


@dataclass
class TemplateInfo:
    """One template of :meth:`Template.list`."""

    template_id: str
    name: str
    build_id: str
    build_status: str
    cpu_count: int
    memory_mb: int
    created_at: datetime.datetime
    updated_at: datetime.datetime
    aliases: list[str] = field(default_factory=list)
    public: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TemplateInfo:
        names = list(data.get("names") or data.get("aliases") or [])
        return cls(
            template_id=str(data.get("templateID", "")),
            name=str(names[0]) if names else str(data.get("templateID", "")),
            build_id=str(data.get("buildID") or ""),
            build_status=str(data.get("buildStatus") or ""),
            cpu_count=int(data.get("cpuCount") or 0),
            memory_mb=int(data.get("memoryMB") or 0),
            created_at=_parse_time(data.get("createdAt")),
            updated_at=_parse_time(data.get("updatedAt") or data.get("createdAt")),
            aliases=[str(a) for a in data.get("aliases") or []],
            public=bool(data.get("public")),
        )


def _parse_time(value: object) -> datetime.datetime:
    if isinstance(value, str):
        try:
            return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
    return datetime.datetime.now(datetime.UTC)
