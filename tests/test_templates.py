"""Template builds through E2B's build API, driven by the official ``e2b`` SDK."""

from __future__ import annotations

import datetime
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import BuildException, Sandbox, Template, wait_for_port

import fake_ecr
import registry
from bilik.templates.registries import sign_v4
from server import SERVER_SETTINGS, BilikServer

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
def ecr() -> Iterator[fake_ecr.FakeEcr]:
    with fake_ecr.fake_ecr() as server:
        yield server


@pytest.fixture(scope="module")
def built_server(ecr: fake_ecr.FakeEcr) -> Iterator[BilikServer]:
    srv = BilikServer()
    # AWS registries' pull tokens come from the fake ECR (the server reads this at start).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("BILIK_ECR_ENDPOINT", fake_ecr.url(ecr))
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


def test_a_build_cut_short_by_a_crash_fails_cleanly_and_can_be_retried(
    server: BilikServer,
) -> None:
    # (first in this module: a server of its own, before the module's starts)
    first = server.start()
    params = _params(server)
    word = uuid.uuid4().hex
    slow = Template().from_base_image().run_cmd(f"echo {word}; sleep 600")
    info = Template.build_in_background(slow, alias="cut-short", **params)
    deadline = time.monotonic() + 60
    # Until the step's command runs in its build sandbox (its output is in the log).
    while not any(
        entry.message == word
        for entry in Template.get_build_status(info, logs_offset=0, **params).log_entries
    ):
        assert time.monotonic() < deadline, "the step never started"
        time.sleep(0.2)
    assert json.loads(server.cli("sandbox", "list", "--json").stdout) != []
    first.send_signal(signal.SIGKILL)
    first.wait()
    scratch = SERVER_SETTINGS.data_dir / "images" / f"build-{info.build_id}.json"
    assert scratch.exists()  # what the step ran on, left by the crash

    server.start()
    status = Template.get_build_status(info, logs_offset=0, **params)
    assert status.status.value == "error" and "stopped during the build" in str(status.reason)
    assert not scratch.exists()  # its layers can go
    response = httpx.post(
        f"{server.url}/sandboxes",
        json={"templateID": "cut-short"},
        headers={"X-API-Key": server.key},
    )
    assert response.status_code == 400 and "no finished build" in response.json()["message"]
    # The build sandbox went with the restart (it would have run on for the step's time limit).
    assert json.loads(server.cli("sandbox", "list", "--json").stdout) == []
    retried = Template().from_base_image().run_cmd("echo retried > ~/r")
    _build(server, retried, "cut-short")
    with Sandbox.create("cut-short", **params) as sbx:
        assert sbx.files.read("/home/user/r") == "retried\n"


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
    # A failed rebuild leaves the template's finished build as it was.
    _build(server, Template().from_base_image().run_cmd("echo first > ~/which"), "retried")
    broken = (
        Template()
        .from_base_image()
        .run_cmd("echo second > ~/which")
        .set_start_cmd("sleep 1000", "false")
    )
    with pytest.raises(BuildException, match="did not become ready"):
        _build(server, broken, "retried")
    with Sandbox.create("retried", **_params(server)) as sbx:
        assert sbx.files.read("/home/user/which") == "first\n"


@pytest.mark.parametrize(
    ("request_body", "build_body", "message"),
    [
        ({"name": "code-interpreter-v1"}, None, "'code-interpreter-v1' is bilik's own template"),
        ({"name": "base"}, None, "'base' is bilik's own template"),
        ({"name": "raw-bad"}, {"fromTemplate": 5}, "fromTemplate must be a name"),
        ({"name": "raw-bad"}, {"fromImage": ["x"]}, "fromImage must be a name"),
        ({"name": "raw-bad"}, {"fromImage": "e2bdev/base", "ociRuntime": "kata"}, "ociRuntime"),
        ({"name": "raw-bad"}, {"steps": {"type": "RUN"}}, "steps must be a list"),
        (
            {"name": "raw-bad"},
            {"fromImage": "e2bdev/base", "steps": [{"type": "RUN", "args": ["true"]}] * 257},
            "at most 256 steps",
        ),
    ],
)
def test_bad_build_requests_get_json_errors(
    built_server: BilikServer,
    request_body: dict[str, Any],
    build_body: dict[str, Any] | None,
    message: str,
) -> None:
    """Refused before anything is built: a 400 with the reason."""
    headers = {"X-API-Key": built_server.key}
    response = httpx.post(f"{built_server.url}/v3/templates", json=request_body, headers=headers)
    if build_body is not None:
        assert response.status_code == 202, response.text
        ids = response.json()
        response = httpx.post(
            f"{built_server.url}/v2/templates/{ids['templateID']}/builds/{ids['buildID']}",
            json=build_body,
            headers=headers,
        )
    assert response.status_code == 400, response.text
    assert response.json()["code"] == 400 and message in response.json()["message"]


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


def test_from_aws_and_gcp_registries(built_server: BilikServer, ecr: fake_ecr.FakeEcr) -> None:
    """ECR: the access key buys a pull token from (fake) ECR's API; GCP: the service account key
    is the password of ``_json_key``. Both against a real registry on loopback."""
    server = built_server
    with registry.registry(auth=True) as address:
        ref = f"{address}/test/tiny:v1"
        aws = Template().from_aws_registry(
            ref,
            access_key_id=fake_ecr.KEY_ID,
            secret_access_key=fake_ecr.SECRET,
            region=fake_ecr.REGION,
        )
        logs, _ = _build(
            server, aws.run_cmd("echo aws $GREETING > /srv/via", user="root"), "tiny-aws"
        )
        assert ecr.calls[-1] == "ok", ecr.calls
        assert any("pull token from ECR" in line for line in logs), logs
        gcp = Template().from_gcp_registry(ref, service_account_json=json.loads(registry.GCP_KEY))
        _build(server, gcp.run_cmd("echo gcp $GREETING > /srv/via", user="root"), "tiny-gcp")
        for name in ("aws", "gcp"):
            with Sandbox.create(f"tiny-{name}", **_params(server)) as sbx:
                assert sbx.files.read("/srv/via") == f"{name} hi-from-registry\n"
                assert sbx.files.read("/srv/data.txt") == "from the registry\n"

        # A wrong secret: the signature does not match, ECR says so, and so does the build.
        wrong_secret = Template().from_aws_registry(
            ref, fake_ecr.KEY_ID, fake_ecr.SECRET[:-1] + "X", fake_ecr.REGION
        )
        with pytest.raises(BuildException, match="secret access key does not match"):
            _build(server, wrong_secret, "tiny-aws-wrong")
        assert ecr.calls[-1].startswith("InvalidSignatureException"), ecr.calls
        unknown = Template().from_aws_registry(ref, "AKIDNOSUCHKEY", fake_ecr.SECRET, "eu-west-1")
        with pytest.raises(BuildException, match="does not know the access key ID"):
            _build(server, unknown, "tiny-aws-wrong")
        bad_region = Template().from_aws_registry(ref, fake_ecr.KEY_ID, fake_ecr.SECRET, "mars")
        with pytest.raises(BuildException, match="'mars' is not an AWS region"):
            _build(server, bad_region, "tiny-aws-wrong")
        # A wrong JSON key: the registry refuses it.
        other_key = {**json.loads(registry.GCP_KEY), "private_key": "pk-other"}
        wrong_key = Template().from_gcp_registry(ref, service_account_json=other_key)
        with pytest.raises(BuildException, match=r"service account key(.|\n)*(?i:unauthorized)"):
            _build(server, wrong_key, "tiny-gcp-wrong")
    with pytest.raises(BuildException, match="not a JSON service account key"):
        _build(
            server,
            Template().from_gcp_registry(ref, service_account_json=[]),  # type: ignore[arg-type]
            "tiny-gcp-wrong",
        )
    # The credentials were used, never kept: not in the database, the build logs, the images.
    _nowhere_on_disk(
        server,
        ["tiny-aws", "tiny-gcp"],
        [fake_ecr.SECRET, registry.ECR_PASSWORD, registry.GCP_SECRET],
    )


def _nowhere_on_disk(server: BilikServer, names: list[str], secrets: list[str]) -> None:
    data = SERVER_SETTINGS.data_dir
    files = [Path(d, f) for d, _, fs in os.walk(data) for f in fs]  # (layers are links)
    for name in names:
        image = json.loads((data / "images" / f"{_id(server, name)}.json").read_text())
        files.append(data / "images" / f"{_id(server, name)}.json")
        for layer in image["layers"]:
            files += [Path(d, f) for d, _, fs in os.walk(data / "layers" / layer) for f in fs]
    for path in files:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 64 << 20:
            continue
        content = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in content, f"{secret!r} is in {path}"


def test_sigv4_is_aws_own_example() -> None:
    """The signing code gives the signature of AWS's worked example (IAM ListUsers)."""
    headers = sign_v4(
        "GET",
        "https://iam.amazonaws.com/?Action=ListUsers&Version=2010-05-08",
        {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
        b"",
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        "us-east-1",
        "iam",
        datetime.datetime(2015, 8, 30, 12, 36, tzinfo=datetime.UTC),
    )
    assert headers["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date, "
        "Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
    )


def test_from_debian_without_a_registry(built_server: BilikServer) -> None:
    """``from_debian_image()`` (debian:stable) is built from the host's own apt sources."""
    server = built_server
    template = Template().from_debian_image().run_cmd("cat /etc/debian_version > /tmp/v")
    logs, _ = _build(server, template, "plain-debian")
    assert any("apt sources" in line for line in logs), logs
    with Sandbox.create("plain-debian", **_params(server)) as sbx:
        assert sbx.files.read("/tmp/v").split(".")[0] == "12"
        assert sbx.commands.run("whoami; command -v sudo python3 || true").stdout == "user\n"


def test_from_one_of_bilik_s_own_templates(built_server: BilikServer) -> None:
    """``from_template`` takes bilik's own templates by name, as ``from_base_image`` does
    ``base``: they stand on the same layers. ``pip install`` works on ``base`` as on E2B's,
    from the package index the host uses."""
    server = built_server
    word = uuid.uuid4().hex
    template = (
        Template()
        .from_template("base")
        .run_cmd(f"echo {word} > ~/w")
        .run_cmd("pip install --no-cache-dir -q six", user="root")
    )
    logs, _ = _build(server, template, "on-base")
    assert any(line.startswith("FROM base:") for line in logs), logs
    with Sandbox.create("on-base", **_params(server)) as sbx:
        assert sbx.files.read("/home/user/w") == f"{word}\n"
        assert sbx.commands.run("command -v git; python3 -c 'import six'").stdout == (
            "/usr/bin/git\n"
        )
        # In the sandbox too, as the user.
        sbx.commands.run("pip install --no-cache-dir -q --user idna && python3 -c 'import idna'")


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
