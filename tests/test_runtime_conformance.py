"""The runtime conformance suite (``runtime_conformance``), run for every backend bilik has.

A backend is one entry of ``BACKENDS``: a name and a context manager that yields a started
runtime whose creates use that backend, described by a ``Backend``. Each is started once for
this module, on the host the session fixtures prepared (``base`` built, DNS served).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import pytest
import pytest_asyncio

from bilik.runtime import LocalRuntime
from helpers import SETTINGS
from runtime_conformance import *  # noqa: F403  (the suite's tests and fixtures, collected here)
from runtime_conformance import Backend


@contextlib.asynccontextmanager
async def _local(oci_runtime: str, *, envd_socket: bool) -> AsyncIterator[Backend]:
    """A ``LocalRuntime`` of the test instance whose creates use ``oci_runtime`` (its
    ``Settings.oci_runtime``). It shares the host with the session's runtime."""

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    runtime = LocalRuntime(dataclasses.replace(SETTINGS, oci_runtime=oci_runtime), log=log)
    await runtime.start()
    try:
        yield Backend(runtime, oci_runtime, envd_socket=envd_socket)
    finally:
        await runtime.close()


BACKENDS: dict[str, Callable[[], AbstractAsyncContextManager[Backend]]] = {
    "crun": lambda: _local("crun", envd_socket=True),
    # gVisor keeps a sandbox's sockets in its own kernel: envd answers at the address only.
    "runsc": lambda: _local("runsc", envd_socket=False),
}


@pytest_asyncio.fixture(scope="module", params=sorted(BACKENDS))
async def backend(request: pytest.FixtureRequest, runtime: LocalRuntime) -> AsyncIterator[Backend]:
    """Each backend in turn (after ``runtime``: the host prepared, ``base`` built)."""
    async with BACKENDS[request.param]() as under_test:
        yield under_test
