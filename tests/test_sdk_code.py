"""bilik's own SDK and the code interpreter: ``run_code`` and contexts, sync and async."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bilik import AsyncSandbox, Sandbox
from bilik.sdk import ChartType, NotFoundException, OutputMessage, Result, TimeoutException
from server import BilikServer, code_interpreter_server


@pytest.fixture(scope="module")
def code_server() -> Iterator[BilikServer]:
    with code_interpreter_server() as srv:
        yield srv


def _opts(server: BilikServer) -> dict[str, Any]:
    return {"api_key": server.key, "api_url": server.url}


@pytest.fixture(scope="module")
def sbx(code_server: BilikServer) -> Iterator[Sandbox]:
    # The default template is the code interpreter's.
    with Sandbox.create(timeout=600, **_opts(code_server)) as sandbox:
        yield sandbox


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def asbx(code_server: BilikServer) -> AsyncIterator[AsyncSandbox]:
    async with await AsyncSandbox.create(timeout=600, **_opts(code_server)) as sandbox:
        yield sandbox


def test_state_results_and_errors(sbx: Sandbox) -> None:
    sbx.run_code("x = 1")
    execution = sbx.run_code("x += 1; x")
    assert execution.text == "2" and execution.execution_count
    failed = sbx.run_code("1 / 0")
    assert failed.error is not None and failed.error.name == "ZeroDivisionError"
    assert "division by zero" in failed.error.traceback
    assert sbx.run_code("x").text == "2"  # the error lost nothing
    printed = sbx.run_code("print('hi'); import sys; print('oops', file=sys.stderr)")
    assert printed.logs.stdout == ["hi\n"] and printed.logs.stderr == ["oops\n"]
    assert printed.text is None
    assert sbx.run_code("import os; os.environ['ONLY']", envs={"ONLY": "now"}).text == "now"
    assert sbx.run_code("import os; os.environ.get('ONLY')").text is None


def test_rich_results(sbx: Sandbox) -> None:
    frame = sbx.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3, 4]})")
    table = frame.results[0]
    assert table.is_main_result and "<table" in (table.html or "")
    assert table._repr_html_() == table.html and "html" in table.formats()
    plot = sbx.run_code(
        "import matplotlib.pyplot as plt\nplt.bar(['a', 'b'], [3, 5])\nplt.title('bars')\n"
        "plt.show()"
    )
    figure = next(r for r in plot.results if r.png)
    assert figure._repr_png_() == figure.png
    assert figure.chart is not None and figure.chart.type == ChartType.BAR
    assert figure.chart.title == "bars" and len(figure.chart.elements) == 2


def test_streaming_callbacks(sbx: Sandbox) -> None:
    seen: list[tuple[float, OutputMessage]] = []
    results: list[Result] = []
    sbx.run_code(
        "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.3)\n'end'",
        on_stdout=lambda message: seen.append((time.monotonic(), message)),
        on_result=results.append,
    )
    assert [m.line for _, m in seen] == ["0\n", "1\n", "2\n"]
    assert seen[-1][0] - seen[0][0] > 0.4 and not seen[0][1].error
    assert [r.text for r in results] == ["end"]


def test_contexts_and_languages(sbx: Sandbox) -> None:
    context = sbx.create_code_context(cwd="/tmp")
    sbx.run_code("y = 'own'", context=context)
    assert sbx.run_code("y", context=context).text == "own"
    assert sbx.run_code("import os; os.getcwd()", context=context).text == "/tmp"
    assert sbx.run_code("'y' in globals()").text == "False"  # the default context is another
    assert context.id in [c.id for c in sbx.list_code_contexts()]
    sbx.restart_code_context(context)
    assert sbx.run_code("'y' in globals()", context=context).text == "False"
    sbx.remove_code_context(context)
    assert context.id not in [c.id for c in sbx.list_code_contexts()]
    with pytest.raises(NotFoundException):
        sbx.run_code("1", context=context)
    sbx.run_code("open('/home/user/from-python.txt', 'w').write('hi')")
    shown = sbx.run_code("cat /home/user/from-python.txt", language="bash")
    assert "".join(shown.logs.stdout).strip() == "hi"
    with pytest.raises(Exception, match="not supported"):
        sbx.run_code("1", language="cobol")


def test_timeouts_interrupt(sbx: Sandbox) -> None:
    with pytest.raises(TimeoutException):
        # (past the interpreter's 5 s keepalive: the whole run counts, not a silence)
        sbx.run_code("import time; time.sleep(30); finished = True", timeout=6)
    # Interrupted (not left to run on), and the context lives on.
    assert sbx.run_code("'finished' in globals()").text == "False"


@pytest.mark.asyncio(loop_scope="session")
async def test_async_run_code(asbx: AsyncSandbox) -> None:
    await asbx.run_code("z = 10")
    lines: list[str] = []

    async def on_stdout(message: OutputMessage) -> None:
        lines.append(message.line)

    execution = await asbx.run_code("print('z is', z); z * 2", on_stdout=on_stdout)
    assert execution.text == "20" and lines == ["z is 10\n"]
    context = await asbx.create_code_context(language="bash")
    assert context.language == "bash"
    await asbx.run_code("export GREET=hey", context=context)
    assert (await asbx.run_code("echo $GREET", context=context)).logs.stdout == ["hey\n"]
    assert context.id in [c.id for c in await asbx.list_code_contexts()]
    await asbx.restart_code_context(context)
    await asbx.remove_code_context(context.id)
    failed = await asbx.run_code("raise KeyError('k')")
    assert failed.error is not None and failed.error.name == "KeyError"


EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        ("stateful_code.py", ["2"]),
        ("file_then_process.py", ["sandbox: step 1 of 3", "sandbox: done", "exit code 0"]),
        ("data_analysis.py", ["accuracy: 0.", "chart: scatter", "downloaded chart.png"]),
        (
            "debug_loop.py",
            [
                "attempt 1 failed: NameError",
                "attempt 2 failed: IndexError",
                "worked after 2 fixes: [1, 2, 3]",
            ],
        ),
        (
            "grading_playground.py",
            [
                "ada: pass: all tests passed",
                "bob: fail: AssertionError",
                "eve: fail: took too long",
            ],
        ),
    ],
)
def test_examples(
    code_server: BilikServer, tmp_path: Path, example: str, expected: list[str]
) -> None:
    """The examples run as written, configured only by the environment."""
    env = {**os.environ, "BILIK_URL": code_server.url, "BILIK_API_KEY": code_server.key}
    ran = subprocess.run(
        [sys.executable, str(EXAMPLES / example)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    lines = ran.stdout.splitlines()
    for text in expected:
        assert any(line.startswith(text) for line in lines), (text, ran.stdout)
