"""The tables, and the migrations that make them: applied in order, each exactly once."""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    # Only a hash of the key is kept; the key itself is shown once, when it is made.
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
    # Operator caps for this key; NULL means no cap beyond the server's own.
    sa.Column("max_sandboxes", sa.Integer, nullable=True),
    sa.Column("creates_per_minute", sa.Integer, nullable=True),
    sa.Column("max_timeout_s", sa.Integer, nullable=True),
    sa.Column("max_cpu", sa.Integer, nullable=True),
    sa.Column("max_memory_mb", sa.Integer, nullable=True),
    # The team the key acts for (E2B's unit of ownership): what its sandboxes and templates
    # belong to. A key made by the operator is a team of its own (its own id); a key made
    # through the API joins the team of the key that made it.
    sa.Column("team_id", sa.String(32), nullable=True),  # (set on every key)
    # The key's last characters, to tell keys apart in listings (E2B's masked suffix).
    sa.Column("suffix", sa.String(8), nullable=False, server_default=""),
)


# What the API knows of a sandbox beyond the runtime's own record: who owns it, and what the
# owner attached to it. The runtime's record says whether it still runs.
sandboxes = sa.Table(
    "sandboxes",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("key_id", sa.String(32), nullable=False, index=True),
    sa.Column("template_id", sa.String(256), nullable=False),
    sa.Column("metadata", sa.Text, nullable=False),  # JSON object of strings
    sa.Column("envd_access_token", sa.String(64), nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    # Where its lifecycle is (``bilik.sandboxes.states``): recorded before each step acts, so
    # a start after a crash finds the creates it cut short.
    sa.Column("state", sa.String(16), nullable=False, server_default="running"),
    # What its timeout does ("kill" or "pause"), how such a pause keeps it (memory or files
    # only), and whether a request to a paused one resumes it (E2B's lifecycle).
    sa.Column("on_timeout", sa.String(8), nullable=False, server_default="kill"),
    sa.Column("auto_pause_memory", sa.Boolean, nullable=False, server_default=sa.true()),
    sa.Column("auto_resume", sa.Boolean, nullable=False, server_default=sa.false()),
    # The timeout it was made with: what a resume by traffic gives it again.
    sa.Column("timeout_s", sa.Integer, nullable=False, server_default="300"),
    # While paused: since when (kept until then plus the retention), and whether with memory.
    sa.Column("paused_at", sa.Float, nullable=True),
    sa.Column("pause_memory", sa.Boolean, nullable=True),
)


# A key's templates: a name the key picks, its latest build and what sandboxes get by default.
templates = sa.Table(
    "templates",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("key_id", sa.String(32), nullable=False, index=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("cpu_count", sa.Integer, nullable=False),
    sa.Column("memory_mb", sa.Integer, nullable=False),
    # The build that made the image sandboxes start from (NULL until one is ready).
    sa.Column("ready_build_id", sa.String(64), nullable=True),
    # A snapshot's: the sandbox it was taken of (NULL for a built template).
    sa.Column("source_sandbox_id", sa.String(32), nullable=True),
    sa.UniqueConstraint("key_id", "name"),
)

template_builds = sa.Table(
    "template_builds",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("template_id", sa.String(32), nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False),  # waiting building ready error
    sa.Column("reason", sa.Text, nullable=True),  # JSON {message, step?} when it failed
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=True),
    # Tags the build takes when it is ready (JSON list), besides "default".
    sa.Column("tags", sa.Text, nullable=True),
)

# A tag names one build of a template ("name:tag"); "default" is the latest ready one.
template_tags = sa.Table(
    "template_tags",
    metadata,
    sa.Column("template_id", sa.String(32), primary_key=True),
    sa.Column("tag", sa.String(128), primary_key=True),
    sa.Column("build_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)


# Each migration spells out its own DDL: the tables above describe the latest schema, and a
# migration must keep doing exactly what it did when it was released.


def _v1_api_keys(conn: Connection) -> None:
    sa.Table(
        "api_keys",
        sa.MetaData(),
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("revoked_at", sa.Float, nullable=True),
    ).create(conn)


def _v2_sandboxes(conn: Connection) -> None:
    sa.Table(
        "sandboxes",
        sa.MetaData(),
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("key_id", sa.String(32), nullable=False, index=True),
        sa.Column("template_id", sa.String(256), nullable=False),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("envd_access_token", sa.String(64), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
    ).create(conn)


# Creates sent with an Idempotency-Key: a repeat returns the sandbox the first one made.
idempotency = sa.Table(
    "idempotency",
    metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("idempotency_key", sa.String(200), primary_key=True),
    sa.Column("sandbox_id", sa.String(32), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)


_V3_KEY_COLUMNS = ("max_sandboxes", "creates_per_minute", "max_timeout_s")


def _v3_key_caps(conn: Connection) -> None:
    for column in _V3_KEY_COLUMNS:
        conn.execute(sa.text(f"ALTER TABLE api_keys ADD COLUMN {column} INTEGER"))


def _v4_idempotency(conn: Connection) -> None:
    sa.Table(
        "idempotency",
        sa.MetaData(),
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("idempotency_key", sa.String(200), primary_key=True),
        sa.Column("sandbox_id", sa.String(32), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    ).create(conn)


def _v5_key_resource_caps(conn: Connection) -> None:
    for column in ("max_cpu", "max_memory_mb"):
        conn.execute(sa.text(f"ALTER TABLE api_keys ADD COLUMN {column} INTEGER"))


def _v6_templates(conn: Connection) -> None:
    meta = sa.MetaData()
    sa.Table(
        "templates",
        meta,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("key_id", sa.String(32), nullable=False, index=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("cpu_count", sa.Integer, nullable=False),
        sa.Column("memory_mb", sa.Integer, nullable=False),
        sa.Column("ready_build_id", sa.String(64), nullable=True),
        sa.UniqueConstraint("key_id", "name"),
    )
    sa.Table(
        "template_builds",
        meta,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("template_id", sa.String(32), nullable=False, index=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float, nullable=True),
    )
    meta.create_all(conn)


def _v7_template_tags(conn: Connection) -> None:
    conn.execute(sa.text("ALTER TABLE template_builds ADD COLUMN tags TEXT"))
    sa.Table(
        "template_tags",
        sa.MetaData(),
        sa.Column("template_id", sa.String(32), primary_key=True),
        sa.Column("tag", sa.String(128), primary_key=True),
        sa.Column("build_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    ).create(conn)


def _v8_sandbox_state(conn: Connection) -> None:
    # (Every sandbox recorded before this ran was running.)
    conn.execute(
        sa.text("ALTER TABLE sandboxes ADD COLUMN state VARCHAR(16) NOT NULL DEFAULT 'running'")
    )


def _v9_key_teams(conn: Connection) -> None:
    # (Every key made before this is a team of its own.)
    conn.execute(sa.text("ALTER TABLE api_keys ADD COLUMN team_id VARCHAR(32)"))
    conn.execute(sa.text("UPDATE api_keys SET team_id = id"))
    conn.execute(sa.text("ALTER TABLE api_keys ADD COLUMN suffix VARCHAR(8) NOT NULL DEFAULT ''"))


def _v10_pause(conn: Connection) -> None:
    # (Every sandbox recorded before this ran is killed at its timeout, as it was made to be.)
    for column in (
        "on_timeout VARCHAR(8) NOT NULL DEFAULT 'kill'",
        "auto_pause_memory BOOLEAN NOT NULL DEFAULT TRUE",
        "auto_resume BOOLEAN NOT NULL DEFAULT FALSE",
        "timeout_s INTEGER NOT NULL DEFAULT 300",
        "paused_at FLOAT",
        "pause_memory BOOLEAN",
    ):
        conn.execute(sa.text(f"ALTER TABLE sandboxes ADD COLUMN {column}"))
    conn.execute(sa.text("ALTER TABLE templates ADD COLUMN source_sandbox_id VARCHAR(32)"))


# Append only: a released migration never changes, a new one goes at the end.
MIGRATIONS: list[Callable[[Connection], None]] = [
    _v1_api_keys,
    _v2_sandboxes,
    _v3_key_caps,
    _v4_idempotency,
    _v5_key_resource_caps,
    _v6_templates,
    _v7_template_tags,
    _v8_sandbox_state,
    _v9_key_teams,
    _v10_pause,
]


def migrate(conn: Connection) -> int:
    """Bring the schema up to date; returns the version it is at."""
    schema_version.create(conn, checkfirst=True)
    row = conn.execute(sa.select(schema_version.c.version)).first()
    current = row.version if row else 0
    if row is None:
        conn.execute(schema_version.insert().values(version=0))
    for version, step in enumerate(MIGRATIONS[current:], start=current + 1):
        step(conn)
        conn.execute(schema_version.update().values(version=version))
    return len(MIGRATIONS)
