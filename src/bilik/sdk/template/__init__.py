"""Templates defined in Python: E2B's fluent builder, built on a bilik server.

``Template`` blocks; ``AsyncTemplate`` has the same calls as coroutines. Both build the
same definitions (``Template().from_…().copy(…).run_cmd(…)…``).
"""

from bilik.sdk.template.async_template import AsyncTemplate, TemplateClass
from bilik.sdk.template.builder import CopyItem, TemplateBase, TemplateBuilder, TemplateFinal
from bilik.sdk.template.readycmd import (
    ReadyCmd,
    wait_for_file,
    wait_for_port,
    wait_for_process,
    wait_for_timeout,
    wait_for_url,
)
from bilik.sdk.template.sync_template import Template
from bilik.sdk.template.types import (
    BuildInfo,
    BuildStatusReason,
    InstructionType,
    LogEntry,
    LogEntryEnd,
    LogEntryLevel,
    LogEntryStart,
    TemplateBuildStatus,
    TemplateBuildStatusResponse,
    TemplateInfo,
    TemplateTag,
    TemplateTagInfo,
)

__all__ = [
    "AsyncTemplate",
    "BuildInfo",
    "BuildStatusReason",
    "CopyItem",
    "InstructionType",
    "LogEntry",
    "LogEntryEnd",
    "LogEntryLevel",
    "LogEntryStart",
    "ReadyCmd",
    "Template",
    "TemplateBase",
    "TemplateBuildStatus",
    "TemplateBuildStatusResponse",
    "TemplateBuilder",
    "TemplateClass",
    "TemplateFinal",
    "TemplateInfo",
    "TemplateTag",
    "TemplateTagInfo",
    "wait_for_file",
    "wait_for_port",
    "wait_for_process",
    "wait_for_timeout",
    "wait_for_url",
]
