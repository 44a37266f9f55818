"""Run a command as root of a new user namespace mapped to a sandbox's host uid range.

gVisor's ``runsc`` runs under this (``python3 -I -S userns_exec.py …``, standalone: the
standard library only): this build of runsc refuses a user namespace in the bundle, so it is
given one from outside. Its Sentry and gofer then act as the sandbox's unprivileged host uids
(a file root makes inside belongs to the range's first uid on the host, as under crun), they
see the same uid-shifted layers crun does, and they run in the sandbox's network namespace and
cgroups, which this joins first (as host root, before giving privilege up).

    userns_exec.py NETNS|- UID_BASE SIZE [CGROUP_PROCS_FILE ...] -- ARGV ...

``-``: stay in this network namespace. The process execs ``ARGV`` itself (its pid is the
command's), after a forked helper, still host root, has written the namespace's uid and gid
maps.
"""

import ctypes
import os
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def main(args: list[str]) -> None:
    if "--" not in args or args.index("--") < 3 or args.index("--") == len(args) - 1:
        raise OSError("usage: userns_exec.py NETNS|- UID_BASE SIZE [CGROUP_PROCS ...] -- ARGV")
    split = args.index("--")
    netns, uid_base, size, *cgroup_procs = args[:split]
    argv = args[split + 1 :]
    libc = ctypes.CDLL(None, use_errno=True)
    for procs in cgroup_procs:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    if netns != "-":
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        _check(libc.setns(fd, CLONE_NEWNET), f"entering {netns}")
        os.close(fd)
    unshared_r, unshared_w = os.pipe()
    mapped_r, mapped_w = os.pipe()
    me = os.getpid()
    helper = os.fork()
    if helper == 0:  # still host root in the host's user namespace: it may write the maps
        os.close(unshared_w)
        os.close(mapped_r)
        answer = b"the user namespace was not made"
        try:
            if os.read(unshared_r, 1) == b"1":
                for name in ("uid_map", "gid_map"):
                    with open(f"/proc/{me}/{name}", "w") as f:
                        f.write(f"0 {uid_base} {size}\n")
                answer = b"ok"
        except OSError as e:
            answer = f"writing the user namespace's maps: {e}".encode()
        finally:
            os.write(mapped_w, answer)
            os._exit(0)
    os.close(unshared_r)
    os.close(mapped_w)
    unshared = libc.unshare(CLONE_NEWUSER)
    errno = ctypes.get_errno()
    os.write(unshared_w, b"1" if unshared == 0 else b"0")
    answer = os.read(mapped_r, 4096)
    os.waitpid(helper, 0)
    if unshared != 0:
        raise OSError(errno, f"creating a user namespace: {os.strerror(errno)}")
    if answer != b"ok":
        raise OSError(answer.decode(errors="replace") or "the uid map helper died")
    os.setgroups([])
    os.setgid(0)
    os.setuid(0)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except OSError as e:
        print(f"userns_exec: {e}", file=sys.stderr)
        sys.exit(125)
