"""The control plane over HTTP: one request with retries, its error body as an exception."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx

from bilik.sdk.config import ConnectionConfig
from bilik.sdk.exceptions import (
    AuthenticationException,
    InvalidArgumentException,
    NotEnoughSpaceException,
    NotFoundException,
    RateLimitException,
    SandboxException,
    ServiceBusyException,
    TimeoutException,
)

RETRYABLE = frozenset({429, 502, 503, 504})
BACKOFF_BASE_S = 0.1
BACKOFF_MAX_S = 10.0

# One connection pool per event loop (an httpx client is bound to the loop it first ran on),
# kept on the loop itself: the two go together once the loop is dropped (``asyncio.run`` per
# task must not pile up clients with open sockets).
_CLIENT_ATTR = "_bilik_sdk_http"


def http_client() -> httpx.AsyncClient:
    """The running loop's HTTP client (timeouts are given per request)."""
    loop = asyncio.get_running_loop()
    client: httpx.AsyncClient | None = getattr(loop, _CLIENT_ATTR, None)
    if client is None:
        client = httpx.AsyncClient(
            timeout=None, limits=httpx.Limits(max_connections=None, max_keepalive_connections=50)
        )
        setattr(loop, _CLIENT_ATTR, client)
    return client


def retry_delay(response: httpx.Response, attempt: int) -> float | None:
    """How long to wait before trying again, or ``None`` when the answer is final.

    ``Should-Retry`` decides when present; otherwise 429, 502, 503 and 504 are retried, after
    ``Retry-After`` seconds when given, else an exponential backoff with jitter.
    """
    should = response.headers.get("Should-Retry")
    if should is not None and should.strip().lower() != "true":
        return None
    if should is None and response.status_code not in RETRYABLE:
        return None
    after = response.headers.get("Retry-After", "").strip()
    if after.isdecimal():
        return float(after)
    return backoff(attempt)


def backoff(attempt: int) -> float:
    return min(BACKOFF_BASE_S * 2.0**attempt, BACKOFF_MAX_S) * (0.5 + random.random() / 2)


def error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text or response.reason_phrase
    if isinstance(body, dict):
        return str(body.get("message") or body)
    return str(body)


def api_error(
    response: httpx.Response, not_found: type[Exception] = NotFoundException
) -> Exception:
    """The exception for an error answer, with the server's message."""
    status, message = response.status_code, error_message(response)
    if status in (401, 403):
        return AuthenticationException(message)
    if status == 404:
        return not_found(message)
    if status == 429:
        return RateLimitException(message)
    if status == 503:
        return ServiceBusyException(message)
    if status == 507:
        return NotEnoughSpaceException(message, status_code=status)
    if status in (400, 409, 422):
        return InvalidArgumentException(message, status_code=status)
    return SandboxException(f"{status}: {message}", status_code=status)


class ApiClient:
    """Requests to the control plane with the key, the timeout and the retries of a config."""

    def __init__(self, config: ConnectionConfig) -> None:
        self.config = config

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        request_timeout: float | None = None,
        not_found: type[Exception] = NotFoundException,
    ) -> httpx.Response:
        """Send, retrying as :func:`retry_delay` says; a non-2xx final answer raises."""
        timeout = self.config.timeout(request_timeout)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        sent = {"X-API-Key": self.config.api_key, **self.config.headers, **(headers or {})}
        attempt = 0
        while True:
            left = None if deadline is None else max(deadline - loop.time(), 0.001)
            try:
                response = await http_client().request(
                    method,
                    self.config.api_url + path,
                    json=json,
                    params=params,
                    headers=sent,
                    timeout=left,
                )
            except httpx.TimeoutException as e:
                raise TimeoutException(
                    f"the request timed out after {timeout} s (request_timeout= sets it)"
                ) from e
            except httpx.ConnectError as e:
                if attempt >= self.config.retries:
                    raise SandboxException(f"cannot reach {self.config.api_url}: {e}") from e
                wait = backoff(attempt)
            else:
                if response.is_success:
                    return response
                delay = retry_delay(response, attempt) if attempt < self.config.retries else None
                if delay is None or (deadline is not None and loop.time() + delay >= deadline):
                    raise api_error(response, not_found)
                wait = delay
            attempt += 1
            await asyncio.sleep(wait)
