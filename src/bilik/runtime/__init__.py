"""The node runtime: template layers, OCI bundles, cgroups, networking, sandbox lifecycle."""

from .base import ExecResult, PauseInfo, Process, Runtime, SandboxInfo, Usage
from .errors import (
    InvalidSpec,
    RuntimeFailure,
    SandboxExists,
    SandboxNotFound,
    SandboxNotPaused,
    SandboxPaused,
    StepFailed,
    TemplateNotFound,
)
from .local import LocalRuntime
from .spec import Limits, SandboxSpec, new_sandbox_id

__all__ = [
    "ExecResult",
    "InvalidSpec",
    "Limits",
    "LocalRuntime",
    "PauseInfo",
    "Process",
    "Runtime",
    "RuntimeFailure",
    "SandboxExists",
    "SandboxInfo",
    "SandboxNotFound",
    "SandboxNotPaused",
    "SandboxPaused",
    "SandboxSpec",
    "StepFailed",
    "TemplateNotFound",
    "Usage",
    "new_sandbox_id",
]
