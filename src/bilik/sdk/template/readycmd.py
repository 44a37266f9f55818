"""Ready checks for a template's start command: shell tests that pass once it is up."""

from __future__ import annotations

import shlex


class ReadyCmd:
    """A shell command whose success means the sandbox's start command is ready."""

    def __init__(self, cmd: str) -> None:
        self._cmd = cmd

    def get_cmd(self) -> str:
        """The shell command."""
        return self._cmd

    def __repr__(self) -> str:
        return f"ReadyCmd({self._cmd!r})"


def wait_for_port(port: int) -> ReadyCmd:
    """Ready once something listens on ``port`` (TCP or UDP), as ``ss`` sees it."""
    # ss exits 0 either way: the test is for output. "sport = :80" does not match 8080.
    return ReadyCmd(f'[ -n "$(ss -Htuln sport = :{int(port)})" ]')


def wait_for_url(url: str, status_code: int = 200) -> ReadyCmd:
    """Ready once ``url`` answers with ``status_code`` (checked with ``curl``)."""
    check = f'curl -s -o /dev/null -w "%{{http_code}}" {shlex.quote(url)}'
    return ReadyCmd(f'{check} | grep -q "{int(status_code)}"')


def wait_for_process(process_name: str) -> ReadyCmd:
    """Ready once a process of that name runs (``pgrep``)."""
    return ReadyCmd(f"pgrep {shlex.quote(process_name)} > /dev/null")


def wait_for_file(filename: str) -> ReadyCmd:
    """Ready once the file exists."""
    return ReadyCmd(f"[ -f {shlex.quote(filename)} ]")


def wait_for_timeout(timeout: int) -> ReadyCmd:
    """Ready after ``timeout`` **milliseconds** (at least one second)."""
    return ReadyCmd(f"sleep {max(1, int(timeout) // 1000)}")
