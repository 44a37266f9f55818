"""Templates defined with bilik's own SDK (``bilik.sdk.template``) and built on a real server;
the sandboxes from them are checked with the official ``e2b`` SDK."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import AsyncSandbox, Sandbox

import fake_ecr
import registry
from bilik.sdk.exceptions import BuildException, InvalidArgumentException, TemplateException
from bilik.sdk.template import (
    AsyncTemplate,
    LogEntry,
    Template,
    TemplateBase,
    TemplateBuilder,
    TemplateFinal,
    wait_for_file,
    wait_for_port,
    wait_for_process,
    wait_for_timeout,
    wait_for_url,
)
from helpers import make_wheel
from server import SERVER_SETTINGS, BilikServer

APP = """
import http.server, os
import bilikdemo
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        text = os.environ["GREETING"] + " " + open("/app/data/a.txt").read() + " " + bilikdemo.WORD
        self.send_response(200)
        self.end_headers()
        self.wfile.write(text.encode())
http.server.HTTPServer(("0.0.0.0", 8000), Hello).serve_forever()
"""
# Stands in for npm (the registry is not for tests): says how it was called, and as whom.
NPM_STUB = '#!/bin/sh\necho "npm $* as $(whoami)" > /opt/npm-called\n'
# Steps that make layers in EVERY_STEP (COPY, RUN and WORKDIR), and its COPY steps.
LAYER_STEPS, COPY_STEPS = 19, 8


@pytest.fixture(scope="module")
def ecr() -> Iterator[fake_ecr.FakeEcr]:
    with fake_ecr.fake_ecr() as server:
        yield server


@pytest.fixture(scope="module")
def srv(ecr: fake_ecr.FakeEcr) -> Iterator[BilikServer]:
    server = BilikServer()
    # AWS registries' pull tokens come from the fake ECR (the server reads this at start).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("BILIK_ECR_ENDPOINT", fake_ecr.url(ecr))
        server.start()
    yield server
    headers = {"X-API-Key": server.key}
    for template in httpx.get(f"{server.url}/templates", headers=headers).json():
        httpx.delete(f"{server.url}/templates/{template['templateID']}", headers=headers)
    server.finish()


def _params(server: BilikServer) -> dict[str, Any]:
    return {"api_key": server.key, "api_url": server.url, "sandbox_url": server.url}


def _apt_repository(directory: Path) -> None:
    """A flat apt repository on disk with one package, so apt_install needs no mirror."""
    package = directory / "pkg"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN" / "control").write_text(
        "Package: bilik-demo\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: tests <tests@localhost>\nDescription: installed by a template test\n"
    )
    (package / "usr/share/bilik-demo").mkdir(parents=True)
    (package / "usr/share/bilik-demo/hello.txt").write_text("from apt\n")
    deb = directory / "bilik-demo_1.0_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(package), str(deb)],
        check=True,
        capture_output=True,
    )
    subprocess.run(["rm", "-rf", str(package)], check=True)
    data = deb.read_bytes()
    (directory / "Packages").write_text(
        "Package: bilik-demo\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: tests <tests@localhost>\n"
        f"Filename: ./{deb.name}\nSize: {len(data)}\nSHA256: {hashlib.sha256(data).hexdigest()}\n"
        "Description: installed by a template test\n\n"
    )


def _git_repository(directory: Path) -> None:
    """A bare repository with two commits on ``main`` (a depth-1 clone has one)."""
    work = directory.with_name("work")
    git = ["git", "-c", "user.name=tests", "-c", "user.email=tests@localhost"]
    subprocess.run([*git, "init", "-q", "-b", "main", str(work)], check=True)
    for text in ("first\n", "second\n"):
        (work / "README").write_text(text)
        subprocess.run([*git, "-C", str(work), "add", "README"], check=True)
        subprocess.run([*git, "-C", str(work), "commit", "-q", "-m", text.strip()], check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(directory)], check=True)
    subprocess.run(["rm", "-rf", str(work)], check=True)


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("context")
    (root / "app.py").write_text(APP)
    (root / "data").mkdir()
    (root / "data" / "a.txt").write_text("world")
    (root / "data" / "b.txt").write_text("more")
    (root / "data" / "secret.key").write_text("never uploaded")
    (root / "conf").mkdir()
    (root / "conf" / "one.cfg").write_text("one\n")
    (root / "conf" / "two.cfg").write_text("two\n")
    (root / "conf" / "other.txt").write_text("not a .cfg\n")
    (root / "tools").mkdir()
    (root / "tools" / "npm").write_text(NPM_STUB)
    (root / ".dockerignore").write_text("# secrets stay home\n*.key\n**/*.key\n")
    make_wheel(root / "wheels")
    _apt_repository(root / "apt")
    (root / "git").mkdir()
    _git_repository(root / "git" / "repo.git")
    return root


def every_step(cls: type[TemplateBase], context: Path) -> TemplateFinal:
    """A template with every kind of step."""
    return (
        cls(file_context_path=context)
        .from_base_image()
        .copy("app.py", "/app/")
        .copy("data", "/app/data", user="user", mode=0o640)
        .copy("conf/*.cfg", "/etc/demo/")
        .copy("conf", "/tmp/")  # into a directory that exists: it keeps its owner and mode
        .copy(["tools/npm"], "/usr/local/bin/", mode=0o755)
        .copy("apt", "/srv/apt")
        .copy("wheels", "/srv/wheels")
        .copy("git", "/srv/git", user="user")
        .run_cmd(
            "rm -f /etc/apt/sources.list.d/* && "
            "echo 'deb [trusted=yes] file:/srv/apt ./' > /etc/apt/sources.list",
            user="root",
        )
        .apt_install("bilik-demo", no_install_recommends=True)
        .pip_install("/srv/wheels/bilikdemo-1.0-py3-none-any.whl")
        .npm_install("left-pad", g=True)
        .set_envs({"GREETING": "hello", "SPACED": "a b"})
        .make_dir(["/app/logs", "/app/cache"], mode=0o775, user="root")
        .set_workdir("/app")
        .set_user("user")
        .git_clone("file:///srv/git/repo.git", "/home/user/repo", branch="main", depth=1)
        .run_cmd(["echo temp > /home/user/tmp.txt", "echo keep > /home/user/old.txt"])
        .remove("/home/user/tmp.txt", force=True)
        .rename("/home/user/old.txt", "/home/user/new.txt")
        .run_cmd("whoami > /home/user/who && pwd >> /home/user/who")
        .set_start_cmd("python3 /app/app.py", wait_for_port(8000))
    )


def _check_sandbox(server: BilikServer, name: str) -> None:
    with Sandbox.create(name, timeout=120, **_params(server)) as sbx:

        def sh(cmd: str) -> str:
            return sbx.commands.run(cmd, user="root").stdout

        # Files: a file into a directory, a directory (owner, mode, .dockerignore), a glob.
        assert sbx.files.read("/app/data/a.txt") == "world"
        assert sh("stat -c '%U %a' /app/data/a.txt /app/data/b.txt") == "user 640\nuser 640\n"
        assert sh("stat -c %U /app/data") == "user\n"  # the directory the copy made, too
        assert sh("stat -c '%U %a' /tmp") == "root 1777\n" and sbx.files.exists("/tmp/one.cfg")
        assert not sbx.files.exists("/app/data/secret.key")
        assert sh("ls /etc/demo") == "one.cfg\ntwo.cfg\n"
        # Packages: apt, pip, npm (as root, globally).
        assert sbx.files.read("/usr/share/bilik-demo/hello.txt") == "from apt\n"
        assert sh("python3 -c 'import bilikdemo; print(bilikdemo.WORD)'") == "from-a-wheel\n"
        assert sbx.files.read("/opt/npm-called") == "npm install -g left-pad as root\n"
        assert sh("stat -c '%a' /app/logs /app/cache") == "775\n775\n"
        # git_clone as the template's user, one branch, one commit deep.
        assert sbx.files.read("/home/user/repo/README") == "second\n"
        assert sh("stat -c %U /home/user/repo/README") == "user\n"
        commits = sbx.commands.run("git -C /home/user/repo rev-list --count HEAD", user="user")
        assert commits.stdout == "1\n"
        # remove and rename.
        assert not sbx.files.exists("/home/user/tmp.txt")
        assert not sbx.files.exists("/home/user/old.txt")
        assert sbx.files.read("/home/user/new.txt") == "keep\n"
        # Env, workdir and user, for steps and for the sandbox's own commands.
        assert sbx.files.read("/home/user/who") == "user\n/app\n"
        run = sbx.commands.run("echo $GREETING; echo $SPACED; pwd; whoami").stdout
        assert run == "hello\na b\n/app\nuser\n"
        # The start command runs, and its port answers (inside, and through the server).
        assert sh("curl -s localhost:8000") == "hello world from-a-wheel"
        page = httpx.get(
            server.url, headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8000"}
        )
        assert page.text == "hello world from-a-wheel"


def test_every_step_builds_and_rebuilds_from_cache(srv: BilikServer, context: Path) -> None:
    logs: list[LogEntry] = []
    info = Template.build(
        every_step(Template, context),
        "every-step",
        cpu_count=1,
        memory_mb=512,
        on_build_logs=logs.append,
        **_params(srv),
    )
    assert info.name == "every-step" and info.template_id and info.build_id
    messages = [e.message for e in logs]
    assert messages[0] == "Build started" and messages[-1] == "Build finished"
    assert sum(m.startswith("Uploaded '") for m in messages) == COPY_STEPS, messages
    # Step logs carry their step: the server's "[n/20] KIND ..." lines.
    assert any(e.step == "11" and "pip install" in e.message for e in logs), messages
    _check_sandbox(srv, "every-step")

    # Unchanged: no upload, and every layer reused (no step runs again).
    again: list[LogEntry] = []
    Template.build(
        every_step(Template, context),
        alias="every-step",
        on_build_logs=again.append,
        **_params(srv),
    )
    messages = [e.message for e in again]
    assert not any(m.startswith("Uploaded") for m in messages), messages
    assert sum(m.startswith("Skipping upload of '") for m in messages) == COPY_STEPS, messages
    assert sum(m == "CACHED" for m in messages) == LAYER_STEPS, messages

    # skip_cache: every step runs again (a step's RUN output shows it did). New words each
    # run: layers are content-addressed and outlive a test session.
    word = f"ran-{uuid.uuid4().hex[:8]}"
    forced: list[LogEntry] = []
    small = Template().from_base_image().run_cmd(f"echo {word} | tee ~/word")
    Template.build(small, "forced", on_build_logs=forced.append, **_params(srv))
    with Sandbox.create("forced", **_params(srv)) as running:
        Template.build(
            small, "forced", skip_cache=True, on_build_logs=forced.append, **_params(srv)
        )
        assert sum(e.message == word for e in forced) == 2, [e.message for e in forced]
        assert not any(e.message == "CACHED" for e in forced)
        # New layers beside the old: the sandbox made before stands on its own still.
        assert running.files.read("/home/user/word") == f"{word}\n"


async def test_async_template_builds_the_same(srv: BilikServer, context: Path) -> None:
    params = _params(srv)
    assert not await AsyncTemplate.exists("every-async", **params)
    logs: list[LogEntry] = []
    await AsyncTemplate.build(
        every_step(AsyncTemplate, context), "every-async", on_build_logs=logs.append, **params
    )
    # Another template: its files are uploaded for it.
    messages = [e.message for e in logs]
    assert sum(m.startswith("Uploaded '") for m in messages) == COPY_STEPS, messages
    assert await AsyncTemplate.exists("every-async", **params)
    sbx = await AsyncSandbox.create("every-async", timeout=60, **params)
    try:
        page = await sbx.commands.run("curl -s localhost:8000")
        assert page.stdout == "hello world from-a-wheel"
        assert await sbx.files.read("/home/user/new.txt") == "keep\n"
    finally:
        await sbx.kill()

    # In the background, then followed by its status.
    marker = Template().from_base_image().run_cmd("echo in-background > /tmp/bg")
    started = await AsyncTemplate.build_in_background(marker, "background", **params)
    entries: list[LogEntry] = []
    while True:
        status = await AsyncTemplate.get_build_status(started, logs_offset=len(entries), **params)
        entries += status.log_entries
        if status.status.value in ("ready", "error") and not status.log_entries:
            break
    assert status.status.value == "ready", status.reason
    assert any("echo in-background" in e.message for e in entries)
    names = {t.name for t in await AsyncTemplate.list(**params)}
    assert {"every-async", "background"} <= names

    # A failing step points at the line that added it here too.
    failing = AsyncTemplate().from_base_image()
    line = sys._getframe().f_lineno + 1
    failing.run_cmd("exit 3", user="root")
    with pytest.raises(BuildException, match=rf"exit code 3(.|\n)*{__file__}:{line}"):
        await AsyncTemplate.build(failing, "failing-async", **params)


def test_a_failing_step_points_at_its_line(srv: BilikServer, tmp_path: Path) -> None:
    template = Template(file_context_path=tmp_path).from_base_image().run_cmd("true")
    line = sys._getframe().f_lineno + 1
    template.run_cmd("echo oh no >&2; exit 7")
    with pytest.raises(BuildException) as caught:
        Template.build(template, "failing-step", **_params(srv))
    message = str(caught.value)
    assert "exit code 7" in message and "oh no" in message, message
    assert f"{__file__}:{line}" in message and "step 2/2" in message, message
    innermost = caught.value.__traceback__
    assert innermost is not None
    while innermost.tb_next is not None:
        innermost = innermost.tb_next
    assert (innermost.tb_frame.f_code.co_filename, innermost.tb_lineno) == (__file__, line)

    # A copy source that is not there: refused before anything is asked of the server.
    missing = Template(file_context_path=tmp_path).from_base_image()
    missing_line = sys._getframe().f_lineno + 1
    missing.copy("nothing-here.txt", "/srv/")
    with pytest.raises(BuildException, match=rf"nothing-here\.txt(.|\n)*:{missing_line}"):
        Template.build(missing, "missing-source", **_params(srv))
    assert not Template.exists("missing-source", **_params(srv))
    with pytest.raises(TemplateException, match="inside the context"):
        Template(file_context_path=tmp_path).from_base_image().copy("../outside", "/srv/")

    # A base that does not exist points at the from_ line.
    unknown = Template()
    base_line = sys._getframe().f_lineno + 1
    unknown.from_template("no-such-template")
    with pytest.raises(BuildException, match=rf"not found(.|\n)*:{base_line}"):
        Template.build(unknown, "unknown-base", **_params(srv))


def test_a_template_can_run_under_gvisor(srv: BilikServer) -> None:
    """bilik's own choice of OCI runtime per template (``set_runtime``), end to end through the
    official SDK; templates built on one inherit it."""
    template = Template().from_base_image().set_runtime("runsc").run_cmd("echo made > ~/made")
    Template.build(template, "under-gvisor", **_params(srv))
    child = Template().from_template("under-gvisor").run_cmd("echo child > ~/child")
    Template.build(child, "under-gvisor-child", **_params(srv))
    for name in ("under-gvisor", "under-gvisor-child"):
        with Sandbox.create(name, **_params(srv)) as sbx:
            result = sbx.commands.run("uname -r; cat ~/made; ls ~")
            assert result.stdout.split()[:2] == ["4.4.0", "made"]  # gVisor's kernel
            sbx.files.write("/home/user/f.txt", "hello")
            assert sbx.files.read("/home/user/f.txt") == "hello"
    with pytest.raises(InvalidArgumentException, match="unknown runtime"):
        Template().from_base_image().set_runtime("kata")  # type: ignore[arg-type]


def test_from_a_private_registry(srv: BilikServer) -> None:
    with registry.registry(auth=True) as address:
        template = (
            Template()
            .from_image(
                f"{address}/test/tiny:v1", username=registry.USER, password=registry.PASSWORD
            )
            .run_cmd("echo $GREETING > /srv/out", user="root")
        )
        Template.build(template, "tiny-private", **_params(srv))
    with Sandbox.create("tiny-private", **_params(srv)) as sbx:
        assert sbx.files.read("/srv/out") == "hi-from-registry\n"
        assert sbx.files.read("/srv/data.txt") == "from the registry\n"


def test_from_aws_and_gcp_registries(
    srv: BilikServer, ecr: fake_ecr.FakeEcr, tmp_path: Path
) -> None:
    (tmp_path / "key.json").write_text(registry.GCP_KEY)
    with registry.registry(auth=True) as address:
        ref = f"{address}/test/tiny:v1"
        aws = (
            Template()
            .from_aws_registry(ref, fake_ecr.KEY_ID, fake_ecr.SECRET, fake_ecr.REGION)
            .run_cmd("echo aws $GREETING > /srv/via", user="root")
        )
        # The key as a file of the context (as E2B's SDK takes it).
        gcp = (
            Template(file_context_path=tmp_path)
            .from_gcp_registry(ref, "key.json")
            .run_cmd("echo gcp $GREETING > /srv/via", user="root")
        )
        # As a Dockerfile: the image, never the credentials (as E2B's).
        assert aws.to_dockerfile() == f"FROM {ref}\nRUN echo aws $GREETING > /srv/via\n"
        assert gcp.to_dockerfile() == f"FROM {ref}\nRUN echo gcp $GREETING > /srv/via\n"
        Template.build(aws, "sdk-aws", **_params(srv))
        assert ecr.calls[-1] == "ok", ecr.calls
        Template.build(gcp, "sdk-gcp", **_params(srv))
        for name in ("aws", "gcp"):
            with Sandbox.create(f"sdk-{name}", **_params(srv)) as sbx:
                assert sbx.files.read("/srv/via") == f"{name} hi-from-registry\n"

        # Refused credentials point at the from_ line.
        wrong = Template()
        line = sys._getframe().f_lineno + 1
        wrong.from_aws_registry(ref, fake_ecr.KEY_ID, "not-the-secret", fake_ecr.REGION)
        with pytest.raises(
            BuildException, match=rf"secret access key does not match(.|\n)*:{line}"
        ):
            Template.build(wrong, "sdk-aws-wrong", **_params(srv))
        assert ecr.calls[-1].startswith("InvalidSignatureException"), ecr.calls
        other_key = {"type": "service_account", "private_key": "pk-not-this-one"}
        wrong_key = Template().from_gcp_registry(ref, other_key)
        with pytest.raises(BuildException, match=r"(?i)service account key.*unauthorized"):
            Template.build(wrong_key, "sdk-gcp-wrong", **_params(srv))

    # The key's JSON text works too; a key file that is not there fails at its line.
    spec = json.loads(Template().from_gcp_registry(ref, registry.GCP_KEY).to_json())
    assert spec["fromImageRegistry"] == {"type": "gcp", "serviceAccountJson": registry.GCP_KEY}
    missing = Template(file_context_path=tmp_path)
    with pytest.raises(InvalidArgumentException, match=r"no-such-key\.json") as caught:
        line = sys._getframe().f_lineno + 1
        missing.from_gcp_registry(ref, "no-such-key.json")
    innermost = caught.value.__traceback__
    while innermost is not None and innermost.tb_next is not None:
        innermost = innermost.tb_next
    assert innermost is not None and innermost.tb_lineno == line


def test_to_dockerfile_and_ready_checks(tmp_path: Path) -> None:
    template = (
        Template(file_context_path=tmp_path)
        .from_python_image("3.11")
        .copy("requirements.txt", "/app/")
        .copy("bin", "/app/bin", user="user", mode=0o755)
        .pip_install()
        .apt_install(["curl", "git"])
        .set_envs({"A": "1", "B": "two words"})
        .set_workdir("/app")
        .set_user("user")
        .git_clone("https://example.invalid/r.git", "/app/r", branch="dev", depth=1)
        .run_cmd(["make", "make install"], user="root")
        .set_start_cmd("python app.py", wait_for_port(8000))
    )
    assert template.to_dockerfile() == Template.to_dockerfile(template)
    assert template.to_dockerfile() == (
        "FROM python:3.11\n"
        "COPY requirements.txt /app/\n"
        "COPY --chown=user --chmod=0755 bin /app/bin\n"
        "RUN PIP_BREAK_SYSTEM_PACKAGES=1 pip install .\n"
        "RUN apt-get update && DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes "
        "apt-get install -y curl git\n"
        "ENV A=1 B='two words'\n"
        "WORKDIR /app\n"
        "USER user\n"
        "RUN git clone https://example.invalid/r.git --branch dev --single-branch --depth 1 "
        "/app/r\n"
        "RUN make && make install\n"
        "ENTRYPOINT python app.py\n"
    )
    with pytest.raises(ValueError, match="another template"):
        Template().from_template("base").to_dockerfile()
    assert isinstance(Template().from_base_image(), TemplateBuilder)
    # The ready checks are E2B's shell tests.
    assert wait_for_port(80).get_cmd() == '[ -n "$(ss -Htuln sport = :80)" ]'
    assert wait_for_url("http://localhost:3000/h", 204).get_cmd() == (
        'curl -s -o /dev/null -w "%{http_code}" http://localhost:3000/h | grep -q "204"'
    )
    assert wait_for_process("nginx").get_cmd() == "pgrep nginx > /dev/null"
    assert wait_for_file("/tmp/ready").get_cmd() == "[ -f /tmp/ready ]"
    assert wait_for_timeout(2500).get_cmd() == "sleep 2"
    assert wait_for_timeout(10).get_cmd() == "sleep 1"


CLI_TEMPLATE = """
from bilik.sdk.template import Template, wait_for_file

template = (
    Template()
    .from_base_image()
    .copy("hello.txt", "/srv/hello.txt")
    .run_cmd("echo made-by-cli > /srv/made", user="root")
    .set_start_cmd("touch /tmp/up && sleep infinity", wait_for_file("/tmp/up"))
)
"""

CLI_TWO = """
from bilik.sdk.template import Template

a = Template().from_base_image()
b = Template().from_debian_image()
"""

CLI_FAILING = """
from bilik.sdk.template import Template

base = Template().from_base_image()
broken = base.run_cmd("echo sad; exit 3")
"""


def _cli(server: BilikServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "BILIK_URL": server.url,
        "BILIK_API_KEY": server.key,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
    }
    return subprocess.run(
        [sys.executable, "-m", "bilik.cli", "template", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_build_list_delete(srv: BilikServer, tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("hello from a file\n")
    (tmp_path / "web_app.py").write_text(CLI_TEMPLATE)
    built = _cli(srv, "build", str(tmp_path / "web_app.py"), "--cpu", "1", "--memory-mb", "512")
    assert built.returncode == 0, built.stderr
    out = built.stdout
    assert "building 'web_app' from" in out and ": 2 steps" in out, out
    # Progress: time so far and steps done out of all, on every line.
    assert "s 0/2] [1/2] COPY hello.txt /srv/hello.txt" in out, out
    assert "s 2/2] Build finished" in out or "s 2/2] Ready" in out, out
    assert "built 'web_app' in " in out and "2/2 steps" in out, out
    with Sandbox.create("web_app", **_params(srv)) as sbx:
        assert sbx.files.read("/srv/hello.txt") == "hello from a file\n"
        assert sbx.files.read("/srv/made") == "made-by-cli\n"
        assert sbx.files.exists("/tmp/up")

    listed = _cli(srv, "list")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert header.split() == ["name", "templateID", "status", "cpu", "memoryMB", "createdAt"]
    assert any(row.split()[0] == "web_app" and row.split()[2] == "ready" for row in rows), rows
    as_json = _cli(srv, "list", "--json")
    assert {"web_app"} <= {row["name"] for row in json.loads(as_json.stdout)}

    # A failing step: non-zero, the error, and the line of the file that added the step.
    (tmp_path / "broken.py").write_text(CLI_FAILING)
    failed = _cli(srv, "build", f"{tmp_path / 'broken.py'}:broken", "--name", "broken")
    assert failed.returncode == 1, failed.stdout
    assert "exit code 3" in failed.stderr and "sad" in failed.stderr, failed.stderr
    assert f"{tmp_path / 'broken.py'}:5" in failed.stderr, failed.stderr
    # Which template: FILE.py:NAME, else "template", else the only one.
    (tmp_path / "two.py").write_text(CLI_TWO)
    ambiguous = _cli(srv, "build", str(tmp_path / "two.py"))
    assert ambiguous.returncode == 2 and "several templates (a, b)" in ambiguous.stderr
    (tmp_path / "none.py").write_text("x = 1\n")
    nothing = _cli(srv, "build", str(tmp_path / "none.py"))
    assert nothing.returncode == 2 and "defines no template" in nothing.stderr

    web_app = next(row for row in json.loads(as_json.stdout) if row["name"] == "web_app")
    data = SERVER_SETTINGS.data_dir
    uploaded = data / "template-files" / web_app["templateID"]
    log = data / "builds" / f"{web_app['buildID']}.jsonl"
    assert uploaded.is_dir() and log.is_file()
    deleted = _cli(srv, "delete", "web_app")
    assert deleted.returncode == 0, deleted.stderr
    assert "web_app" not in _cli(srv, "list").stdout
    # Nothing of it is left: the files uploaded for it, its builds' logs.
    assert not uploaded.exists() and not log.exists()
    again = _cli(srv, "delete", "web_app")
    assert again.returncode == 1 and "not found" in again.stderr


def test_the_default_templates_are_defined_with_the_builder() -> None:
    """``base`` and ``code-interpreter-v1`` are written with this builder; the server builds
    their requests."""
    from bilik.templates.defaults import BASE_TEMPLATE, CODE_INTERPRETER_TEMPLATE, DEFAULTS

    dockerfile = BASE_TEMPLATE.to_dockerfile()
    assert dockerfile.startswith("FROM debian:stable\n") and "python3-pip" in dockerfile
    base = DEFAULTS["base"]
    assert base["fromImage"] == "debian:stable"
    # The host's pip settings go in (what the server fills in itself, never uploaded).
    assert [step.get("hostPipSettings", False) for step in base["steps"]].count(True) == 1
    dockerfile = CODE_INTERPRETER_TEMPLATE.to_dockerfile()
    assert dockerfile.startswith("FROM e2bdev/base\n") and "ipykernel" in dockerfile
    spec = DEFAULTS["code-interpreter-v1"]
    assert spec["memoryMB"] == 1024
    assert spec["startCmd"].endswith("python3 -m bilik.interpreter")


def test_package_names_are_quoted() -> None:
    """``numpy>=2`` is one argument to pip, not a redirect."""
    dockerfile = (
        Template().from_base_image().pip_install(["numpy>=2", "flask"]).apt_install("jq")
    ).to_dockerfile()
    assert "pip install 'numpy>=2' flask" in dockerfile and "install -y jq" in dockerfile
