"""The code interpreter, driven by the official ``e2b-code-interpreter`` SDK (sync and async)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from e2b_code_interpreter import AsyncSandbox, Context, Sandbox

from server import BilikServer, code_interpreter_server


@pytest.fixture(scope="module")
def interpreter_server() -> Iterator[BilikServer]:
    with code_interpreter_server() as srv:
        yield srv


def _params(server: BilikServer) -> dict[str, Any]:
    return {"api_key": server.key, "api_url": server.url, "sandbox_url": server.url}


@pytest.fixture(scope="module")
def sbx(interpreter_server: BilikServer) -> Iterator[Sandbox]:
    with Sandbox.create(timeout=300, **_params(interpreter_server)) as sandbox:
        yield sandbox


def test_state_carries_over(sbx: Sandbox) -> None:
    sbx.run_code("x = 1")
    execution = sbx.run_code("x += 1; x")
    assert execution.text == "2" and execution.execution_count is not None
    assert sbx.run_code("'a string'").text == "a string"


def test_output_streams_as_it_comes(sbx: Sandbox) -> None:
    seen: list[tuple[float, str]] = []
    errors: list[str] = []
    execution = sbx.run_code(
        "import sys, time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.3)\n"
        "print('oops', file=sys.stderr)",
        on_stdout=lambda out: seen.append((time.monotonic(), str(out.line))),
        on_stderr=lambda err: errors.append(str(err.line)),
    )
    assert "".join(line for _, line in seen) == "0\n1\n2\n"
    assert seen[-1][0] - seen[0][0] > 0.4
    assert errors == ["oops\n"] and execution.logs.stdout == ["0\n", "1\n", "2\n"]


def test_errors_are_data_and_the_sandbox_goes_on(sbx: Sandbox) -> None:
    execution = sbx.run_code("def f():\n    raise ValueError('bad value')\nf()")
    assert execution.error is not None
    assert execution.error.name == "ValueError" and execution.error.value == "bad value"
    assert "f()" in execution.error.traceback
    assert sbx.run_code("1 + 1").text == "2"


def test_rich_results(sbx: Sandbox) -> None:
    frame = sbx.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': [3, 4]})")
    result = frame.results[0]
    assert result.is_main_result and "<table" in (result.html or "") and "a" in (result.text or "")
    plot = sbx.run_code(
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.title('squares')\n"
        "plt.show()"
    )
    figure = next(r for r in plot.results if r.png)
    # The figure's data too, as E2B's interpreter extracts it.
    assert figure.chart is not None and figure.chart.type.value == "line", figure.chart
    assert figure.chart.title == "squares"
    points = figure.chart.elements[0].points
    assert [tuple(map(float, p)) for p in points] == [(1, 1), (2, 4), (3, 9)]


def test_contexts_and_env_vars(sbx: Sandbox) -> None:
    context = sbx.create_code_context(cwd="/tmp")
    sbx.run_code("y = 'in the context'", context=context)
    assert sbx.run_code("y", context=context).text == "in the context"
    assert sbx.run_code("'y' in globals()").text == "False"  # the default context's own state
    assert sbx.run_code("import os; os.getcwd()", context=context).text == "/tmp"
    assert context.id in [c.id for c in sbx.list_code_contexts()]
    scoped = sbx.run_code("import os; os.environ.get('ONLY_NOW')", envs={"ONLY_NOW": "yes"})
    assert scoped.text == "yes"
    assert sbx.run_code("import os; str(os.environ.get('ONLY_NOW'))").text == "None"
    sbx.restart_code_context(context)
    assert sbx.run_code("'y' in globals()", context=context).text == "False"
    sbx.remove_code_context(context)
    assert context.id not in [c.id for c in sbx.list_code_contexts()]


def test_a_timeout_interrupts_rather_than_kills(sbx: Sandbox) -> None:
    sbx.run_code("z = 'kept'")
    with pytest.raises(Exception):  # noqa: B017 (the SDK's timeout error)
        sbx.run_code("import time; time.sleep(30)", timeout=2)
    time.sleep(0.5)
    assert sbx.run_code("z").text == "kept"


async def test_async_sdk(interpreter_server: BilikServer) -> None:
    sandbox = await AsyncSandbox.create(timeout=120, **_params(interpreter_server))
    try:
        await sandbox.run_code("n = 20")
        assert (await sandbox.run_code("n * 2")).text == "40"
    finally:
        await sandbox.kill()


def test_bash_and_r(sbx: Sandbox) -> None:
    sbx.run_code("open('/home/user/from_python.txt', 'w').write('written by python')")
    shell = sbx.run_code("cat /home/user/from_python.txt; echo; echo $ONLY", language="bash",
                         envs={"ONLY": "for bash"})  # fmt: skip
    assert "".join(shell.logs.stdout) == "written by python\nfor bash\n", shell
    assert sbx.run_code("x <- 20; x * 2", language="r").text == "[1] 40"
    assert sbx.run_code("x + 1", language="r").text == "[1] 21"  # R keeps its own state
    assert sbx.run_code("x").text == "2"  # and Python its own
    failed = sbx.run_code("stop('no good')", language="r")
    assert failed.error is not None and "no good" in failed.error.value
    with pytest.raises(Exception, match="not supported"):
        sbx.run_code("1", language="cobol")


def test_the_data_analyst_flow(sbx: Sandbox) -> None:
    """Upload a CSV, read it with pandas, fit a scikit-learn model, save a chart, download it."""
    rows = "\n".join(f"{i},{2 * i + 1}" for i in range(100))
    sbx.files.write("/home/user/data.csv", "x,y\n" + rows)
    execution = sbx.run_code(
        "import pandas as pd\n"
        "from sklearn.linear_model import LinearRegression\n"
        "import matplotlib.pyplot as plt\n"
        "df = pd.read_csv('/home/user/data.csv')\n"
        "model = LinearRegression().fit(df[['x']], df['y'])\n"
        "print(f\"accuracy {model.score(df[['x']], df['y']):.3f}\")\n"
        "plt.scatter(df.x, df.y)\n"
        "plt.savefig('/home/user/chart.png')\n"
    )
    assert execution.error is None, execution.error
    assert "accuracy 1.000" in "".join(execution.logs.stdout)
    png = sbx.files.read("/home/user/chart.png", format="bytes")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    stack = sbx.run_code("import scipy, seaborn, plotly, requests, bs4, openpyxl; 'ok'")
    assert stack.text == "ok", stack.error


def test_bad_input(sbx: Sandbox) -> None:
    syntax = sbx.run_code("def broken(:\n    pass")
    assert syntax.error is not None and syntax.error.name == "SyntaxError"
    flood = sbx.run_code("print('x' * 5_000_000)")
    assert sum(len(chunk) for chunk in flood.logs.stdout) == 5_000_001
    with pytest.raises(Exception, match="not found"):
        sbx.run_code("1", context=Context(context_id="no-such-context", language="python", cwd="/"))
    # A kernel killed from a command: the next execution says so; a restart brings it back.
    context = sbx.create_code_context()
    sbx.run_code("import os; kernel_pid = os.getpid()", context=context)
    pid = sbx.run_code("str(kernel_pid)", context=context).text
    sbx.commands.run(f"kill -9 {pid}")
    dead = sbx.run_code("1 + 1", context=context)
    assert dead.error is not None and dead.error.name == "UnexpectedEndOfExecution"
    sbx.restart_code_context(context)
    assert sbx.run_code("1 + 1", context=context).text == "2"
    assert sbx.run_code("'still here'").text == "still here"


def test_javascript_and_typescript(interpreter_server: BilikServer) -> None:
    # A sandbox of their own: Deno's kernels take about 200 MB each.
    with Sandbox.create(timeout=300, **_params(interpreter_server)) as sbx:
        sbx.run_code("let x = 1", language="js")
        execution = sbx.run_code("x += 1; x", language="js")
        assert execution.text == "2" and execution.execution_count is not None
        assert sbx.run_code("'a string'", language="javascript").text == "a string"
        seen: list[tuple[float, str]] = []
        printed = sbx.run_code(
            "for (let i = 0; i < 3; i++) {\n  console.log(i)\n  await new Promise((r) => "
            "setTimeout(r, 300))\n}\nconsole.error('oops')",
            language="js",
            on_stdout=lambda out: seen.append((time.monotonic(), str(out.line))),
        )
        assert "".join(line for _, line in seen) == "0\n1\n2\n" and seen[-1][0] - seen[0][0] > 0.4
        assert printed.logs.stderr == ["oops\n"]
        failed = sbx.run_code(
            "function f() {\n  throw new TypeError('bad value')\n}\nf()", language="js"
        )
        assert failed.error is not None
        assert failed.error.name == "TypeError" and failed.error.value == "bad value"
        assert "at f" in failed.error.traceback
        assert sbx.run_code("x * 10", language="js").text == "20"  # the context goes on
        scoped = sbx.run_code("Deno.env.get('ONLY_NOW')", language="js", envs={"ONLY_NOW": "yes"})
        assert scoped.text == "yes"
        assert sbx.run_code("String(Deno.env.get('ONLY_NOW'))", language="js").text == "undefined"
        # TypeScript: a context of its own, with types.
        sbx.run_code(
            "interface Point { x: number; y: number }\nconst p: Point = { x: 3, y: 4 }",
            language="ts",
        )
        typed = sbx.run_code(
            "function norm(q: Point): number {\n  return Math.hypot(q.x, q.y)\n}\nnorm(p)",
            language="typescript",
        )
        assert typed.text == "5", typed
        assert sbx.run_code("typeof x", language="ts").text == "undefined"  # the js context's own
        failed = sbx.run_code("const n: number = undefinedThing", language="ts")
        assert failed.error is not None and failed.error.name == "ReferenceError"
        assert sbx.run_code("p.x + p.y", language="ts").text == "7"
        # A timeout interrupts the code, not the context.
        busy = "const end = Date.now() + 5000\nwhile (Date.now() < end) {}"
        with pytest.raises(Exception):  # noqa: B017 (the SDK's timeout error)
            sbx.run_code(busy, language="ts", timeout=2)
        time.sleep(0.5)
        assert sbx.run_code("p.x", language="ts").text == "3"
        # Interrupted while it awaits, Deno's kernel would never finish: it starts afresh.
        with pytest.raises(Exception):  # noqa: B017 (the SDK's timeout error)
            sbx.run_code("await new Promise((r) => setTimeout(r, 60e3))", language="js", timeout=2)
        assert sbx.run_code("typeof x", language="js").text == "undefined"


def test_java(interpreter_server: BilikServer) -> None:
    with Sandbox.create(timeout=300, **_params(interpreter_server)) as sbx:
        sbx.run_code("int x = 1;", language="java")
        execution = sbx.run_code("x += 1; x", language="java")
        assert execution.text == "2" and execution.execution_count is not None
        assert sbx.run_code('"a " + "string"', language="java").text == "a string"
        summed = sbx.run_code("List.of(1, 2, 3).stream().mapToInt(i -> i).sum()", language="java")
        assert summed.text == "6"  # (jshell's default imports)
        seen: list[tuple[float, str]] = []
        printed = sbx.run_code(
            "for (int i = 0; i < 3; i++) {\n  System.out.println(i);\n  Thread.sleep(300);\n}\n"
            'System.err.println("oops");',
            language="java",
            on_stdout=lambda out: seen.append((time.monotonic(), str(out.line))),
        )
        assert "".join(line for _, line in seen) == "0\n1\n2\n" and seen[-1][0] - seen[0][0] > 0.4
        # (a line, then its end: as E2B's Java kernel sends println)
        assert printed.logs.stderr == ["oops", "\n"] and printed.text is None
        failed = sbx.run_code("int half(int n) {\n  return n / 0;\n}\nhalf(4)", language="java")
        assert failed.error is not None
        assert failed.error.name == "java.lang.ArithmeticException"
        assert failed.error.value == "/ by zero" and "half" in failed.error.traceback
        wrong = sbx.run_code('int y = "text";', language="java")
        assert wrong.error is not None and wrong.error.name == "CompilationException"
        assert "incompatible types" in wrong.error.value
        assert sbx.run_code("x * 10", language="java").text == "20"  # the context goes on
        scoped = sbx.run_code('System.getProperty("ONLY")', language="java", envs={"ONLY": "yes"})
        assert scoped.text == "yes"  # (a system property: a JVM's environment is fixed)
        with pytest.raises(Exception):  # noqa: B017 (the SDK's timeout error)
            sbx.run_code("Thread.sleep(5000);", language="java", timeout=2)
        time.sleep(0.5)
        assert sbx.run_code("x", language="java").text == "2"
