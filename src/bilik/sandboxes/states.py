"""A sandbox's states, which moves between them are allowed, and the one function that makes
a move.

    creating ──► running ──► killed
        └────────────────────►┘      (a create undone)

A state is recorded in the sandbox's row before the step it names acts (``creating`` before
the runtime makes anything), so a start after a crash finds what a stop cut short and settles
it from the runtime's truth. ``killed`` is the row's removal: nothing is kept of a killed
sandbox. New states (paused, snapshotting) are a row of :data:`ALLOWED` each, and go through
:func:`transition` like the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Literal

from ..store.sandboxes import SandboxStore

State = Literal["creating", "running", "killed"]

CREATING: Final = "creating"
RUNNING: Final = "running"
KILLED: Final = "killed"

ALLOWED: Mapping[State, frozenset[State]] = {
    CREATING: frozenset({RUNNING, KILLED}),
    RUNNING: frozenset({KILLED}),
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
) -> None:
    """Record that the sandbox moves from ``old`` to ``new`` (its start time becoming
    ``started_at``, if given), or raise :class:`TransitionRefused`. Only from the state it is
    in: of two concurrent moves from one state, one is refused."""
    if new not in ALLOWED[old]:
        raise TransitionRefused(sandbox_id, old, new, "not an allowed move")
    if new == KILLED:
        await store.remove(sandbox_id)
    elif not await store.set_state(sandbox_id, old, new, started_at):
        raise TransitionRefused(sandbox_id, old, new, f"it is no longer {old}")
