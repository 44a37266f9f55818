"""The operator CLI: create prints an id, exec streams and passes the exit code through."""

from __future__ import annotations

import json

from helpers import bilik


def test_create_exec_list_kill() -> None:
    created = bilik(
        "sandbox",
        "create",
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
    sandbox_id = created.stdout.strip()
    assert len(sandbox_id) == 20
    try:
        run = bilik(
            "sandbox",
            "exec",
            sandbox_id,
            "--user",
            "user",
            "--",
            "sh",
            "-c",
            "echo $GREETING $(id -un); echo oops >&2; exit 7",
        )
        assert (run.returncode, run.stdout, run.stderr) == (7, "hello user\n", "oops\n")
        piped = bilik("sandbox", "exec", sandbox_id, "--", "tr", "a-z", "A-Z", input="abc\n")
        assert (piped.returncode, piped.stdout) == (0, "ABC\n")
        listed = json.loads(bilik("sandbox", "list", "--json").stdout)
        row = next(r for r in listed if r["sandboxId"] == sandbox_id)
        assert (row["cpu"], row["memoryMB"], row["diskMB"], row["internet"]) == (
            0.5,
            256,
            256,
            False,
        )
        table = bilik("sandbox", "list").stdout
        assert sandbox_id in table and table.startswith("sandboxId")
    finally:
        assert bilik("sandbox", "kill", sandbox_id).returncode == 0
    assert sandbox_id not in bilik("sandbox", "list").stdout


def test_errors_are_clear() -> None:
    missing = bilik("sandbox", "exec", "nosuchsandbox1", "--", "true")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "bilik: sandbox 'nosuchsandbox1' not found"
    absurd = bilik("sandbox", "create", "--memory-mb", "99999999")
    assert absurd.returncode == 1 and "memory_mb must be between" in absurd.stderr
    unknown = bilik("sandbox", "create", "--template", "nope")
    assert unknown.returncode == 1 and "template 'nope' not found" in unknown.stderr
    bad_instance = bilik("sandbox", "list", "--instance", "Bad-Name")
    assert bad_instance.returncode == 1
    assert bad_instance.stderr.startswith("bilik: instance 'Bad-Name': use 1-10 lowercase")


def test_keys_create_list_revoke() -> None:
    created = bilik("keys", "create", "--name", "cli test")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert len(key) == 44 and key.startswith("e2b_")
    rows = json.loads(bilik("keys", "list", "--json").stdout)
    mine = next(r for r in rows if r["name"] == "cli test" and r["state"] == "active")
    assert key.startswith(mine["prefix"]) and key not in json.dumps(rows)
    assert mine["id"] in bilik("keys", "list").stdout
    assert bilik("keys", "revoke", mine["id"]).returncode == 0
    rows = json.loads(bilik("keys", "list", "--json").stdout)
    assert next(r for r in rows if r["id"] == mine["id"])["state"] == "revoked"
    missing = bilik("keys", "revoke", "nosuchkey")
    assert (missing.returncode, missing.stderr.strip()) == (
        1,
        "bilik: API key 'nosuchkey' not found",
    )
