"""Snapshots and forks through the official ``e2b`` SDK: a snapshot is a template of the
caller's holding the sandbox's files (listed, filtered, started from, deleted); a fork makes
independent sandboxes from one snapshot while the sandbox goes on. The server runs on
PostgreSQL here (pausing, its states and snapshots' records included)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from e2b import Sandbox, SandboxException

from server import SERVER_SETTINGS, BilikServer


@pytest.fixture(scope="module")
def server(postgres_url: str) -> Iterator[BilikServer]:
    # (on PostgreSQL: the other pause tests run on the embedded SQLite)
    srv = BilikServer(database_url=postgres_url)
    try:
        srv.start()
        yield srv
    finally:
        srv.finish()


def api(server: BilikServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(
        method, server.url + path, headers={"X-API-Key": server.key}, timeout=120, **kwargs
    )


def snapshot_ids(server: BilikServer, **filters: Any) -> list[str]:
    pages = Sandbox.list_snapshots(limit=1, **filters, **server.sdk_params())
    seen: list[str] = []
    while pages.has_next:
        seen += [s.snapshot_id for s in pages.next_items()]
    return seen


def test_snapshot_listed_started_from_and_deleted(server: BilikServer) -> None:
    p = server.sdk_params()
    name = f"snap-{uuid.uuid4().hex[:8]}"
    sbx = Sandbox.create("base", timeout=120, **p)
    try:
        sbx.files.write("/home/user/state.txt", "first")
        snap = sbx.create_snapshot(name=name)
        assert snap.names == [name]
        # The sandbox goes on running, and changes after the snapshot are not in it.
        sbx.files.write("/home/user/state.txt", "after")
        assert sbx.get_info().state.value == "running"
        # A second one under the same name is a new build of the same template; taken with
        # the raw API, it says it kept files only.
        raw = api(server, "POST", f"/sandboxes/{sbx.sandbox_id}/snapshots", json={"name": name})
        assert raw.status_code == 201, raw.text
        assert raw.json()["snapshotID"] == snap.snapshot_id
        assert raw.json()["bilikSnapshot"]["memory"] is False
        other = sbx.create_snapshot()
        assert snapshot_ids(server, sandbox_id=sbx.sandbox_id) == [
            other.snapshot_id,
            snap.snapshot_id,
        ]
        assert snapshot_ids(server, name=name) == [snap.snapshot_id]
        assert snapshot_ids(server, name=f"{name}:default") == [snap.snapshot_id]
        assert snapshot_ids(server, sandbox_id="i" + uuid.uuid4().hex[:19]) == []
        # Started from (by name: its latest build; by id).
        started = Sandbox.create(name, timeout=60, **p)
        try:
            assert started.files.read("/home/user/state.txt") == "after"
        finally:
            started.kill()
        first = Sandbox.create(other.snapshot_id, timeout=60, **p)
        try:
            assert first.files.read("/home/user/state.txt") == "after"
        finally:
            first.kill()
        assert Sandbox.delete_snapshot(snap.snapshot_id, **p) is True
        assert Sandbox.delete_snapshot(other.snapshot_id, **p) is True
        assert Sandbox.delete_snapshot(other.snapshot_id, **p) is False
        assert snapshot_ids(server, sandbox_id=sbx.sandbox_id) == []
        with pytest.raises(SandboxException):
            Sandbox.create(name, timeout=60, **p).kill()
    finally:
        sbx.kill()


def test_snapshot_of_a_paused_sandbox_leaves_it_paused(server: BilikServer) -> None:
    p = server.sdk_params()
    sbx = Sandbox.create("base", timeout=120, **p)
    try:
        sbx.files.write("/home/user/state.txt", "paused")
        sbx.commands.run("sync")
        sbx.pause()
        snap = sbx.create_snapshot()
        assert sbx.get_info().state.value == "paused"
        started = Sandbox.create(snap.snapshot_id, timeout=60, **p)
        try:
            assert started.files.read("/home/user/state.txt") == "paused"
        finally:
            started.kill()
        Sandbox.delete_snapshot(snap.snapshot_id, **p)
    finally:
        sbx.kill()


def test_fork_children_are_copies_of_the_parent_and_independent(server: BilikServer) -> None:
    p = server.sdk_params()
    parent = Sandbox.create("base", timeout=120, metadata={"role": "parent"}, **p)
    children: list[Sandbox] = []
    try:
        parent.files.write("/home/user/shared.txt", "from the parent")
        forked = parent.fork(count=2, timeout=60)
        assert len(forked) == 2
        for child in forked:
            assert isinstance(child, Sandbox), child
            children.append(child)
        a, b = children
        assert len({a.sandbox_id, b.sandbox_id, parent.sandbox_id}) == 3
        for child in children:
            assert child.files.read("/home/user/shared.txt") == "from the parent"
            assert child.get_info().metadata == {"role": "parent"}
        a.files.write("/home/user/shared.txt", "child a")
        b.files.write("/home/user/only-b.txt", "b")
        parent.files.write("/home/user/shared.txt", "parent later")
        assert b.files.read("/home/user/shared.txt") == "from the parent"
        assert a.files.read("/home/user/shared.txt") == "child a"
        assert not a.files.exists("/home/user/only-b.txt")
        assert not parent.files.exists("/home/user/only-b.txt")
        assert parent.commands.run("echo alive").stdout.strip() == "alive"
        # The raw answer: a result each, each saying its children booted afresh.
        raw = api(server, "POST", f"/sandboxes/{parent.sandbox_id}/fork", json={"count": 1})
        assert raw.status_code == 201, raw.text
        (one,) = raw.json()
        assert one["forkMode"] == "filesystem"
        children.append(Sandbox.connect(one["sandbox"]["sandboxID"], **p))
        # No image of the fork is left behind (its layers stay while its children run).
        images = [i.name for i in (SERVER_SETTINGS.data_dir / "images").glob("*.json")]
        assert not [i for i in images if "fork-" in i]
    finally:
        for child in children:
            child.kill()
        parent.kill()
