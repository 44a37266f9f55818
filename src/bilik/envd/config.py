"""What envd is told at start: written by the runtime, readable only by the sandbox's root."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# Where the per-sandbox directory (envd's config) appears, read-only, inside the sandbox.
CONTROL_DIR = "/run/bilik"
CONFIG_FILE = "envd.json"
PORT = 49983


@dataclass
class EnvdConfig:
    access_token: str = ""
    default_user: str = "user"
    default_workdir: str = ""
    env: dict[str, str] = field(default_factory=dict)
    port: int = PORT
    # The sandbox's limits, for /metrics.
    cpu_count: float = 1
    memory_bytes: int = 0

    @classmethod
    def load(cls, path: str) -> EnvdConfig:
        with open(path) as f:
            raw = json.load(f)
        return cls(
            access_token=str(raw.get("access_token", "")),
            default_user=str(raw.get("default_user") or "user"),
            default_workdir=str(raw.get("default_workdir") or ""),
            env={str(k): str(v) for k, v in (raw.get("env") or {}).items()},
            port=int(raw.get("port", PORT)),
            cpu_count=float(raw.get("cpu_count", 1)),
            memory_bytes=int(raw.get("memory_bytes", 0)),
        )
