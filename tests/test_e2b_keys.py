"""E2B's API-key management (``/api-keys``) for the caller's team, and keys made there used
with the official ``e2b`` SDK: they act for the same team (the same sandboxes), never with more
than the key that made them may do."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import AuthenticationException

from server import BilikServer


@pytest.fixture(scope="module")
def srv() -> Iterator[BilikServer]:
    server = BilikServer()
    server.start()
    yield server
    server.finish()


def _api(server: BilikServer, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"X-API-Key": key})


def _params(server: BilikServer, key: str) -> dict[str, Any]:
    return {"api_key": key, "api_url": server.url, "sandbox_url": server.url}


def test_list_create_rename_delete(srv: BilikServer) -> None:
    with _api(srv, srv.key) as api:
        [mine] = api.get("/api-keys").json()
        assert mine["name"] == "default" and "key" not in mine
        assert mine["mask"]["prefix"] == "e2b_" and mine["mask"]["valueLength"] == 40
        assert srv.key[4:].startswith(mine["mask"]["maskedValuePrefix"])

        made = api.post("/api-keys", json={"name": "ci"})
        assert made.status_code == 201
        created = made.json()
        secret = created["key"]
        assert secret.startswith("e2b_") and len(secret) == 44
        assert secret.endswith(created["mask"]["maskedValueSuffix"])
        listed = {k["id"]: k for k in api.get("/api-keys").json()}
        assert set(listed) == {mine["id"], created["id"]}
        assert "key" not in listed[created["id"]]  # (the secret was shown once)

        assert api.patch(f"/api-keys/{created['id']}", json={"name": "ci-2"}).status_code == 200
        assert {k["name"] for k in api.get("/api-keys").json()} == {"default", "ci-2"}
        assert api.patch(f"/api-keys/{created['id']}", json={}).status_code == 400
        assert api.patch("/api-keys/not-an-id", json={"name": "x"}).status_code == 400
        assert api.post("/api-keys", json={"name": ""}).status_code == 400

        assert api.delete(f"/api-keys/{created['id']}").status_code == 204
        assert api.delete(f"/api-keys/{created['id']}").status_code == 404
        assert [k["id"] for k in api.get("/api-keys").json()] == [mine["id"]]
    with _api(srv, secret) as gone:
        assert gone.get("/api-keys").status_code == 401


def test_a_made_key_acts_for_the_same_team(srv: BilikServer) -> None:
    with _api(srv, srv.key) as api:
        made = api.post("/api-keys", json={"name": "teammate"}).json()
    with Sandbox.create(timeout=60, **_params(srv, srv.key)) as sbx:
        # The teammate's key sees and drives the team's sandbox with the official SDK.
        same = Sandbox.connect(sbx.sandbox_id, **_params(srv, made["key"]))
        assert same.commands.run("echo team").stdout == "team\n"
        listed = Sandbox.list(**_params(srv, made["key"])).next_items()
        assert sbx.sandbox_id in [s.sandbox_id for s in listed]
    # A key may delete itself (as on E2B); it stops working at once.
    with _api(srv, made["key"]) as teammate:
        assert teammate.delete(f"/api-keys/{made['id']}").status_code == 204
    with pytest.raises(AuthenticationException):
        Sandbox.list(**_params(srv, made["key"])).next_items()


def test_another_team_is_out_of_reach(srv: BilikServer) -> None:
    other = srv.cli("keys", "create", "--name", "other").stdout.strip()
    with _api(srv, srv.key) as api, _api(srv, other) as stranger:
        ours = {k["id"] for k in api.get("/api-keys").json()}
        [theirs] = stranger.get("/api-keys").json()
        assert theirs["id"] not in ours
        for key_id in ours:
            assert stranger.delete(f"/api-keys/{key_id}").status_code == 404
            assert stranger.patch(f"/api-keys/{key_id}", json={"name": "x"}).status_code == 404
        assert {k["id"] for k in api.get("/api-keys").json()} == ours


def test_a_made_key_has_the_caps_of_its_maker(srv: BilikServer) -> None:
    capped = srv.cli("keys", "create", "--name", "capped", "--max-cpu", "1").stdout.strip()
    with _api(srv, capped) as api:
        made = api.post("/api-keys", json={"name": "minted"}).json()
    with _api(srv, made["key"]) as minted:
        asked = minted.post("/v3/templates", json={"name": "big", "cpuCount": 2})
        assert asked.status_code == 400 and "vCPUs" in asked.json()["message"]
