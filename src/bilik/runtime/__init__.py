"""The node runtime: template layers, OCI bundles, cgroups, networking, sandbox lifecycle."""

from .base import ExecResult, Process, Runtime, SandboxInfo, Usage
from .errors import (
    InvalidSpec,
    RuntimeFailure,
    SandboxExists,
    SandboxNotFound,
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
    "Process",
    "Runtime",
    "RuntimeFailure",
    "SandboxExists",
    "SandboxInfo",
    "SandboxNotFound",
    "SandboxSpec",
    "StepFailed",
    "TemplateNotFound",
    "Usage",
    "new_sandbox_id",
]
