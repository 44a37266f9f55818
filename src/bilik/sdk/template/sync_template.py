"""``Template``: the same calls as :class:`AsyncTemplate`, blocking.

Each one runs the async implementation on the SDK's portal loop (a daemon thread), so the
two cannot drift apart; ``on_build_logs`` is called on that thread.
"""

from __future__ import annotations

import builtins
from typing import Unpack

from bilik.sdk._portal import run
from bilik.sdk.config import ApiParams
from bilik.sdk.template import operations
from bilik.sdk.template.async_template import TemplateClass
from bilik.sdk.template.builder import TemplateBase
from bilik.sdk.template.operations import OnLogs
from bilik.sdk.template.types import (
    BuildInfo,
    TemplateBuildStatusResponse,
    TemplateInfo,
    TemplateTag,
    TemplateTagInfo,
)


class Template(TemplateBase):
    """A template definition (see :class:`TemplateBase`) and the calls that build and manage
    templates. Server options (``api_key=``, ``api_url=``, ``request_timeout=``, …) default
    to ``BILIK_API_KEY``/``BILIK_URL`` (then ``E2B_API_KEY``/``E2B_API_URL``).

    Example::

        template = (
            Template()
            .from_base_image()
            .copy("app.py", "/app/")
            .set_envs({"PORT": "8000"})
            .set_start_cmd("python3 /app/app.py", wait_for_port(8000))
        )
        Template.build(template, "my-app", cpu_count=2, memory_mb=1024)
    """

    @staticmethod
    def build(
        template: TemplateClass,
        name: str | None = None,
        *,
        alias: str | None = None,
        tags: builtins.list[str] | None = None,
        cpu_count: int | None = None,
        memory_mb: int | None = None,
        skip_cache: bool = False,
        on_build_logs: OnLogs | None = None,
        **opts: Unpack[ApiParams],
    ) -> BuildInfo:
        """Build ``template`` as ``name`` (``alias=`` is E2B's older name for it) and wait.

        Logs go to ``on_build_logs`` as they are produced. A failed build raises
        BuildException whose message (and traceback) points at the line of template code
        that added the failed step.

        :param tags: more tags for this build (it is also the template's "default")
        :param cpu_count: vCPUs of sandboxes from the template
        :param memory_mb: memory of sandboxes from the template, MiB
        :param skip_cache: rebuild every step, even the ones the server has
        """
        return run(
            operations.build(
                template, name, alias, tags, cpu_count, memory_mb, skip_cache, on_build_logs, opts
            )
        )

    @staticmethod
    def build_in_background(
        template: TemplateClass,
        name: str | None = None,
        *,
        alias: str | None = None,
        tags: builtins.list[str] | None = None,
        cpu_count: int | None = None,
        memory_mb: int | None = None,
        skip_cache: bool = False,
        on_build_logs: OnLogs | None = None,
        **opts: Unpack[ApiParams],
    ) -> BuildInfo:
        """Start building ``template`` and return at once; follow it with
        :meth:`get_build_status`."""
        return run(
            operations.start_build(
                template, name, alias, tags, cpu_count, memory_mb, skip_cache, on_build_logs, opts
            )
        )

    @staticmethod
    def get_build_status(
        build_info: BuildInfo, logs_offset: int | None = None, **opts: Unpack[ApiParams]
    ) -> TemplateBuildStatusResponse:
        """A build's status, and its log entries from ``logs_offset`` (a page at most)."""
        return run(operations.build_status(build_info, logs_offset, opts))

    @staticmethod
    def exists(name: str, **opts: Unpack[ApiParams]) -> bool:
        """Whether a template of that name exists (for this API key)."""
        return run(operations.exists(name, opts))

    @staticmethod
    def alias_exists(alias: str, **opts: Unpack[ApiParams]) -> bool:
        """E2B's older name for :meth:`exists`."""
        return run(operations.exists(alias, opts))

    @staticmethod
    def list(**opts: Unpack[ApiParams]) -> builtins.list[TemplateInfo]:
        """The API key's templates."""
        return run(operations.list_templates(opts))

    @staticmethod
    def delete(name: str, **opts: Unpack[ApiParams]) -> None:
        """Delete a template (by name or id); NotFoundException if there is none."""
        run(operations.delete(name, opts))

    @staticmethod
    def assign_tags(
        target_name: str, tags: str | builtins.list[str], **opts: Unpack[ApiParams]
    ) -> TemplateTagInfo:
        """Point ``tags`` at the build ``target_name`` (``name:tag``) names."""
        return run(operations.assign_tags(target_name, tags, opts))

    @staticmethod
    def remove_tags(name: str, tags: str | builtins.list[str], **opts: Unpack[ApiParams]) -> None:
        """Take tags off a template."""
        run(operations.remove_tags(name, tags, opts))

    @staticmethod
    def get_tags(template_id: str, **opts: Unpack[ApiParams]) -> builtins.list[TemplateTag]:
        """A template's tags and the builds they name."""
        return run(operations.get_tags(template_id, opts))
