"""Templates bilik defines itself, built on first use (or ahead, ``bilik template
build-default``): ``code-interpreter-v1``, the name E2B's code-interpreter SDK asks for."""

from __future__ import annotations

from typing import Any

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
)
# R and its kernel, from the host's Debian sources.
DEBIAN_PACKAGES = ("r-base-core", "r-cran-irkernel")

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
                    "python3 -m bash_kernel.install --sys-prefix && "
                    "R -q -e 'IRkernel::installspec(user = FALSE)'",
                    "root",
                ],
            },
        ],
        # The server comes with envd (/.bilik/agents); the kernels use the image's Python.
        "startCmd": "cd /home/user && PYTHONPATH=/.bilik/agents exec python3 -m bilik.interpreter",
        "readyCmd": '[ -n "$(ss -Htuln sport = :49999)" ]',
    },
}
