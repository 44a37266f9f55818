"""The sandbox plane: requests for a sandbox's ports, routed and streamed to the sandbox."""

from .proxy import SandboxPlane

__all__ = ["SandboxPlane"]
