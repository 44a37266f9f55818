"""A Jupyter kernel for Java: ``python3 -m bilik.interpreter.java_kernel -f CONNECTION_FILE``.

JShell (the JDK's own engine behind ``jshell``) keeps what each execution declares, so state
carries over like a notebook's. A small Java program (``jshell_helper``) evaluates the code
with it; this side speaks Jupyter through ipykernel, streams the program's output, returns the
value of the last expression as the execution's result and errors (compile or runtime) as
errors. The kernelspec asks for interrupts as messages, which stop the running snippet
without touching the Java process, so state survives an interrupt.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from ipykernel.kernelapp import IPKernelApp
from ipykernel.kernelbase import Kernel

from . import jshell_helper

# Snippets are small and many: C1 alone compiles them sooner than with C2 behind it, and the
# JVM needs less memory (which a sandbox's kernels share). A sandbox's memory limit is not
# visible inside it, so the JVM would size its first heap for the host's memory: it starts
# small and grows as needed.
JVM_OPTIONS = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xms16m")
# Where the helper's compiled class goes, per version of its source.
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bilik"


def compiled_helper() -> Path:
    """The directory with the helper's class, compiled on first use."""
    digest = hashlib.sha256(jshell_helper.SOURCE.encode()).hexdigest()[:16]
    target = CACHE / f"jshell-{digest}"
    if (target / f"{jshell_helper.CLASS_NAME}.class").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=CACHE))
    try:
        source = scratch / f"{jshell_helper.CLASS_NAME}.java"
        source.write_text(jshell_helper.SOURCE)
        subprocess.run(["javac", "-nowarn", "-d", str(scratch), str(source)], check=True)
        source.unlink()
        scratch.chmod(0o755)  # (mkdtemp's is the owner's alone)
        with contextlib.suppress(OSError):  # (another kernel compiled it first)
            scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


class Helper:
    """The Java process: requests in, frames out."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["java", *JVM_OPTIONS, "-cp", str(compiled_helper()), jshell_helper.CLASS_NAME],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # Its own session: a signal to the kernel's process group does not end it.
            start_new_session=True,
        )
        self._write_lock = threading.Lock()
        self.ready = self.exited = False

    def request(self, line: str) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        with self._write_lock:
            stdin.write(line.encode() + b"\n")
            stdin.flush()

    def frames(self) -> Iterator[tuple[str, list[bytes]]]:
        """Frames up to the next ``D`` (not included), their fields decoded from base64; ends
        early if the process exits (then ``exited`` is set)."""
        stdout = self.proc.stdout
        assert stdout is not None
        for raw in stdout:
            kind, *fields = raw.decode().rstrip("\n").split(" ")
            if kind == "D":
                return
            yield kind, [base64.b64decode(field) for field in fields]
        self.exited = True

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class JavaKernel(Kernel):
    implementation = "bilik-java"
    implementation_version = "1.0"
    language = "java"
    language_version = "17"
    language_info: ClassVar[dict[str, object]] = {
        "name": "java",
        "mimetype": "text/x-java-source",
        "file_extension": ".java",
        "codemirror_mode": "text/x-java",
    }
    banner = "Java (JShell)"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Started now, so the JVM comes up while the client waits for the kernel.
        self.helper: Helper | None = Helper()

    def _running_helper(self) -> Helper:
        if self.helper is None or self.helper.exited:
            self.helper = Helper()
        if not self.helper.ready:
            for _ in self.helper.frames():
                pass
            self.helper.ready = True
        return self.helper

    async def do_execute(  # type: ignore[override]
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict[str, Any] | None = None,
        allow_stdin: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        helper = self._running_helper()
        with contextlib.suppress(BrokenPipeError):  # (it died: reading says so)
            helper.request("E " + base64.b64encode(code.encode()).decode())
        # Output may split a character between two frames.
        decoders = {"O": codecs.getincrementaldecoder("utf-8")("replace")}
        decoders["R"] = codecs.getincrementaldecoder("utf-8")("replace")
        error: dict[str, Any] | None = None
        # (Reading blocks this kernel's shell, as other wrapper kernels do; interrupts come on
        # the control channel, which has a thread of its own.)
        for kind, fields in helper.frames():
            if kind in ("O", "R") and not silent:
                text = decoders[kind].decode(fields[0])
                name = "stdout" if kind == "O" else "stderr"
                self.send_response(self.iopub_socket, "stream", {"name": name, "text": text})
            elif kind == "V" and not silent:
                self.send_response(
                    self.iopub_socket,
                    "execute_result",
                    {
                        "execution_count": self.execution_count,
                        "data": {"text/plain": fields[0].decode()},
                        "metadata": {},
                    },
                )
            elif kind == "X":
                name, value, trace = (field.decode() for field in fields)
                error = {"ename": name, "evalue": value, "traceback": [trace]}
        if helper.exited:
            # System.exit, or the JVM died: the next execution starts a new one.
            status = helper.proc.wait()
            self.helper = None
            error = {
                "ename": "JavaProcessExited",
                "evalue": f"the Java process exited with status {status}; its state is gone",
                "traceback": [],
            }
        if error is None:
            return {
                "status": "ok",
                "execution_count": self.execution_count,
                "payload": [],
                "user_expressions": {},
            }
        if not silent:
            self.send_response(self.iopub_socket, "error", error)
        return {"status": "error", "execution_count": self.execution_count, **error}

    async def interrupt_request(self, stream: Any, ident: Any, parent: Any) -> None:
        # Stop the running snippet only: the JVM and everything declared stay.
        if self.helper is not None and self.helper.proc.poll() is None:
            self.helper.request("S")
        if self.session:
            self.session.send(stream, "interrupt_reply", {"status": "ok"}, parent, ident=ident)

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        if self.helper is not None:
            self.helper.close()
            self.helper = None
        return {"status": "ok", "restart": restart}


def main() -> None:
    if sys.argv[1:] == ["--compile"]:  # (ahead, in a template build)
        print(compiled_helper())
        return
    IPKernelApp.launch_instance(kernel_class=JavaKernel)


if __name__ == "__main__":
    main()
