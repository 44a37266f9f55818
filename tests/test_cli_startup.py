"""The ``bilik`` command starts without loading what its command does not need: parsing the
command line (``--help``, a usage mistake) imports neither the server, the runtime, the store
nor the SDK. (How long that takes is ``bilik bench cli``'s to measure; this holds the
behaviour that makes it short.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bilik import cli
from bilik.runtime.backends import RUNTIMES
from bilik.runtime.spec import MIN_DISK_MB, MIN_MEMORY_MB
from bilik.templates.defaults import DEFAULTS
from helpers import SETTINGS, settings_env

BILIK = os.path.join(os.path.dirname(sys.executable), "bilik")

# What only a command's work needs: never loaded to parse its command line.
HEAVY = (
    "asyncio",
    "uvicorn",
    "starlette",
    "httpx",
    "sqlalchemy",
    "pyroute2",
    "connectrpc",
    "bilik.api",
    "bilik.runtime",
    "bilik.sandboxes",
    "bilik.store",
    "bilik.templates",
    "bilik.sdk",
    "bilik.plane",
)


def _imported(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the installed ``bilik ARGS``; what it did and every module it imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", BILIK, *args],
        env=settings_env(SETTINGS),
        capture_output=True,
        text=True,
        timeout=60,
    )
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return done, modules


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["sandbox", "--help"],
        ["sandbox", "create", "--help"],
        ["sandbox", "spawn", "--help"],
        ["sandbox", "pause", "--help"],
        ["sandbox", "fork", "--help"],
        ["template", "build", "--help"],
        ["keys", "create", "--help"],
        ["bench", "--help"],
        ["sandbox", "create", "--no-such-option"],
    ],
)
def test_parsing_loads_nothing_heavy(args: list[str]) -> None:
    done, modules = _imported(*args)
    assert done.returncode in (0, 2), done.stderr
    assert "bilik.cli" in modules  # (the real command ran)
    assert _heavy(modules) == [], f"bilik {' '.join(args)} imported {_heavy(modules)}"


def test_a_command_loads_what_it_needs() -> None:
    # The lazily loaded parts are loaded when the command runs (a list needs the runtime).
    done, modules = _imported("sandbox", "list", "--json")
    assert done.returncode == 0, done.stderr
    assert "bilik.runtime" in modules


def test_the_parsers_names_are_the_runtimes_and_templates() -> None:
    # Named in the CLI so that parsing needs neither; they must be the same.
    assert cli.OCI_RUNTIMES == RUNTIMES
    assert tuple(DEFAULTS) == cli.DEFAULT_TEMPLATES
    assert (cli.MIN_MEMORY_MB, cli.MIN_DISK_MB) == (MIN_MEMORY_MB, MIN_DISK_MB)
