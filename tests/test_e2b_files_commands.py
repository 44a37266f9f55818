"""Commands and files as the official ``e2b`` SDK sees them on E2B, against a real ``bilik
serve``, under each OCI runtime: passwordless ``sudo`` for ``user`` (with the sandbox's
isolation intact), ``files.remove`` of nothing, ``files.list`` depth first, the metadata a
write returns, and a command's ``timeout`` as a TimeoutException in both SDKs.

Debian 12's gVisor ignores set-uid bits and sets ``no_new_privs`` on every process
(google/gvisor#212), and has no user extended attributes (where file metadata lives): those
are tested under crun only.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from e2b import AsyncSandbox, CommandExitException, Sandbox, TimeoutException

from bilik.runtime import cgroups
from bilik.runtime.backends import RUNTIMES
from server import SERVER_SETTINGS, BilikServer


class _Server(BilikServer):
    """A server whose sandboxes run under one OCI runtime."""

    def __init__(self, oci_runtime: str) -> None:
        super().__init__()
        self.oci_runtime = oci_runtime

    def env(self) -> dict[str, str]:
        return {**super().env(), "BILIK_OCI_RUNTIME": self.oci_runtime}


@pytest.fixture(scope="module", params=RUNTIMES)
def srv(request: pytest.FixtureRequest) -> Iterator[_Server]:
    server = _Server(request.param)
    server.start()
    yield server
    server.finish()


def _params(srv: BilikServer) -> dict[str, Any]:
    return {"api_key": srv.key, "api_url": srv.url, "sandbox_url": srv.url}


@pytest.fixture(scope="module")
def sbx(srv: _Server) -> Iterator[Sandbox]:
    sandbox = Sandbox.create("base", timeout=600, **_params(srv))
    yield sandbox
    sandbox.kill()


@pytest_asyncio.fixture
async def async_sbx(srv: _Server) -> AsyncIterator[AsyncSandbox]:
    sandbox = await AsyncSandbox.create("base", timeout=120, **_params(srv))
    yield sandbox
    await sandbox.kill()


def _status(sbx: Sandbox, field: str) -> str:
    """A field of /proc/self/status of a command of the sandbox's user."""
    out = sbx.commands.run(f"grep '^{field}:' /proc/self/status").stdout
    return out.split(":", 1)[1].strip()


def _needs_setuid(srv: _Server) -> None:
    if srv.oci_runtime == "runsc":
        pytest.skip("Debian 12's gVisor ignores set-uid bits (google/gvisor#212)")


def test_sudo_works_without_a_password(sbx: Sandbox, srv: _Server) -> None:
    _needs_setuid(srv)
    assert sbx.commands.run('sudo echo "$FOO"', envs={"FOO": "bar"}).stdout == "bar\n"
    assert sbx.commands.run("sudo whoami").stdout == "root\n"
    assert sbx.commands.run("whoami").stdout == "user\n"
    # -E keeps the caller's environment; root's own files are root's to write.
    kept = sbx.commands.run("sudo -E sh -c 'echo $FOO; id -u'", envs={"FOO": "kept"})
    assert kept.stdout == "kept\n0\n"
    sbx.commands.run("sudo touch /root/made-by-sudo && sudo chmod 600 /root/made-by-sudo")
    assert sbx.commands.run("sudo stat -c '%U %a' /root/made-by-sudo").stdout == "root 600\n"
    with pytest.raises(CommandExitException):
        sbx.commands.run("cat /root/made-by-sudo")  # and still not the user's
    # As E2B's base image: the user's entry in sudoers.d, and sudo -n never asks.
    assert sbx.commands.run("sudo -n true").exit_code == 0


def test_root_through_sudo_stays_confined(sbx: Sandbox, srv: _Server) -> None:
    _needs_setuid(srv)
    # Set-uid programs work (no_new_privs is off), but the seccomp filter is inherited across
    # the set-uid exec: new user namespaces and mounts stay refused to root inside.
    assert _status(sbx, "NoNewPrivs") == "0"
    assert _status(sbx, "CapEff") == "0000000000000000"
    refused = sbx.commands.run(
        "sudo sh -c 'unshare -U true; echo $?; mount -t tmpfs x /mnt; echo $?; id -u'"
    )
    unshare, mount, uid = refused.stdout.split()
    assert unshare != "0" and mount != "0" and uid == "0"
    assert sbx.commands.run("sudo grep '^Seccomp:' /proc/self/status").stdout == "Seccomp:\t2\n"
    # What sudo gains is the sandbox's bounding set: no CAP_SYS_ADMIN, NET_ADMIN, SYS_MODULE,
    # SYS_PTRACE (what the processes the runtime itself starts have, see test_isolation).
    bounding = int(sbx.commands.run("sudo grep '^CapBnd:' /proc/self/status").stdout.split()[1], 16)
    for cap in (21, 12, 16, 19):
        assert not bounding & (1 << cap), cap
    # And root inside is no root on the host: every host process of the server's sandboxes,
    # one started through sudo among them, runs as an unprivileged uid.
    sleeper = sbx.commands.run("sudo sleep 60", background=True)
    try:
        time.sleep(0.5)
        pids = cgroups.pids_in(SERVER_SETTINGS.instance)
        owners = {os.stat(f"/proc/{p}").st_uid for p in pids if os.path.exists(f"/proc/{p}")}
        assert owners and 0 not in owners
    finally:
        sbx.commands.kill(sleeper.pid)


def test_remove_of_nothing_succeeds(sbx: Sandbox) -> None:
    sbx.files.remove("/tmp/never-was")
    sbx.files.remove("/no/such/dir/at/all")
    sbx.files.write("/tmp/gone/a/b.txt", "x")
    sbx.files.remove("/tmp/gone")  # recursive
    assert not sbx.files.exists("/tmp/gone")
    sbx.files.remove("/tmp/gone")


def test_list_is_depth_first_in_lexical_order(sbx: Sandbox) -> None:
    for path in ("b/y/deep.txt", "b/x.txt", "a.txt", "c/z.txt", "B.txt"):
        sbx.files.write(f"/tmp/walk/{path}", "w")
    listed = [e.path.removeprefix("/tmp/walk/") for e in sbx.files.list("/tmp/walk", depth=3)]
    assert listed == ["B.txt", "a.txt", "b", "b/x.txt", "b/y", "b/y/deep.txt", "c", "c/z.txt"]
    two = [e.path.removeprefix("/tmp/walk/") for e in sbx.files.list("/tmp/walk", depth=2)]
    assert two == ["B.txt", "a.txt", "b", "b/x.txt", "b/y", "c", "c/z.txt"]


def test_write_returns_its_metadata(sbx: Sandbox, srv: _Server) -> None:
    if srv.oci_runtime == "runsc":
        pytest.skip("Debian 12's gVisor has no user extended attributes, where metadata lives")
    for octet_stream in (False, True):
        info = sbx.files.write(
            "/tmp/meta.txt", "m", metadata={"Owner": "agent-7"}, use_octet_stream=octet_stream
        )
        assert info.metadata == {"owner": "agent-7"}, octet_stream
        assert sbx.files.get_info("/tmp/meta.txt").metadata == {"owner": "agent-7"}
    assert sbx.files.write("/tmp/meta.txt", "plain").metadata is None
    for octet_stream in (False, True):
        infos = sbx.files.write_files(
            [{"path": "/tmp/many/1.txt", "data": "1"}, {"path": "/tmp/many/2.txt", "data": "2"}],
            metadata={"batch": "b1"},
            use_octet_stream=octet_stream,
        )
        assert [(i.path, i.metadata) for i in infos] == [
            ("/tmp/many/1.txt", {"batch": "b1"}),
            ("/tmp/many/2.txt", {"batch": "b1"}),
        ]
        for info in infos:
            assert sbx.files.get_info(info.path).metadata == {"batch": "b1"}


def test_command_timeout_is_a_timeout(sbx: Sandbox) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 10", timeout=2)
    assert time.monotonic() - started < 8
    time.sleep(0.5)
    assert "sleep 10" not in sbx.commands.run("ps -eo args").stdout


async def test_command_timeout_is_a_timeout_in_the_async_sdk(async_sbx: AsyncSandbox) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        await async_sbx.commands.run("sleep 10", timeout=2)
    assert time.monotonic() - started < 8
    # A background command's handle ends the same way; the command is gone with its deadline.
    handle = await async_sbx.commands.run("sleep 10", background=True, timeout=2)
    with pytest.raises(TimeoutException):
        await handle.wait()
    assert "sleep 10" not in (await async_sbx.commands.run("ps -eo args")).stdout
