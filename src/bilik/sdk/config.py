"""Where the server is and how to talk to it: arguments first, then ``BILIK_*``, then ``E2B_*``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict

from bilik.proto.contract import ENVD_PORT, INTERPRETER_PORT
from bilik.sdk.exceptions import AuthenticationException

__all__ = ["ENVD_PORT", "INTERPRETER_PORT"]  # (the SDK's modules take them from here)

DEFAULT_URL = "http://127.0.0.1:3000"
# The key a local server made on its first start: found without configuration on its own machine.
LOCAL_KEY_FILE = Path("/var/lib/bilik/api-key")
REQUEST_TIMEOUT = 60.0
RETRIES = 3


def _env(*names: str) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


class ApiParams(TypedDict, total=False):
    """Where the server is and how to call it, per call (each falls back as
    :class:`ConnectionConfig` says)."""

    api_key: str | None
    api_url: str | None
    sandbox_url: str | None
    request_timeout: float | None
    retries: int | None
    headers: dict[str, str] | None


@dataclass(frozen=True)
class ConnectionConfig:
    """How to reach a bilik server (or anything speaking E2B's API).

    - ``api_key``: ``BILIK_API_KEY``, else ``E2B_API_KEY``, else the local server's key file
      (``/var/lib/bilik/api-key``) when it is readable.
    - ``api_url``: ``BILIK_URL``, else ``E2B_API_URL``, else ``http://127.0.0.1:3000``.
    - ``sandbox_url``: where sandboxes are reached: ``E2B_SANDBOX_URL``, else ``api_url``
      (bilik serves both on one port).
    - ``request_timeout`` (seconds, ``0`` for none) and ``retries`` (on 429, 502, 503 and 504,
      honouring ``Retry-After``).
    """

    api_key: str
    api_url: str = DEFAULT_URL
    sandbox_url: str = DEFAULT_URL
    request_timeout: float = REQUEST_TIMEOUT
    retries: int = RETRIES
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def resolve(
        cls,
        api_key: str | None = None,
        api_url: str | None = None,
        sandbox_url: str | None = None,
        request_timeout: float | None = None,
        retries: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> ConnectionConfig:
        """The configuration from arguments, falling back to the environment."""
        key = api_key or _env("BILIK_API_KEY", "E2B_API_KEY")
        if not key:
            try:
                key = LOCAL_KEY_FILE.read_text().strip()
            except OSError:
                key = ""
        if not key:
            raise AuthenticationException(
                "no API key: pass api_key= or set BILIK_API_KEY (bilik keys create makes one)"
            )
        url = (api_url or _env("BILIK_URL", "E2B_API_URL") or DEFAULT_URL).rstrip("/")
        return cls(
            api_key=key,
            api_url=url,
            sandbox_url=(sandbox_url or _env("BILIK_SANDBOX_URL", "E2B_SANDBOX_URL") or url).rstrip(
                "/"
            ),
            request_timeout=REQUEST_TIMEOUT if request_timeout is None else request_timeout,
            retries=RETRIES if retries is None else retries,
            headers=dict(headers or {}),
        )

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ConnectionConfig:
        """The configuration from :class:`ApiParams` among other keyword arguments."""
        return cls.resolve(**{k: v for k, v in params.items() if k in ApiParams.__annotations__})

    def params(self) -> ApiParams:
        """This configuration as :class:`ApiParams` (for the calls of a sandbox made with it)."""
        return {
            "api_key": self.api_key,
            "api_url": self.api_url,
            "sandbox_url": self.sandbox_url,
            "request_timeout": self.request_timeout,
            "retries": self.retries,
            "headers": self.headers,
        }

    def timeout(self, request_timeout: float | None = None) -> float | None:
        """A call's timeout in seconds: its own, else the configured one; ``None`` for none."""
        value = self.request_timeout if request_timeout is None else request_timeout
        return value or None

    def with_timeout(self, request_timeout: float | None) -> ConnectionConfig:
        return self if request_timeout is None else replace(self, request_timeout=request_timeout)
