"""``python -I -m bilik.envd [CONTROL_DIR]``: serve on CONTROL_DIR/envd.sock and port 49983."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys

import uvicorn

from .app import Envd
from .config import CONFIG_FILE, CONTROL_DIR, SOCKET_FILE, EnvdConfig


def _sockets(control_dir: str, port: int) -> list[socket.socket]:
    path = os.path.join(control_dir, SOCKET_FILE)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bound under a temporary name and renamed: the socket appears only once it listens.
    temporary = f"{path}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    unix.bind(temporary)
    os.chmod(temporary, 0o600)
    unix.listen(128)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", port))
    tcp.listen(128)
    os.rename(temporary, path)
    return [unix, tcp]


def main() -> None:
    control_dir = sys.argv[1] if len(sys.argv) > 1 else CONTROL_DIR
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
    asyncio.run(_serve(server, _sockets(control_dir, config.port)))


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
