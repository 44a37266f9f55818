"""The contract between the host and a sandbox: where envd listens, where its control directory
appears inside, and the config the runtime writes there for it.

One module, standard library only, imported by every side of the contract: the runtime (which
writes the config), the sandbox plane and the SDKs (which reach envd and the code interpreter
on these ports), and envd itself (which reads the config, inside someone else's rootfs: hence
nothing here but the standard library).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

# envd's port inside every sandbox (E2B's), and the code interpreter's.
ENVD_PORT = 49983
INTERPRETER_PORT = 49999
# Where the sandbox's control directory appears, read-only, inside the sandbox; envd's config
# is the file CONFIG_FILE there. The host writes it; the sandbox may only read it.
CONTROL_DIR = "/run/bilik"
CONFIG_FILE = "envd.json"


@dataclass(frozen=True)
class EnvdConfig:
    """What envd is told at start (readable only by the sandbox's root)."""

    access_token: str = ""
    default_user: str = "user"
    default_workdir: str = ""
    env: dict[str, str] = field(default_factory=dict)
    port: int = ENVD_PORT
    # The sandbox's limits, for /metrics.
    cpu_count: float = 1
    memory_bytes: int = 0

    def dumps(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def loads(cls, text: str | bytes) -> EnvdConfig:
        """The config in ``text``; every field checked for its type (a missing one takes its
        default), so a reader never meets a value of another kind."""
        raw: Any = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("envd's config is not an object")
        env = raw.get("env") or {}
        if not isinstance(env, dict):
            raise ValueError("envd's config: env is not an object")
        return cls(
            access_token=str(raw.get("access_token", "")),
            default_user=str(raw.get("default_user") or "user"),
            default_workdir=str(raw.get("default_workdir") or ""),
            env={str(k): str(v) for k, v in env.items()},
            port=int(raw.get("port", ENVD_PORT)),
            cpu_count=float(raw.get("cpu_count", 1)),
            memory_bytes=int(raw.get("memory_bytes", 0)),
        )

    @classmethod
    def load(cls, path: str) -> EnvdConfig:
        with open(path, "rb") as f:
            return cls.loads(f.read())
