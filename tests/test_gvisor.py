"""gVisor (runsc) as a template's runtime, and what its sandboxes' own processes get.

What every backend must do is checked under runsc too (``runtime_conformance``), and the
isolation, limits and network suites run under both runtimes (``EACH_OCI_RUNTIME``); these are
the parts particular to runsc.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os

from bilik.runtime import LocalRuntime, SandboxSpec
from helpers import SETTINGS, run_ok


async def test_a_template_can_choose_gvisor(runtime: LocalRuntime) -> None:
    """A template's image names its OCI runtime; creates follow it unless they name another."""
    base = await asyncio.to_thread(runtime.image, "base")
    runtime.layers.save_image(dataclasses.replace(base, name="test-gvisor", oci_runtime="runsc"))
    try:
        info = await runtime.create(SandboxSpec(template="test-gvisor"))
        try:
            assert info.oci_runtime == "runsc"
            state = await runtime.oci("runsc").state(info.sandbox_id)
            assert state is not None and state["status"] == "running"
            assert await run_ok(runtime, info.sandbox_id, "uname -r") == "4.4.0\n"  # gVisor's
        finally:
            await runtime.kill(info.sandbox_id)
    finally:
        runtime.layers.remove_image("test-gvisor")


async def test_envd_and_its_processes_run_confined(runtime: LocalRuntime) -> None:
    """envd (started by the sandbox's init, not by ``runsc exec``) and everything it starts
    carry the sandbox's seccomp filter, run as the range's uids on the host, and see the
    coreutils that gVisor's statx quirk would break."""
    info = await runtime.create(SandboxSpec(), oci_runtime="runsc")
    try:
        async with runtime.envd(info.sandbox_id) as envd:
            status = await envd.run("grep Seccomp: /proc/self/status; ls /home; stat -c %U /")
            assert status.exit_code == 0, status
            assert status.output.split() == ["Seccomp:", "2", "user", "root"]
            refused = await envd.run("unshare --user true")
            assert refused.exit_code != 0
            await envd.run("echo x > /home/user/made-by-user", user="user")
        upper = SETTINGS.data_dir / "sandboxes" / info.sandbox_id / "disk" / "upper"
        made = os.stat(upper / "home" / "user" / "made-by-user")
        assert (made.st_uid, made.st_gid) == (SETTINGS.uid_base + 1000, SETTINGS.uid_base + 1000)
    finally:
        await runtime.kill(info.sandbox_id)


async def test_the_loaders_variables_reach_the_command_only(runtime: LocalRuntime) -> None:
    """The Python that sets a gVisor exec's filter starts without LD_PRELOAD and the like
    (what they load would run unfiltered); the command gets them back."""
    info = await runtime.create(SandboxSpec(), oci_runtime="runsc")
    try:
        loaded = await runtime.run(
            info.sandbox_id,
            # (one process: the shell reads its own status)
            [
                "sh",
                "-c",
                'echo "$LD_LIBRARY_PATH"; while read -r l; do case $l in Seccomp:*)'
                " echo $l;; esac; done < /proc/self/status",
            ],
            env={"LD_LIBRARY_PATH": "/opt/lib", "LD_PRELOAD": "/no/such.so"},
        )
        # One complaint of the loader: the shell's, not also the filter-setting Python's.
        assert loaded.stderr.count(b"cannot be preloaded") == 1, loaded
        assert loaded.stdout.split() == [b"/opt/lib", b"Seccomp:", b"2"]
    finally:
        await runtime.kill(info.sandbox_id)


async def test_file_metadata_gvisor_cannot_keep_is_a_clear_400(runtime: LocalRuntime) -> None:
    """gVisor keeps no user xattrs, where an upload's ``X-Metadata-*`` is kept: such an upload
    is refused as a request bilik cannot honour there (400, saying why), and writes nothing;
    the same upload without metadata succeeds."""
    info = await runtime.create(SandboxSpec(), oci_runtime="runsc")
    try:
        async with runtime.envd(info.sandbox_id) as envd:
            client = envd._client  # (the runtime's own client has no metadata parameter)
            params = {"path": "/tmp/tagged", "username": "user"}
            refused = await client.post(
                "/files", params=params, content=b"x", headers={"X-Metadata-Team": "blue"}
            )
            assert refused.status_code == 400, refused.text
            assert "metadata" in refused.json()["message"]
            gone = await envd.run("test -e /tmp/tagged")
            assert gone.exit_code == 1, gone
            plain = await client.post("/files", params=params, content=b"x")
            assert plain.status_code == 200, plain.text
    finally:
        await runtime.kill(info.sandbox_id)
