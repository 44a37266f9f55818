"""The code interpreter's HTTP API (E2B's, port 49999): contexts and streamed executions.

Each context is a Jupyter kernel (``jupyter_client``), started in its working directory and
kept between executions, so state carries over like a notebook's. ``POST /execute`` streams
NDJSON as the kernel produces it: stdout and stderr, results (mapped from MIME types), errors,
the execution count, keepalives while it is silent, and the end.

As on E2B, the default contexts (one per language, in ``/home/user``) are listed from the start,
Python's and JavaScript's among them; each starts its kernel when first used (Python's with the
server), so a sandbox that never runs JavaScript never pays for its kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import secrets
import shlex
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jupyter_client.manager import AsyncKernelManager

from ..proto.contract import INTERPRETER_PORT

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

PORT = INTERPRETER_PORT
KEEPALIVE_S = 5.0
DEFAULT_CWD = "/home/user"
# The default contexts listed before any is used (E2B lists these two).
LISTED_DEFAULTS = ("python", "javascript")
# Every Python kernel runs it first: results' data, charts and images as E2B's have them.
PYTHON_STARTUP = Path(__file__).with_name("kernel_startup.py")
ALIASES = {"js": "javascript", "ts": "typescript"}
# Language → Jupyter kernel name. Deno's kernel runs both JavaScript and TypeScript (a context
# each); Java's is bilik's own (``java_kernel``).
KERNELS = {
    "python": "python3",
    "bash": "bash",
    "r": "ir",
    "javascript": "deno",
    "typescript": "deno",
    "java": "java",
}
VALUES_AS_DISPLAY = {"r"}
# Languages that Deno's kernel runs. It may publish an execution's last output just after
# saying it is idle (its result and console output reach iopub by other tasks than its
# status); and interrupted while awaiting a promise, it never finishes that execution (the
# callback that would settle the promise is stopped too), so such a context is restarted.
DENO = {"javascript", "typescript"}
INTERRUPT_GRACE_S = 3.0
MARKER_WAIT_S = 2.0
MIME_FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "e2b/data": "data",
    "e2b/chart": "chart",
}


class Unsupported(Exception):
    """A request asked for what cannot be done (a 400, with this message)."""


class KernelFailed(Exception):
    """A kernel did not start (a 500, with this message)."""


class KernelDied(Exception):
    """A context's kernel ended (killed at the memory limit, say) while it was being used."""


DIED = "the context's kernel died (out of memory?)"
# What comes of it: a language's default context restarts its kernel by itself (with the next
# execution, as E2B's does); one the user made is theirs to restart.
DIED_DEFAULT = "the next execution restarts it, without the context's state"
DIED_MADE = "restart the context to use it again (its state is gone)"
RESTARTED = (
    "bilik: this context's kernel had died (out of memory?) and was restarted: "
    "the variables and imports of earlier executions are gone\n"
)


@dataclass
class Context:
    id: str
    language: str
    cwd: str
    manager: AsyncKernelManager
    client: Any
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    running: str = ""  # the execution under way (its message id)
    abandoned: str = ""  # an execution given up on: its kernel is to be restarted

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}


def language_of(raw: object) -> str:
    language = str(raw or "python").lower()
    return ALIASES.get(language, language)


def usable_cwd(raw: object) -> str:
    """The directory a context asks for (relative ones are in the default one), checked to be
    one the kernels can work in; Unsupported if it is not."""
    if raw is None or raw == "":
        return DEFAULT_CWD
    if not isinstance(raw, str) or "\0" in raw:
        raise Unsupported("cwd must be a path")
    cwd = os.path.normpath(os.path.join(DEFAULT_CWD, raw))
    if not os.path.isdir(cwd):
        raise Unsupported(f"cwd {cwd!r} is not a directory")
    if not os.access(cwd, os.R_OK | os.X_OK):
        raise Unsupported(f"cwd {cwd!r} is not a directory the interpreter may use")
    return cwd


class Interpreter:
    def __init__(self) -> None:
        self.contexts: dict[str, Context] = {}
        # Each language's default context id, given out before its kernel starts.
        self.defaults: dict[str, str] = {lang: secrets.token_hex(8) for lang in LISTED_DEFAULTS}
        self._starting: dict[str, asyncio.Lock] = {}

    async def create(self, language: str, cwd: str, context_id: str = "") -> Context:
        kernel = KERNELS.get(language)
        if kernel is None:
            raise Unsupported(f"language {language!r} is not supported (yet): try python")
        manager = AsyncKernelManager(kernel_name=kernel)
        # The server's own PYTHONPATH (bilik's packages) is no business of the user's code.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        extra = [f"--IPKernelApp.exec_files={PYTHON_STARTUP}"] if language == "python" else []
        try:
            await manager.start_kernel(cwd=cwd, env=env, extra_arguments=extra)
            client = manager.client()
            client.start_channels()
            await client.wait_for_ready(timeout=60)
        except Exception as e:
            with contextlib.suppress(Exception):
                await manager.shutdown_kernel(now=True)
            raise KernelFailed(f"the {language} kernel did not start: {e}") from e
        context = Context(context_id or secrets.token_hex(8), language, cwd, manager, client)
        self.contexts[context.id] = context
        return context

    async def default(self, language: str) -> Context:
        """The language's default context, started on first use (one, however many ask)."""
        async with self._starting.setdefault(language, asyncio.Lock()):
            context_id = self.defaults.setdefault(language, secrets.token_hex(8))
            if context_id in self.contexts:
                return self.contexts[context_id]
            return await self.create(language, DEFAULT_CWD, context_id)

    async def find(self, context_id: str) -> Context | None:
        """The context ``context_id``; a default one not yet used starts now."""
        if context_id in self.contexts:
            return self.contexts[context_id]
        for language, default_id in self.defaults.items():
            if default_id == context_id:
                return await self.default(language)
        return None

    def listing(self) -> list[dict[str, str]]:
        """Every context, the default ones not yet started first."""
        waiting = [
            {"id": context_id, "language": language, "cwd": DEFAULT_CWD}
            for language, context_id in self.defaults.items()
            if context_id not in self.contexts
        ]
        return waiting + [context.to_json() for context in self.contexts.values()]

    async def remove(self, context_id: str) -> bool:
        was_default = False
        for language, default_id in list(self.defaults.items()):
            if default_id == context_id:  # (the next one the language needs is a new one)
                del self.defaults[language]
                was_default = True
        context = self.contexts.pop(context_id, None)
        if context is None:
            return was_default
        context.client.stop_channels()
        await context.manager.shutdown_kernel(now=True)
        return True

    async def restart(self, context_id: str) -> bool:
        context = self.contexts.get(context_id)
        if context is None:  # (a default context not started yet is as new as can be)
            return context_id in self.defaults.values()
        await context.manager.restart_kernel(now=True)
        await context.client.wait_for_ready(timeout=60)
        return True

    async def execute(
        self,
        context: Context,
        code: str,
        env: dict[str, str],
        emit: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        """Run ``code`` in ``context``, emitting E2B's stream items; ends with end_of_execution.
        A default context whose kernel has died gets a new one first (and the first output
        says so): one death never makes every later execution fail."""
        default = context.id in self.defaults.values()
        async with context.lock:
            try:
                if not await context.manager.is_alive():
                    if not default:
                        raise KernelDied
                    await self._revive(context)
                    await emit({"type": "stderr", "text": RESTARTED, "timestamp": _now()})
                if env:
                    await self._silently(context, _env_code(context.language, env, set_them=True))
                try:
                    await self._run(context, code, emit)
                finally:
                    if env:
                        await self._silently(
                            context, _env_code(context.language, env, set_them=False)
                        )
            except KernelDied:
                then = DIED_DEFAULT if default else DIED_MADE
                await emit(_error("UnexpectedEndOfExecution", f"{DIED}; {then}"))
            except KernelFailed as e:
                await emit(_error("UnexpectedEndOfExecution", str(e)))
        await emit({"type": "end_of_execution"})

    async def _revive(self, context: Context) -> None:
        try:
            await self.restart(context.id)
        except Exception as e:
            raise KernelFailed(f"the {context.language} kernel did not restart: {e}") from e

    async def _silently(self, context: Context, code: str) -> None:
        msg_id = context.client.execute(code, silent=True, store_history=False)
        await self._wait_idle(context, msg_id)

    async def _wait_idle(self, context: Context, msg_id: str) -> None:
        while True:
            message = await self._next_message(context)
            if (
                message["parent_header"].get("msg_id") == msg_id
                and message["msg_type"] == "status"
                and message["content"]["execution_state"] == "idle"
            ):
                return

    async def _next_message(self, context: Context) -> dict[str, Any]:
        """The kernel's next iopub message, however long it takes; KernelDied if the kernel
        ends first (it is looked at every second it is silent)."""
        while True:
            try:
                message: dict[str, Any] = await context.client.get_iopub_msg(timeout=1)
                return message
            except Exception:  # queue.Empty: the kernel is silent; is it still there?
                if not await context.manager.is_alive():
                    raise KernelDied from None

    async def _run(
        self, context: Context, code: str, emit: Callable[[dict[str, Any]], Awaitable[None]]
    ) -> None:
        client = context.client
        msg_id = context.running = client.execute(code, allow_stdin=False)
        try:
            await self._follow(context, msg_id, emit)
        finally:
            context.running = ""

    async def _follow(
        self,
        context: Context,
        msg_id: str,
        emit: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        client = context.client
        # The executions whose output is this one's. Deno's is followed by one that prints a
        # marker: its idle comes after the first's result, and the marker after the first's
        # console output (one queue in the kernel carries all of it).
        ours, marker, marked = {msg_id}, "", False
        deadline = math.inf  # for the marker, in case the code took console.log away
        while True:
            if context.abandoned == msg_id:
                # (here, where the context is still locked, so nothing runs on it meanwhile)
                await self.restart(context.id)
                await emit(
                    _error(
                        "UnexpectedEndOfExecution",
                        "the code did not stop when interrupted: the kernel was restarted",
                    )
                )
                return
            if time.monotonic() > deadline:
                return
            try:
                message = await client.get_iopub_msg(timeout=1)
            except Exception:  # queue.Empty: the kernel is silent; is it still there?
                if not await context.manager.is_alive():
                    raise KernelDied from None
                continue
            parent = message["parent_header"].get("msg_id")
            if parent not in ours:
                continue
            kind, content = message["msg_type"], message["content"]
            stamp = str(message["header"].get("date", ""))
            if kind == "stream":
                text = content["text"]
                if marker and marker in text:
                    text, marked = text.replace(marker + "\n", "").replace(marker, ""), True
                if text:
                    await emit({"type": content["name"], "text": text, "timestamp": stamp})
                if marked and deadline < math.inf:
                    return
            elif kind in ("execute_result", "display_data"):
                # IRkernel shows an execution's value as display data, not as its result.
                main = kind == "execute_result" or context.language in VALUES_AS_DISPLAY
                await emit(_result(content.get("data", {}), main))
            elif kind == "error":
                await emit(
                    {
                        "type": "error",
                        "name": content.get("ename", ""),
                        "value": content.get("evalue", ""),
                        "traceback": "\n".join(content.get("traceback", [])),
                    }
                )
            elif kind == "execute_input" and parent == msg_id:
                await emit(
                    {"type": "number_of_executions", "execution_count": content["execution_count"]}
                )
            elif kind == "status" and content["execution_state"] == "idle":
                if parent == msg_id and context.language in DENO:
                    marker = f"bilik-done-{msg_id}"
                    ours.add(
                        client.execute(
                            f"console.log({json.dumps(marker)})", silent=True, store_history=False
                        )
                    )
                elif parent != msg_id and not marked:
                    deadline = time.monotonic() + MARKER_WAIT_S
                else:
                    return

    async def interrupt(self, context: Context) -> None:
        running = context.running
        with contextlib.suppress(Exception):
            await context.manager.interrupt_kernel()
        if context.language in DENO and running:
            await asyncio.sleep(INTERRUPT_GRACE_S)
            if context.running == running:  # stuck: the execution restarts the kernel
                context.abandoned = running


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _error(name: str, value: str) -> dict[str, Any]:
    return {"type": "error", "name": name, "value": value, "traceback": ""}


def _result(data: dict[str, Any], main: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"type": "result", "is_main_result": main}
    extra = {}
    for mime, value in data.items():
        name = MIME_FIELDS.get(mime)
        if name is None:
            extra[mime] = value
        else:
            result[name] = value
    text = result.get("text")
    if isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        result["text"] = text[1:-1]
    if extra:
        result["extra"] = extra
    return result


def _env_code(language: str, env: dict[str, str], *, set_them: bool) -> str:
    """Code that sets ``env`` for one execution, in the context's language, and then puts back
    what was there before (a sandbox's own variable keeps its value for the next execution)."""
    if language == "bash":
        if set_them:
            return "\n".join(
                f'if [ -n "${{{k}+x}}" ]; then __bilik_old_{k}=${k}; '
                f"else unset __bilik_old_{k}; fi; export {k}={shlex.quote(v)}"
                for k, v in env.items()
            )
        return "\n".join(
            f'if [ -n "${{__bilik_old_{k}+x}}" ]; then export {k}="$__bilik_old_{k}"; '
            f"unset __bilik_old_{k}; else unset {k}; fi"
            for k in env
        )
    if language == "r":
        if set_them:
            names = ", ".join(json.dumps(k) for k in env)
            pairs = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in env.items())
            return (
                f".bilik_saved_env <- Sys.getenv(c({names}), unset = NA, names = TRUE)\n"
                f"Sys.setenv({pairs})"
            )
        return (
            "for (.bilik_k in names(.bilik_saved_env)) {\n"
            "  .bilik_v <- .bilik_saved_env[[.bilik_k]]\n"
            "  if (is.na(.bilik_v)) Sys.unsetenv(.bilik_k)\n"
            "  else do.call(Sys.setenv, stats::setNames(list(.bilik_v), .bilik_k))\n"
            "}\n"
            "rm(.bilik_saved_env, .bilik_k, .bilik_v)"
        )
    if language in DENO:
        if set_them:
            return (
                f"globalThis.__bilik_saved_env = Object.fromEntries({json.dumps(list(env))}"
                ".map((k) => [k, Deno.env.get(k)]));\n"
                f"for (const [k, v] of Object.entries({json.dumps(env)})) Deno.env.set(k, v);"
            )
        return (
            "for (const [k, v] of Object.entries(globalThis.__bilik_saved_env)) "
            "v === undefined ? Deno.env.delete(k) : Deno.env.set(k, v);\n"
            "delete globalThis.__bilik_saved_env;"
        )
    if language == "java":
        # A running JVM's environment cannot change: they come as system properties, which
        # mirror the environment otherwise (the kernel copies it in at start).
        if set_them:
            return "".join(
                f"System.setProperty({json.dumps(k)}, {json.dumps(v)});" for k, v in env.items()
            )
        return "".join(
            f"{{ String __bilik_v = System.getenv({json.dumps(k)}); if (__bilik_v == null) "
            f"System.clearProperty({json.dumps(k)}); "
            f"else System.setProperty({json.dumps(k)}, __bilik_v); }}"
            for k in env
        )
    names = json.dumps(env)
    if set_them:
        return (
            "import os as __bilik_os\n"
            f"__bilik_saved_env = {{k: __bilik_os.environ.get(k) for k in {names}}}\n"
            f"__bilik_os.environ.update({names})\n"
        )
    return (
        "for __k, __v in __bilik_saved_env.items():\n"
        "    if __v is None: __bilik_os.environ.pop(__k, None)\n"
        "    else: __bilik_os.environ[__k] = __v\n"
        "del __bilik_saved_env\n"
    )


# -- HTTP ---------------------------------------------------------------------------------------


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _reply(send: Send, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def _fail(send: Send, status: int, message: str) -> None:
    await _reply(send, status, {"code": status, "message": message})


def _object(raw: bytes) -> dict[str, Any]:
    data = json.loads(raw or b"{}")
    if not isinstance(data, dict):
        raise Unsupported("the body must be a JSON object")
    return data


class App:
    def __init__(self) -> None:
        self.interpreter = Interpreter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        try:
            if path == "/health":
                await _reply(send, 200, "OK")
            elif path == "/execute" and method == "POST":
                await self._execute(receive, send)
            elif path == "/contexts" and method == "POST":
                data = _object(await _body(receive))
                context = await self.interpreter.create(
                    language_of(data.get("language")), usable_cwd(data.get("cwd"))
                )
                await _reply(send, 200, context.to_json())
            elif path == "/contexts" and method == "GET":
                await _reply(send, 200, self.interpreter.listing())
            elif path.startswith("/contexts/") and method == "DELETE":
                context_id = path.split("/")[2]
                if not await self.interpreter.remove(context_id):
                    await _fail(send, 404, f"Context {context_id} not found")
                else:
                    await _reply(send, 200, {})
            elif path.startswith("/contexts/") and path.endswith("/restart") and method == "POST":
                context_id = path.split("/")[2]
                if not await self.interpreter.restart(context_id):
                    await _fail(send, 404, f"Context {context_id} not found")
                else:
                    await _reply(send, 200, {})
            else:
                await _fail(send, 404, f"no such endpoint: {method} {path}")
        except Unsupported as e:
            await _fail(send, 400, str(e))
        except KernelFailed as e:
            await _fail(send, 500, str(e))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            await _fail(send, 400, f"malformed request: {e}")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # The default Python kernel starts with the server, not at the first run_code.
                self._warm = asyncio.create_task(self.interpreter.default("python"))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _execute(self, receive: Receive, send: Send) -> None:
        data = _object(await _body(receive))
        code = data.get("code")
        if not isinstance(code, str):
            await _fail(send, 400, "code is required")
            return
        context_id, language = data.get("context_id"), data.get("language")
        if context_id and language:
            await _fail(send, 400, "give a context or a language, not both")
            return
        if context_id:
            context = await self.interpreter.find(str(context_id))
            if context is None:
                await _fail(send, 404, f"Context {context_id} not found")
                return
        else:
            context = await self.interpreter.default(language_of(language))
        env = {
            str(k): str(v)
            for k, v in (data.get("env_vars") or {}).items()
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(k))
        }
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-ndjson")],
            }
        )
        last = time.monotonic()

        async def emit(item: dict[str, Any]) -> None:
            nonlocal last
            last = time.monotonic()
            line = json.dumps(item).encode() + b"\n"
            await send({"type": "http.response.body", "body": line, "more_body": True})

        async def keepalive() -> None:
            while True:
                await asyncio.sleep(1)
                if time.monotonic() - last >= KEEPALIVE_S:
                    await emit({"type": "keepalive"})

        async def hang_up() -> None:
            # The client went away (its timeout, say): stop the code, keep the context.
            while (await receive())["type"] != "http.disconnect":
                pass
            await self.interpreter.interrupt(context)

        helpers = [asyncio.create_task(keepalive()), asyncio.create_task(hang_up())]
        try:
            await self.interpreter.execute(context, code, env, emit)
        finally:
            for helper in helpers:
                helper.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})
