"""``python -I -m bilik.envd [CONTROL_DIR] [--listen-fd=N]``: serve on port 49983, and on the
listening unix socket at fd N when one is given.

Under crun the zygote makes that socket on the host (the host reaches envd through it); under
gVisor the host reaches envd at the sandbox's address, and no socket is made: the control
directory is read-only inside every sandbox.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import uvicorn

from ..proto.contract import CONFIG_FILE, CONTROL_DIR, EnvdConfig
from .app import Envd


def _sockets(port: int, listen_fd: int | None) -> list[socket.socket]:
    unix = [] if listen_fd is None else [socket.socket(fileno=listen_fd)]
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        tcp.bind(("0.0.0.0", port))
    except OSError as e:
        if not unix:
            raise
        # An envd of a bilik before the host made envd's socket may still hold the port (its
        # sandbox outlived an upgrade): the host reaches this one through its socket.
        print(f"envd: port {port} is taken ({e}); serving the host's socket only", flush=True)
        tcp.close()
        return unix
    tcp.listen(128)
    return [*unix, tcp]


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--listen-fd=")]
    fds = [int(a.split("=", 1)[1]) for a in sys.argv[1:] if a.startswith("--listen-fd=")]
    control_dir = args[0] if args else CONTROL_DIR
    config = EnvdConfig.load(os.path.join(control_dir, CONFIG_FILE))
    server = uvicorn.Server(
        uvicorn.Config(
            Envd(config),
            lifespan="off",
            log_level="warning",
            access_log=False,
            http="h11",
            ws="none",
            loop="asyncio",
            timeout_keep_alive=60,
        )
    )
    asyncio.run(_serve(server, _sockets(config.port, fds[0] if fds else None)))


async def _serve(server: uvicorn.Server, sockets: list[socket.socket]) -> None:
    if sys.version_info < (3, 12) and _has_pidfds():
        # Wait for children with pidfds: the default watcher starts a thread per child.
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(asyncio.get_running_loop())
        asyncio.set_child_watcher(watcher)
    await server.serve(sockets=sockets)


def _has_pidfds() -> bool:
    """Whether the kernel has pidfd_open (gVisor's of late 2022 has not)."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


if __name__ == "__main__":
    main()
