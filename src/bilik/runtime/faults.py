"""Crash injection for the pause and resume paths: :func:`fault` SIGKILLs this process at a
named step when the environment variable ``BILIK_FAULT`` names that step. Off (a no-op) unless
the variable is set; the tests use it to prove that a crash at any step leaves a sandbox that
the next start's reconcile settles as running or paused, with nothing acknowledged lost.

Each point fires just *after* the step it names is done (and before the next one):

Pause (``Runtime.pause``):
    ``pause:intent``    the intent (``pausing``, and its mode) is in the sandbox's record
    ``pause:sync``      (files pause under gVisor) ``sync`` ran inside the sandbox
    ``pause:freeze``    the sandbox is frozen (all but a files pause under gVisor)
    ``pause:syncfs``    (files pause) the disk's filesystem and image are flushed
    ``pause:stop``      (files pause) every process of the sandbox is gone
    ``pause:commit``    the pause is in the record (the caller has not been told yet)

Resume (``Runtime.resume``):
    ``resume:intent``   the intent (``resuming``) is in the sandbox's record
    ``resume:thaw``     (memory pause) the cgroup is thawed: the processes run again
    ``resume:boot``     (files pause) the new container runs, envd not yet started
    ``resume:envd``     (files pause) envd answers, the start command has not run yet
    ``resume:commit``   the record says running again (the caller has not been told yet)

Other parts of bilik call :func:`fault` at their own steps under their own names.
"""

from __future__ import annotations

import os
import signal

ENV = "BILIK_FAULT"


def fault(point: str) -> None:
    """Die at once (SIGKILL, no cleanup: as a crash) if ``BILIK_FAULT`` names ``point``."""
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
