"""Where in the user's code a template step was added, so a failed step can point there."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from types import FrameType, TracebackType

# Frames in this tree are the SDK's own; the first frame outside it is the user's.
_SDK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inside_sdk(filename: str) -> bool:
    try:
        return os.path.commonpath([_SDK_ROOT, os.path.abspath(filename)]) == _SDK_ROOT
    except ValueError:
        return False


@dataclass(frozen=True)
class Origin:
    """A line of user code, and a one-frame traceback of it (for ``with_traceback``)."""

    filename: str
    lineno: int
    traceback: TracebackType

    def __str__(self) -> str:
        return f"{self.filename}:{self.lineno}"


def user_frame() -> FrameType | None:
    """The innermost frame that is not the SDK's."""
    frame = inspect.currentframe()
    while frame is not None and _inside_sdk(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def caller() -> Origin | None:
    """The user's line that called into the SDK (None when there is no such frame)."""
    frame = user_frame()
    if frame is None:
        return None
    # Keeping the frame keeps its locals alive; that is the price of a real traceback.
    traceback = TracebackType(None, frame, frame.f_lasti, frame.f_lineno)
    return Origin(frame.f_code.co_filename, frame.f_lineno, traceback)


def caller_directory() -> str | None:
    """The directory of the user's file that called into the SDK."""
    frame = user_frame()
    if frame is None or frame.f_code.co_filename.startswith("<"):
        return None
    return os.path.dirname(os.path.abspath(frame.f_code.co_filename))
