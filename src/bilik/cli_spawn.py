"""``bilik sandbox spawn``: an interactive terminal into a sandbox, over the server's PTY API."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import termios
import tty
from datetime import UTC, datetime
from typing import Any

from bilik.sdk import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    PtySize,
    SandboxException,
    ServiceBusyException,
)

# While someone is attached, the sandbox's lifetime is renewed; it ends this long after the
# terminal goes away (a lost connection, a killed CLI).
LEASE_S = 300


def _size() -> PtySize:
    try:
        columns, lines = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        return PtySize(rows=24, cols=80)
    return PtySize(rows=lines, cols=columns)


async def spawn(args: argparse.Namespace) -> int:
    """Open a login shell in a new sandbox (or ``--connect`` to one) and hand it the terminal."""
    opts: dict[str, Any] = {"api_url": args.url, "api_key": args.api_key}
    try:
        if args.connect:  # (its lifetime as it is: renewed only if it would end sooner)
            sandbox = await AsyncSandbox.connect(args.connect, **opts)
        else:
            sandbox = await AsyncSandbox.create(args.template, timeout=LEASE_S, **opts)
    except (SandboxException, AuthenticationException, ServiceBusyException, OSError) as e:
        print(f"bilik: {e}", file=sys.stderr)
        return 1
    keep = args.keep if args.keep is not None else bool(args.connect)
    print(f"sandbox {sandbox.sandbox_id} ({'kept' if keep else 'killed'} on exit)", file=sys.stderr)
    try:
        return await _attach(sandbox)
    finally:
        if not keep:
            await sandbox.kill()


async def _attach(sandbox: AsyncSandbox) -> int:
    loop = asyncio.get_running_loop()
    out = sys.stdout.buffer

    def show(data: bytes) -> None:
        out.write(data)
        out.flush()

    terminal = await sandbox.pty.create(_size(), on_data=show, timeout=0)
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    typed: asyncio.Queue[bytes] = asyncio.Queue()

    def read() -> None:
        data = os.read(stdin, 4096)
        if not data:
            loop.remove_reader(stdin)
        typed.put_nowait(data)

    async def forward() -> None:
        while data := await typed.get():
            await terminal.send_stdin(data)
        await terminal.send_stdin(b"\x04")  # end of piped input: end of the shell's input

    async def renew() -> None:
        # Never shortens a lifetime: only one ending within the lease is pushed out.
        while True:
            await asyncio.sleep(LEASE_S / 5)
            left = (await sandbox.get_info()).end_at - datetime.now(UTC)
            if left.total_seconds() < LEASE_S:
                await sandbox.set_timeout(LEASE_S)

    resizes: set[asyncio.Task[None]] = set()

    def resized() -> None:
        task = loop.create_task(sandbox.pty.resize(terminal.pid, _size()))
        resizes.add(task)
        task.add_done_callback(resizes.discard)

    if saved is not None:
        tty.setraw(stdin, termios.TCSANOW)  # (what was typed ahead is kept)
    loop.add_reader(stdin, read)
    loop.add_signal_handler(signal.SIGWINCH, resized)
    helpers = [asyncio.create_task(forward()), asyncio.create_task(renew())]
    try:
        await terminal.wait()
        return 0
    except CommandExitException as e:
        return e.exit_code
    finally:
        # The terminal first: whatever happens next, the user gets theirs back.
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        loop.remove_signal_handler(signal.SIGWINCH)
        loop.remove_reader(stdin)
        for helper in helpers:
            helper.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)


def add_command(sandboxes: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``spawn`` under ``bilik sandbox``."""
    parser = sandboxes.add_parser(
        "spawn",
        help="an interactive terminal into a new sandbox (or --connect ID)",
        description=(
            "Open a login shell in a new sandbox of TEMPLATE (or in a running one with "
            "--connect), through the server's API. A new sandbox is killed when the shell "
            "exits unless --keep; a connected one is kept unless --no-keep."
        ),
    )
    parser.add_argument("template", nargs="?", default="base", help="template (default: base)")
    parser.add_argument("--connect", metavar="SANDBOX_ID", help="a running sandbox instead")
    parser.add_argument("--keep", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--url", help="the server (BILIK_URL, else E2B_API_URL)")
    parser.add_argument("--api-key", help="API key (BILIK_API_KEY, else E2B_API_KEY)")
    parser.set_defaults(func=spawn)
