"""A real ``bilik serve`` for tests, on an instance of its own (sharing the test layer cache)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import create_async_engine

from bilik.config import Settings
from bilik.runtime.network import HostNetwork
from bilik.store import database_url, schema
from helpers import DATA_DIR, SETTINGS, host_state, settings_env

SERVER_SETTINGS = Settings(data_dir=DATA_DIR / "server", instance="biltsrv", subnet="10.215.0.0/16")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _empty_database(url: str) -> None:
    """Drop every table, so the server's start is a first start on this database too."""
    engine = create_async_engine(database_url(Path("/nonexistent"), url))
    async with engine.begin() as conn:
        await conn.run_sync(schema.metadata.drop_all)
    await engine.dispose()


class BilikServer:
    """Start (and restart) the server; every run begins as a first start, with no key."""

    def __init__(
        self, database_url: str = "", warm_pool: str = "", env: dict[str, str] | None = None
    ) -> None:
        self.database_url = database_url
        # More settings of the server's own (BILIK_* variables).
        self.extra_env = dict(env or {})
        # Off unless a test asks: pooled sandboxes would change what other tests count and time.
        self.warm_pool = warm_pool
        data = SERVER_SETTINGS.data_dir
        data.mkdir(parents=True, exist_ok=True)
        for shared in ("layers", "images"):
            link = data / shared
            if not link.exists():
                (SETTINGS.data_dir / shared).mkdir(parents=True, exist_ok=True)
                link.symlink_to(SETTINGS.data_dir / shared)
        for first_start in ("bilik.db", "bilik.db-wal", "bilik.db-shm", "api-key"):
            (data / first_start).unlink(missing_ok=True)
        if database_url:
            asyncio.run(_empty_database(database_url))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        env = {**self.env(), "BILIK_PORT": str(self.port)}
        # The server's log, for when a test fails.
        with open(SERVER_SETTINGS.data_dir / "server.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bilik.cli", "serve"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            probe = subprocess.run(["curl", "-sf", f"{self.url}/health"], capture_output=True)
            if probe.returncode == 0:
                return proc
            assert proc.poll() is None, "bilik serve exited"
            time.sleep(0.1)
        raise AssertionError("bilik serve never became healthy")

    def peak_rss_kib(self) -> int:
        """The running server's peak resident memory so far."""
        status = Path(f"/proc/{self.procs[-1].pid}/status").read_text()
        return int(
            next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]
        )

    @property
    def key(self) -> str:
        """The key the first start made."""
        return (SERVER_SETTINGS.data_dir / "api-key").read_text().strip()

    def sdk_params(self) -> dict[str, Any]:
        """What the official SDKs' calls take to reach this server as its first key."""
        return {"api_key": self.key, "api_url": self.url, "sandbox_url": self.url}

    def env(self) -> dict[str, str]:
        """What the server and its CLI run with."""
        return {
            **settings_env(SERVER_SETTINGS),
            "BILIK_DATABASE_URL": self.database_url,
            "BILIK_WARM_POOL": self.warm_pool,
            # Templates whose ready check never passes fail in seconds, not a minute.
            "BILIK_READY_TIMEOUT_S": "5",
            **self.extra_env,
        }

    def cli(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bilik.cli", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def finish(self) -> None:
        """Stop every server, kill what is left, and fail if anything was left behind."""
        hung = []
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    # (killed, so that the tests after this one get a server of their own)
                    proc.kill()
                    proc.wait()
                    hung.append(proc.pid)
        rows = json.loads(self.cli("sandbox", "list", "--json").stdout)
        leftover = [row["sandboxId"] for row in rows]
        for sandbox_id in leftover:
            self.cli("sandbox", "kill", sandbox_id)
        HostNetwork(SERVER_SETTINGS.instance, SERVER_SETTINGS.subnet).teardown()
        assert not hung, f"bilik serve did not stop within 30 s of SIGINT: {hung}"
        assert not leftover, f"the server test left sandboxes running: {leftover}"
        # (veth names are not per instance: the session's leak check covers them)
        left = {k: v for k, v in host_state(SERVER_SETTINGS).items() if v and k != "veths"}
        assert not left, f"the server test left these behind: {left}"


@contextlib.contextmanager
def code_interpreter_server() -> Iterator[BilikServer]:
    """A started server with ``code-interpreter-v1`` built ahead, beside the server (whose DNS
    forwarder the build sandboxes use): the first create would otherwise wait for the build."""
    srv = BilikServer()
    try:
        srv.start()
        built = srv.cli("template", "build-default", "code-interpreter-v1", check=False)
        assert built.returncode == 0, built.stdout + built.stderr
        yield srv
    finally:
        srv.finish()
