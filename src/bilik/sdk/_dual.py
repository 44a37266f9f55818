"""Methods callable on the class with a sandbox id and on a sandbox without one, as E2B's
(``Sandbox.kill(sandbox_id)`` and ``sandbox.kill()``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

R = TypeVar("R")


class dual(Generic[R]):
    """``fn(cls, sandbox_id, ...)`` on the class; ``fn(type(self), self.sandbox_id, ...)`` on
    an instance, with the instance's connection settings (``self._opts``)."""

    def __init__(self, fn: Callable[..., R]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    @overload
    def __get__(self, obj: None, owner: type) -> Callable[..., R]: ...
    @overload
    def __get__(self, obj: object, owner: type) -> Callable[..., R]: ...
    def __get__(self, obj: object | None, owner: type) -> Callable[..., R]:
        if obj is None:
            return functools.partial(self.fn, owner)

        def bound(*args: Any, **kwargs: Any) -> R:
            # (an argument left as None keeps the sandbox's own setting)
            given = {k: v for k, v in kwargs.items() if v is not None}
            options = {**obj._opts, **given}  # type: ignore[attr-defined]
            return self.fn(owner, obj.sandbox_id, *args, **options)  # type: ignore[attr-defined]

        functools.update_wrapper(bound, self.fn)
        return bound
