"""The host reaches a sandbox's envd through a socket the sandbox cannot repoint (issue: a
sandbox that replaced its envd socket with a link had the plane, as host root, connect to any
host unix socket, with no key), and nothing in the sandbox's control directory is the sandbox's
to change."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import Sandbox, SandboxException

from bilik.runtime import LocalRuntime, SandboxInfo
from helpers import EACH_OCI_RUNTIME, run_ok
from server import SERVER_SETTINGS, BilikServer


@pytest.fixture(scope="module")
def served() -> Iterator[BilikServer]:
    server = BilikServer()
    server.start()
    yield server
    server.finish()


class HostSocket:
    """A unix socket on the host that records every connection made to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connections = 0
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhost-secret")
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        self.path.unlink(missing_ok=True)


@pytest.mark.parametrize("oci_runtime", ["crun"])
def test_a_sandbox_cannot_repoint_its_envd_socket(served: BilikServer, oci_runtime: str) -> None:
    host = HostSocket(Path("/run") / "bilik-test-host.sock")
    sbx = Sandbox.create(
        "base", timeout=120, api_key=served.key, api_url=served.url, sandbox_url=served.url
    )
    try:
        attempt = (
            f"ln -sfn {host.path} /run/bilik/envd.sock; "
            "ln -sfn /run/bilik-test-host.sock /run/bilik/evil.sock; "
            "echo x > /run/bilik/envd.json; "
            "ls -la /run/bilik"
        )
        out = sbx.commands.run(attempt, user="root")
        assert "evil.sock" not in out.stdout
        # Kill envd too: the host's revival path is the one that would follow a planted link.
        with contextlib.suppress(SandboxException):
            sbx.commands.run("kill -9 $(pgrep -x envd)", user="root")
        for _ in range(3):
            assert sbx.commands.run("echo still-envd").stdout == "still-envd\n"
        assert host.connections == 0
        # The socket the host uses is in a directory only the host writes.
        sandbox_dir = SERVER_SETTINGS.data_dir / "sandboxes" / sbx.sandbox_id
        st = os.stat(sandbox_dir)
        assert st.st_uid == 0 and st.st_mode & 0o022 == 0
        assert (sandbox_dir / "envd.sock").is_socket()
    finally:
        sbx.kill()
        host.close()


@EACH_OCI_RUNTIME
async def test_the_control_directory_is_read_only_inside(
    runtime: LocalRuntime, sandbox: SandboxInfo
) -> None:
    """Under both runtimes: nothing the sandbox writes lands in the host's control directory
    (its files are trusted by the host, and the directory is on the host's disk)."""
    out = await run_ok(
        runtime,
        sandbox.sandbox_id,
        "for f in /run/bilik/envd.json /run/bilik/new; do "
        "  (echo x > $f) 2>/dev/null && echo wrote $f; done; "
        "ln -s / /run/bilik/link 2>/dev/null && echo linked; true",
    )
    assert "wrote" not in out and "linked" not in out
    control = runtime.records.dir(sandbox.sandbox_id) / "control"
    assert sorted(p.name for p in control.iterdir()) == ["envd.json"]
