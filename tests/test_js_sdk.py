"""The official JavaScript SDKs (``e2b`` and ``@e2b/code-interpreter`` from npm) against a real
``bilik serve``: the suite in ``tests/js`` runs under node's own test runner.

Its dependencies are pinned in ``tests/js/package-lock.json`` and installed by
``scripts/install.sh --test`` (``npm ci``). The SDKs read the server's address and key from the
environment given here, so nothing they do can reach past this machine's loopback.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from server import BilikServer, code_interpreter_server

JS_DIR = Path(__file__).with_name("js")


@pytest.fixture(scope="module")
def js_server() -> Iterator[BilikServer]:
    with code_interpreter_server() as srv:
        yield srv


def test_the_js_suite(js_server: BilikServer) -> None:
    # (scripts/install.sh --test puts a node of its own there where the host's is too old)
    own = JS_DIR.parents[1] / ".venv-node" / "bin" / "node"
    node = str(own) if own.exists() else shutil.which("node")
    assert node, "node is missing: run scripts/install.sh --test"
    assert (JS_DIR / "node_modules" / "e2b").is_dir(), "run scripts/install.sh --test (npm ci)"
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "E2B_API_URL": js_server.url,
        "E2B_SANDBOX_URL": js_server.url,
        "E2B_API_KEY": js_server.key,
        # Whatever the SDKs would name by domain stays on loopback too.
        "E2B_DOMAIN": "localhost",
    }
    files = sorted(p.name for p in JS_DIR.glob("*.test.mjs"))
    run = subprocess.run(
        [node, "--test", "--test-concurrency=1", "--test-reporter=tap", *files],
        cwd=JS_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(run.stdout)
    assert run.returncode == 0, f"node --test failed:\n{run.stdout}\n{run.stderr}"
    # Every test ran (a file that fails to load, or tests never reached, count as none).
    written = sum(
        len(re.findall(r"^\s*test\(", (JS_DIR / name).read_text(), re.MULTILINE)) for name in files
    )
    assert f"\n# pass {written}\n" in run.stdout, run.stdout
