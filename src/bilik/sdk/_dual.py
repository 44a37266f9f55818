"""Methods callable on the class with a sandbox id and on a sandbox without one, as E2B's
(``Sandbox.kill(sandbox_id)`` and ``sandbox.kill()``).

Typed with a ``ParamSpec``, so type checkers and IDEs see each call's real parameters; the
callables it hands out carry the matching runtime signature too (``help()``, ``inspect``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

P = ParamSpec("P")
R = TypeVar("R")


class dual(Generic[P, R]):
    """``fn(cls, sandbox_id, ...)`` on the class; ``fn(type(self), self.sandbox_id, ...)`` on
    an instance, with the instance's connection settings (``self._opts``)."""

    def __init__(self, fn: Callable[Concatenate[Any, str, P], R]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]
        # (``fn`` takes ``cls, sandbox_id, /``: a ParamSpec can only prepend positional-only
        # parameters)
        signature = inspect.signature(fn)
        params = list(signature.parameters.values())
        self._on_class = signature.replace(parameters=params[1:])
        self._on_instance = signature.replace(parameters=params[2:])

    @overload
    def __get__(self, obj: None, owner: type) -> Callable[Concatenate[str, P], R]: ...
    @overload
    def __get__(self, obj: object, owner: type) -> Callable[P, R]: ...
    def __get__(self, obj: object | None, owner: type) -> Callable[..., R]:
        fn = self.fn
        if obj is None:
            # (the id may still be named, as E2B's ``Sandbox.kill(sandbox_id=...)`` allows)
            def unbound(sandbox_id: str, *args: P.args, **kwargs: P.kwargs) -> R:
                return fn(owner, sandbox_id, *args, **kwargs)

            return _dressed(unbound, fn, self._on_class)

        def bound(*args: P.args, **kwargs: P.kwargs) -> R:
            # (an argument left as None keeps the sandbox's own setting)
            given = {k: v for k, v in kwargs.items() if v is not None}
            options: dict[str, Any] = {**obj._opts, **given}  # type: ignore[attr-defined]
            return fn(owner, obj.sandbox_id, *args, **options)  # type: ignore[attr-defined]

        return _dressed(bound, fn, self._on_instance)


F = TypeVar("F", bound=Callable[..., Any])


def _dressed(wrapper: F, fn: Callable[..., Any], signature: inspect.Signature) -> F:
    """``wrapper`` with ``fn``'s name and doc and the signature it is called with."""
    functools.update_wrapper(wrapper, fn)
    wrapper.__signature__ = signature  # type: ignore[attr-defined]
    return wrapper
