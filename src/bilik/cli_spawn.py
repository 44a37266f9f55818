"""``bilik sandbox spawn``: an interactive terminal into a sandbox, over the server's PTY API."""

from __future__ import annotations

import argparse
import os
import signal
import stat
import sys
import termios
import tty
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import bilik.cli_identity as cli_identity  # (not `from bilik import`: see cli.py)
from bilik.config import Settings

if TYPE_CHECKING:  # (the SDK loads when spawn runs: ``--help`` stays fast)
    from bilik.sdk import AsyncSandbox, PtySize

# While someone is attached, the sandbox's lifetime is renewed; it ends this long after the
# terminal goes away (a lost connection, a killed CLI).
LEASE_S = 300


def _size() -> PtySize:
    from bilik.sdk import PtySize

    try:
        columns, lines = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        return PtySize(rows=24, cols=80)
    return PtySize(rows=lines, cols=columns)


async def spawn(args: argparse.Namespace) -> int:
    """Open a login shell in a new sandbox (or ``--connect`` to one) and hand it the terminal."""
    from bilik.sdk import (
        AsyncSandbox,
        AuthenticationException,
        SandboxException,
        ServiceBusyException,
    )

    if not _pollable(sys.stdin.fileno()):
        print(
            "bilik: spawn needs a terminal (or a pipe) as its input; to run one command, use "
            "`bilik sandbox exec ID COMMAND`",
            file=sys.stderr,
        )
        return 1
    chosen = cli_identity.choose(args.key, Settings.from_env().data_dir)
    cli_identity.announce(chosen)
    opts: dict[str, Any] = {"api_url": args.url, "api_key": chosen.key}
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


def _pollable(fd: int) -> bool:
    """Whether the event loop can wait on ``fd`` for input: a terminal, a pipe or a socket
    (not a file, nor /dev/null)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return os.isatty(fd) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


async def _attach(sandbox: AsyncSandbox) -> int:
    import asyncio

    from bilik.sdk import CommandExitException

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
    parser.add_argument(
        "--keep",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the sandbox when the shell exits (default: only a --connect one)",
    )
    parser.add_argument(
        "--url", help="the server (BILIK_URL, else E2B_API_URL, else http://127.0.0.1:3000)"
    )
    cli_identity.add_key_option(parser)
    parser.set_defaults(func=spawn)
