"""Which API key a CLI command acts as: ``--key``, else ``BILIK_API_KEY`` (or ``E2B_API_KEY``,
as the SDKs read it), else the key the server's first start wrote to ``DATA_DIR/api-key``.

Commands that make something (a sandbox, a template) act as that key, so what they make is
the key's team's and visible to it through the API and the SDKs; they name the key on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (the store loads only when a command opens it: ``--help`` stays fast)
    from .store import ApiKey, Store

# As long as the ``prefix`` column of ``bilik keys list``: a key is told by it.
_SHOWN = 10


class NoKey(Exception):
    """No key was given and none can be found (a one-line message for the user)."""


@dataclasses.dataclass(frozen=True)
class ChosenKey:
    key: str
    source: str  # where it came from, for people

    def describe(self, record: ApiKey | None = None) -> str:
        named = f" {record.id} ({record.name})" if record is not None else ""
        return f"acting as API key{named} {self.key[:_SHOWN]}… from {self.source}"


def add_key_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key",
        "--api-key",
        dest="key",
        metavar="KEY",
        help="the API key to act as (default: BILIK_API_KEY, else E2B_API_KEY, else the key "
        "the server's first start wrote to DATA_DIR/api-key)",
    )


def choose(given: str | None, data_dir: Path) -> ChosenKey:
    """The key a command acts as; NoKey if there is none to be found."""
    if given:
        return ChosenKey(given, "--key")
    for variable in ("BILIK_API_KEY", "E2B_API_KEY"):
        if value := os.environ.get(variable, "").strip():
            return ChosenKey(value, variable)
    path = data_dir / "api-key"
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    except OSError as e:
        raise NoKey(f"cannot read {path} ({e.strerror}): pass --key or set BILIK_API_KEY") from e
    if not key:
        raise NoKey(
            f"no API key: pass --key, set BILIK_API_KEY, or start `bilik serve` once (its first "
            f"start writes one to {path}); `bilik keys create` makes more"
        )
    return ChosenKey(key, str(path))


async def verify(chosen: ChosenKey, store: Store) -> ApiKey:
    """The active key record of ``chosen``; NoKey if it is not one."""
    record = await store.keys.verify(chosen.key)
    if record is None:
        raise NoKey(not_active(chosen))
    return record


def not_active(chosen: ChosenKey) -> str:
    """What to say when the server knows no active key ``chosen``."""
    return (
        f"the API key from {chosen.source} ({chosen.key[:_SHOWN]}…) is not an active key "
        "of this server (see `bilik keys list`)"
    )


def announce(chosen: ChosenKey, record: ApiKey | None = None) -> None:
    """One line on stderr: which key this command acts as."""
    print(f"bilik: {chosen.describe(record)}", file=sys.stderr)
