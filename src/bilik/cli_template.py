"""``bilik template build FILE.py``, ``list`` and ``delete``: templates through the SDK.

``build`` runs the Python file (as a module, not as ``__main__``) and builds the template it
defines: the module-level variable named in ``FILE.py:NAME``, else the one named
``template``, else the only template in the file. The template's name is ``--name``, else
the file's name without ``.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import bilik.cli_identity as cli_identity  # (not `from . import`: see cli.py)

from .config import Settings

if TYPE_CHECKING:  # (the SDK loads when a command runs: ``--help`` stays fast)
    from .sdk.config import ApiParams
    from .sdk.template import LogEntry
    from .sdk.template.builder import TemplateBase


def sdk_errors() -> tuple[type[Exception], ...]:
    """The SDK's errors a template command reports as one line."""
    from .sdk.exceptions import (
        AuthenticationException,
        BuildException,
        SandboxException,
        ServiceBusyException,
    )

    return (SandboxException, AuthenticationException, ServiceBusyException, BuildException)


_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
_TICK_S = 0.15


def _api(args: argparse.Namespace, *, announce: bool = False) -> ApiParams:
    """The server and the key to act as (named on stderr when ``announce``)."""
    chosen = cli_identity.choose(args.key, Settings.from_env().data_dir)
    if announce:
        cli_identity.announce(chosen)
    return {"api_key": chosen.key, "api_url": args.url}


class TemplateFileError(Exception):
    pass


@contextlib.contextmanager
def _on_path(directory: Path) -> Iterator[None]:
    """The template file's directory importable while it runs (for its own helpers)."""
    sys.path.insert(0, str(directory))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(directory))


def load_template(spec: str) -> tuple[TemplateBase, Path]:
    """Run ``FILE.py`` (or ``FILE.py:NAME``) and return the template it defines."""
    import importlib.util

    from .sdk.template.builder import TemplateBase, TemplateBuilder, TemplateFinal, definition

    path, _, variable = spec.rpartition(":") if not Path(spec).exists() else (spec, "", "")
    if not path:
        path, variable = spec, ""
    file = Path(path).resolve()
    if not file.is_file():
        raise TemplateFileError(f"{path}: no such file")
    module_spec = importlib.util.spec_from_file_location(f"_bilik_template_{file.stem}", file)
    if module_spec is None or module_spec.loader is None:
        raise TemplateFileError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    with _on_path(file.parent):
        try:
            module_spec.loader.exec_module(module)
        except SyntaxError as e:
            raise TemplateFileError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
        except Exception as e:
            # (the file is the user's own code: its failure is reported, not a crash of ours)
            where = _failing_line(e, file)
            raise TemplateFileError(
                f"{path}{where}: running it failed: {type(e).__name__}: {e}"
            ) from None
    found: dict[str, Any] = {
        name: value
        for name, value in vars(module).items()
        if not name.startswith("_")
        and isinstance(value, TemplateBase | TemplateBuilder | TemplateFinal)
    }
    if variable:
        if variable not in found:
            raise TemplateFileError(f"{path} has no template named {variable!r}")
        return definition(found[variable]), file
    if "template" in found:
        return definition(found["template"]), file
    distinct = {id(definition(v)): definition(v) for v in found.values()}
    if len(distinct) == 1:
        return next(iter(distinct.values())), file
    if not distinct:
        raise TemplateFileError(
            f"{path} defines no template: assign one to a module-level variable, e.g. "
            "template = Template().from_base_image()..."
        )
    raise TemplateFileError(
        f"{path} defines several templates ({', '.join(sorted(found))}): name one, "
        f"as {path}:NAME, or call it 'template'"
    )


def _failing_line(error: BaseException, file: Path) -> str:
    """ ":LINE" of the template file where ``error`` was raised last, if it was there."""
    line = ""
    tb = error.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename) == file:
            line = f":{tb.tb_lineno}"
        tb = tb.tb_next
    return line


def default_name(file: Path) -> str:
    """A template name from a file name: lowercase, other characters as "-"."""
    name = re.sub(r"[^a-z0-9._-]+", "-", file.stem.lower()).strip("-._")
    return name or "template"


class Progress:
    """Build logs with the steps done out of all and the time so far; on a terminal, also
    a live status line under them."""

    def __init__(self, name: str, total: int, out: TextIO, live: bool) -> None:
        self.name, self.total, self.out, self.live = name, total, out, live
        self.started = time.monotonic()
        self.done = 0
        self.cached = 0
        self.failed_step: str | None = None
        self._frame = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __call__(self, entry: LogEntry) -> None:
        from .sdk.template import LogEntryEnd, LogEntryStart

        if isinstance(entry, LogEntryStart | LogEntryEnd):
            return
        step = entry.step
        if step is not None and step.isdigit():
            number = int(step)
            if entry.message == "CACHED":
                self.cached += 1
                self.done = max(self.done, number)
            else:
                self.done = max(self.done, number - 1)
            if entry.level == "error":
                self.failed_step = step
        elif step == "finalize":
            self.done = self.total
        elif step == "base" and entry.level == "error":
            self.failed_step = step
        prefix = f"[{self.elapsed():6.1f}s {self.done:>{len(str(self.total))}}/{self.total}]"
        # (a step's blank output lines say nothing: no prefix with nothing after it)
        lines = [line for line in entry.message.splitlines() if line.strip()]
        if not lines:
            return
        self._clear()
        for line in lines:
            print(f"{prefix} {line}", file=self.out)
        self._draw()

    def _clear(self) -> None:
        if self.live:
            sys.stderr.write("\r\x1b[2K")

    def _draw(self) -> None:
        if self.live:
            spin = _SPINNER[self._frame % len(_SPINNER)]
            sys.stderr.write(
                f"{spin} building {self.name}: {self.done}/{self.total} steps, "
                f"{self.elapsed():.1f}s"
            )
            sys.stderr.flush()

    async def tick(self) -> None:
        """Redraw the status line (the spinner and the clock) until cancelled."""
        import asyncio

        while True:
            await asyncio.sleep(_TICK_S)
            self._frame += 1
            self._clear()
            self._draw()

    def close(self) -> None:
        """Take the status line away (for good)."""
        if self.live:
            self._clear()
            sys.stderr.flush()
            self.live = False


async def build(args: argparse.Namespace) -> int:
    """``bilik template build FILE.py``."""
    import asyncio

    from .sdk.template import AsyncTemplate

    try:
        template, file = load_template(args.file)
    except TemplateFileError as e:
        print(f"bilik: {e}", file=sys.stderr)
        return 2
    name = args.name or default_name(file)
    api = _api(args, announce=True)
    total = len(template._steps)
    progress = Progress(name, total, sys.stdout, live=sys.stderr.isatty())
    print(f"building {name!r} from {args.file}: {total} steps", flush=True)
    ticker = asyncio.create_task(progress.tick())
    try:
        info = await AsyncTemplate.build(
            template,
            name,
            cpu_count=args.cpu,
            memory_mb=args.memory_mb,
            skip_cache=args.skip_cache,
            on_build_logs=progress,
            **api,
        )
    except sdk_errors() as e:
        ticker.cancel()
        progress.close()
        where = f" at step {progress.failed_step}" if progress.failed_step else ""
        print(
            f"bilik: building {name!r} failed after {progress.elapsed():.1f}s{where}:\n{e}",
            file=sys.stderr,
        )
        return 1
    finally:
        ticker.cancel()
        progress.close()
    print(
        f"built {name!r} in {progress.elapsed():.1f}s: {total}/{total} steps, "
        f"{progress.cached} cached (template {info.template_id}, build {info.build_id})"
    )
    return 0


async def list_templates(args: argparse.Namespace) -> int:
    """``bilik template list``."""
    import json

    from .sdk.template import AsyncTemplate

    try:
        templates = await AsyncTemplate.list(**_api(args))
    except sdk_errors() as e:
        print(f"bilik: {e}", file=sys.stderr)
        return 1
    rows: list[dict[str, object]] = [
        {
            "name": t.name,
            "templateID": t.template_id,
            "buildID": t.build_id,
            "status": t.build_status,
            "cpu": t.cpu_count,
            "memoryMB": t.memory_mb,
            "createdAt": t.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        for t in templates
    ]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    columns = ["name", "templateID", "status", "cpu", "memoryMB", "createdAt"]
    table = [columns] + [[str(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


async def delete(args: argparse.Namespace) -> int:
    """``bilik template delete NAME``."""
    from .sdk.exceptions import NotFoundException
    from .sdk.template import AsyncTemplate

    try:
        await AsyncTemplate.delete(args.name, **_api(args))
    except NotFoundException:
        print(f"bilik: template {args.name!r} not found", file=sys.stderr)
        return 1
    except sdk_errors() as e:
        print(f"bilik: {e}", file=sys.stderr)
        return 1
    print(f"deleted {args.name}")
    return 0


def add_commands(templates: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``build``, ``list`` and ``delete`` under ``bilik template``."""
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument(
        "--url", help="the server (BILIK_URL, else E2B_API_URL, else http://127.0.0.1:3000)"
    )
    cli_identity.add_key_option(server)
    build_cmd = templates.add_parser(
        "build",
        parents=[server],
        help="build the template a Python file defines",
        description=(
            "Build the template FILE.py defines: its module-level variable NAME (with "
            "FILE.py:NAME), else the one called 'template', else the only template in it. "
            "The file runs as a module, not as __main__."
        ),
    )
    build_cmd.add_argument("file", help="FILE.py, or FILE.py:NAME for a variable NAME in it")
    build_cmd.add_argument(
        "--name", "--alias", dest="name", help="template name (default: the file's name)"
    )
    build_cmd.add_argument("--cpu", type=int, help="vCPUs of its sandboxes (default: 1)")
    build_cmd.add_argument(
        "--memory-mb", type=int, help="memory of its sandboxes, MiB (default: 512)"
    )
    build_cmd.add_argument(
        "--skip-cache", action="store_true", help="rebuild every step, cached or not"
    )
    build_cmd.set_defaults(func=build)
    ls = templates.add_parser("list", parents=[server], help="list the key's templates")
    ls.add_argument("--json", action="store_true", help="JSON for scripts, not a table")
    ls.set_defaults(func=list_templates)
    rm = templates.add_parser("delete", parents=[server], help="delete a template")
    rm.add_argument("name", help="template name or id")
    rm.set_defaults(func=delete)
