"""bilik: self-hosted sandboxes for AI agents, speaking E2B's protocol.

``from bilik import Sandbox`` (or any other name of the SDK, ``bilik.sdk``) is the client.
"""

import importlib
from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The SDK loads on first use: the in-sandbox parts import this package too, without the
    # SDK's dependencies.
    if name.startswith("_"):
        raise AttributeError(name)
    sdk = importlib.import_module("bilik.sdk")
    if name in sdk.__all__:
        return getattr(sdk, name)
    raise AttributeError(f"module 'bilik' has no attribute {name!r}")
