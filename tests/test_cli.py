"""The ``bilik`` command as a user meets it: it acts as a named API key, and what it creates is
that key's through the API and the official SDK; exec needs no ``--`` and runs as the SDK
does; every mistake is one ``bilik: ...`` line; the help describes every option."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox

from bilik import cli
from helpers import SETTINGS, bilik, settings_env
from server import BilikServer


def _key(name: str) -> tuple[str, str]:
    """A new key of the test instance, and its id."""
    created = bilik("keys", "create", "--name", name)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    rows = json.loads(bilik("keys", "list", "--json").stdout)
    return key, next(r["id"] for r in rows if key.startswith(r["prefix"]) and r["name"] == name)


def test_create_exec_list_kill() -> None:
    key, key_id = _key("cli create")
    created = bilik(
        "sandbox",
        "create",
        "--key",
        key,
        "--cpu",
        "0.5",
        "--memory-mb",
        "256",
        "--disk-mb",
        "256",
        "--no-internet",
        "--env",
        "GREETING=hello",
    )
    assert created.returncode == 0, created.stderr
    assert f"bilik: acting as API key {key_id} (cli create) {key[:10]}… from --key\n" in (
        created.stderr
    )
    sandbox_id = created.stdout.strip()
    assert len(sandbox_id) == 20
    try:
        # No "--" needed: everything after the id is the command.
        run = bilik(
            "sandbox",
            "exec",
            "--user",
            "user",
            sandbox_id,
            "sh",
            "-c",
            "echo $GREETING $(id -un); echo oops >&2; exit 7",
        )
        assert (run.returncode, run.stdout, run.stderr) == (7, "hello user\n", "oops\n")
        # Options after the id, ended by "--".
        after = bilik("sandbox", "exec", sandbox_id, "--user", "root", "--", "id", "-un")
        assert (after.returncode, after.stdout) == (0, "root\n")
        piped = bilik("sandbox", "exec", sandbox_id, "--", "tr", "a-z", "A-Z", input="abc\n")
        assert (piped.returncode, piped.stdout) == (0, "ABC\n")
        missing = bilik("sandbox", "exec", sandbox_id, "no-such-command", "--flag")
        assert missing.returncode == 127 and "not found" in missing.stderr
        listed = json.loads(bilik("sandbox", "list", "--json").stdout)
        row = next(r for r in listed if r["sandboxId"] == sandbox_id)
        assert (row["cpu"], row["memoryMB"], row["diskMB"], row["internet"]) == (
            0.5,
            256,
            256,
            False,
        )
        assert (row["templateName"], row["owner"], row["warmPool"]) == ("base", key_id, False)
        table = bilik("sandbox", "list").stdout
        assert table.split()[:5] == ["sandboxId", "template", "state", "owner", "cpu"]
        line = next(x for x in table.splitlines() if x.startswith(sandbox_id))
        assert line.split()[:6] == [sandbox_id, "base", "running", key_id, "0.5", "256"]
    finally:
        assert bilik("sandbox", "kill", sandbox_id).returncode == 0
    assert sandbox_id not in bilik("sandbox", "list").stdout


def test_errors_are_one_clear_line(tmp_path: Path) -> None:
    def fails(*args: str, stdin: int | None = None) -> str:
        done = bilik(*args) if stdin is None else _with_stdin(stdin, *args)
        assert done.returncode != 0, done.stdout
        # One line, after only the key a create acts as (no progress: it was no terminal),
        # and no traceback.
        said = done.stderr.splitlines()
        errors = [x for x in said if not x.startswith("bilik: acting as ")]
        assert len(errors) == 1 and errors[0].startswith("bilik: "), done.stderr
        assert done.stderr.endswith(errors[0] + "\n"), done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        return errors[0]

    key, _ = _key("cli errors")
    assert fails("sandbox", "exec", "nosuchsandbox1", "true") == (
        "bilik: sandbox 'nosuchsandbox1' not found"
    )
    too_much = fails("sandbox", "create", "--key", key, "--memory-mb", "999999999")
    assert too_much.startswith("bilik: --memory-mb must be between 32 and ")
    assert too_much.endswith(", got 999999999")
    assert "--timeout must be between 1 and" in fails("sandbox", "create", "--timeout", "0")
    assert "template 'nope' not found" in fails(
        "sandbox", "create", "--key", key, "--template", "nope"
    )
    assert "not an active key" in fails("sandbox", "create", "--key", "e2b_" + "0" * 40)
    assert fails("sandbox", "list", "--instance", "Bad-Name").startswith(
        "bilik: instance 'Bad-Name': use 1-10 lowercase"
    )
    assert "--max-sandboxes: must be 1 or more" in fails("keys", "create", "--max-sandboxes", "-1")
    assert "--max-cpu: must be 1 or more" in fails("keys", "create", "--max-cpu", "0")
    assert "invalid choice: 'nope'" in fails("nope")
    broken = tmp_path / "broken.py"
    broken.write_text("from bilik.sdk.template import Template\ntemplate = (Template()\n")
    assert fails("template", "build", str(broken)).startswith(f"bilik: {broken}:2: syntax error")
    raising = tmp_path / "raising.py"
    raising.write_text("x = 1\nraise ValueError('no good')\n")
    assert fails("template", "build", str(raising)) == (
        f"bilik: {raising}:2: running it failed: ValueError: no good"
    )
    assert "spawn needs a terminal" in fails("sandbox", "spawn", stdin=subprocess.DEVNULL)


def _with_stdin(stdin: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bilik.cli", *args],
        env=settings_env(SETTINGS),
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_keys_create_list_revoke() -> None:
    created = bilik("keys", "create", "--name", "cli test", "--max-sandboxes", "3")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert len(key) == 44 and key.startswith("e2b_")
    rows = json.loads(bilik("keys", "list", "--json").stdout)
    mine = next(r for r in rows if r["name"] == "cli test" and r["state"] == "active")
    assert key.startswith(mine["prefix"]) and key not in json.dumps(rows)
    assert (mine["maxSandboxes"], mine["maxCpu"], mine["team"]) == (3, None, mine["id"])
    table = bilik("keys", "list").stdout
    assert table.split()[:6] == ["id", "name", "team", "prefix", "createdAt", "state"]
    assert "maxSandboxes" in table and mine["id"] in table
    revoked = bilik("keys", "revoke", mine["id"])
    assert (revoked.returncode, revoked.stdout) == (
        0,
        f"revoked API key {mine['id']} (cli test); it no longer authenticates\n",
    )
    again = bilik("keys", "revoke", mine["id"])
    assert again.returncode == 1
    assert again.stderr.startswith(f"bilik: API key {mine['id']} (cli test) was already revoked")
    # Revoked keys leave the list, unless asked for.
    assert mine["id"] not in bilik("keys", "list").stdout
    rows = json.loads(bilik("keys", "list", "--all", "--json").stdout)
    assert next(r for r in rows if r["id"] == mine["id"])["state"] == "revoked"
    missing = bilik("keys", "revoke", "nosuchkey")
    assert (missing.returncode, missing.stderr.strip()) == (
        1,
        "bilik: API key 'nosuchkey' not found",
    )


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_help_reads_well() -> None:
    top = bilik("--help")
    assert top.returncode == 0 and "``" not in top.stdout
    for command in ("serve", "sandbox", "template", "keys", "bench"):
        assert f"    {command} " in top.stdout
    assert bilik("--version").stdout.startswith("bilik ")
    # Every option and argument of every command says what it is.
    for parser in _parsers(cli._parser()):
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                assert action.help, (parser.prog, action.dest)
    create = bilik("sandbox", "create", "--help").stdout
    assert "--oci-runtime" in create and "--runtime " not in create
    assert "(default: 300)" in create and "--key KEY" in create
    keys = bilik("keys", "create", "--help").stdout
    assert "--instance" not in keys and "--oci-runtime" not in keys
    listed = bilik("sandbox", "--help").stdout.splitlines()
    for operator in ("list", "kill"):
        assert "(operator)" in next(x for x in listed if x.strip().startswith(f"{operator} "))


# -- against a server: one identity ------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[BilikServer]:
    srv = BilikServer(warm_pool="base=1")
    try:
        srv.start()
        yield srv
    finally:
        srv.finish()


def _cli(server: BilikServer, *args: str) -> subprocess.CompletedProcess[str]:
    """``bilik`` as a user of that server runs it: no key given (the first-start key)."""
    return subprocess.run(
        [sys.executable, "-m", "bilik.cli", *args],
        env={**server.env(), "BILIK_URL": server.url},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_what_the_cli_creates_is_the_keys(served: BilikServer, tmp_path: Path) -> None:
    file = tmp_path / "cli_tpl.py"
    file.write_text(
        "from bilik.sdk.template import Template\n"
        "template = Template().from_base_image().run_cmd('echo made-by-cli > /tmp/made')\n"
    )
    built = _cli(served, "template", "build", str(file), "--name", "cli-tpl")
    assert built.returncode == 0, built.stdout + built.stderr
    key_file = served.env()["BILIK_DATA_DIR"] + "/api-key"
    assert f"bilik: acting as API key {served.key[:10]}… from {key_file}\n" in built.stderr
    created = _cli(served, "sandbox", "create", "--template", "cli-tpl", "--timeout", "120")
    assert created.returncode == 0, created.stderr
    assert f"{served.key[:10]}… from {key_file}" in created.stderr
    sandbox_id = created.stdout.strip()
    try:
        # The operator's list: the template by its name, whole CPUs as whole numbers, the
        # owner, and the warm pool's sandbox marked as no one's.
        table = _cli(served, "sandbox", "list").stdout
        line = next(x for x in table.splitlines() if x.startswith(sandbox_id))
        assert line.split()[1:5] == ["cli-tpl", "running", _team(served), "1"], table
        pooled = _pooled(served)
        assert pooled["owner"] == "(warm pool)" and pooled["templateName"] == "base"
        assert pooled["sandboxId"] + "  base " in _cli(served, "sandbox", "list").stdout
        detail = httpx.get(
            f"{served.url}/sandboxes/{sandbox_id}", headers={"X-API-Key": served.key}
        ).json()
        assert detail["templateID"] == "cli-tpl" and detail["envdAccessToken"]
        time.sleep(1.1)  # (the sandbox plane reads who owns what at most once a second)
        sbx = Sandbox.connect(
            sandbox_id, api_key=served.key, api_url=served.url, sandbox_url=served.url
        )
        sdk = sbx.commands.run("cat /tmp/made; id -un; pwd")
        # exec runs as the SDK does: the template's user, in its working directory.
        mine = _cli(served, "sandbox", "exec", sandbox_id, "sh", "-c", "cat /tmp/made; id -un; pwd")
        assert (mine.returncode, mine.stdout) == (0, sdk.stdout)
        assert sdk.stdout.startswith("made-by-cli\n")
    finally:
        _cli(served, "sandbox", "kill", sandbox_id)


def _team(server: BilikServer) -> str:
    """The team of the server's first-start key."""
    rows = json.loads(_cli(server, "keys", "list", "--json").stdout)
    return str(next(r["team"] for r in rows if server.key.startswith(r["prefix"])))


def _pooled(server: BilikServer) -> dict[str, object]:
    """The warm pool's sandbox, as ``sandbox list --json`` shows it, once there is one."""
    deadline = time.monotonic() + 120
    while True:
        rows = json.loads(_cli(server, "sandbox", "list", "--json").stdout)
        pooled = [r for r in rows if r["warmPool"]]
        if pooled or time.monotonic() > deadline:
            assert pooled, rows
            return dict(pooled[0])
        time.sleep(0.5)


def test_build_log_reads_as_a_dockerfile(served: BilikServer, tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("hi\n")
    file = tmp_path / "cli_log.py"
    file.write_text(
        "from bilik.sdk.template import Template\n"
        "template = (Template().from_base_image()\n"
        "    .run_cmd('echo; echo made; echo', user='root')\n"
        "    .copy('hello.txt', '/srv/hello.txt', user='user', mode=0o644)\n"
        "    .set_envs({'MODE': 'two words'}))\n"
    )
    built = _cli(served, "template", "build", str(file), "--name", "cli-log", "--skip-cache")
    assert built.returncode == 0, built.stdout + built.stderr
    lines = built.stdout.splitlines()
    # The step's user as Docker and E2B show it, never glued on like an argument.
    assert any(x.endswith("] [1/3] RUN (as root) echo; echo made; echo") for x in lines), lines
    copy = "] [2/3] COPY --chown=user --chmod=0644 hello.txt /srv/hello.txt"
    assert any(x.endswith(copy) for x in lines), lines
    assert any(x.endswith("] [3/3] ENV MODE='two words'") for x in lines), lines
    assert any(x.endswith("] made") for x in lines), lines
    # No step prefix with nothing after it (the step's blank output lines).
    assert not [x for x in lines if re.fullmatch(r"\[\s*[\d.]+s\s+\d+/\d+\]\s*", x)], lines


def test_a_failed_create_says_only_why(served: BilikServer, tmp_path: Path) -> None:
    file = tmp_path / "cli_fails.py"
    # Ready while it is built; its start command ends at once in a sandbox made with FAIL.
    file.write_text(
        "from bilik.sdk.template import Template, wait_for_file\n"
        "template = Template().from_base_image().set_start_cmd(\n"
        "    'echo starting; if [ -n \"$FAIL\" ]; then echo giving up >&2; exit 3; fi; '\n"
        "    'touch /tmp/up; sleep infinity', wait_for_file('/tmp/up'))\n"
    )
    built = _cli(served, "template", "build", str(file), "--name", "cli-fails")
    assert built.returncode == 0, built.stdout + built.stderr
    for here in ([], ["--disk-mb", "512"]):  # through the server, and made by the CLI itself
        failed = _cli(
            served, "sandbox", "create", "--template", "cli-fails", "--env", "FAIL=1", *here
        )
        assert failed.returncode == 1, failed.stdout
        said = failed.stderr.splitlines()
        assert len(said) == 2 and said[0].startswith("bilik: acting as "), failed.stderr
        assert said[1].startswith("bilik: ") and "giving up" in said[1], failed.stderr


def test_exec_says_when_the_sandbox_ends_under_it(served: BilikServer) -> None:
    created = _cli(served, "sandbox", "create", "--timeout", "3")
    assert created.returncode == 0, created.stderr
    sandbox_id = created.stdout.strip()
    ran = _cli(served, "sandbox", "exec", sandbox_id, "sleep", "60")
    assert ran.returncode == 137
    assert f"bilik: sandbox {sandbox_id} ended (its timeout, or a kill)" in ran.stderr
