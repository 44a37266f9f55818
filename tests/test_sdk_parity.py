"""The sync SDK is a facade over the async one, written by hand: this keeps the two the same.

Every public class of the sync SDK (``Sandbox``, ``Filesystem``, ``Commands``, ``Pty``,
``CommandHandle``, ``WatchHandle``, ``SandboxPaginator``, ``Template``) has an async twin named
``Async`` + its name, and the other way round. Twins have the same public members, each of the
same kind (method, static or class method, ``@dual``, value), with the same parameters (names,
kinds, defaults, annotations), the same return annotation and the same ``typing.overload``
variants. An async annotation reads in the sync SDK as:

- ``async def f(...) -> X`` (a coroutine of X): ``def f(...) -> X``; a method that is not a
  coroutine function in the async SDK is not one in the sync SDK either, and has the same type
- ``AsyncIterator[T]``: ``Iterator[T]``
- an async class (``AsyncSandbox``, ``AsyncCommandHandle``, …): its sync twin
- ``httpx.AsyncClient``: ``httpx.Client``
- ``__aenter__``/``__aexit__``/``__aiter__``: ``__enter__``/``__exit__``/``__iter__``

Where E2B's own sync SDK differs from its async one, bilik's sync SDK follows E2B's:
``E2B_SYNC_SHAPES`` and ``SYNC_ONLY`` list those differences and why. Nothing here touches a
sandbox.

The SDK's errors are checked here too: each is a ``SandboxException`` (one ``except`` catches
whatever the SDK raises), named as E2B's, and nested as E2B's below that root.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_overloads, get_type_hints

import e2b.exceptions
import httpx
import pytest

import bilik.sdk
from bilik.sdk import AsyncSandbox, ConnectionConfig, Sandbox
from bilik.sdk._dual import dual
from bilik.sdk.api import api_error
from bilik.sdk.code import _error as interpreter_error
from bilik.sdk.exceptions import SandboxException
from bilik.sdk.files import files_error

# The modules of the sync facade: every class defined in them is a sync twin.
SYNC_MODULES = ("bilik.sdk.sandbox", "bilik.sdk.template.sync_template")
# Async classes without a sync class of their own, and where their calls are in the sync SDK.
ASYNC_MIXINS = {"AsyncCodeInterpreter": "a base of AsyncSandbox: Sandbox has its calls"}
ASYNC_DUNDERS = {"__aenter__": "__enter__", "__aexit__": "__exit__", "__aiter__": "__iter__"}


@dataclass(frozen=True)
class Shape:
    """How a sync method's parameters differ from its async twin's, as E2B's do."""

    why: str
    drop: tuple[str, ...] = ()  # async parameters the sync method has not
    order: tuple[str, ...] = ()  # the sync method's parameters in order (when they move)
    keyword_only: tuple[str, ...] = ()
    defaults: dict[str, object] = field(default_factory=dict)


E2B_SYNC_SHAPES = {
    "Filesystem.watch_dir": Shape(
        why="E2B's sync watch_dir takes no callbacks (its handle is polled with "
        "get_new_events()) and its watch has no time limit: timeout is 0 (none), after "
        "E2B's positional parameters",
        drop=("on_event", "on_exit"),
        order=("self", "path", "user", "request_timeout", "recursive", "timeout"),
        defaults={"timeout": 0},
    ),
    "Pty.create": Shape(
        why="E2B's sync pty.create takes no on_data (output goes to wait(on_pty=)): positional "
        "arguments mean what they mean there, on_data is given by name",
        order=("self", "size", "user", "cwd", "envs", "timeout", "request_timeout", "on_data"),
        keyword_only=("on_data",),
    ),
    "Pty.connect": Shape(
        why="E2B's sync pty.connect takes no on_data (output goes to wait(on_pty=)): "
        "positional arguments mean what they mean there, on_data is given by name",
        order=("self", "pid", "timeout", "request_timeout", "on_data"),
        keyword_only=("on_data",),
    ),
}
SYNC_ONLY = {
    "WatchHandle.get_new_events": "E2B's sync watch handle is polled; the async one calls on_event",
}

# Exceptions that never leave the SDK, and what they become.
INTERNAL_EXCEPTIONS = {"NoFilesMatched": "operations._hashes raises it as BuildException"}


def _sdk_modules() -> list[types.ModuleType]:
    names = [bilik.sdk.__name__] + [
        m.name for m in pkgutil.walk_packages(bilik.sdk.__path__, bilik.sdk.__name__ + ".")
    ]
    return [importlib.import_module(name) for name in names]


def _classes() -> dict[str, type]:
    """Every class the SDK defines, by name."""
    found: dict[str, type] = {}
    for module in _sdk_modules():
        for value in vars(module).values():
            if isinstance(value, type) and value.__module__ == module.__name__:
                found[value.__name__] = value
    return found


CLASSES = _classes()
SYNC_CLASSES = {
    name: cls for name, cls in CLASSES.items() if cls.__module__ in SYNC_MODULES and name[0] != "_"
}
ASYNC_CLASSES = {name: cls for name, cls in CLASSES.items() if name.startswith("Async")}
TWINS = {
    ASYNC_CLASSES["Async" + name]: cls
    for name, cls in SYNC_CLASSES.items()
    if "Async" + name in ASYNC_CLASSES
}
SYNC_OF: dict[Any, Any] = {AsyncIterator: Iterator, httpx.AsyncClient: httpx.Client, **TWINS}


def test_every_sync_class_has_an_async_twin_and_back() -> None:
    assert set(SYNC_CLASSES) >= {"Sandbox", "Filesystem", "Commands", "Pty", "Template"}
    lonely = [name for name in SYNC_CLASSES if "Async" + name not in ASYNC_CLASSES]
    assert not lonely, f"sync classes without an async twin: {lonely}"
    missing = [
        name for name, cls in ASYNC_CLASSES.items() if cls not in TWINS and name not in ASYNC_MIXINS
    ]
    assert not missing, f"async classes without a sync twin: {missing}"


# -- the members of a class, resolved --------------------------------------------------------


def _canon(tp: Any) -> str:
    """An annotation as text, async types read as their sync twins."""
    if isinstance(tp, list):  # a Callable's parameters
        return "[" + ", ".join(_canon(a) for a in tp) + "]"
    tp = SYNC_OF.get(tp, tp)
    origin, args = get_origin(tp), get_args(tp)
    if origin is None:
        if isinstance(tp, type):
            return f"{tp.__module__}.{tp.__qualname__}"
        return repr(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(sorted(_canon(a) for a in args))
    if origin is Literal:
        return f"Literal[{', '.join(map(repr, args))}]"
    return f"{_canon(origin)}[{', '.join(_canon(a) for a in args)}]"


def _params(fn: Callable[..., Any], shape: Shape | None = None) -> tuple[list[str], str]:
    """``fn``'s parameters (``name: annotation = default (kind)``) and return annotation;
    with a shape, as the sync twin of ``fn`` should have them."""
    hints = get_type_hints(fn)
    params = list(inspect.signature(fn).parameters.values())
    if shape is not None:
        params = [p for p in params if p.name not in shape.drop]
        params = [
            p.replace(
                default=shape.defaults.get(p.name, p.default),
                kind=inspect.Parameter.KEYWORD_ONLY if p.name in shape.keyword_only else p.kind,
            )
            for p in params
        ]
        if shape.order:
            by_name = {p.name: p for p in params}
            assert sorted(shape.order) == sorted(by_name), f"{shape} lists other parameters"
            params = [by_name[name] for name in shape.order]
    described = [
        f"{p.name}: {_canon(hints[p.name]) if p.name in hints else '-'}"
        + ("" if p.default is p.empty else f" = {p.default!r}")
        + f" ({p.kind.name.lower()})"
        for p in params
    ]
    return described, _canon(hints.get("return", inspect.Signature.empty))


@dataclass
class Member:
    kind: str  # method, staticmethod, classmethod, dual, value
    fn: Callable[..., Any] | None = None  # what has the signature (None for a value)
    type: str = ""  # a value's type


def _members(cls: type) -> dict[str, Member]:
    """The public members of a class (annotated attributes too), protocol dunders by their
    sync names."""
    hints = get_type_hints(cls)
    names = {n for n in dir(cls) if not n.startswith("_")}
    names |= {n for n in hints if not n.startswith("_")}
    names |= {n for n in (*ASYNC_DUNDERS, *ASYNC_DUNDERS.values()) if hasattr(cls, n)}
    found: dict[str, Member] = {}
    for name in names:
        try:
            raw = inspect.getattr_static(cls, name)
        except AttributeError:
            found[name] = Member("value", type=_canon(hints[name]))
            continue
        key = ASYNC_DUNDERS.get(name, name)
        if isinstance(raw, property):
            assert raw.fget is not None
            found[key] = Member("value", type=_canon(get_type_hints(raw.fget)["return"]))
        elif isinstance(raw, staticmethod | classmethod):
            found[key] = Member(type(raw).__name__, raw.__func__)
        elif isinstance(raw, dual):
            found[key] = Member("dual", raw.fn)
        elif inspect.isfunction(raw):
            found[key] = Member("method", raw)
        else:
            found[key] = Member("value", type=_canon(type(raw)))
    return found


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)


def _drift(sync: type, twin: type) -> list[str]:
    """What differs between a sync class and its async twin (beyond the listed shapes)."""
    problems: list[str] = []
    mine, theirs = _members(sync), _members(twin)
    for name in sorted(set(mine) | set(theirs)):
        where = f"{sync.__name__}.{name}"
        if name not in theirs:
            if where not in SYNC_ONLY:
                problems.append(f"{where}: only in the sync SDK")
            continue
        if name not in mine:
            problems.append(f"{where}: missing (it is in {twin.__name__})")
            continue
        s, a = mine[name], theirs[name]
        if s.kind != a.kind:
            problems.append(f"{where}: a {s.kind}, but a {a.kind} in {twin.__name__}")
            continue
        if s.kind == "value":
            if s.type != a.type:
                problems.append(f"{where}: {s.type}, but {a.type} in {twin.__name__}")
            continue
        assert s.fn is not None and a.fn is not None
        if s.fn is a.fn:  # inherited from a base both share
            continue
        if _is_async(s.fn):
            problems.append(f"{where}: a coroutine function in the sync SDK")
        shape = E2B_SYNC_SHAPES.get(where)
        variants = [(s.fn, a.fn)]
        sync_overloads, async_overloads = get_overloads(s.fn), get_overloads(a.fn)
        if len(sync_overloads) != len(async_overloads):
            problems.append(
                f"{where}: {len(sync_overloads)} overloads, {len(async_overloads)} in the async SDK"
            )
        variants += list(zip(sync_overloads, async_overloads, strict=False))
        for number, (sync_fn, async_fn) in enumerate(variants):
            label = where if number == 0 else f"{where} (overload {number})"
            expected, expected_return = _params(async_fn, shape)
            actual, actual_return = _params(sync_fn)
            if actual != expected:
                problems.append(
                    f"{label}: parameters\n      "
                    + "\n      ".join(actual)
                    + "\n    should be\n      "
                    + "\n      ".join(expected)
                )
            if actual_return != expected_return:
                problems.append(f"{label}: returns {actual_return}, should be {expected_return}")
    return problems


@pytest.mark.parametrize("name", sorted(SYNC_CLASSES))
def test_sync_class_has_the_async_api(name: str) -> None:
    sync = SYNC_CLASSES[name]
    twin = ASYNC_CLASSES["Async" + name]
    problems = _drift(sync, twin)
    assert not problems, "\n".join(problems)


def test_listed_differences_exist() -> None:
    """Every listed difference names a real method (no stale entries)."""
    for where in [*E2B_SYNC_SHAPES, *SYNC_ONLY]:
        cls_name, method = where.split(".")
        assert method in _members(SYNC_CLASSES[cls_name]), where


def test_the_sandboxs_parts_are_twins() -> None:
    """A sandbox's parts (files, commands, pty) are the sync twins of the async one's, and
    every public attribute a sandbox sets is declared on its class (so the walk sees it)."""
    inner = AsyncSandbox("sbx-parity", ConnectionConfig(api_key="parity"))
    outer = Sandbox(inner)
    for instance in (inner, outer):
        declared = get_type_hints(type(instance))
        public = {n for n in vars(instance) if not n.startswith("_")}
        assert public <= set(declared), f"undeclared attributes of {type(instance).__name__}"
    for part in ("files", "commands", "pty"):
        assert type(getattr(outer, part)) is TWINS[type(getattr(inner, part))], part


def test_dual_keeps_signatures() -> None:
    """``@dual`` methods show their real parameters: the sandbox id on the class, not on an
    instance."""
    sandbox = Sandbox(AsyncSandbox("sbx-parity", ConnectionConfig(api_key="parity")))
    for cls, instance in ((Sandbox, sandbox), (AsyncSandbox, sandbox._a)):
        for name in ("kill", "set_timeout", "get_info", "get_metrics", "get_logs"):
            raw = inspect.getattr_static(cls, name)
            assert isinstance(raw, dual), name
            full = list(inspect.signature(raw.fn).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == full[1:], name
            assert list(inspect.signature(getattr(instance, name)).parameters) == full[2:], name
            assert getattr(instance, name).__doc__ == raw.fn.__doc__


# -- errors -----------------------------------------------------------------------------------


def _exceptions() -> dict[str, type[BaseException]]:
    return {
        name: cls
        for name, cls in CLASSES.items()
        if issubclass(cls, BaseException) and name not in INTERNAL_EXCEPTIONS
    }


def test_every_sdk_exception_is_a_sandbox_exception() -> None:
    outside = [name for name, cls in _exceptions().items() if not issubclass(cls, SandboxException)]
    assert not outside, f"not SandboxExceptions: {outside}"
    assert {"AuthenticationException", "BuildException", "CommandExitException"} <= set(
        _exceptions()
    )


def test_exceptions_are_named_and_nested_as_e2bs() -> None:
    """``except X`` catches the same errors as with E2B's SDK: the same names, and below
    ``SandboxException`` (where E2B has some at ``Exception``) the same nesting."""
    ours = _exceptions()
    e2bs = {
        name: cls
        for name, cls in vars(e2b.exceptions).items()
        if isinstance(cls, type) and issubclass(cls, BaseException)
    }
    e2bs["CommandExitException"] = e2b.CommandExitException
    assert set(ours) <= set(e2bs), f"not E2B's names: {set(ours) - set(e2bs)}"
    for name, cls in ours.items():
        for other_name, other in ours.items():
            if other is SandboxException:
                continue
            theirs = issubclass(e2bs[name], e2bs[other_name])
            assert issubclass(cls, other) == theirs, f"{name} under {other_name}: E2B {theirs}"
    assert bilik.sdk.ServiceBusyException("busy").status_code == 503
    assert bilik.sdk.RateLimitException("slow down").status_code == 429


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 429, 500, 502, 503, 504, 507])
def test_every_error_answer_is_a_sandbox_exception(status: int) -> None:
    response = httpx.Response(status, json={"code": status, "message": "no"})
    for make in (api_error, files_error, interpreter_error):
        assert isinstance(make(response), SandboxException), (make.__name__, status)
