"""Template builds through E2B's build API, driven by the official ``e2b`` SDK."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import BuildException, Sandbox, Template, wait_for_port

import registry
from server import BilikServer

APP = """
import http.server, os
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = (os.environ.get("GREETING", "?") + " " + open("/app/data/a.txt").read()).encode()
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)
http.server.HTTPServer(("0.0.0.0", 8000), Hello).serve_forever()
"""


@pytest.fixture(scope="module")
def built_server() -> Iterator[BilikServer]:
    srv = BilikServer()
    srv.start()
    yield srv
    # Templates share the test layer store: drop them, so their layers can be collected.
    headers = {"X-API-Key": srv.key}
    for template in httpx.get(f"{srv.url}/templates", headers=headers).json():
        httpx.delete(f"{srv.url}/templates/{template['templateID']}", headers=headers)
    srv.finish()


def _params(server: BilikServer) -> dict[str, Any]:
    return {"api_key": server.key, "api_url": server.url, "sandbox_url": server.url}


def _template(context: Path) -> Any:
    return (
        Template(file_context_path=str(context))
        .from_base_image()
        .copy("app.py", "/app/")
        .copy("data", "/app/data")
        .run_cmd("echo built > /home/user/marker")
        .set_envs({"GREETING": "hello"})
        .set_workdir("/app")
        .set_user("user")
        .run_cmd("whoami > /home/user/who && pwd >> /home/user/who")
        .set_start_cmd("python3 /app/app.py", wait_for_port(8000))
    )


def _build(
    server: BilikServer, template: Any, name: str, tags: list[str] | None = None
) -> tuple[list[str], float]:
    logs: list[str] = []
    started = time.monotonic()
    Template.build(
        template,
        alias=name,
        tags=tags,
        cpu_count=1,
        memory_mb=512,
        on_build_logs=lambda entry: logs.append(entry.message),
        **_params(server),
    )
    return logs, time.monotonic() - started


def test_build_cache_and_sandboxes_from_it(built_server: BilikServer, tmp_path: Path) -> None:
    server = built_server
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("world")
    logs, _ = _build(server, _template(tmp_path), "web")
    assert any("RUN echo built" in line for line in logs), logs

    with Sandbox.create("web", timeout=120, **_params(server)) as sbx:
        # Files, env, user, workdir, and the start command's port answering.
        assert sbx.files.read("/app/data/a.txt") == "world"
        assert sbx.files.read("/home/user/who") == "user\n/app\n"
        assert sbx.files.read("/home/user/marker") == "built\n"
        assert sbx.commands.run("echo $GREETING; pwd; whoami").stdout == "hello\n/app\nuser\n"
        page = sbx.commands.run("curl -s localhost:8000").stdout
        assert page == "hello world"
        answer = httpx.get(
            server.url, headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8000"}
        )
        assert answer.text == "hello world"

    # Unchanged: every layer reused, nothing uploaded, quickly.
    again, took = _build(server, _template(tmp_path), "web")
    # Five steps make layers (two COPYs, two RUNs and the WORKDIR): none runs again.
    assert sum("CACHED" in line for line in again) == 5, again
    assert any("Skipping upload" in line for line in again), again
    assert took < 2

    # One copied file changed: that step and the ones above it run again, not those below.
    # (New content each run: layers are content-addressed and outlive a test session.)
    fresh = f"again-{uuid.uuid4().hex[:8]}"
    (tmp_path / "data" / "a.txt").write_text(fresh)
    changed, _ = _build(server, _template(tmp_path), "web")
    assert sum("CACHED" in line for line in changed) == 1, changed  # the first COPY only
    with Sandbox.create("web", timeout=60, **_params(server)) as sbx:
        assert sbx.commands.run("curl -s localhost:8000").stdout == f"hello {fresh}"


def test_tags_name_builds(built_server: BilikServer, tmp_path: Path) -> None:
    server = built_server
    params = _params(server)
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "data").mkdir()
    for version in ("one", "two"):
        (tmp_path / "data" / "a.txt").write_text(version)
        _build(server, _template(tmp_path), "tagged", tags=[f"v-{version}"])
    for name, page in (("tagged:v-one", "hello one"), ("tagged", "hello two")):
        with Sandbox.create(name, timeout=60, **params) as sbx:
            assert sbx.commands.run("curl -s localhost:8000").stdout == page, name
    info = Template.assign_tags("tagged:v-one", ["stable"], **params)
    assert info.tags == ["stable"]
    tags = {t.tag: str(t.build_id) for t in Template.get_tags(_id(server, "tagged"), **params)}
    assert set(tags) == {"default", "v-one", "v-two", "stable"}
    assert tags["stable"] == tags["v-one"] != tags["default"] == tags["v-two"]
    Template.remove_tags("tagged", ["stable"], **params)
    with pytest.raises(Exception, match="stable"):
        Sandbox.create("tagged:stable", **params)


def _id(server: BilikServer, name: str) -> str:
    response = httpx.get(
        f"{server.url}/templates/aliases/{name}", headers={"X-API-Key": server.key}
    )
    return str(response.json()["templateID"])


def test_build_errors_are_clear(built_server: BilikServer, tmp_path: Path) -> None:
    server = built_server
    (tmp_path / "present.txt").write_text("x")
    failing = (
        Template(file_context_path=str(tmp_path))
        .from_base_image()
        .run_cmd("echo oh no >&2; exit 7")
    )
    with pytest.raises(BuildException, match=r"exit code 7(.|\n)*oh no"):
        _build(server, failing, "failing")
    with pytest.raises(Exception, match=r"missing\.txt"):
        _build(
            server,
            Template(file_context_path=str(tmp_path)).from_base_image().copy("missing.txt", "/"),
            "missing",
        )
    with pytest.raises(BuildException, match="nosuch-template' not found"):
        _build(server, Template().from_template("nosuch-template"), "unknown-base")
    never = (
        Template(file_context_path=str(tmp_path))
        .from_base_image()
        .set_start_cmd("sleep 1000", "false")
    )
    with pytest.raises(BuildException, match="did not become ready"):
        _build(server, never, "never-ready")
    # Nothing half-built can be used.
    for name in ("failing", "never-ready"):
        response = httpx.post(
            f"{server.url}/sandboxes",
            json={"templateID": name},
            headers={"X-API-Key": server.key},
        )
        assert response.status_code == 400 and "no finished build" in response.json()["message"]


@pytest.mark.parametrize("auth", [False, True], ids=["open", "basic-auth"])
def test_from_an_oci_registry(built_server: BilikServer, auth: bool) -> None:
    server = built_server
    creds = {"username": registry.USER, "password": registry.PASSWORD} if auth else {}
    with registry.registry(auth=auth) as address:
        ref = f"{address}/test/tiny:v1"
        template = (
            Template()
            .from_image(ref, **creds)
            .run_cmd("echo $GREETING > /srv/out; pwd >> /srv/out", user="root")
            .run_cmd("touch /home/user/mine")  # as the sandbox user, added to the image
        )
        logs, _ = _build(server, template, f"tiny-{'auth' if auth else 'open'}")
        assert any("Pulling" in line or "cached" in line for line in logs), logs
        with Sandbox.create(f"tiny-{'auth' if auth else 'open'}", **_params(server)) as sbx:
            assert sbx.files.read("/srv/out") == "hi-from-registry\n/srv\n"
            assert sbx.files.read("/srv/data.txt") == "from the registry\n"
            assert sbx.files.get_info("/home/user/mine").owner == "user"
        if auth:
            wrong = Template().from_image(ref, username=registry.USER, password="wrong")
            with pytest.raises(BuildException, match=r"(?i)unauthorized|authentication"):
                _build(server, wrong, "tiny-wrong")
    # A registry that is not there: a clear error, quickly.
    with pytest.raises(BuildException, match="base"):
        _build(server, Template().from_image(f"{address}/test/tiny:v1"), "tiny-gone")


def test_from_debian_without_a_registry(built_server: BilikServer) -> None:
    """``from_debian_image()`` (debian:stable) is built from the host's own apt sources."""
    server = built_server
    template = Template().from_debian_image().run_cmd("cat /etc/debian_version > /tmp/v")
    logs, _ = _build(server, template, "plain-debian")
    assert any("apt sources" in line for line in logs), logs
    with Sandbox.create("plain-debian", **_params(server)) as sbx:
        assert sbx.files.read("/tmp/v").split(".")[0] == "12"
        assert sbx.commands.run("whoami; command -v sudo python3 || true").stdout == "user\n"


def test_background_builds_and_exists(built_server: BilikServer) -> None:
    server = built_server
    params = _params(server)
    assert not Template.exists("later", **params)
    template = Template().from_base_image().run_cmd(f"echo {uuid.uuid4().hex} > /tmp/id")
    info = Template.build_in_background(template, alias="later", **params)
    deadline = time.monotonic() + 120
    while True:
        status = Template.get_build_status(info, logs_offset=0, **params)
        if status.status.value in ("ready", "error") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status.status.value == "ready", status
    assert any("RUN echo" in entry.message for entry in status.log_entries)
    assert Template.exists("later", **params)
