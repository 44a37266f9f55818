"""Templates through the official ``e2b`` SDK: names that carry a tag, bilik's own templates,
a start command that ends at once, and the template routes E2B's SDK and CLI read (its
generated API client as the client)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from e2b import Sandbox, Template, wait_for_timeout
from e2b.api.client.api.templates import (
    get_templates_template_id,
    get_templates_template_id_builds_build_id_logs,
    patch_templates_template_id,
    patch_v_2_templates_template_id,
)
from e2b.api.client.models import LogsDirection, TemplateUpdateRequest
from e2b.api.client_sync import get_api_client
from e2b.connection_config import ConnectionConfig
from e2b.template.types import TemplateBuildStatus

from helpers import DATA_DIR
from server import BilikServer


@pytest.fixture(scope="module")
def srv() -> Iterator[BilikServer]:
    # wait_for_timeout(10_000) is a ready check of ten seconds: the suite's usual 5 s is short.
    server = BilikServer(env={"BILIK_READY_TIMEOUT_S": "30"})
    server.start()
    yield server
    headers = {"X-API-Key": server.key}
    for template in httpx.get(f"{server.url}/templates", headers=headers).json():
        httpx.delete(f"{server.url}/templates/{template['templateID']}", headers=headers)
    server.finish()


def _params(server: BilikServer) -> dict[str, Any]:
    return {"api_key": server.key, "api_url": server.url, "sandbox_url": server.url}


def _client(server: BilikServer) -> Any:
    return get_api_client(ConnectionConfig(api_key=server.key, api_url=server.url))


def _small() -> Any:
    return Template().from_base_image().run_cmd("echo built > /tmp/built")


def test_a_name_with_its_tag_builds_that_tag(srv: BilikServer) -> None:
    info = Template.build(_small(), name="my-app:v1", **_params(srv))
    assert info.tags == ["v1"]
    assert [t.tag for t in Template.get_tags("my-app", **_params(srv))] == ["default", "v1"]
    with Sandbox.create("my-app:v1", timeout=60, **_params(srv)) as sbx:
        assert sbx.files.read("/tmp/built") == "built\n"

    started = Template.build_in_background(_small(), name="my-app:v2", **_params(srv))
    assert started.tags == ["v2"]
    deadline = time.monotonic() + 120
    while Template.get_build_status(started, **_params(srv)).status != TemplateBuildStatus.READY:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    tags = {t.tag: t.build_id for t in Template.get_tags("my-app", **_params(srv))}
    assert tags["v2"] == started.build_id and tags["v1"] == info.build_id
    # "default" is the latest build, as on E2B (a name with ":default" means it too).
    assert tags["default"] == started.build_id


@pytest.mark.parametrize(
    ("name", "says"),
    [
        (":v1", "a tag needs a name before its ':'"),
        ("my-app:", "a tag after ':'"),
        ("my.app", "a template name must be"),
        ("my-app:6f1e8b8e-0b7f-4c55-9a57-0d0d8c7cb0a5", "not a UUID"),
    ],
)
def test_a_malformed_name_is_a_clear_400(srv: BilikServer, name: str, says: str) -> None:
    with pytest.raises(Exception, match=says):
        Template.build(_small(), name=name, **_params(srv))
    body = {"name": name}
    answer = httpx.post(f"{srv.url}/v3/templates", json=body, headers={"X-API-Key": srv.key})
    assert answer.status_code == 400 and says in answer.json()["message"]


def test_bilik_own_templates_exist_for_every_key(srv: BilikServer) -> None:
    assert Template.exists("base", **_params(srv))
    assert Template.exists("code-interpreter-v1", **_params(srv))
    assert not Template.exists("no-such-template", **_params(srv))
    other = srv.cli("keys", "create", "--name", "other").stdout.strip()
    assert Template.exists("base", **{**_params(srv), "api_key": other})


def test_a_start_command_that_ends_at_once_builds(srv: BilikServer) -> None:
    template = (
        Template().from_base_image().set_start_cmd("echo 'Hello, world!'", wait_for_timeout(10_000))
    )
    logs: list[str] = []
    Template.build(
        template, "hello-once", on_build_logs=lambda e: logs.append(e.message), **_params(srv)
    )
    assert "Ready" in logs


def test_a_build_failure_says_what_failed(srv: BilikServer) -> None:
    template = Template().from_base_image().run_cmd("echo no such thing >&2; exit 3")
    with pytest.raises(Exception, match="exit code 3") as failed:
        Template.build(template, "fails", **_params(srv))
    assert "no such thing" in str(failed.value)


def test_templates_with_their_builds_and_logs(srv: BilikServer) -> None:
    first = Template.build(_small(), name="listed", **_params(srv))
    second = Template.build(_small(), name="listed:two", **_params(srv))
    listed = {t.names[0]: t for t in Template.list(**_params(srv)).next_items()}
    assert listed["listed"].build_status == TemplateBuildStatus.READY
    assert listed["listed"].build_count == 2 and not listed["listed"].public

    client = _client(srv)
    with client:
        found = get_templates_template_id.sync(first.template_id, client=client)
        assert [str(b.build_id) for b in found.builds] == [second.build_id, first.build_id]
        assert found.names == ["listed"] and found.builds[0].status.value == "ready"
        page = get_templates_template_id.sync_detailed(first.template_id, client=client, limit=1)
        assert len(page.parsed.builds) == 1 and page.headers["x-next-token"]

        logs = get_templates_template_id_builds_build_id_logs.sync(
            first.template_id, first.build_id, client=client
        )
        messages = [e.message for e in logs.logs]
        assert messages and "Build finished" in messages[-1]
        newest = get_templates_template_id_builds_build_id_logs.sync(
            first.template_id,
            first.build_id,
            client=client,
            limit=1,
            direction=LogsDirection.BACKWARD,
        )
        assert [e.message for e in newest.logs] == [messages[-1]]

        names = patch_v_2_templates_template_id.sync(
            "listed", client=client, body=TemplateUpdateRequest(public=False)
        )
        assert names.names == ["listed"]
        refused = patch_v_2_templates_template_id.sync_detailed(
            "listed", client=client, body=TemplateUpdateRequest(public=True)
        )
        assert refused.status_code == 400 and "public" in refused.parsed.message
        older = patch_templates_template_id.sync_detailed(
            "listed", client=client, body=TemplateUpdateRequest(public=False)
        )
        assert older.status_code == 200


def test_a_default_build_logs_each_line_once(srv: BilikServer) -> None:
    """Creates waiting for the same default build do not repeat its lines in the server's
    log (the build's log listeners are each told once)."""
    from bilik.templates.build import BuildLog

    build_log = BuildLog(DATA_DIR / "once.jsonl")
    seen: list[str] = []
    log = logging.getLogger("bilik").info
    build_log.listeners.extend([seen.append] * 4 + [log])
    build_log("one line")
    assert seen == ["one line"]
    (DATA_DIR / "once.jsonl").unlink()
