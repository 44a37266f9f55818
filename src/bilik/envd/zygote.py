"""envd's zygote: one host process with envd already imported, forking an envd per sandbox.

Starting a Python and importing envd's stack costs ~250 ms and ~20 MiB per sandbox. The zygote
pays that once: for each new sandbox it forks, the child joins the sandbox (``enter``: cgroups,
namespaces, root, user, capabilities, seccomp, as strictly as the OCI runtime's own ``exec``)
and forks envd inside its pid namespace. envd starts in milliseconds, and the imported code
stays shared, copy-on-write, between the zygote and every envd.

The zygote is started by the server (``runtime.envd_zygote``) with the host's Python (the very
interpreter the sandboxes' copy was made from) and dies with it; the envds it forked live on.
Its configuration (the sandboxes' capabilities and seccomp profile, and the fd of its end of a
socket pair) comes as one JSON line on stdin. Requests arrive on the socket one JSON line at a
time, ``{"pid": <the sandbox's PID 1 on the host>, "start": <its start time>, "control_dir":
"/run/bilik", "socket": <host path>, "log": <host path>}``, and each is answered with
``{"pid": <envd's host pid>}`` or ``{"error": "..."}``. The zygote exits when the server closes
its end.

envd's unix socket and its log are made here, on the host, before the joiner enters the sandbox,
at paths only the host can change: envd gets them as open descriptors. The host reaches envd
through that socket, so nothing in the sandbox can point the host's connection elsewhere (a
socket file in a directory the sandbox could write could be replaced by a link to any host
socket).

Inside the sandbox the interpreter's files are those of ``/.bilik/python`` and
``/.bilik/agents``, copies of the host files the zygote loaded: ``sys.path`` is pointed there,
so an import envd makes later still finds its module.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import json
import os
import signal
import socket
import sys
import traceback

from ..proto.contract import CONTROL_DIR
from . import enter

# envd's listening socket, in envd (``python -m bilik.envd --listen-fd``).
LISTEN_FD = 3
_NO_LINKS = os.O_NOFOLLOW | os.O_CLOEXEC

# sys.path inside sandboxes, entry for entry the zygote's own (see ``EnvdZygote``).
IN_SANDBOX_PATH = [
    "/.bilik/agents",
    f"/.bilik/python/lib/python{sys.version_info.major}.{sys.version_info.minor}",
    f"/.bilik/python/lib/python{sys.version_info.major}.{sys.version_info.minor}/lib-dynload",
]


def cgroup_procs(pid: int) -> list[str]:
    """The ``cgroup.procs`` file of every cgroup hierarchy ``pid`` is in (host view)."""
    files = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers == "":
                unified = "/sys/fs/cgroup/unified"
                base = unified if os.path.isdir(unified) else "/sys/fs/cgroup"
            elif controllers.startswith("name="):
                base = f"/sys/fs/cgroup/{controllers[5:]}"
            else:
                base = f"/sys/fs/cgroup/{controllers}"
            procs = f"{base}{path}/cgroup.procs"
            if os.path.exists(procs):
                files.append(procs)
    return files


def _preload() -> None:
    """Import everything envd may use, before any fork."""
    import asyncio.subprocess  # noqa: F401
    import concurrent.futures.thread  # noqa: F401

    import uvicorn.lifespan.off
    import uvicorn.loops.asyncio
    import uvicorn.protocols.http.h11_impl  # noqa: F401

    from . import __main__, app, files, inotify, metrics, multipart  # noqa: F401


def _relocate(moves: dict[str, str]) -> None:
    """Point the import system at the sandbox's copies of the files it loaded from the host:
    ``sys.path``, and each imported package's own search path (which submodules come from)."""

    def moved(path: str) -> str:
        for old, new in moves.items():
            if path == old or path.startswith(old + "/"):
                return new + path[len(old) :]
        return path

    sys.path[:] = [moved(p) for p in sys.path]
    for module in list(sys.modules.values()):
        search = getattr(module, "__path__", None)
        if search is not None and not isinstance(search, str):
            search[:] = [moved(p) for p in search]
    sys.path_importer_cache.clear()


def _become_envd(control_dir: str, listener: int, log: int) -> None:
    """In the forked envd, inside the sandbox: a clean process (stdout and stderr to ``log``,
    the listening socket ``listener`` as fd 3), then envd's main loop."""
    os.setsid()
    for signum in range(1, signal.NSIG):
        with contextlib.suppress(OSError, ValueError):  # uncatchable or unused numbers
            signal.signal(signum, signal.SIG_DFL)
    # As Python itself starts: a write to a socket whose client hung up is an error to handle
    # (EPIPE), not a silent death (SIGPIPE); the processes envd starts get the defaults back.
    for signum in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    os.umask(0o022)
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.dup2(listener, LISTEN_FD)
    os.closerange(LISTEN_FD + 1, 65536)
    os.environ.clear()
    os.environ["PATH"] = "/usr/bin:/bin"
    _relocate(dict(zip(sys.path, IN_SANDBOX_PATH, strict=True)))
    enter.set_name("envd")
    from .__main__ import main

    sys.argv = ["envd", control_dir, f"--listen-fd={LISTEN_FD}"]
    main()


def _listen(path: str) -> int:
    """A unix socket listening at ``path`` (on the host, in a directory only the host writes);
    bound under a temporary name and renamed, so it appears only once it listens."""
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    temporary = f"{path}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    unix.bind(temporary)
    os.chmod(temporary, 0o600)
    unix.listen(128)
    os.rename(temporary, path)
    return unix.detach()


def _close_all_but(keep: set[int]) -> None:
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 65536)


def _spawn(
    request: dict[str, object], capabilities: list[str], seccomp: enter.SeccompFilter
) -> int:
    """Fork a process that joins the sandbox and forks envd in it; returns envd's host pid."""
    pid = int(request["pid"])  # type: ignore[call-overload]
    control_dir = str(request.get("control_dir", CONTROL_DIR))
    socket_path, log_path = str(request["socket"]), str(request["log"])
    start = int(request["start"])  # type: ignore[call-overload]
    target = enter.Target(pid, start, cgroup_procs(pid))
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the joiner
        status = 1
        try:
            os.close(read_end)
            # Made while still on the host (see the module's docstring).
            listener = _listen(socket_path)
            log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | _NO_LINKS, 0o600)
            # Nothing else of the zygote's may cross into the sandbox: not its channel to the
            # server (which can start envds anywhere), not its stdio.
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            _close_all_but({write_end, listener, log})
            enter.enter(target, capabilities, seccomp)
            envd = os.fork()  # only a child is in the sandbox's pid namespace
            if envd == 0:
                code = 0
                try:
                    os.close(write_end)
                    _become_envd(control_dir, listener, log)
                except BaseException:
                    traceback.print_exc()  # to envd.log, once it is stderr
                    code = 1
                finally:
                    os._exit(code)
            os.write(write_end, json.dumps({"pid": envd}).encode())
            status = 0
        except BaseException:
            os.write(write_end, json.dumps({"error": traceback.format_exc(limit=3)}).encode())
        finally:
            os._exit(status)
    os.close(write_end)
    answer = b""
    while chunk := os.read(read_end, 65536):
        answer += chunk
    os.close(read_end)
    with contextlib.suppress(ChildProcessError):  # the SIGCHLD handler may have reaped it
        os.waitpid(child, 0)
    result = json.loads(answer or b'{"error": "the joiner died"}')
    if "error" in result:
        raise RuntimeError(result["error"])
    return int(result["pid"])


def _reap(signum: int, frame: object) -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def main() -> None:
    config = json.loads(sys.stdin.readline())
    capabilities: list[str] = config["capabilities"]
    seccomp = enter.SeccompFilter(base64.b64decode(config["seccomp_bpf"]))
    _preload()
    # Nothing the zygote imported is ever collected: a collection in an envd would write to
    # every object's header and copy all the shared pages.
    gc.collect()
    gc.freeze()
    channel = os.fdopen(config["fd"], "r+b", buffering=0)
    # The envds are orphaned as soon as they start (the process that joined the sandbox exits):
    # they become the zygote's to reap, so a sandbox's pid namespace can always end promptly.
    # (Should the zygote die, the host's init takes them.)
    enter.set_child_subreaper()
    signal.signal(signal.SIGCHLD, _reap)
    print("ready", flush=True)
    for line in channel:
        answer: dict[str, object]
        try:
            answer = {"pid": _spawn(json.loads(line), capabilities, seccomp)}
        except Exception as e:
            answer = {"error": str(e)}
        channel.write(json.dumps(answer).encode() + b"\n")


if __name__ == "__main__":
    main()
