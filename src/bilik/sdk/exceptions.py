"""The SDK's errors, named and arranged as E2B's, so ``except`` clauses carry over.

Every one is a :class:`SandboxException`, so one ``except SandboxException`` catches whatever
the SDK raises. E2B roots ``AuthenticationException``, ``ServiceBusyException`` and
``BuildException`` at ``Exception`` instead; below the root the tree is E2B's, so a clause
that catches one of these catches exactly what it catches with E2B's SDK.
"""

from __future__ import annotations


class SandboxException(Exception):
    """Base class of the sandbox errors; ``status_code`` is the HTTP status, when there was one."""

    status_code: int | None = None

    def __init__(self, *args: object, status_code: int | None = None) -> None:
        super().__init__(*args)
        self.status_code = status_code


class TimeoutException(SandboxException):
    """A request, a command or the sandbox itself ran out of time."""


class InvalidArgumentException(SandboxException):
    """An argument the server (or the SDK) refused."""


class NotEnoughSpaceException(SandboxException):
    """The sandbox's disk is full."""


class NotFoundException(SandboxException):
    """Something asked for does not exist."""


class FileNotFoundException(NotFoundException):
    """A file or directory inside the sandbox does not exist."""


class SandboxNotFoundException(NotFoundException):
    """The sandbox does not exist (or no longer runs)."""


class SandboxNotRunningException(TimeoutException):
    """The sandbox went away while it was being used (killed, or its lifetime over), or its
    port did not answer: a ``TimeoutException``, as E2B raises for these."""


class TemplateException(SandboxException):
    """The template cannot serve this request."""


class RateLimitException(SandboxException):
    """The API key's rate or sandbox cap was hit (after the retries)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args, status_code=429)


class AuthenticationException(SandboxException):
    """The API key or the sandbox's access token was refused."""


class ServiceBusyException(SandboxException):
    """The server had no capacity (503) after the retries; nothing was changed."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args, status_code=503)


class BuildException(SandboxException):
    """A template build failed."""


class FileUploadException(BuildException):
    """Uploading a template's files failed."""
