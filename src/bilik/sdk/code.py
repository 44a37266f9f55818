"""``sandbox.run_code`` and code contexts: the code interpreter's NDJSON ``/execute`` and its
results as data (E2B's names and fields, ``_repr_*_`` for Jupyter)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import httpx

from bilik.sdk._handlers import call
from bilik.sdk.api import error_message, http_client
from bilik.sdk.config import INTERPRETER_PORT
from bilik.sdk.envd import Envd
from bilik.sdk.exceptions import (
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
    SandboxNotRunningException,
    TimeoutException,
)

# How long run_code may take unless told (E2B's default).
DEFAULT_RUN_TIMEOUT = 300.0
RESULT_FORMATS = (
    "text",
    "html",
    "markdown",
    "svg",
    "png",
    "jpeg",
    "pdf",
    "latex",
    "json",
    "javascript",
)


@dataclass
class OutputMessage:
    """A piece of stdout or stderr, with when it was produced (Unix ns)."""

    line: str
    timestamp: int
    error: bool = False

    def __str__(self) -> str:
        return self.line


@dataclass
class ExecutionError:
    """An exception the code raised: its class name, message and traceback."""

    name: str
    value: str
    traceback: str


class ChartType(StrEnum):
    LINE = "line"
    SCATTER = "scatter"
    BAR = "bar"
    PIE = "pie"
    BOX_AND_WHISKER = "box_and_whisker"
    SUPERCHART = "superchart"
    UNKNOWN = "unknown"


@dataclass
class Chart:
    """The data of a matplotlib figure: its type, title, labels and elements (series, bars,
    slices, boxes or sub-charts, as dicts of the interpreter's fields)."""

    type: ChartType
    title: str | None
    elements: list[Any]
    x_label: str | None = None
    y_label: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Chart:
        try:
            kind = ChartType(str(data.get("type")))
        except ValueError:
            kind = ChartType.UNKNOWN
        elements = data.get("elements") or []
        if kind is ChartType.SUPERCHART:
            elements = [cls.from_json(e) for e in elements]
        return cls(
            kind, data.get("title"), elements, data.get("x_label"), data.get("y_label"), data
        )

    def to_dict(self) -> dict[str, Any]:
        return self.raw


class Result:
    """One display of the code or its main result, in every format the kernel gave."""

    def __init__(self, is_main_result: bool = False, **formats: Any) -> None:
        self.is_main_result = is_main_result
        self.text: str | None = formats.pop("text", None)
        self.html: str | None = formats.pop("html", None)
        self.markdown: str | None = formats.pop("markdown", None)
        self.svg: str | None = formats.pop("svg", None)
        self.png: str | None = formats.pop("png", None)
        self.jpeg: str | None = formats.pop("jpeg", None)
        self.pdf: str | None = formats.pop("pdf", None)
        self.latex: str | None = formats.pop("latex", None)
        self.json: dict[str, Any] | None = formats.pop("json", None)
        self.javascript: str | None = formats.pop("javascript", None)
        self.data: dict[str, Any] | None = formats.pop("data", None)
        chart = formats.pop("chart", None)
        self.chart: Chart | None = Chart.from_json(chart) if isinstance(chart, dict) else None
        self.extra: dict[str, Any] = formats.pop("extra", None) or {}
        self.extra.update(formats)

    def formats(self) -> list[str]:
        """The formats this result has."""
        found = [f for f in RESULT_FORMATS if getattr(self, f) is not None]
        found += [name for name in ("data", "chart") if getattr(self, name) is not None]
        return found + list(self.extra)

    def __getitem__(self, item: str) -> Any:
        return getattr(self, item)

    def __str__(self) -> str:
        return self.text or ""

    def __repr__(self) -> str:
        return f"Result({self.text!r})" if self.text is not None else f"Result({self.formats()})"

    def _repr_html_(self) -> str | None:
        return self.html

    def _repr_markdown_(self) -> str | None:
        return self.markdown

    def _repr_svg_(self) -> str | None:
        return self.svg

    def _repr_png_(self) -> str | None:
        return self.png

    def _repr_jpeg_(self) -> str | None:
        return self.jpeg

    def _repr_pdf_(self) -> str | None:
        return self.pdf

    def _repr_latex_(self) -> str | None:
        return self.latex

    def _repr_json_(self) -> dict[str, Any] | None:
        return self.json

    def _repr_javascript_(self) -> str | None:
        return self.javascript


@dataclass
class Logs:
    """What the code printed: stdout and stderr, a piece each."""

    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


@dataclass
class Execution:
    """What running code produced: results, logs, the error if it raised, its count."""

    results: list[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int | None = None

    @property
    def text(self) -> str | None:
        """The main result's text (the value of the last expression), if any."""
        return next((r.text for r in self.results if r.is_main_result), None)


@dataclass
class Context:
    """A kernel of its own: a language, a working directory and its state."""

    id: str
    language: str
    cwd: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Context:
        return cls(data["id"], data["language"], data["cwd"])


Handler = Callable[[Any], Any]


async def _apply(
    execution: Execution,
    line: str,
    on_stdout: Handler | None,
    on_stderr: Handler | None,
    on_result: Handler | None,
    on_error: Handler | None,
) -> None:
    data = json.loads(line)
    kind = data.pop("type", None)
    if kind == "result":
        result = Result(**data)
        execution.results.append(result)
        await call(on_result, result)
    elif kind in ("stdout", "stderr"):
        (execution.logs.stdout if kind == "stdout" else execution.logs.stderr).append(data["text"])
        message = OutputMessage(data["text"], data.get("timestamp", 0), kind == "stderr")
        await call(on_stdout if kind == "stdout" else on_stderr, message)
    elif kind == "error":
        execution.error = ExecutionError(data["name"], data["value"], data["traceback"])
        await call(on_error, execution.error)
    elif kind == "number_of_executions":
        execution.execution_count = data["execution_count"]


def _error(response: httpx.Response) -> Exception:
    status, message = response.status_code, error_message(response)
    if status == 404:
        return NotFoundException(message, status_code=status)
    if status == 400:
        return InvalidArgumentException(message, status_code=status)
    if status == 502:
        return SandboxNotRunningException(
            f"{message} (is this a code-interpreter sandbox? its interpreter did not answer)",
            status_code=status,
        )
    return SandboxException(f"{status}: {message}", status_code=status)


class AsyncCodeInterpreter:
    """The code interpreter of a sandbox (port 49999): what ``AsyncSandbox`` adds for it."""

    def __init__(self, envd: Envd) -> None:
        self._envd = envd

    async def _request(
        self, method: str, path: str, request_timeout: float | None, body: Any = None
    ) -> httpx.Response:
        try:
            response = await http_client().request(
                method,
                self._envd.url + path,
                json=body,
                headers=self._envd.headers(INTERPRETER_PORT),
                timeout=self._envd.config.timeout(request_timeout),
            )
        except httpx.TimeoutException as e:
            raise TimeoutException(f"{method} {path} timed out") from e
        if not response.is_success:
            raise _error(response)
        return response

    async def run_code(
        self,
        code: str,
        language: str | None = None,
        context: Context | None = None,
        on_stdout: Handler | None = None,
        on_stderr: Handler | None = None,
        on_result: Handler | None = None,
        on_error: Handler | None = None,
        envs: dict[str, str] | None = None,
        timeout: float | None = DEFAULT_RUN_TIMEOUT,
        request_timeout: float | None = None,
    ) -> Execution:
        """Run code in a context (the language's default one unless given) and return what
        it produced; the callbacks get each output as it comes. ``timeout`` (seconds, 300 by
        default as on E2B; ``0`` or ``None`` for none) interrupts the code, not the context."""
        if language and context:
            raise InvalidArgumentException("give a language or a context, not both")
        body = {
            "code": code,
            "context_id": context.id if context else None,
            "language": language,
            "env_vars": envs,
        }
        connect = self._envd.config.timeout(request_timeout)
        execution = Execution()
        try:
            # The whole run, keepalive lines and all, within ``timeout``: hanging up interrupts
            # the code (the interpreter stops it when its client goes).
            async with asyncio.timeout(timeout or None):
                async with http_client().stream(
                    "POST",
                    self._envd.url + "/execute",
                    json=body,
                    headers=self._envd.headers(INTERPRETER_PORT),
                    timeout=httpx.Timeout(None, connect=connect),
                ) as response:
                    if not response.is_success:
                        await response.aread()
                        raise _error(response)
                    async for line in response.aiter_lines():
                        if line.strip():
                            await _apply(execution, line, on_stdout, on_stderr, on_result, on_error)
        except TimeoutError:
            raise TimeoutException(
                f"the code ran past its timeout of {timeout} s and was interrupted"
            ) from None
        except httpx.TimeoutException as e:
            raise TimeoutException("reaching the code interpreter timed out") from e
        except httpx.HTTPError as e:
            raise SandboxNotRunningException(
                f"the code interpreter's answer was cut off ({type(e).__name__} {e})".rstrip()
            ) from e
        return execution

    async def create_code_context(
        self,
        cwd: str | None = None,
        language: str | None = None,
        request_timeout: float | None = None,
    ) -> Context:
        """A new context (its own kernel): a language (``python`` by default) and a cwd."""
        body = {k: v for k, v in (("cwd", cwd), ("language", language)) if v}
        response = await self._request("POST", "/contexts", request_timeout, body)
        return Context.from_json(response.json())

    async def list_code_contexts(self, request_timeout: float | None = None) -> list[Context]:
        """Every context of the sandbox, the default ones too."""
        response = await self._request("GET", "/contexts", request_timeout)
        return [Context.from_json(c) for c in response.json()]

    async def remove_code_context(
        self, context: Context | str, request_timeout: float | None = None
    ) -> None:
        """Stop a context's kernel and forget it."""
        context_id = context.id if isinstance(context, Context) else context
        await self._request("DELETE", f"/contexts/{context_id}", request_timeout)

    async def restart_code_context(
        self, context: Context | str, request_timeout: float | None = None
    ) -> None:
        """Restart a context's kernel: its state is lost, the context stays."""
        context_id = context.id if isinstance(context, Context) else context
        await self._request("POST", f"/contexts/{context_id}/restart", request_timeout)
