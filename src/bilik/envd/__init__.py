"""envd: bilik's agent inside every sandbox.

It serves E2B's envd protocol (Connect RPC ``process.Process`` and ``filesystem.Filesystem``,
plain HTTP ``/files``, ``/health``, ``/envs``, ``/metrics``) on a unix socket the server reaches
from the host and on ``ENVD_PORT`` inside the sandbox (``bilik.proto.contract``). It runs from the
read-only runtime directory every sandbox sees at ``/.bilik``, so it imports only the standard
library, its own modules and the few packages copied there with it (never anything of the
server's).

Two modules here run as root on the host, not in a sandbox: ``zygote`` (one process that has
envd imported and forks one per new crun sandbox) and ``enter`` (what each fork does to join
its sandbox before it becomes envd). They belong with envd, not with the server's runtime: the
fork that becomes envd carries everything the zygote imported into the sandbox, so the zygote
must import envd's code and nothing of the server's, under the same rule as envd itself. The
server starts and talks to the zygote from ``bilik.runtime.envd_zygote``.
"""
