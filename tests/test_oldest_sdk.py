"""The oldest official SDKs bilik supports, as the client of a part of this suite.

``scripts/install.sh --test`` installs the pins of ``tests/constraints-oldest.txt`` into
``.venv-oldest`` (the newest tested, ``tests/constraints.txt``, go into ``.venv``). Running the
whole suite twice would take too long: the tests below cover the lifecycle, files, commands, a
PTY, ``run_code`` and a template build, and run as they are written, in a pytest of that
virtualenv. Tests of calls newer than those SDKs are left out.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLDEST_PYTHON = ROOT / ".venv-oldest" / "bin" / "python"

SELECTED = [
    "tests/test_api.py::test_lifecycle_with_the_official_sdk[sqlite]",
    "tests/test_api.py::test_lifecycle_with_the_async_sdk",
    "tests/test_envd.py::test_list_exists_make_dir_rename_remove",
    "tests/test_envd.py::test_watch_dir_sync",
    "tests/test_envd.py::test_run_output_exit_codes_env_and_users",
    "tests/test_envd.py::test_streaming_callbacks_and_background",
    "tests/test_envd.py::test_kill_list_and_connect_after_disconnect",
    "tests/test_envd.py::test_timeouts_end_the_process",
    "tests/test_envd.py::test_pty_input_resize_and_kill",
    "tests/test_interpreter.py::test_state_carries_over",
    "tests/test_interpreter.py::test_output_streams_as_it_comes",
    "tests/test_interpreter.py::test_rich_results",
    "tests/test_interpreter.py::test_contexts_and_env_vars",
    "tests/test_interpreter.py::test_javascript_and_typescript",
    "tests/test_templates.py::test_build_cache_and_sandboxes_from_it",
]


def _pins(constraints: Path) -> dict[str, str]:
    lines = (line.split("#")[0].strip() for line in constraints.read_text().splitlines())
    return dict(line.split("==") for line in lines if line)


def test_the_oldest_supported_sdks() -> None:
    assert OLDEST_PYTHON.exists(), "run scripts/install.sh --test"
    pins = _pins(ROOT / "tests" / "constraints-oldest.txt")
    installed = subprocess.run(
        [
            str(OLDEST_PYTHON),
            "-c",
            "import importlib.metadata as m, sys\n"
            "print(*(f'{n}=={m.version(n)}' for n in sys.argv[1:]))",
            *pins,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert installed == [f"{name}=={version}" for name, version in pins.items()]
    # Without the suite's conftest: its session fixtures would set up and tear down host state
    # that this session holds. This session's own check for leftovers covers that run too.
    run = subprocess.run(
        [
            str(OLDEST_PYTHON),
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--noconftest",
            "-q",
            *SELECTED,
        ],
        cwd=ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, f"with {pins}:\n{run.stdout[-20000:]}\n{run.stderr[-5000:]}"
