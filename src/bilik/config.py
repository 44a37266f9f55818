"""Server settings: every setting is a ``BILIK_*`` environment variable with a matching flag."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path


class InvalidSettings(ValueError):
    """A setting (variable or flag) has a value bilik cannot use."""


@dataclasses.dataclass(frozen=True)
class Caps:
    """Operator caps: the largest values a create may ask for, and what a key may upload."""

    cpu: int = 4
    memory_mb: int = 8192
    disk_mb: int = 20480
    pids: int = 32768
    lifetime_s: int = 3600
    # Template files (COPY steps' uploads): one upload, and all of one key's kept at once, MiB.
    upload_mb: int = 1024
    uploads_mb: int = 4096
    # Layers one key's templates keep on the host's disk (what no other image shares), MiB.
    layers_mb: int = 20480


@dataclasses.dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("/var/lib/bilik")
    # Names the host objects (bridge, nftables table, cgroup parent, netns prefix) so that two
    # installations, or a test run beside a real server, never touch each other's sandboxes.
    instance: str = "bilik"
    oci_runtime: str = "crun"
    subnet: str = "10.213.0.0/16"
    # Root inside a sandbox is this host uid; template layers are stored shifted by it.
    uid_base: int = 1_000_000
    # PostgreSQL (postgresql://user:password@host/db) instead of the embedded SQLite.
    database_url: str = ""
    # Resolvers the sandboxes' DNS forwarder asks, comma-separated; empty: the host's own.
    dns_upstream: str = ""
    # Sandbox ports are also reachable as {port}-{sandboxID}.{domain} on the server's port.
    domain: str = "localhost"
    host: str = "127.0.0.1"
    port: int = 3000
    # How long a template's ready check may take to pass when a sandbox starts.
    ready_timeout_s: int = 60
    # ECR's API for templates from AWS registries (GetAuthorizationToken); empty: AWS's own,
    # https://api.ecr.{region}.amazonaws.com/. For ECR-compatible endpoints and tests.
    ecr_endpoint: str = ""
    # Sandboxes kept made and ready per template, handed over whole to a create that asks for
    # exactly what they were made with: ``name=count,...`` (default templates only; "": none).
    # A pool fills only once its template is built: a pool never starts a build.
    warm_pool: str = "code-interpreter-v1=1"
    # A client has this long to send a request's headers (from connecting, or from the end of
    # the previous response), and may leave its body this long without a byte; then it is cut
    # off. Without them a client sending a byte at a time holds a connection for ever.
    header_timeout_s: int = 10
    body_timeout_s: int = 30
    # Connections held at once (idle, half-sent and websockets alike); past it, requests are
    # answered 503. The timeouts above are what frees the connections of slow clients.
    max_connections: int = 1000
    # Requests and websockets relayed to the sandboxes of one key at once (their ports take no
    # key, so without it one tenant's hanging ports could hold every connection); past it, 429.
    max_streams_per_key: int = 256
    # How long a paused sandbox is kept (seconds; 30 days by default): then it is killed.
    paused_retention_s: int = 30 * 86400
    caps: Caps = dataclasses.field(default_factory=Caps)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Read ``BILIK_*`` variables; explicit ``overrides`` (e.g. from flags) win. Caps are
        overridden as ``max_<cap>`` (``max_cpu=8``), like their variables."""
        env = dict(os.environ if env is None else env)
        values: dict[str, object] = {}
        caps: dict[str, int] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(f"BILIK_{field.name.upper()}")
            if raw is None or field.name == "caps":
                continue
            if field.name == "data_dir":
                values[field.name] = Path(raw)
            elif field.type in ("int", int):
                values[field.name] = _int(f"BILIK_{field.name.upper()}", raw)
            else:
                values[field.name] = raw
        for field in dataclasses.fields(Caps):
            raw = env.get(f"BILIK_MAX_{field.name.upper()}")
            if raw is not None:
                caps[field.name] = _int(f"BILIK_MAX_{field.name.upper()}", raw)
        for field in dataclasses.fields(Caps):
            flag = overrides.pop(f"max_{field.name}", None)
            if flag is not None:
                caps[field.name] = int(flag)  # type: ignore[call-overload]
        values["caps"] = Caps(**caps)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("data_dir"), str):
            values["data_dir"] = Path(str(values["data_dir"]))
        return cls(**values)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        # The instance names a bridge (15 bytes at most, with its "0"), a cgroup and a table.
        if not re.fullmatch(r"[a-z][a-z0-9]{0,9}", self.instance):
            raise InvalidSettings(
                f"instance {self.instance!r}: use 1-10 lowercase letters and digits, "
                "starting with a letter"
            )
        self.warm_pool_sizes()  # (raises on a malformed value)
        for name in (
            "header_timeout_s",
            "body_timeout_s",
            "max_connections",
            "max_streams_per_key",
        ):
            if getattr(self, name) < 1:
                raise InvalidSettings(f"{name} must be at least 1, got {getattr(self, name)}")

    def warm_pool_sizes(self) -> dict[str, int]:
        """``warm_pool`` as template name → how many to keep ready (0s left out)."""
        sizes: dict[str, int] = {}
        for entry in self.warm_pool.replace(" ", "").split(","):
            if not entry:
                continue
            name, sep, count = entry.partition("=")
            if not sep or not name or not count.isdigit() or int(count) > MAX_WARM_POOL:
                raise InvalidSettings(
                    f"warm pool {entry!r}: use TEMPLATE=COUNT (0 to {MAX_WARM_POOL}), "
                    "comma-separated"
                )
            if int(count):
                sizes[name] = int(count)
            else:
                sizes.pop(name, None)
        return sizes


# Each pooled sandbox holds memory and an address while it waits: a typo must not take them all.
MAX_WARM_POOL = 64


def _int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise InvalidSettings(f"{name} must be a whole number, got {raw!r}") from None
