"""Durable sandbox records: one JSON file per sandbox, written atomically.

The runtime's truth is what runs; these records say what *should* run, so a restarted server can
re-adopt its sandboxes and tell orphans (running with no record, or recorded but not running).

Ids reach here from requests: a path is built only from an id of the shape bilik makes
(``is_sandbox_id``), so an id is one directory under the root and never a path into a sandbox's
own files (``<id>/rootfs``) or anywhere else (an absolute path). A record is read without
following a link.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from .errors import SandboxNotFound
from .fsutil import write_json_atomic
from .spec import Limits, is_sandbox_id


@dataclasses.dataclass
class SandboxRecord:
    sandbox_id: str
    template: str
    layers: list[str]
    limits: Limits
    internet: bool
    address: str
    address_index: int
    oci_runtime: str
    created_at: float
    end_at: float
    user: str
    workdir: str
    env: dict[str, str]
    metadata: dict[str, str]
    # PID 1 on the host and its start time (clock ticks after boot): whether the sandbox still
    # runs, without asking the OCI runtime (0 until it started).
    init_pid: int = 0
    init_start: int = 0
    allow_out: list[str] = dataclasses.field(default_factory=list)
    deny_out: list[str] = dataclasses.field(default_factory=list)
    # A warm-pool sandbox not handed over yet (see ``SandboxSpec.pooled``): after a restart,
    # nothing remembers its access token, so it is of no use to anyone and is released.
    pooled: bool = False
    # What a files pause's resume runs again, as the template said when the sandbox was made
    # (the template may have changed since), and the template's own environment (a snapshot's
    # image carries it, not the create's additions).
    start_cmd: str | None = None
    ready_cmd: str | None = None
    image_env: dict[str, str] | None = None
    # Set while paused: ``PauseInfo``'s fields (see ``base.PauseInfo``).
    pause: dict[str, Any] | None = None
    # A pause or resume in flight, recorded before it acts (``{"op": "pause"|"resume",
    # "memory": bool}``) and cleared with its result: what ``reconcile`` settles after a crash.
    pause_op: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SandboxRecord:
        data = dict(data)
        data["limits"] = Limits(**data["limits"])
        return cls(**data)


class RecordStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        # Parsed records by id, with the file identity they were read from: the reaper lists
        # every record twice a second, and re-parsing hundreds of unchanged files would cost.
        self._cache: dict[str, tuple[tuple[int, int], SandboxRecord]] = {}

    def dir(self, sandbox_id: str) -> Path:
        """The sandbox's directory; SandboxNotFound for anything that is not an id (no such
        sandbox can exist), before any path is made of it."""
        if not is_sandbox_id(sandbox_id):
            raise SandboxNotFound(str(sandbox_id))
        return self.root / sandbox_id

    def save(self, record: SandboxRecord) -> None:
        write_json_atomic(self.dir(record.sandbox_id) / "record.json", record.to_json())

    def load(self, sandbox_id: str) -> SandboxRecord | None:
        """The sandbox's record; None if there is none, or ``sandbox_id`` is not an id."""
        if not is_sandbox_id(sandbox_id):
            return None
        path = os.path.join(self.root, sandbox_id, "record.json")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            self._cache.pop(sandbox_id, None)
            return None
        except OSError:  # (ELOOP: a link, which bilik never makes there)
            return None
        with os.fdopen(fd) as f:
            st = os.fstat(fd)
            identity = (st.st_ino, st.st_mtime_ns)  # an atomic save is a new inode
            cached = self._cache.get(sandbox_id)
            if cached and cached[0] == identity:
                return copy.copy(cached[1])  # callers may change theirs
            try:
                record = SandboxRecord.from_json(json.load(f))
            except (ValueError, KeyError, TypeError):  # (JSON, text and shape errors)
                return None
        if record.sandbox_id != sandbox_id:  # (a record names the sandbox it is filed under)
            return None
        self._cache[sandbox_id] = (identity, record)
        return copy.copy(record)

    def ids(self) -> list[str]:
        """Ids of every sandbox directory, recorded or not (a create may have died early)."""
        with os.scandir(self.root) as entries:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))

    def all(self) -> list[SandboxRecord]:
        ids = self.ids()
        for gone in set(self._cache) - set(ids):
            self._cache.pop(gone, None)
        return [r for r in (self.load(i) for i in ids) if r is not None]
