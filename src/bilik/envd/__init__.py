"""envd: bilik's agent inside every sandbox.

It serves E2B's envd protocol (Connect RPC ``process.Process`` and ``filesystem.Filesystem``,
plain HTTP ``/files``, ``/health``, ``/envs``, ``/metrics``) on a unix socket the server reaches
from the host and on port 49983 inside the sandbox. It runs from the read-only runtime directory
every sandbox sees at ``/.bilik``, so it imports only the standard library, its own modules and
the few packages copied there with it (never anything of the server's).
"""
