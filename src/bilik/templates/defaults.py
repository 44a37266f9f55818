"""Templates bilik defines itself, with its own template builder, built on first use (or ahead,
``bilik template build-default``): ``base``, what sandboxes get unless they name a template,
and ``code-interpreter-v1``, the name E2B's code-interpreter SDK asks for."""

from __future__ import annotations

import base64
import dataclasses
import json
import shlex
from typing import Any

from ..runtime import Limits
from ..sdk.template import Template, TemplateBuilder, TemplateFinal

BASE = "base"
CODE_INTERPRETER = "code-interpreter-v1"

# What agents expect of E2B's base template: a shell, Python with pip and venv, git, curl and
# the usual tools (on plain Debian of the host's release, with the ``user`` account).
BASE_PACKAGES = (
    "coreutils",
    "python3",
    "python3-pip",
    "python3-venv",
    "curl",
    "wget",
    "git",
    "procps",
    "iproute2",
    "iputils-ping",
    "sudo",
    "less",
    "nano",
    "unzip",
    "zip",
    "xz-utils",
    "file",
    "jq",
    "openssh-client",
    "tini",
)

# What the interpreter's kernels get besides the language itself: the data stack agents reach
# for (from the configured package index).
PYTHON_PACKAGES = (
    "ipykernel",
    "jupyter_client",
    "bash_kernel",
    "numpy",
    "pandas",
    # (before 3.11, as E2B's image has it: E2B's own examples still call boxplot(labels=...))
    "matplotlib<3.11",
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


# Where the host's pip settings (index, trusted CA) go: a COPY whose files the server puts in
# itself (their hash is filled in at build time), not uploaded from a context directory.
HOST_PIP_SETTINGS = "pip-settings"


def _apt(packages: tuple[str, ...], *, upgrade: bool = False) -> str:
    install = "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
    return (
        "apt-get update -q && "
        + ("DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -q && " if upgrade else "")
        + install
        + " ".join(packages)
        + " && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb"
    )


def _pip(packages: tuple[str, ...]) -> str:
    return "python3 -m pip install --break-system-packages --no-cache-dir -q " + " ".join(
        shlex.quote(package) for package in packages
    )


# ``base``, with bilik's own template builder (the SDK's).
BASE_TEMPLATE = (
    Template()
    .from_debian_image()
    # (upgraded first: a rebuild brings every package up to date, not only these)
    .run_cmd(_apt(BASE_PACKAGES, upgrade=True), user="root")
    .run_cmd(
        "echo 'user ALL=(ALL:ALL) NOPASSWD: ALL' > /etc/sudoers.d/user && "
        "chmod 0440 /etc/sudoers.d/user",
        user="root",
    )
    # ``pip install`` works as on E2B's, not only in a venv (Debian refuses installs into its
    # own Python otherwise), from the package index this host uses.
    .copy(HOST_PIP_SETTINGS, "/", user="root")
    .set_envs({"PIP_BREAK_SYSTEM_PACKAGES": "1"})
    # (user ``user`` in /home/user, as ``debian`` has them)
)

# ``code-interpreter-v1``, with bilik's own template builder (the SDK's).
CODE_INTERPRETER_TEMPLATE = (
    Template()
    .from_base_image()
    # R with its kernel; the data stack (the interpreter has every Python kernel give results
    # their data, charts and images as E2B's do: ``interpreter.kernel_startup``).
    .run_cmd(_apt(DEBIAN_PACKAGES), user="root")
    .run_cmd(_pip(PYTHON_PACKAGES), user="root")
    .run_cmd(
        "python3 -m bash_kernel.install --sys-prefix && "
        "R -q -e 'IRkernel::installspec(user = FALSE)'",
        user="root",
    )
    # Java (JShell) and Deno (JavaScript and TypeScript), and their kernels' specs (the paths
    # the specs name are checked to be there).
    .run_cmd(_apt(JAVA_PACKAGES), user="root")
    .run_cmd(_pip(DENO_PACKAGES), user="root")
    .run_cmd(
        " && ".join(
            f"mkdir -p {KERNELS_DIR}/{name} && "
            + _write_file(f"{KERNELS_DIR}/{name}/kernel.json", json.dumps(spec))
            for name, spec in KERNEL_SPECS.items()
        )
        + " && /usr/local/bin/deno --version && javac -version",
        user="root",
    )
    # The Java kernel's helper, compiled ahead for the first Java context (one of a newer
    # version is compiled when first needed).
    .run_cmd(
        "PYTHONPATH=/.bilik/agents python3 -m bilik.interpreter.java_kernel --compile",
        user="user",
    )
    # Root's home is one the kernels (which run as ``user``) can work in, as on E2B, whose
    # kernels run as root: ``create_code_context(cwd="/root")`` works (E2B's own image for
    # Docker gives ``/root`` to ``user`` likewise).
    .run_cmd("chown -R user:user /root", user="root")
    # The server comes with envd (/.bilik/agents); the kernels use the image's Python.
    .set_start_cmd(
        "cd /home/user && PYTHONPATH=/.bilik/agents exec python3 -m bilik.interpreter",
        '[ -n "$(ss -Htuln sport = :49999)" ]',
    )
)


def _spec(template: TemplateBuilder | TemplateFinal, **limits: int) -> dict[str, Any]:
    """A default template as the server builds it: the builder's request, its host-settings
    COPY marked, and the limits its sandboxes get."""
    spec: dict[str, Any] = json.loads(template.to_json())
    for step in spec["steps"]:
        if step["type"] == "COPY" and step["args"][0] == HOST_PIP_SETTINGS:
            step["hostPipSettings"] = True
    return {**spec, **limits}


DEFAULTS: dict[str, dict[str, Any]] = {
    BASE: _spec(BASE_TEMPLATE),
    # As E2B's: 1 GiB, so a kernel per language fits (Deno's take about 200 MB each).
    CODE_INTERPRETER: _spec(CODE_INTERPRETER_TEMPLATE, memoryMB=1024),
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
