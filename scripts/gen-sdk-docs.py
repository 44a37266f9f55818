#!/usr/bin/env python3
"""Write the SDK's API page (docs/sdk.md) from its docstrings and signatures.

Usage: scripts/gen-sdk-docs.py [OUT]   (default: docs/sdk.md beside this script's project)
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import re
import sys
from pathlib import Path
from typing import Any

import bilik.sdk as sdk

ROOT = Path(__file__).resolve().parent.parent

# The order of the page: what people reach for first.
SECTIONS = [
    ("Sandboxes", ["Sandbox", "AsyncSandbox", "SandboxPaginator", "AsyncSandboxPaginator"]),
    (
        "Pause, snapshots and fork",
        ["SandboxLifecycle", "SnapshotInfo", "SnapshotPaginator", "AsyncSnapshotPaginator"],
    ),
    ("Files", ["Filesystem", "AsyncFilesystem", "WatchHandle", "AsyncWatchHandle"]),
    ("Commands and terminals", ["Commands", "AsyncCommands", "Pty", "AsyncPty"]),
    ("Command handles", ["CommandHandle", "AsyncCommandHandle"]),
    ("Code interpreter", ["Execution", "Result", "Logs", "ExecutionError", "OutputMessage"]),
    ("Code contexts and charts", ["Context", "Chart", "ChartType"]),
    ("Templates", ["Template", "AsyncTemplate"]),
    ("Configuration", ["ConnectionConfig"]),
]
# Shorter names for people: list, not builtins.list; Context, not bilik.sdk.code.Context.
QUALIFIED = re.compile(r"\b(?:builtins|typing|collections\.abc|[a-z_.]+\.)\.?(?=[A-Za-z])")
SUBMODULE_CLASSES = {
    "Filesystem": "bilik.sdk.sandbox",
    "Commands": "bilik.sdk.sandbox",
    "Pty": "bilik.sdk.sandbox",
    "AsyncFilesystem": "bilik.sdk.files",
    "AsyncCommands": "bilik.sdk.commands",
    "AsyncPty": "bilik.sdk.commands",
}


def _object(name: str) -> Any:
    if name in SUBMODULE_CLASSES:
        module = __import__(SUBMODULE_CLASSES[name], fromlist=[name])
        return getattr(module, name)
    return getattr(sdk, name)


def _doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__ or "").strip()


def _signature(name: str, fn: Any) -> str:
    try:
        signature = inspect.signature(fn, eval_str=True)
    except NameError:  # a name only type checkers see: the annotations as written
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return f"{name}(...)"
    params = [p for p in signature.parameters.values() if p.name not in ("self", "cls")]
    text = str(signature.replace(parameters=params, return_annotation=signature.return_annotation))
    text = re.sub(r"\*<class '([^']+)'>", r"Unpack[\1]", text)  # **opts: Unpack[...]
    return name + QUALIFIED.sub("", text)


def _members(cls: type) -> list[tuple[str, Any]]:
    found = []
    names: set[str] = set()
    for klass in cls.__mro__[:-1]:  # (inherited calls too, not object's)
        for name, value in klass.__dict__.items():
            if name.startswith("_") or name in names:
                continue
            names.add(name)
            fn = value.__func__ if isinstance(value, classmethod | staticmethod) else value
            fn = getattr(fn, "fn", fn)  # a class-or-instance method (``dual``)
            if callable(fn) and _doc(fn):
                found.append((name, fn))
    return found


def _class(name: str) -> list[str]:
    cls = _object(name)
    lines = [f"### `{name}`", ""]
    if doc := _doc(cls):
        lines += [doc, ""]
    if issubclass(cls, enum.Enum):
        lines += [", ".join(f"`{m.name}`" for m in cls), ""]
        return lines
    if dataclasses.is_dataclass(cls):
        fields = ", ".join(f"`{f.name}`" for f in dataclasses.fields(cls))
        lines += [f"Fields: {fields}", ""]
    for member, fn in _members(cls):
        lines += [f"#### `{name}.{_signature(member, fn)}`", "", _doc(fn), ""]
    return lines


def render() -> str:
    lines = [
        "# bilik's Python SDK",
        "",
        "<!-- Written by scripts/gen-sdk-docs.py from the SDK's docstrings: do not edit. -->",
        "",
        _doc(sdk),
        "",
    ]
    seen: set[str] = set()
    for title, names in SECTIONS:
        lines += [f"## {title}", ""]
        for name in names:
            lines += _class(name)
            seen.add(name)
    rest = [n for n in sdk.__all__ if n not in seen]
    lines += ["## Other names", ""]
    for name in rest:
        obj = getattr(sdk, name)
        kind = "function" if inspect.isfunction(obj) else "class"
        summary = _doc(obj).split("\n\n")[0].replace("\n", " ")
        lines.append(f"- `{name}` ({kind}): {summary}".rstrip(": "))
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "sdk.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())


if __name__ == "__main__":
    main()
