"""bilik: self-hosted sandboxes for AI agents, speaking E2B's protocol."""

__version__ = "0.1.0"
