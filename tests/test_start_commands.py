"""Templates' start commands and ready checks, through the official ``e2b`` SDK against a real
``bilik serve``: a start command that fails fails its build (or its create, as the template's
fault: a 400) at once, with its exit code and its last lines; a failed build shows ``error``
with its reason; and the sandbox's logs hold what the start command wrote."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from e2b import Sandbox, SandboxException, Template, wait_for_file
from e2b.api.client.models import SandboxLogsV2Response

from server import SERVER_SETTINGS, BilikServer

# Long enough that only a start command's end (never the ready timeout) explains a quick
# failure that names the command's exit code.
READY_TIMEOUT_S = "120"
UP = "/tmp/up"


@pytest.fixture(scope="module")
def srv() -> Iterator[BilikServer]:
    server = BilikServer(env={"BILIK_READY_TIMEOUT_S": READY_TIMEOUT_S})
    server.start()
    yield server
    headers = {"X-API-Key": server.key}
    for template in httpx.get(f"{server.url}/templates", headers=headers).json():
        httpx.delete(f"{server.url}/templates/{template['templateID']}", headers=headers)
    server.finish()


def _params(server: BilikServer) -> dict[str, Any]:
    return {"api_key": server.key, "api_url": server.url, "sandbox_url": server.url}


def _headers(server: BilikServer) -> dict[str, str]:
    return {"X-API-Key": server.key}


def _template_json(server: BilikServer, name: str) -> dict[str, Any]:
    listed = httpx.get(f"{server.url}/templates", headers=_headers(server)).json()
    return next(t for t in listed if name in t["names"])


def test_a_start_command_that_fails_fails_its_build_at_once(srv: BilikServer) -> None:
    template = (
        Template()
        .from_base_image()
        .set_start_cmd("echo starting; echo cannot bind >&2; exit 3", wait_for_file(UP))
    )
    with pytest.raises(Exception, match="exited with code 3") as failed:
        Template.build(template, "crashes", **_params(srv))
    assert "cannot bind" in str(failed.value) and "starting" in str(failed.value)

    # The build shows as failed, with its reason (`bilik template list` shows buildStatus).
    listed = _template_json(srv, "crashes")
    assert listed["buildStatus"] == "error"
    status = httpx.get(
        f"{srv.url}/templates/{listed['templateID']}/builds/{listed['buildID']}/status",
        headers=_headers(srv),
    ).json()
    assert status["status"] == "error" and "exited with code 3" in status["reason"]["message"]


def test_a_start_command_that_ends_after_making_what_its_check_wants_builds(
    srv: BilikServer,
) -> None:
    template = Template().from_base_image().set_start_cmd(f"touch {UP}", wait_for_file(UP))
    Template.build(template, "ends-ready", **_params(srv))
    with Sandbox.create("ends-ready", timeout=60, **_params(srv)) as sbx:
        assert sbx.files.exists(UP)


def _service_template(srv: BilikServer) -> str:
    """A template whose start command prints to both streams, then serves until the sandbox
    ends; it fails (exit 4) in a sandbox created with FAIL set."""
    start = (
        "echo out-line; echo err-line >&2; "
        'if [ -n "$FAIL" ]; then echo broken-at-create >&2; exit 4; fi; '
        f"touch {UP}; exec sleep infinity"
    )
    template = Template().from_base_image().set_start_cmd(start, wait_for_file(UP))
    Template.build(template, "serves", **_params(srv))
    return "serves"


def test_a_create_whose_start_command_fails_is_the_templates_fault(srv: BilikServer) -> None:
    name = _service_template(srv)
    with pytest.raises(SandboxException) as failed:
        Sandbox.create(name, timeout=60, envs={"FAIL": "1"}, **_params(srv))
    said = str(failed.value)
    assert said.startswith("400:") and "exited with code 4" in said, said
    assert "broken-at-create" in said and "the sandbox runtime failed" not in said
    assert Sandbox.list(**_params(srv)).next_items() == []


def test_logs_hold_what_the_start_command_wrote(srv: BilikServer) -> None:
    name = _service_template(srv)
    with Sandbox.create(name, timeout=60, **_params(srv)) as sbx:
        sbx.commands.run("echo later-line > /proc/1/fd/1", user="root")
        url = f"{srv.url}/sandboxes/{sbx.sandbox_id}/logs"
        v1 = httpx.get(url, headers=_headers(srv)).json()
        lines = [entry["line"] for entry in v1["logs"]]
        assert {"out-line", "err-line", "later-line"} <= set(lines)
        assert all(entry["timestamp"].endswith("Z") for entry in v1["logs"])
        streams = {e["message"]: e["fields"]["stream"] for e in v1["logEntries"]}
        assert streams["out-line"] == "stdout" and streams["err-line"] == "stderr"

        v2_url = f"{srv.url}/v2/sandboxes/{sbx.sandbox_id}/logs"
        answer = httpx.get(v2_url, params={"search": "-line"}, headers=_headers(srv))
        v2 = SandboxLogsV2Response.from_dict(answer.json()).logs
        assert {"out-line", "err-line", "later-line"} <= {e.message for e in v2}
        times = [e.timestamp for e in v2]
        assert times == sorted(times)


def test_the_start_log_is_bounded(srv: BilikServer) -> None:
    start = f"head -c 3000000 /dev/zero | tr '\\0' x | fold -w 100; touch {UP}; sleep infinity"
    template = Template().from_base_image().set_start_cmd(start, wait_for_file(UP))
    Template.build(template, "chatty", **_params(srv))
    with Sandbox.create("chatty", timeout=60, **_params(srv)) as sbx:
        disk = SERVER_SETTINGS.data_dir / "sandboxes" / sbx.sandbox_id / "disk"
        kept = sum(f.stat().st_size for f in disk.glob("start.log*"))
        assert 0 < kept <= 2 * (512 << 10) + (64 << 10)
        v1 = httpx.get(f"{srv.url}/sandboxes/{sbx.sandbox_id}/logs", headers=_headers(srv))
        assert v1.status_code == 200 and v1.json()["logs"][-1]["line"] == "x" * 100


def test_a_build_whose_start_is_refused_shows_failed(srv: BilikServer) -> None:
    made = httpx.post(
        f"{srv.url}/v3/templates", json={"name": "refused"}, headers=_headers(srv)
    ).json()
    started = httpx.post(
        f"{srv.url}/v2/templates/{made['templateID']}/builds/{made['buildID']}",
        json={"fromImage": "debian:bookworm", "ociRuntime": "no-such-runtime"},
        headers=_headers(srv),
    )
    assert started.status_code == 400
    listed = _template_json(srv, "refused")
    assert listed["buildStatus"] == "error"
    status = httpx.get(
        f"{srv.url}/templates/{made['templateID']}/builds/{made['buildID']}/status",
        headers=_headers(srv),
    ).json()
    assert status["status"] == "error"
    assert status["reason"]["message"] == started.json()["message"]
