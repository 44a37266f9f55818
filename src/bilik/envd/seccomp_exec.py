"""Run a command under a seccomp filter it sets itself: ``python3 -I -m bilik.envd.seccomp_exec
FILTER ARGV ...`` (``FILTER``: a compiled program, see ``runtime.seccomp.compile_bpf``).

Debian 12's gVisor applies a bundle's seccomp filter to PID 1 alone, not to what ``runsc exec``
starts (google/gvisor#12692 added that later), and processes under its rendering of the filter
cannot start threads. So in gVisor sandboxes PID 1 and the runtime's own execs start through
this, with the filter libseccomp compiled on the host, as crun would set it.

It sets ``no_new_privs`` to set the filter, as a process without CAP_SYS_ADMIN must. Under crun
sandbox processes go without it (set-uid ``sudo`` works there, see ``enter``); this gVisor sets
it on every process anyway, and ignores set-uid bits (google/gvisor#212).
"""

from __future__ import annotations

import os
import sys

from .enter import PR_SET_NO_NEW_PRIVS, SeccompFilter, _prctl

KEPT = "BILIK_KEPT_"


def main(filter_path: str, argv: list[str]) -> None:
    with open(filter_path, "rb") as f:
        program = f.read()
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    SeccompFilter(program).load()
    # The loader's variables, put aside so that they applied to the command only.
    for name in [n for n in os.environ if n.startswith(KEPT)]:
        os.environ[name.removeprefix(KEPT)] = os.environ.pop(name)
    command = argv[0]
    try:
        os.execvp(command, argv)
    except OSError as e:
        print(f"{command}: {e.strerror}", file=sys.stderr)
        sys.exit(127 if isinstance(e, FileNotFoundError) else 126)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: seccomp_exec FILTER COMMAND [ARG ...]")
    main(sys.argv[1], sys.argv[2:])
