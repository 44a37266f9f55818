"""Durable sandbox records: one JSON file per sandbox, written atomically.

The runtime's truth is what runs; these records say what *should* run, so a restarted server can
re-adopt its sandboxes and tell orphans (running with no record, or recorded but not running).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .fsutil import write_json_atomic
from .spec import Limits


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

    def dir(self, sandbox_id: str) -> Path:
        return self.root / sandbox_id

    def save(self, record: SandboxRecord) -> None:
        write_json_atomic(self.dir(record.sandbox_id) / "record.json", record.to_json())

    def load(self, sandbox_id: str) -> SandboxRecord | None:
        try:
            return SandboxRecord.from_json(
                json.loads((self.dir(sandbox_id) / "record.json").read_text())
            )
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (json.JSONDecodeError, KeyError, TypeError):
            return None

    def ids(self) -> list[str]:
        """Ids of every sandbox directory, recorded or not (a create may have died early)."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def all(self) -> list[SandboxRecord]:
        return [r for r in (self.load(i) for i in self.ids()) if r is not None]
