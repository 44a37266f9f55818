"""``bilik sandbox pause|resume|snapshot|fork``: a key's sandbox paused, resumed, snapshotted
or forked through the running server's API, as the SDKs do it (the server holds what a pause
changes: which sandboxes its sandbox plane lets traffic reach, and which it resumes)."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import bilik.cli_identity as cli_identity  # (not `from bilik import`: see cli.py)
from bilik.config import Settings


def _opts(args: argparse.Namespace) -> dict[str, Any]:
    """The SDK's connection options: the server, and the key chosen as the other commands
    choose it."""
    chosen = cli_identity.choose(args.key, Settings.from_env().data_dir)
    cli_identity.announce(chosen)
    return {"api_url": args.url, "api_key": chosen.key}


def _reported(
    command: Callable[[argparse.Namespace], Awaitable[int]],
) -> Callable[[argparse.Namespace], Awaitable[int]]:
    """What the server refused, one ``bilik: ...`` line (and exit status 1), as the other
    commands report theirs."""

    @functools.wraps(command)
    async def reported(args: argparse.Namespace) -> int:
        from bilik.sdk import SandboxException

        try:
            return await command(args)
        except SandboxException as e:
            print(f"bilik: {e}", file=sys.stderr)
            return 1

    return reported


@_reported
async def _pause(args: argparse.Namespace) -> int:
    from bilik.sdk import AsyncSandbox

    mode = "filesystem" if args.files_only else "full"
    paused = await AsyncSandbox.pause(args.sandbox_id, mode, **_opts(args))
    if not paused:
        print(f"bilik: sandbox {args.sandbox_id} is paused already", file=sys.stderr)
        return 1
    print(args.sandbox_id)
    return 0


@_reported
async def _resume(args: argparse.Namespace) -> int:
    from bilik.sdk import AsyncSandbox

    sandbox = await AsyncSandbox.connect(args.sandbox_id, args.timeout, **_opts(args))
    print(sandbox.sandbox_id)
    return 0


@_reported
async def _snapshot(args: argparse.Namespace) -> int:
    from bilik.sdk import AsyncSandbox

    snapshot = await AsyncSandbox.create_snapshot(args.sandbox_id, args.name, **_opts(args))
    print(snapshot.snapshot_id)
    print(
        f"snapshot {', '.join(snapshot.names)}: its files only (a sandbox made from it boots "
        "afresh); `bilik sandbox create --template NAME` starts one",
        file=sys.stderr,
    )
    return 0


@_reported
async def _fork(args: argparse.Namespace) -> int:
    from bilik.sdk import AsyncSandbox

    made = await AsyncSandbox.fork(args.sandbox_id, args.timeout, args.count, **_opts(args))
    failed = 0
    for child in made:
        if isinstance(child, AsyncSandbox):
            print(child.sandbox_id)
        else:
            failed += 1
            print(f"bilik: a fork failed: {child}", file=sys.stderr)
    return 1 if failed else 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sandbox_id", metavar="SANDBOX_ID", help="the sandbox's id")
    parser.add_argument(
        "--url", help="the server (BILIK_URL, else E2B_API_URL, else http://127.0.0.1:3000)"
    )
    cli_identity.add_key_option(parser)


def add_commands(sandboxes: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``pause``, ``resume``, ``snapshot`` and ``fork`` under ``bilik sandbox``."""
    pause = sandboxes.add_parser(
        "pause",
        help="pause a sandbox (its memory kept, or --files-only)",
        description="Pause a sandbox through the server, as its key: its processes stop where "
        "they are and go on at `bilik sandbox resume`; with --files-only only its files are "
        "kept, and a resume boots it afresh. Prints its id.",
    )
    _common(pause)
    pause.add_argument(
        "--files-only", action="store_true", help="keep its files only (a resume boots afresh)"
    )
    pause.set_defaults(func=_pause)
    resume = sandboxes.add_parser(
        "resume",
        help="resume a paused sandbox (same id)",
        description="Resume a paused sandbox through the server, as its key, with the same id "
        "(a running one only has its end moved later). Prints its id.",
    )
    _common(resume)
    resume.add_argument(
        "--timeout", type=int, default=300, help="seconds it lives from now (default: 300)"
    )
    resume.set_defaults(func=_resume)
    snapshot = sandboxes.add_parser(
        "snapshot",
        help="snapshot a sandbox's files as a template",
        description="Snapshot a sandbox's files (it goes on) as a template of its key's, that "
        "sandboxes are created from. Prints the snapshot's id.",
    )
    _common(snapshot)
    snapshot.add_argument("--name", help="the snapshot's name (default: its id)")
    snapshot.set_defaults(func=_snapshot)
    fork = sandboxes.add_parser(
        "fork",
        help="new sandboxes with a copy of a sandbox's files",
        description="Make COUNT new sandboxes, each with a copy of the sandbox's files (it "
        "goes on; they boot afresh). Prints their ids, one a line.",
    )
    _common(fork)
    fork.add_argument("--count", type=int, default=1, help="how many, 1 to 20 (default: 1)")
    fork.add_argument("--timeout", type=int, default=300, help="seconds each lives (default: 300)")
    fork.set_defaults(func=_fork)
