"""Shared fixtures: one runtime for the session; a check that the suite leaves nothing behind."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from bilik.runtime import LocalRuntime, SandboxInfo, SandboxSpec
from bilik.runtime.network import HostNetwork
from bilik.templates import default_builds
from bilik.templates.defaults import BASE
from helpers import INET_HOST, INET_NET, INET_PEER, SETTINGS, host_state, sh
from postgres import postgres_server
from server import BilikServer

INET_NS = "bilik-test-inet"
PRIVATE_PEER = "192.168.213.2"


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[None]:
    """Fail the run if the suite leaves any mount, netns, veth, cgroup, process or container."""
    before = host_state(SETTINGS)
    yield
    after = host_state(SETTINGS)
    HostNetwork(SETTINGS.instance, SETTINGS.subnet).teardown()
    leaked = {k: sorted(set(after[k]) - set(before[k])) for k in after}
    leaked = {k: v for k, v in leaked.items() if v}
    if leaked:
        pytest.fail(f"the test suite left these behind: {leaked}", pytrace=False)


@pytest_asyncio.fixture(scope="session")
async def runtime(internet: dict[str, str]) -> AsyncIterator[LocalRuntime]:
    """The runtime as the server runs it: host prepared, reconciled, DNS forwarder up, and
    ``base`` (what a create with no template gets) built."""

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    # Built as a server would: its build sandboxes resolve names through the host's resolvers
    # (this runtime's, the test internet's only).
    builder = LocalRuntime(dataclasses.replace(SETTINGS, dns_upstream=""), log=log)
    await builder.start()
    try:
        async with default_builds.outside_a_server(builder) as defaults:
            await defaults.ensure(BASE, log=log)
    finally:
        await builder.close()
    rt = LocalRuntime(SETTINGS, log=log)
    await rt.start()
    await rt.reconcile()
    dns = await rt.serve_dns()
    yield rt
    await dns.close()
    await rt.close()


@pytest.fixture(scope="module")
def oci_runtime() -> str | None:
    """The OCI runtime of the sandboxes a test makes; None: the server's (crun). The isolation
    suites run under each runtime (``helpers.EACH_OCI_RUNTIME``)."""
    return None


@pytest_asyncio.fixture
async def sandbox(runtime: LocalRuntime, oci_runtime: str | None) -> AsyncIterator[SandboxInfo]:
    """A sandbox of the test's own, to change as it likes."""
    info = await runtime.create(SandboxSpec(), oci_runtime=oci_runtime)
    yield info
    await runtime.kill(info.sandbox_id)


@pytest_asyncio.fixture(scope="module")
async def shared_sandbox(
    runtime: LocalRuntime, oci_runtime: str | None
) -> AsyncIterator[SandboxInfo]:
    """A sandbox the module's tests share (one per OCI runtime): for tests that only look."""
    info = await runtime.create(SandboxSpec(), oci_runtime=oci_runtime)
    yield info
    await runtime.kill(info.sandbox_id)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL for the session, started (and removed) by the tests themselves."""
    with postgres_server() as url:
        yield url


@pytest.fixture
def server() -> Iterator[BilikServer]:
    """A real ``bilik serve`` on its own instance; checked for leftovers when the test ends."""
    srv = BilikServer()
    yield srv
    srv.finish()


@pytest.fixture(scope="session")
def internet() -> Iterator[dict[str, str]]:
    """A stand-in for the internet: a host in a network namespace on a documentation range the
    host does not use (``INET_NET``), routed from the host, serving HTTP on port 8080 and DNS
    for names under ``.test``; and a host on a private range, 192.168.213.2, which sandboxes
    must never reach."""
    sh("ip", "netns", "del", INET_NS, check=False)
    sh("ip", "link", "del", "bkt-inet", check=False)
    sh("ip", "netns", "add", INET_NS)
    sh("ip", "link", "add", "bkt-inet", "type", "veth", "peer", "name", "eth0", "netns", INET_NS)
    sh("ip", "addr", "add", f"{INET_HOST}/{INET_NET.prefixlen}", "dev", "bkt-inet")
    sh("ip", "link", "set", "bkt-inet", "up")
    sh("ip", "route", "add", "192.168.213.0/24", "via", INET_PEER)
    for cmd in (
        ["ip", "addr", "add", f"{INET_PEER}/{INET_NET.prefixlen}", "dev", "eth0"],
        ["ip", "addr", "add", f"{PRIVATE_PEER}/32", "dev", "lo"],
        ["ip", "link", "set", "eth0", "up"],
        ["ip", "link", "set", "lo", "up"],
    ):
        sh("ip", "netns", "exec", INET_NS, *cmd)
    servers = [
        subprocess.Popen(
            ["ip", "netns", "exec", INET_NS, *cmd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for cmd in (
            [sys.executable, "-m", "http.server", "--bind", "0.0.0.0", "8080"],
            [sys.executable, str(Path(__file__).with_name("fake_dns.py")), INET_PEER],
        )
    ]
    _wait_port(INET_NS, 8080)
    try:
        yield {"public": INET_PEER, "private": PRIVATE_PEER}
    finally:
        for server in servers:
            server.kill()
            server.wait()
        sh("ip", "route", "del", "192.168.213.0/24", check=False)
        sh("ip", "link", "del", "bkt-inet", check=False)
        sh("ip", "netns", "del", INET_NS, check=False)


def _wait_port(netns: str, port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = sh(
            "ip",
            "netns",
            "exec",
            netns,
            "bash",
            "-c",
            f"exec 3<>/dev/tcp/127.0.0.1/{port}",
            check=False,
        )
        if probe.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"port {port} in {netns} never opened")
