"""Egress only: the host, other sandboxes, link-local and private ranges are never reachable."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from bilik.runtime import LocalRuntime, SandboxInfo, SandboxSpec
from helpers import EACH_OCI_RUNTIME, SETTINGS, run_ok, sh, wait_for

pytestmark = EACH_OCI_RUNTIME

METADATA = "169.254.169.254"


def curl(url: str) -> list[str]:
    return ["curl", "-sS", "--max-time", "2", "-o", "/dev/null", "-w", "%{http_code}", url]


@pytest.fixture(scope="module")
def host_servers() -> Iterator[dict[str, str]]:
    """HTTP servers on the host: on loopback, on the bridge's address, on the metadata address."""
    sh("ip", "addr", "add", f"{METADATA}/32", "dev", "lo", check=False)
    gateway = "10.214.0.1"
    servers = []
    urls = {}
    for name, address, port in (
        ("loopback", "127.0.0.1", 18081),
        ("bridge", gateway, 18082),
        ("any", "0.0.0.0", 18083),
        ("metadata", METADATA, 18084),
    ):
        servers.append(
            subprocess.Popen(
                [sys.executable, "-m", "http.server", "--bind", address, str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        target = gateway if address == "0.0.0.0" else address
        urls[name] = f"http://{target}:{port}/"
    try:
        for url in urls.values():
            for _ in range(50):
                if sh("curl", "-s", "-o", "/dev/null", url, check=False).returncode == 0:
                    break
                subprocess.run(["sleep", "0.1"])
        yield urls
    finally:
        for server in servers:
            server.kill()
            server.wait()
        sh("ip", "addr", "del", f"{METADATA}/32", "dev", "lo", check=False)


async def test_internet_is_reachable_when_on(
    runtime: LocalRuntime, shared_sandbox: SandboxInfo, internet: dict[str, str]
) -> None:
    result = await runtime.run(
        shared_sandbox.sandbox_id, curl(f"http://{internet['public']}:8080/")
    )
    assert result.stdout == b"200", result


async def test_internet_is_unreachable_when_off(
    runtime: LocalRuntime, internet: dict[str, str], oci_runtime: str
) -> None:
    info = await runtime.create(SandboxSpec(internet=False), oci_runtime=oci_runtime)
    try:
        result = await runtime.run(info.sandbox_id, curl(f"http://{internet['public']}:8080/"))
        assert result.exit_code != 0 and result.stdout != b"200"
    finally:
        await runtime.kill(info.sandbox_id)


async def test_private_ranges_are_unreachable(
    runtime: LocalRuntime, shared_sandbox: SandboxInfo, internet: dict[str, str]
) -> None:
    # The private host is routed from the host just like the public one, yet blocked.
    assert (
        sh(
            "curl", "-s", "--max-time", "2", f"http://{internet['private']}:8080/", check=False
        ).returncode
        == 0
    )
    result = await runtime.run(
        shared_sandbox.sandbox_id, curl(f"http://{internet['private']}:8080/")
    )
    assert result.exit_code != 0


@pytest.mark.parametrize("target", ["loopback", "bridge", "any", "metadata"])
async def test_host_is_unreachable(
    runtime: LocalRuntime, shared_sandbox: SandboxInfo, host_servers: dict[str, str], target: str
) -> None:
    assert sh("curl", "-s", "--max-time", "2", host_servers[target], check=False).returncode == 0
    result = await runtime.run(shared_sandbox.sandbox_id, curl(host_servers[target]))
    assert result.exit_code != 0, result


async def test_other_sandboxes_are_unreachable(
    runtime: LocalRuntime, shared_sandbox: SandboxInfo, oci_runtime: str
) -> None:
    other = await runtime.create(SandboxSpec(), oci_runtime=oci_runtime)
    server = await runtime.exec(
        other.sandbox_id, ["python3", "-m", "http.server", "--bind", "0.0.0.0", "8000"]
    )
    try:
        url = f"http://{other.address}:8000/"

        async def serving() -> bool:
            result = await runtime.run(other.sandbox_id, curl(url))
            return result.stdout == b"200"

        assert await wait_for(serving)
        result = await runtime.run(shared_sandbox.sandbox_id, curl(url))
        assert result.exit_code != 0, result
        # The host can reach a sandbox's ports (the sandbox plane proxies to them).
        assert sh("curl", "-s", "--max-time", "2", url, check=False).returncode == 0
    finally:
        server.kill()
        await server.wait()
        await runtime.kill(other.sandbox_id)


async def test_addresses_and_rules_are_released_on_kill(
    runtime: LocalRuntime, oci_runtime: str
) -> None:
    info = await runtime.create(SandboxSpec(internet=False), oci_runtime=oci_runtime)
    assert info.address in runtime.network.offline_addresses()
    await runtime.kill(info.sandbox_id)
    assert info.address not in runtime.network.offline_addresses()
    again = await runtime.create(SandboxSpec(), oci_runtime=oci_runtime)
    try:
        assert again.address == info.address  # the address went back to the pool
        assert await run_ok(runtime, again.sandbox_id, "hostname") == f"{again.sandbox_id}\n"
    finally:
        await runtime.kill(again.sandbox_id)
    assert SETTINGS.instance in runtime.network.bridge


async def test_names_resolve_through_the_gateway(
    runtime: LocalRuntime, shared_sandbox: SandboxInfo, internet: dict[str, str]
) -> None:
    resolv = await run_ok(runtime, shared_sandbox.sandbox_id, "cat /etc/resolv.conf")
    assert resolv.split() == ["nameserver", "10.214.0.1"]
    resolved = await run_ok(runtime, shared_sandbox.sandbox_id, "getent hosts example.test")
    assert resolved.split()[0] == internet["public"]
    fetched = await runtime.run(shared_sandbox.sandbox_id, curl("http://example.test:8080/"))
    assert fetched.stdout == b"200", fetched
    # TCP too (large answers fall back to it).
    tcp = await run_ok(
        runtime,
        shared_sandbox.sandbox_id,
        "python3 -c \"import socket, struct; s = socket.create_connection(('10.214.0.1', 53),"
        " timeout=3); q = bytes.fromhex('abcd01000001000000000000') + b'\\x07example\\x04test\\x00'"
        " + bytes.fromhex('00010001'); s.sendall(struct.pack('!H', len(q)) + q);"
        " n = struct.unpack('!H', s.recv(2))[0]; print(s.recv(n)[-4:].hex())\"",
    )
    assert tcp.strip() == socket.inet_aton(internet["public"]).hex()
    missing = await runtime.run(shared_sandbox.sandbox_id, ["getent", "hosts", "nowhere.invalid"])
    assert missing.exit_code != 0


async def test_no_dns_without_internet(runtime: LocalRuntime, oci_runtime: str) -> None:
    info = await runtime.create(SandboxSpec(internet=False), oci_runtime=oci_runtime)
    try:
        result = await runtime.run(info.sandbox_id, ["getent", "hosts", "example.test"])
        assert result.exit_code != 0
    finally:
        await runtime.kill(info.sandbox_id)


# -- per-sandbox egress rules (E2B's network.allowOut / denyOut) ------------------------------


def _table_elements(address: str) -> list[str]:
    """Every line of the instance's nftables table that names ``address``."""
    listing = sh("nft", "list", "table", "inet", SETTINGS.instance).stdout
    return [line for line in listing.splitlines() if f"{address} " in line or f"{address}," in line]


async def test_denied_destinations_are_unreachable(
    runtime: LocalRuntime, internet: dict[str, str], oci_runtime: str
) -> None:
    public = internet["public"]
    info = await runtime.create(SandboxSpec(deny_out=(f"{public}/32",)), oci_runtime=oci_runtime)
    try:
        denied = await runtime.run(info.sandbox_id, curl(f"http://{public}:8080/"))
        assert denied.stdout != b"200", denied
    finally:
        await runtime.kill(info.sandbox_id)


async def test_allowed_destinations_with_internet_off(
    runtime: LocalRuntime, internet: dict[str, str], oci_runtime: str
) -> None:
    public = internet["public"]
    info = await runtime.create(
        SandboxSpec(internet=False, allow_out=(f"{public}/24",), deny_out=("0.0.0.0/0",)),
        oci_runtime=oci_runtime,
    )
    try:
        allowed = await runtime.run(info.sandbox_id, curl(f"http://{public}:8080/"))
        assert allowed.stdout == b"200", allowed  # an allow wins over internet off and denies
        # No domain is allowed, so no DNS.
        names = await runtime.run(info.sandbox_id, ["getent", "hosts", "example.test"])
        assert names.exit_code != 0
        # Never the always-blocked ranges, allowed or not.
        private = await runtime.run(info.sandbox_id, curl(f"http://{internet['private']}:8080/"))
        assert private.stdout != b"200"
    finally:
        await runtime.kill(info.sandbox_id)


async def test_allowed_domains_with_internet_off(
    runtime: LocalRuntime, internet: dict[str, str], oci_runtime: str
) -> None:
    public = internet["public"]
    info = await runtime.create(
        SandboxSpec(internet=False, allow_out=("web.test", "*.api.test")), oci_runtime=oci_runtime
    )
    sandbox_id = info.sandbox_id
    try:
        before = await runtime.run(sandbox_id, curl(f"http://{public}:8080/"))
        assert before.stdout != b"200"  # not yet: nothing resolved
        other = await runtime.run(sandbox_id, ["getent", "hosts", "other.test"])
        assert other.exit_code != 0  # names it does not allow are not answered
        resolved = await run_ok(runtime, sandbox_id, "getent hosts web.test")
        assert resolved.split()[0] == public
        fetched = await runtime.run(sandbox_id, curl("http://web.test:8080/"))
        assert fetched.stdout == b"200", fetched
        sub = await run_ok(runtime, sandbox_id, "getent hosts v1.api.test")
        assert sub.split()[0] == public
        apex = await runtime.run(sandbox_id, ["getent", "hosts", "api.test"])
        assert apex.exit_code != 0  # "*." names subdomains only
    finally:
        await runtime.kill(sandbox_id)
    # Everything the sandbox's rules added is gone with it, learned addresses included.
    assert _table_elements(info.address) == []
