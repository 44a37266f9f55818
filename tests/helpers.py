"""What tests share: settings for the test instance and looks at the host's state."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from bilik.config import Settings
from bilik.runtime import Runtime, cgroups, syscalls
from bilik.runtime.backends import RUNTIMES
from bilik.runtime.network import HostNetwork, veth_name

DATA_DIR = Path(os.environ.get("BILIK_TEST_DATA_DIR", "/var/lib/bilik-test"))
INSTANCE = "biltest"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=check, capture_output=True, text=True)


def _free_documentation_net() -> ipaddress.IPv4Network:
    """A documentation range (RFC 5737) this host does not use, for the test "internet".

    Hosts like this one may reach their package mirrors at documentation addresses; routing
    such a range into a test namespace would cut them off while the tests run.
    """
    used = []
    for line in sh("ip", "-4", "-o", "addr").stdout.splitlines():
        fields = line.split()
        if fields[1] != "bkt-inet":  # a stale test link of an earlier run does not count
            used.append(ipaddress.IPv4Network(fields[3], strict=False))
    for name in ("deb.debian.org", "security.debian.org", "pypi.org", "registry.npmjs.org"):
        for line in sh("getent", "ahostsv4", name, check=False).stdout.splitlines():
            used.append(ipaddress.IPv4Network(line.split()[0]))
    for candidate in ("198.51.100.0/24", "203.0.113.0/24", "192.0.2.0/24"):
        net = ipaddress.IPv4Network(candidate)
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("every documentation range is in use on this host")


# The test "internet": a host on a documentation range, in a namespace the tests create.
INET_NET = _free_documentation_net()
INET_HOST = str(INET_NET.network_address + 1)
INET_PEER = str(INET_NET.network_address + 2)

# For a module whose every test is to pass under each OCI runtime: ``pytestmark = EACH_OCI_RUNTIME``
# (its tests take the sandbox fixtures, or ``oci_runtime`` for the sandboxes they make). Scoped
# to the module, so its tests are grouped by runtime and can share one sandbox per runtime.
EACH_OCI_RUNTIME = pytest.mark.parametrize("oci_runtime", RUNTIMES, scope="module")

SETTINGS = Settings(
    data_dir=DATA_DIR / "main", instance=INSTANCE, subnet="10.214.0.0/16", dns_upstream=INET_PEER
)


def host_state(settings: Settings) -> dict[str, list[str]]:
    """Everything bilik makes per sandbox on the host, for one instance."""
    instance = settings.instance
    sandboxes = settings.data_dir / "sandboxes"
    veths = sorted(p.name for p in Path("/sys/class/net").iterdir() if p.name.startswith("bk"))
    state_root = Path("/run") / instance
    containers = []
    for runtime in RUNTIMES:
        with contextlib.suppress(FileNotFoundError):
            containers += [f"{runtime}:{p.name}" for p in (state_root / runtime).iterdir()]
    return {
        "mounts": syscalls.mounted_under(str(sandboxes)),
        "netns": HostNetwork(instance, settings.subnet).leftover_ids(),
        "veths": veths,
        "cgroups": cgroups.leftover_cgroups(instance),
        "processes": [str(p) for p in cgroups.pids_in(instance)],
        "containers": containers,
        "loop_devices": _loop_devices_under(sandboxes),
        "sandbox_dirs": sorted(p.name for p in sandboxes.iterdir()) if sandboxes.exists() else [],
    }


def sandbox_traces(settings: Settings, sandbox_id: str) -> dict[str, list[str]]:
    """What the host holds for one sandbox (its processes aside: they carry no id)."""
    state = host_state(settings)
    return {
        k: [v for v in vals if sandbox_id in v or v == veth_name(sandbox_id)]
        for k, vals in state.items()
        if k != "processes"
    }


def _loop_devices_under(root: Path) -> list[str]:
    devices = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().strip().startswith(str(root)):
                devices.append(backing.parent.parent.name)
    return sorted(devices)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that points the ``bilik`` command at ``settings``."""
    return {
        **os.environ,
        "BILIK_DATA_DIR": str(settings.data_dir),
        "BILIK_INSTANCE": settings.instance,
        "BILIK_SUBNET": settings.subnet,
    }


def bilik(
    *args: str, settings: Settings = SETTINGS, input: str | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the ``bilik`` command against ``settings``."""
    return subprocess.run(
        [sys.executable, "-m", "bilik.cli", *args],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
        input=input,
        check=check,
    )


async def run_ok(runtime: Runtime, sandbox_id: str, script: str, user: str = "root") -> str:
    """Run a shell script in the sandbox; fail the test with its output if it fails."""
    result = await runtime.run(sandbox_id, ["sh", "-c", script], user=user)
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return result.stdout.decode()


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.1)
    return False


# An older official SDK (2.20), in a virtualenv of its own (made by scripts/install.sh --test).
OLD_SDK_PYTHON = Path(__file__).resolve().parents[1] / ".venv-e2b-2.20" / "bin" / "python"


def make_wheel(directory: Path) -> None:
    """A pure-Python wheel, made by hand: pip installs it with no index."""
    files = {
        "bilikdemo/__init__.py": b'WORD = "from-a-wheel"\n',
        "bilikdemo-1.0.dist-info/METADATA": (
            b"Metadata-Version: 2.1\nName: bilikdemo\nVersion: 1.0\n"
        ),
        "bilikdemo-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("bilikdemo-1.0.dist-info/RECORD,,")
    directory.mkdir()
    with zipfile.ZipFile(directory / "bilikdemo-1.0-py3-none-any.whl", "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("bilikdemo-1.0.dist-info/RECORD", "\n".join(record) + "\n")
