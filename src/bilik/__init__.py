"""bilik: self-hosted sandboxes for AI agents, speaking E2B's protocol.

``from bilik import Sandbox`` (or any other name of the SDK, ``bilik.sdk``) is the client.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The SDK loads on first use: the in-sandbox parts import this package too, without the
    # SDK's dependencies.
    import importlib.util  # (only here: the CLI's start-up does without it)

    if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # (a submodule, asked for by ``from bilik import name``: the import system loads it,
        # without the SDK)
        raise AttributeError(name)
    sdk = importlib.import_module("bilik.sdk")
    if name in sdk.__all__:
        return getattr(sdk, name)
    raise AttributeError(f"module 'bilik' has no attribute {name!r}")
