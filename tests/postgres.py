"""A throwaway PostgreSQL server for the tests: its own cluster, on a unix socket only."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (scripts/install.sh --test installs it)")
    return found[-1]


def _as_postgres(*args: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True)


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a cluster and yield a database URL for it; stop and delete it afterwards."""
    root = tempfile.mkdtemp(prefix="bilik-pg-")
    shutil.chown(root, "postgres", "postgres")
    data, socket_dir = os.path.join(root, "data"), root
    _as_postgres(_bin("initdb"), "-D", data, "-A", "trust", "-U", "postgres")
    options = f"-k {socket_dir} -c listen_addresses='' -c fsync=off"
    # With a log file the server lets go of pg_ctl's output, so this returns once it is up.
    log = os.path.join(root, "server.log")
    _as_postgres(_bin("pg_ctl"), "-D", data, "-o", options, "-l", log, "-w", "start")
    try:
        _as_postgres(_bin("createdb"), "-h", socket_dir, "-U", "postgres", "bilik")
        yield f"postgresql://postgres@/bilik?host={socket_dir}"
    finally:
        _as_postgres(_bin("pg_ctl"), "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)
