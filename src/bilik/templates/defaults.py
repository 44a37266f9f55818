"""Templates bilik defines itself, built on first use (or ahead, ``bilik template
build-default``): ``code-interpreter-v1``, the name E2B's code-interpreter SDK asks for."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

from ..runtime import Limits

CODE_INTERPRETER = "code-interpreter-v1"

# What the interpreter's kernels get besides the language itself: the data stack agents reach
# for (from the configured package index).
PYTHON_PACKAGES = (
    "ipykernel",
    "jupyter_client",
    "bash_kernel",
    "numpy",
    "pandas",
    "matplotlib",
    "scipy",
    "scikit-learn",
    "seaborn",
    "plotly",
    "requests",
    "beautifulsoup4",
    "openpyxl",
    # chart data from matplotlib figures, as E2B's interpreter returns it (MIT, by E2B)
    "e2b-charts",
)

# An IPython startup script: every matplotlib figure displayed also carries its data as an
# ``e2b/chart`` display (which the interpreter returns as a result's ``chart``).
CHART_STARTUP = """\
def _bilik_charts():
    import json

    from IPython import get_ipython
    from IPython.core.formatters import JSONFormatter
    from traitlets import Unicode

    shell = get_ipython()
    if shell is None:
        return

    class ChartFormatter(JSONFormatter):  # (returns a dict, as JSON does)
        format_type = Unicode("e2b/chart")
        print_method = Unicode("_repr_e2b_chart_")

        def pop(self, typ, default=None):
            # matplotlib's inline backend pops Figure from every formatter when it sets its
            # formats up: this one keeps it.
            return default

    def chart(figure):
        try:
            from e2b_charts import chart_figure_to_dict
            # (enums and tuples in it: plain JSON out)
            return json.loads(json.dumps(chart_figure_to_dict(figure), default=str))
        except Exception:
            return None

    formatter = ChartFormatter(parent=shell.display_formatter)
    formatter.for_type_by_name("matplotlib.figure", "Figure", chart)
    shell.display_formatter.formatters["e2b/chart"] = formatter
    # Only the types listed when the shell started are computed: add ours.
    if "e2b/chart" not in shell.display_formatter.active_types:
        shell.display_formatter.active_types.append("e2b/chart")


_bilik_charts()
del _bilik_charts
"""
# R and its kernel, from the host's Debian sources.
DEBIAN_PACKAGES = ("r-base-core", "r-cran-irkernel")
# Java: JShell comes with the JDK; the kernel around it is bilik's (``interpreter.java_kernel``).
JAVA_PACKAGES = ("openjdk-17-jdk-headless",)
# JavaScript and TypeScript: Deno and its built-in Jupyter kernel, from the Deno authors'
# build on PyPI (through the same pip settings as the rest).
DENO_PACKAGES = ("deno",)
KERNELS_DIR = "/usr/local/share/jupyter/kernels"
KERNEL_SPECS: dict[str, dict[str, Any]] = {
    "deno": {
        "argv": ["/usr/local/bin/deno", "jupyter", "--kernel", "--conn", "{connection_file}"],
        "display_name": "Deno",
        "language": "typescript",
        # An interrupt_request stops the running code; a SIGINT would not.
        "interrupt_mode": "message",
        # Plain text results and errors (no colour codes), and no update check on the network.
        "env": {"NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1"},
    },
    "java": {
        "argv": ["python3", "-m", "bilik.interpreter.java_kernel", "-f", "{connection_file}"],
        "display_name": "Java",
        "language": "java",
        "interrupt_mode": "message",
        # The kernel's Python side comes with the interpreter's server.
        "env": {"PYTHONPATH": "/.bilik/agents"},
    },
}


def _write_file(path: str, text: str) -> str:
    """A shell command that writes ``text`` to ``path`` (base64, so no quoting to get wrong)."""
    return f"echo {base64.b64encode(text.encode()).decode()} | base64 -d > {path}"


DEFAULTS: dict[str, dict[str, Any]] = {
    CODE_INTERPRETER: {
        "fromImage": "e2bdev/base",
        "steps": [
            # The host's pip settings (index, trusted CA): filesHash filled in at build time.
            {"type": "COPY", "args": ["pip-settings", "/", "root", ""], "hostPipSettings": True},
            {
                "type": "RUN",
                "args": [
                    "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                    "--no-install-recommends " + " ".join(DEBIAN_PACKAGES) + " && "
                    "rm -rf /var/lib/apt/lists/*",
                    "root",
                ],
            },
            {
                "type": "RUN",
                "args": [
                    "python3 -m pip install --break-system-packages --no-cache-dir -q "
                    + " ".join(PYTHON_PACKAGES),
                    "root",
                ],
            },
            {
                "type": "RUN",
                "args": [
                    "mkdir -p ~/.ipython/profile_default/startup && echo "
                    + base64.b64encode(CHART_STARTUP.encode()).decode()
                    + " | base64 -d > ~/.ipython/profile_default/startup/00-bilik-charts.py",
                    "user",
                ],
            },
            {
                "type": "RUN",
                "args": [
                    "python3 -m bash_kernel.install --sys-prefix && "
                    "R -q -e 'IRkernel::installspec(user = FALSE)'",
                    "root",
                ],
            },
            {
                "type": "RUN",
                "args": [
                    "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                    "--no-install-recommends " + " ".join(JAVA_PACKAGES) + " && "
                    "rm -rf /var/lib/apt/lists/*",
                    "root",
                ],
            },
            {
                "type": "RUN",
                "args": [
                    "python3 -m pip install --break-system-packages --no-cache-dir -q "
                    + " ".join(DENO_PACKAGES),
                    "root",
                ],
            },
            {
                "type": "RUN",
                "args": [
                    " && ".join(
                        f"mkdir -p {KERNELS_DIR}/{name} && "
                        + _write_file(f"{KERNELS_DIR}/{name}/kernel.json", json.dumps(spec))
                        for name, spec in KERNEL_SPECS.items()
                    )
                    # (the paths the specs name are there)
                    + " && /usr/local/bin/deno --version && javac -version",
                    "root",
                ],
            },
            {
                "type": "RUN",
                "args": [
                    # The Java kernel's helper, compiled ahead for the first Java context (one
                    # of a newer version is compiled when first needed).
                    "PYTHONPATH=/.bilik/agents python3 -m bilik.interpreter.java_kernel --compile",
                    "user",
                ],
            },
        ],
        # The server comes with envd (/.bilik/agents); the kernels use the image's Python.
        "startCmd": "cd /home/user && PYTHONPATH=/.bilik/agents exec python3 -m bilik.interpreter",
        "readyCmd": '[ -n "$(ss -Htuln sport = :49999)" ]',
        # As E2B's: a kernel per language (Deno's take about 200 MB each) fits.
        "memoryMB": 1024,
    },
}


def default_limits(name: str) -> Limits:
    """What sandboxes of the default template ``name`` get unless a create asks otherwise."""
    spec = DEFAULTS[name]
    default = Limits()
    return dataclasses.replace(
        default,
        cpu=spec.get("cpuCount", default.cpu),
        memory_mb=spec.get("memoryMB", default.memory_mb),
    )
