"""The runtime's exceptions: one root, each named after what went wrong.

RuntimeFailure
├── SandboxNotFound     no sandbox with that id
├── InvalidSpec         a create asked for something impossible (bad limits, unknown template)
├── SandboxExists       a create reused a live id
├── TemplateNotFound    no template of that name
├── SandboxPaused       the sandbox is paused: resume it first (or it is, and a pause was asked)
├── SandboxNotPaused    a resume of a sandbox that is not paused
├── StepFailed          a host-side step of create or kill failed (names the step)
└── StartFailed         the template's start command failed, or its ready check never passed:
                        the template's fault, not the host's
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class RuntimeFailure(Exception):
    """Root of every error the runtime raises."""


class SandboxNotFound(RuntimeFailure):
    def __init__(self, sandbox_id: str) -> None:
        super().__init__(f"sandbox {sandbox_id!r} not found")
        self.sandbox_id = sandbox_id


class InvalidSpec(RuntimeFailure):
    pass


class SandboxExists(RuntimeFailure):
    def __init__(self, sandbox_id: str) -> None:
        super().__init__(f"sandbox {sandbox_id!r} already exists")
        self.sandbox_id = sandbox_id


class TemplateNotFound(InvalidSpec):
    def __init__(self, name: str) -> None:
        super().__init__(f"template {name!r} not found")
        self.name = name


class SandboxPaused(RuntimeFailure):
    """The sandbox is paused: what was asked needs it running (or was a pause)."""

    def __init__(self, sandbox_id: str) -> None:
        super().__init__(f"sandbox {sandbox_id!r} is paused")
        self.sandbox_id = sandbox_id


class SandboxNotPaused(RuntimeFailure):
    """A resume of a sandbox that is not paused."""

    def __init__(self, sandbox_id: str) -> None:
        super().__init__(f"sandbox {sandbox_id!r} is not paused")
        self.sandbox_id = sandbox_id


class StepFailed(RuntimeFailure):
    """A host-side step failed; ``step`` says which (``mount-disk``, ``oci-start``, …)."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step
        self.detail = detail


class StartFailed(RuntimeFailure):
    """The template's start command ended before its ready check passed (``exit_code``), or
    the check did not pass in time (``exit_code`` None); ``output`` is the command's last
    lines (what the sandbox printed: shown to the template's owner, never trusted). The
    message follows "the start command …" (``it exited with code 3``)."""

    def __init__(self, message: str, *, exit_code: int | None, output: str) -> None:
        said = f"its last output:\n{output}" if output else "it printed nothing"
        super().__init__(f"{message}; {said}")
        self.exit_code = exit_code
        self.output = output


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """One named host-side step: an OSError in it raises StepFailed(``name``)."""
    try:
        yield
    except OSError as e:
        raise StepFailed(name, str(e)) from e
