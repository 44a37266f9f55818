"""Inside a sandbox the host is out of sight and out of reach, under crun and under gVisor."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

from bilik.runtime import LocalRuntime, SandboxInfo, cgroups
from helpers import EACH_OCI_RUNTIME, SETTINGS, run_ok

pytestmark = EACH_OCI_RUNTIME


async def test_host_processes_are_invisible(
    runtime: LocalRuntime, shared_sandbox: SandboxInfo
) -> None:
    out = await run_ok(runtime, shared_sandbox.sandbox_id, "ps -eo pid,comm --no-headers")
    pids = {int(line.split()[0]) for line in out.splitlines()}
    commands = {line.split()[1] for line in out.splitlines()}
    assert 1 in pids
    assert "pytest" not in commands and "python" not in commands
    assert len(pids) < 10, out
    # The test process itself, by its host pid, does not exist inside.
    result = await runtime.run(shared_sandbox.sandbox_id, ["cat", f"/proc/{os.getpid()}/cmdline"])
    assert b"pytest" not in result.stdout


async def test_host_files_are_unreachable(
    runtime: LocalRuntime, shared_sandbox: SandboxInfo
) -> None:
    marker = Path("/tmp") / f"bilik-marker-{uuid.uuid4().hex}"
    marker.write_text("secret")
    try:
        result = await runtime.run(shared_sandbox.sandbox_id, ["cat", str(marker)])
        assert result.exit_code != 0 and b"secret" not in result.stdout
        out = await run_ok(runtime, shared_sandbox.sandbox_id, "cat /etc/hostname; ls /home")
        assert out.split() == [shared_sandbox.sandbox_id, "user"]
        # Nothing of the host is mounted inside but the sandbox's own files and the read-only
        # runtime directory.
        mounts = await run_ok(runtime, shared_sandbox.sandbox_id, "cat /proc/self/mountinfo")
        points = {line.split()[4] for line in mounts.splitlines()}
        assert points <= {
            "/",
            "/proc",
            "/dev",
            "/dev/pts",
            "/dev/shm",
            "/dev/mqueue",
            "/sys",
            "/etc/hostname",
            "/etc/hosts",
            "/etc/resolv.conf",
            "/.bilik",
            "/run/bilik",  # the sandbox's own control directory (envd's config and socket)
            "/etc/ld.so.preload",  # gVisor's: the statx shim (runtime/gvisor_statx.c)
            "/tmp",  # gVisor's: the disk's own /tmp, bound over the tmpfs runsc would put there
            *(p for p in points if p.startswith(("/proc/", "/sys/", "/dev/"))),
        }
    finally:
        marker.unlink()


async def test_mount_is_refused(runtime: LocalRuntime, shared_sandbox: SandboxInfo) -> None:
    result = await runtime.run(shared_sandbox.sandbox_id, ["mount", "-t", "tmpfs", "none", "/mnt"])
    assert result.exit_code != 0
    assert (
        b"permission denied" in result.stderr.lower() or b"not permitted" in result.stderr.lower()
    )


async def test_kernel_module_loading_is_refused(
    runtime: LocalRuntime, shared_sandbox: SandboxInfo
) -> None:
    script = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "for nr, name in ((175, 'init_module'), (313, 'finit_module'), (246, 'kexec_load'),"
        " (321, 'bpf'), (250, 'keyctl')):\n"
        "    r = libc.syscall(nr, 0, 0, 0, 0)\n"
        "    print(name, r, os.strerror(ctypes.get_errno()))\n"
    )
    out = await run_ok(runtime, shared_sandbox.sandbox_id, f'python3 -c "{script}"')
    for line in out.splitlines():
        _name, result, *error = line.split(maxsplit=2)
        assert result == "-1", line
        assert error == ["Operation not permitted"], line


async def test_new_user_namespaces_are_refused(
    runtime: LocalRuntime, shared_sandbox: SandboxInfo
) -> None:
    result = await runtime.run(
        shared_sandbox.sandbox_id, ["unshare", "--user", "--map-root-user", "id"]
    )
    assert result.exit_code != 0


async def test_host_devices_are_unreachable(
    runtime: LocalRuntime, shared_sandbox: SandboxInfo
) -> None:
    devices = (await run_ok(runtime, shared_sandbox.sandbox_id, "ls /dev")).split()
    assert not {"vda", "sda", "mem", "kmem", "port", "kvm", "loop0"} & set(devices)
    # Making a node for the host's disk (major 254 is virtio-blk) does not give access to it.
    result = await runtime.run(
        shared_sandbox.sandbox_id,
        ["sh", "-c", "mknod /tmp/disk b 254 0 && head -c 512 /tmp/disk | wc -c"],
    )
    assert result.exit_code != 0 or result.stdout.strip() == b"0", result


async def test_root_inside_is_an_unprivileged_uid_outside(
    runtime: LocalRuntime, sandbox: SandboxInfo, oci_runtime: str
) -> None:
    out = await run_ok(
        runtime,
        sandbox.sandbox_id,
        "id -u; cat /proc/self/uid_map; echo hi > /etc/owned-by-root-inside",
    )
    uid, *mapping = out.split()
    assert uid == "0"
    if oci_runtime == "crun":  # gVisor's own kernel shows a map of its own; runsc runs in this
        assert mapping == ["0", str(SETTINGS.uid_base), "65536"]
    upper = SETTINGS.data_dir / "sandboxes" / sandbox.sandbox_id / "disk" / "upper"
    st = (upper / "etc" / "owned-by-root-inside").stat()
    assert st.st_uid == SETTINGS.uid_base and st.st_gid == SETTINGS.uid_base
    # And every process of the sandbox runs as that uid on the host.
    host_pids = cgroups.pids_in(SETTINGS.instance)
    owners = {os.stat(f"/proc/{p}").st_uid for p in host_pids if os.path.exists(f"/proc/{p}")}
    assert owners and 0 not in owners


async def test_sandbox_user_and_sudo_config(
    runtime: LocalRuntime, shared_sandbox: SandboxInfo, oci_runtime: str
) -> None:
    out = await run_ok(runtime, shared_sandbox.sandbox_id, "id; echo $HOME; pwd", user="user")
    assert out.splitlines() == [
        "uid=1000(user) gid=1000(user) groups=1000(user)",
        "/home/user",
        "/home/user",
    ]
    sudoers = await run_ok(runtime, shared_sandbox.sandbox_id, "cat /etc/sudoers.d/user")
    assert "NOPASSWD: ALL" in sudoers
    # no_new_privs is off, so sudo works, as on E2B (root inside is still the unprivileged
    # host uid, see above, under the same seccomp filter). Debian 12's gVisor sets it on every
    # process whatever the bundle says, and ignores set-uid bits (google/gvisor#212).
    get_no_new_privs = "import ctypes; print(ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))"
    status = await run_ok(
        runtime, shared_sandbox.sandbox_id, f'python3 -c "{get_no_new_privs}"', user="user"
    )
    if oci_runtime == "runsc":
        assert status == "1\n"
        return
    assert status == "0\n"
    out = await run_ok(runtime, shared_sandbox.sandbox_id, "sudo -n id -u", user="user")
    assert out == "0\n"
    seccomp = await run_ok(
        runtime, shared_sandbox.sandbox_id, "sudo -n grep ^Seccomp: /proc/self/status", user="user"
    )
    assert seccomp.split() == ["Seccomp:", "2"]


async def test_capabilities_are_minimal(runtime: LocalRuntime, shared_sandbox: SandboxInfo) -> None:
    out = await run_ok(runtime, shared_sandbox.sandbox_id, "grep CapBnd /proc/self/status")
    bounding = int(out.split()[1], 16)
    CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_MODULE, CAP_SYS_PTRACE = 21, 12, 16, 19
    for cap in (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_MODULE, CAP_SYS_PTRACE):
        assert not bounding & (1 << cap)
    user = await run_ok(
        runtime, shared_sandbox.sandbox_id, "grep CapEff /proc/self/status", user="user"
    )
    assert int(user.split()[1], 16) == 0


async def test_kernel_paths_are_masked(runtime: LocalRuntime, shared_sandbox: SandboxInfo) -> None:
    kcore = await runtime.run(
        shared_sandbox.sandbox_id, ["sh", "-c", "head -c 16 /proc/kcore | wc -c"]
    )
    assert kcore.stdout.strip() == b"0"
    sysrq = await runtime.run(
        shared_sandbox.sandbox_id, ["sh", "-c", "echo h > /proc/sysrq-trigger"]
    )
    assert sysrq.exit_code != 0
    sysctl = await runtime.run(
        shared_sandbox.sandbox_id, ["sh", "-c", "echo 1 > /proc/sys/kernel/panic"]
    )
    assert sysctl.exit_code != 0
    # The host's cgroup tree (every other sandbox's among it) and debug trees are hidden.
    hidden = await runtime.run(
        shared_sandbox.sandbox_id,
        ["sh", "-c", "ls -A /sys/fs/cgroup /sys/kernel/debug 2>/dev/null"],
    )
    assert hidden.stdout.split() in (
        [b"/sys/fs/cgroup:", b"/sys/kernel/debug:"],  # empty (crun masks them)
        [b"/sys/fs/cgroup:"],  # or not there at all (gVisor's sysfs has no debug tree)
    ), hidden


async def test_host_never_follows_links_the_sandbox_plants(
    runtime: LocalRuntime, sandbox: SandboxInfo
) -> None:
    """Users are looked up in the template's layers, not in the sandbox's own /etc/passwd."""
    await run_ok(runtime, sandbox.sandbox_id, "ln -sf /dev/zero /etc/passwd")
    assert await run_ok(runtime, sandbox.sandbox_id, "id -u", user="user") == "1000\n"


async def test_set_uid_files_stay_out_of_other_host_users_reach(
    runtime: LocalRuntime, shared_sandbox: SandboxInfo
) -> None:
    """Set-uid files work inside (``sudo``), and exist on the host in layers, build trees and
    each sandbox's rootfs, owned by the sandboxes' root: no other host user may reach them."""
    sandbox_dir = runtime.records.dir(shared_sandbox.sandbox_id)
    for d in (runtime.layers.layers_dir, runtime.layers.tmp_dir, sandbox_dir):
        st = os.stat(d)
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, SETTINGS.uid_base, 0o710), d
    # (nobody is neither root nor in the sandboxes' group)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    listing = subprocess.run([*nobody, "ls", sandbox_dir / "rootfs"], capture_output=True)
    assert listing.returncode != 0 and b"Permission denied" in listing.stderr
