"""The code interpreter as E2B's behaves, with the official ``e2b-code-interpreter`` SDK as the
client: context options, the default contexts, sandbox-wide variables in every language, and
results' data, images and charts as E2B's interpreter returns them."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from e2b_code_interpreter import Sandbox
from e2b_code_interpreter.charts import BoxAndWhiskerChart, ChartType

from server import BilikServer, code_interpreter_server

PNG = b"\x89PNG\r\n\x1a\n"


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


def test_default_contexts_are_listed_from_the_start(interpreter_server: BilikServer) -> None:
    with Sandbox.create(timeout=300, **_params(interpreter_server)) as fresh:
        listed = {c.language: c for c in fresh.list_code_contexts()}
        assert {"python", "javascript"} <= set(listed), listed
        assert all(c.cwd == "/home/user" for c in listed.values())
        # Each is the language's default context: the same state as run_code(language=...).
        fresh.run_code("shared = 'by the default context'")
        assert fresh.run_code("shared", context=listed["python"]).text == "by the default context"
        fresh.run_code("const fromContext = 41", context=listed["javascript"])
        assert fresh.run_code("fromContext + 1", language="js").text == "42"
        # A context made later is listed last, as on E2B.
        made = fresh.create_code_context(language="python")
        last = fresh.list_code_contexts()[-1]
        assert (last.id, last.language, last.cwd) == (made.id, "python", "/home/user")
        fresh.remove_code_context(listed["javascript"])
        assert listed["javascript"].id not in [c.id for c in fresh.list_code_contexts()]
        # The language gets a new default context when next used.
        assert fresh.run_code("typeof fromContext", language="js").text == "undefined"


def test_context_options(sbx: Sandbox) -> None:
    at_root = sbx.create_code_context(language="python", cwd="/root")
    assert at_root.cwd == "/root"
    where = sbx.run_code("import os; open('here', 'w').write('x'); os.getcwd()", context=at_root)
    assert where.text == "/root", where.error
    assert sbx.files.exists("/root/here")
    # What cannot be honoured is refused with a 4xx that says why.
    with pytest.raises(Exception, match=r"400.*no-such-dir.*not a directory"):
        sbx.create_code_context(cwd="/no-such-dir")
    with pytest.raises(Exception, match=r"400.*cobol.*not supported"):
        sbx.create_code_context(language="cobol")  # type: ignore[arg-type]
    # A relative one is in the default directory.
    sbx.files.make_dir("/home/user/sub")
    assert sbx.create_code_context(cwd="sub").cwd == "/home/user/sub"


def test_sandbox_envs_in_every_language(interpreter_server: BilikServer) -> None:
    envs = {"SANDBOX_WIDE": "everywhere"}
    with Sandbox.create(timeout=300, envs=envs, **_params(interpreter_server)) as sandbox:
        reads = {
            "python": "import os; os.environ['SANDBOX_WIDE']",
            "bash": "echo $SANDBOX_WIDE",
            "r": 'Sys.getenv("SANDBOX_WIDE")',
            "java": 'System.getProperty("SANDBOX_WIDE")',
            "javascript": "Deno.env.get('SANDBOX_WIDE')",
        }

        def read(language: str, **options: Any) -> str:
            execution = sandbox.run_code(reads[language], language=language, **options)
            assert execution.error is None, (language, execution.error)
            out = execution.text if execution.text is not None else "".join(execution.logs.stdout)
            return out.strip().removeprefix("[1] ").strip('"')

        for language in reads:
            assert read(language) == "everywhere", language
            # Overridden for one execution, then the sandbox's value again.
            assert read(language, envs={"SANDBOX_WIDE": "just now"}) == "just now", language
            assert read(language) == "everywhere", language
        # Java's System.out.println gives stdout as E2B's Java kernel does: the line, then its end.
        hello = sandbox.run_code('System.out.println("Hello, World!")', language="java")
        assert hello.logs.stdout == ["Hello, World!", "\n"]


def test_dataframe_data(sbx: Sandbox) -> None:
    execution = sbx.run_code(
        "import pandas as pd\npd.DataFrame({'a': [1, 2, 3], 'b': ['x', 'y', 'z'], "
        "'when': pd.to_datetime(['2024-01-01', '2024-01-02', '2024-01-03'])})"
    )
    result = execution.results[0]
    assert result.is_main_result and result.html and "<table" in result.html and result.text
    assert result.data == {
        "a": [1, 2, 3],
        "b": ["x", "y", "z"],
        "when": ["2024-01-01T00:00:00", "2024-01-02T00:00:00", "2024-01-03T00:00:00"],
    }
    assert "data" in result.formats()


def test_images_come_back_as_png(sbx: Sandbox) -> None:
    make = (
        "import numpy\nfrom PIL import Image\n"
        "image = Image.fromarray((numpy.random.rand(16, 16, 3) * 255).astype('uint8'))\n"
    )
    shown = sbx.run_code(make + "image.show()\nprint('shown')")
    assert shown.logs.stdout == ["shown\n"] and len(shown.results) == 1
    assert base64.b64decode(shown.results[0].png or "")[:8] == PNG
    displayed = sbx.run_code(make + "display(image)")
    assert base64.b64decode(displayed.results[0].png or "")[:8] == PNG
    # savefig writes through PIL: the image saved is shown, as on E2B; and shown again.
    saved = sbx.run_code(
        "import matplotlib.pyplot as plt\nfrom PIL import Image\n"
        "plt.plot([1, 2], [3, 4])\nplt.savefig('/home/user/saved.png')\nplt.close()\n"
        "Image.open('/home/user/saved.png').show()"
    )
    assert saved.error is None, saved.error
    assert len(saved.results) == 2 and all(r.png for r in saved.results), saved.results
    assert sbx.files.read("/home/user/saved.png", format="bytes")[:8] == PNG


def test_box_and_whisker_chart(sbx: Sandbox) -> None:
    # E2B's own example, as it is written (``labels=``, boxes drawn as patches).
    execution = sbx.run_code(
        "import matplotlib.pyplot as plt\n"
        "data = {'Class A': [85, 90, 78, 92, 88], 'Class B': [95, 89, 76, 91, 84, 87],\n"
        "        'Class C': [75, 82, 88, 79, 86]}\n"
        "fig, ax = plt.subplots(figsize=(10, 6))\n"
        "ax.boxplot(data.values(), labels=data.keys(), patch_artist=True)\n"
        "ax.set_title('Exam Scores Distribution')\nax.set_xlabel('Class')\nax.set_ylabel('Score')\n"
        "plt.tight_layout()\nplt.show()"
    )
    assert execution.error is None, execution.error
    chart = execution.results[0].chart
    assert isinstance(chart, BoxAndWhiskerChart), execution.results[0]
    assert chart.type == ChartType.BOX_AND_WHISKER and chart.title == "Exam Scores Distribution"
    assert (chart.x_label, chart.y_label) == ("Class", "Score")
    assert [box.label for box in chart.elements] == ["Class A", "Class B", "Class C"]
    class_a = chart.elements[0]
    quartiles = (class_a.min, class_a.first_quartile, class_a.median, class_a.third_quartile)
    assert (*quartiles, class_a.max) == (78, 85, 88, 90, 92)
