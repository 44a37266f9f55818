"""What the benchmarks share: a real ``bilik serve`` of their own, and a client that speaks
the wire protocol the SDKs speak (REST for the control plane, Connect JSON envelopes and
``/files`` for envd, through the server's one port)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import httpx

from bilik.config import Settings
from bilik.store import Store, database_url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def envelope(message: dict[str, object]) -> bytes:
    payload = json.dumps(message).encode()
    return b"\0" + len(payload).to_bytes(4, "big") + payload


class Server:
    """``bilik serve`` on the bench's instance, in a process of its own."""

    def __init__(self, settings: Settings, warm_pool: str = "") -> None:
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "BILIK_DATA_DIR": str(settings.data_dir),
            "BILIK_INSTANCE": settings.instance,
            "BILIK_SUBNET": settings.subnet,
            "BILIK_PORT": str(self.port),
            # No warm pool unless the bench asks: pooled sandboxes starting in the background
            # would time themselves into every other figure.
            "BILIK_WARM_POOL": warm_pool,
            "BILIK_OCI_RUNTIME": settings.oci_runtime,
        }
        log = open(settings.data_dir / "bench-server.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bilik.cli", "serve"], env=env, stdout=log, stderr=log
        )

    async def ready(self) -> None:
        async with httpx.AsyncClient() as client:
            for _ in range(600):
                if self.proc.poll() is not None:
                    raise SystemExit("bilik serve exited; see bench-server.log in the data dir")
                try:
                    if (await client.get(f"{self.url}/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        raise SystemExit("bilik serve never became ready")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


@contextlib.asynccontextmanager
async def serving(settings: Settings, warm_pool: str = "") -> AsyncIterator[tuple[str, str]]:
    """A ready server of the bench's own (with the warm pools ``warm_pool`` names, none by
    default), and a new key: ``(url, key)``; stopped afterwards."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    server = Server(settings, warm_pool)
    try:
        await server.ready()
        yield server.url, await new_key(settings)
    finally:
        server.stop()


async def new_key(settings: Settings) -> str:
    store = await Store.open(database_url(settings.data_dir, settings.database_url))
    try:
        _, key = await store.keys.create("bench")
        return key
    finally:
        await store.close()


class BenchSandbox:
    def __init__(self, client: httpx.AsyncClient, created: dict[str, str]) -> None:
        self.client = client
        self.id = created["sandboxID"]
        self.headers = {
            "E2b-Sandbox-Id": self.id,
            "E2b-Sandbox-Port": "49983",
            "X-Access-Token": created["envdAccessToken"],
        }

    async def run(self, cmd: str) -> int:
        body = envelope({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd]}})
        headers = {**self.headers, "Content-Type": "application/connect+json"}
        response = await self.client.post("/process.Process/Start", content=body, headers=headers)
        if b'"end"' not in response.content:
            raise SystemExit(f"no end event: {response.content[:200]!r}")
        return len(response.content)

    async def first_output(self, cmd: str) -> float:
        """Start ``cmd`` as ``commands.run`` does; returns when (``time.perf_counter()``) its
        first output arrived. The stream is read to its end."""
        body = envelope({"process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd]}})
        headers = {**self.headers, "Content-Type": "application/connect+json"}
        buffer = b""
        arrived = None
        async with self.client.stream(
            "POST", "/process.Process/Start", content=body, headers=headers
        ) as response:
            async for chunk in response.aiter_raw():
                buffer += chunk
                if arrived is None and b'"data"' in buffer:
                    arrived = time.perf_counter()
        if arrived is not None:
            return arrived
        raise SystemExit(f"no output: {buffer[:200]!r}")

    async def write(self, path: str, data: bytes | AsyncIterator[bytes]) -> None:
        response = await self.client.post(
            "/files",
            params={"path": path},
            content=data,
            headers={**self.headers, "Content-Type": "application/octet-stream"},
        )
        response.raise_for_status()

    async def read(self, path: str) -> bytes:
        response = await self.client.get("/files", params={"path": path}, headers=self.headers)
        response.raise_for_status()
        return response.content


async def create(client: httpx.AsyncClient, key: str) -> BenchSandbox:
    response = await client.post(
        "/sandboxes", json={"templateID": "base", "timeout": 3600}, headers={"X-API-Key": key}
    )
    if response.status_code != 201:
        raise SystemExit(f"create failed: {response.status_code} {response.text}")
    return BenchSandbox(client, response.json())


async def kill(client: httpx.AsyncClient, key: str, sandbox_id: str) -> None:
    await client.delete(f"/sandboxes/{sandbox_id}", headers={"X-API-Key": key})
