"""bilik's Python SDK: sandboxes with files, commands, terminals and a code interpreter.

The same shape as E2B's ``e2b`` and ``e2b_code_interpreter`` packages, sync and async::

    from bilik import Sandbox

    with Sandbox.create() as sandbox:
        sandbox.run_code("x = 1")
        print(sandbox.run_code("x += 1; x").text)  # 2

Configuration: ``BILIK_URL`` and ``BILIK_API_KEY`` (or ``E2B_API_URL`` and ``E2B_API_KEY``).
"""

from bilik.sdk.code import (
    Chart,
    ChartType,
    Context,
    Execution,
    ExecutionError,
    Logs,
    OutputMessage,
    Result,
)
from bilik.sdk.commands import AsyncCommandHandle
from bilik.sdk.config import ConnectionConfig
from bilik.sdk.exceptions import (
    AuthenticationException,
    BuildException,
    FileNotFoundException,
    FileUploadException,
    InvalidArgumentException,
    NotEnoughSpaceException,
    NotFoundException,
    RateLimitException,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    ServiceBusyException,
    TemplateException,
    TimeoutException,
)
from bilik.sdk.files import AsyncWatchHandle, WriteEntry
from bilik.sdk.models import (
    CommandExitException,
    CommandResult,
    EntryInfo,
    FilesystemEvent,
    FilesystemEventType,
    FileType,
    ProcessInfo,
    PtySize,
    ResourceUsage,
    SandboxInfo,
    SandboxMetrics,
    SandboxQuery,
    SnapshotInfo,
    WriteInfo,
)
from bilik.sdk.sandbox import (
    CommandHandle,
    Sandbox,
    SandboxPaginator,
    SnapshotPaginator,
    WatchHandle,
)
from bilik.sdk.sandbox_async import (
    AsyncSandbox,
    AsyncSandboxPaginator,
    AsyncSnapshotPaginator,
    SandboxLifecycle,
)
from bilik.sdk.template import (
    AsyncTemplate,
    BuildInfo,
    CopyItem,
    LogEntry,
    ReadyCmd,
    Template,
    TemplateBuildStatus,
    TemplateInfo,
    wait_for_file,
    wait_for_port,
    wait_for_process,
    wait_for_timeout,
    wait_for_url,
)

__all__ = [
    "AsyncCommandHandle",
    "AsyncSandbox",
    "AsyncSandboxPaginator",
    "AsyncSnapshotPaginator",
    "AsyncTemplate",
    "AsyncWatchHandle",
    "AuthenticationException",
    "BuildException",
    "BuildInfo",
    "Chart",
    "ChartType",
    "CommandExitException",
    "CommandHandle",
    "CommandResult",
    "ConnectionConfig",
    "Context",
    "CopyItem",
    "EntryInfo",
    "Execution",
    "ExecutionError",
    "FileNotFoundException",
    "FileType",
    "FileUploadException",
    "FilesystemEvent",
    "FilesystemEventType",
    "InvalidArgumentException",
    "LogEntry",
    "Logs",
    "NotEnoughSpaceException",
    "NotFoundException",
    "OutputMessage",
    "ProcessInfo",
    "PtySize",
    "RateLimitException",
    "ReadyCmd",
    "ResourceUsage",
    "Result",
    "Sandbox",
    "SandboxException",
    "SandboxInfo",
    "SandboxLifecycle",
    "SandboxMetrics",
    "SandboxNotFoundException",
    "SandboxNotRunningException",
    "SandboxPaginator",
    "SandboxQuery",
    "ServiceBusyException",
    "SnapshotInfo",
    "SnapshotPaginator",
    "Template",
    "TemplateBuildStatus",
    "TemplateException",
    "TemplateInfo",
    "TimeoutException",
    "WatchHandle",
    "WriteEntry",
    "WriteInfo",
    "wait_for_file",
    "wait_for_port",
    "wait_for_process",
    "wait_for_timeout",
    "wait_for_url",
]
