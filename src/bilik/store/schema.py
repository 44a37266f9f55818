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
)


def _v1_api_keys(conn: Connection) -> None:
    api_keys.create(conn)


def _v2_sandboxes(conn: Connection) -> None:
    sandboxes.create(conn)


# Append only: a released migration never changes, a new one goes at the end.
MIGRATIONS: list[Callable[[Connection], None]] = [_v1_api_keys, _v2_sandboxes]


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
