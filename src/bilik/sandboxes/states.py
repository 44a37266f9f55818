"""A sandbox's states, which moves between them are allowed, and the one function that makes
a move.

    creating ──► running ──────────────► killed
        └──────────►┘ │  ▲                  ▲
                      ▼  │ (a pause failed) │
                    pausing ──► paused ─────┘
                                 │  ▲
                                 ▼  │ (a resume failed)
                               resuming ──► running

A state is recorded in the sandbox's row before the step it names acts (``creating`` before
the runtime makes anything), so a start after a crash finds what a stop cut short and settles
it from the runtime's truth. ``killed`` is the row's removal: nothing is kept of a killed
sandbox. ``pausing`` and ``resuming`` are recorded before the runtime pauses or resumes the
sandbox: a start that finds one settles it from what the runtime says (paused, running, gone).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

from ..store.sandboxes import SandboxStore

State = Literal["creating", "running", "pausing", "paused", "resuming", "killed"]

CREATING: Final = "creating"
RUNNING: Final = "running"
PAUSING: Final = "pausing"
PAUSED: Final = "paused"
RESUMING: Final = "resuming"
KILLED: Final = "killed"

ALLOWED: Mapping[State, frozenset[State]] = {
    CREATING: frozenset({RUNNING, KILLED}),
    RUNNING: frozenset({PAUSING, KILLED}),
    # (back to running: the pause failed and the sandbox runs on; killed: it was gone)
    PAUSING: frozenset({PAUSED, RUNNING, KILLED}),
    PAUSED: frozenset({RESUMING, KILLED}),
    # (back to paused: the resume failed and the sandbox is still paused)
    RESUMING: frozenset({RUNNING, PAUSED, KILLED}),
    KILLED: frozenset(),
}


class TransitionRefused(Exception):
    """A move :data:`ALLOWED` does not list, or one from a state the sandbox is no longer in
    (another request moved it first)."""

    def __init__(self, sandbox_id: str, old: State, new: State, why: str) -> None:
        super().__init__(f"sandbox {sandbox_id!r}: {old} → {new}: {why}")
        self.sandbox_id = sandbox_id
        self.old = old
        self.new = new


async def transition(
    store: SandboxStore,
    sandbox_id: str,
    old: State,
    new: State,
    *,
    started_at: float | None = None,
    record: Mapping[str, Any] | None = None,
) -> None:
    """Record that the sandbox moves from ``old`` to ``new`` (its start time becoming
    ``started_at``, if given, and the row's other columns ``record``), or raise
    :class:`TransitionRefused`. Only from the state it is in: of two concurrent moves from one
    state, one is refused."""
    if new not in ALLOWED[old]:
        raise TransitionRefused(sandbox_id, old, new, "not an allowed move")
    if new == KILLED:
        await store.remove(sandbox_id)
    elif not await store.set_state(sandbox_id, old, new, started_at, record):
        raise TransitionRefused(sandbox_id, old, new, f"it is no longer {old}")
