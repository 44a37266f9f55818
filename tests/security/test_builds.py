"""Template builds keep to the tenant boundary (issue: a build step's leftover process swapped
directories under the host's copy of its layer, which then held host files and another
sandbox's access token; one key's upload became another key's cached COPY layer; uploads and
build output had no bounds)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import Sandbox, Template

from bilik.runtime.backends import RUNTIMES
from server import SERVER_SETTINGS, BilikServer

DATA = SERVER_SETTINGS.data_dir
# Directory pairs the leftover process swaps: each real directory holds a large file, so the
# host's copy of the layer spends time inside it, then names that exist at the link's target.
PAIRS = 8
SWAPPER = """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
os.chdir("/home/user/p")
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
pairs = [(b"x%d" % i, b"y%d" % i) for i in range({pairs})]
while True:
    for a, b in pairs:
        libc.renameat2(-100, a, -100, b, 2)  # RENAME_EXCHANGE
    time.sleep(0.03)
"""


@pytest.fixture
def keys(server: BilikServer) -> Iterator[list[str]]:
    """The keys a test uses (the server's first, and any it adds): their templates are
    deleted when it ends, passed or not, so no layer of an attack outlives its test."""
    used: list[str] = []
    yield used
    for key in ([server.key] if server.procs else []) + used:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            for row in httpx.get(f"{server.url}/templates", headers=_headers(key)).json():
                httpx.delete(f"{server.url}/templates/{row['templateID']}", headers=_headers(key))


def _headers(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def _params(server: BilikServer, key: str | None = None) -> dict[str, Any]:
    return {"api_key": key or server.key, "api_url": server.url, "sandbox_url": server.url}


def _request_build(server: BilikServer, key: str, name: str) -> tuple[str, str]:
    response = httpx.post(
        f"{server.url}/v3/templates",
        json={"name": name, "cpuCount": 1, "memoryMB": 512},
        headers=_headers(key),
    )
    assert response.status_code == 202, response.text
    body = response.json()
    return body["templateID"], body["buildID"]


def _run_build(
    server: BilikServer, key: str, template_id: str, build_id: str, spec: dict[str, Any]
) -> dict[str, Any]:
    """Start the build and wait for its end; its last status, with every log line."""
    url = f"{server.url}/v2/templates/{template_id}/builds/{build_id}"
    response = httpx.post(url, json=spec, headers=_headers(key))
    assert response.status_code == 202, response.text
    status_url = f"{server.url}/templates/{template_id}/builds/{build_id}/status"
    logs: list[str] = []
    deadline = time.monotonic() + 600
    while True:
        body = httpx.get(status_url, params={"logsOffset": len(logs)}, headers=_headers(key)).json()
        logs += body["logs"]
        if body["status"] in ("ready", "error") and not body["logs"]:
            return {**body, "logs": logs}
        assert time.monotonic() < deadline, "the build never ended"
        if not body["logs"]:
            time.sleep(0.2)


def _upload_url(server: BilikServer, key: str, template_id: str, files_hash: str) -> str:
    response = httpx.get(
        f"{server.url}/templates/{template_id}/files/{files_hash}", headers=_headers(key)
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["present"] is False, body
    return str(body["url"])


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _layer_files(image: str) -> Iterator[Path]:
    """Every file in the layers the template's image has over its base's."""
    layers = json.loads((DATA / "images" / f"{image}.json").read_text())["layers"]
    base = set(json.loads((DATA / "images" / "base.json").read_text())["layers"])
    for key in layers:
        if key in base:
            continue
        for top, dirs, files in os.walk(DATA / "layers" / key):  # (never follows a link)
            for name in files + dirs:
                yield Path(top) / name


@pytest.mark.parametrize("oci_runtime", RUNTIMES)
def test_a_leftover_process_cannot_steer_the_layer_copy_into_host_files(
    server: BilikServer, keys: list[str], tmp_path: Path, oci_runtime: str
) -> None:
    server.start()
    # What must never reach a layer: a root-only file of the host, and another key's sandbox's
    # envd token (its sandbox directory is where the links point).
    secret = f"host-secret-{uuid.uuid4().hex}"
    host_dir = tmp_path / "host"
    (host_dir / "s").mkdir(parents=True)
    (host_dir / "s" / "secret.txt").write_text(secret)
    (host_dir / "big").write_text("small on the host")
    os.chmod(tmp_path, 0o700)
    other_key = server.cli("keys", "create", "--name", "victim").stdout.strip()
    keys.append(other_key)
    with Sandbox.create(**_params(server, other_key)) as victim:
        victim_dir = DATA / "sandboxes" / victim.sandbox_id
        token = json.loads((victim_dir / "control" / "envd.json").read_text())["access_token"]
        make = ["set -e", "mkdir -p /home/user/p", "cd /home/user/p"]
        for i in range(PAIRS):
            if i % 2 == 0:  # names that exist in host_dir
                big, inner, inner_file, target = "big", "s", "secret.txt", host_dir
            else:  # names that exist in the victim's sandbox directory
                big, inner, inner_file, target = "config.json", "control", "envd.json", victim_dir
            make += [
                f"mkdir x{i} && head -c 64M /dev/zero > x{i}/{big}",
                f"mkdir x{i}/{inner} && echo decoy > x{i}/{inner}/{inner_file}",
                f"ln -s {target} y{i}",
            ]
        make += [
            "cat > /home/user/swap.py <<'EOF'",
            textwrap.dedent(SWAPPER.format(pairs=PAIRS)).strip(),
            "EOF",
            "python3 /home/user/swap.py",
        ]
        spec = {
            "fromImage": "e2bdev/base",
            "ociRuntime": oci_runtime,
            "steps": [{"type": "RUN", "args": ["\n".join(make)], "force": False}],
        }
        template_id, build_id = _request_build(server, server.key, f"swapper-{oci_runtime}")
        status = _run_build(server, server.key, template_id, build_id, spec)
        assert status["status"] == "ready", status
        for path in _layer_files(template_id):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 1 << 20:
                data = path.read_bytes()
                assert secret.encode() not in data, f"host file copied into the layer: {path}"
                assert token.encode() not in data, f"another sandbox's token in the layer: {path}"
        with Sandbox.create(template_id, **_params(server)) as sbx:
            found = sbx.commands.run(
                f"grep -rl -e {secret} -e {token} /home/user /tmp || true", user="root"
            )
            assert found.stdout.strip() == "", found.stdout
            # What the step wrote is all there, whichever way each pair was when it stopped.
            listing = sbx.commands.run("ls /home/user/p").stdout.split()
            assert sorted(listing) == sorted([f"x{i}" for i in range(PAIRS)] +
                                             [f"y{i}" for i in range(PAIRS)])  # fmt: skip


def test_another_keys_upload_under_my_files_hash_never_becomes_my_copy(
    server: BilikServer, keys: list[str], tmp_path: Path
) -> None:
    server.start()
    mine = f"mine-{uuid.uuid4().hex}"
    (tmp_path / "app.txt").write_text(mine)
    template = Template(file_context_path=str(tmp_path)).from_base_image()
    template = template.copy("app.txt", "/home/user/app.txt")
    spec = json.loads(Template.to_json(template))
    files_hash = next(s["filesHash"] for s in spec["steps"] if s["type"] == "COPY")

    # Another key, knowing the hash, builds the same steps first with its own content under it.
    attacker = server.cli("keys", "create", "--name", "attacker").stdout.strip()
    keys.append(attacker)
    template_id, build_id = _request_build(server, attacker, "poison")
    url = _upload_url(server, attacker, template_id, files_hash)
    assert httpx.put(url, content=_tar({"app.txt": b"planted"})).status_code == 200
    assert _run_build(server, attacker, template_id, build_id, spec)["status"] == "ready"

    logs: list[str] = []
    Template.build(
        template, alias="mine", on_build_logs=lambda e: logs.append(e.message), **_params(server)
    )
    assert not any("CACHED" in line for line in logs), logs
    with Sandbox.create("mine", **_params(server)) as sbx:
        assert sbx.files.read("/home/user/app.txt") == mine
    # The key's own second build still uses its cache and skips the upload.
    again: list[str] = []
    Template.build(
        template, alias="mine", on_build_logs=lambda e: again.append(e.message), **_params(server)
    )
    assert any("CACHED" in line for line in again), again
    assert any("Skipping upload" in line for line in again), again


@pytest.fixture
def capped(server: BilikServer) -> BilikServer:
    """A server whose uploads are capped at 1 MiB each and 2 MiB a key."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("BILIK_MAX_UPLOAD_MB", "1")
        env.setenv("BILIK_MAX_UPLOADS_MB", "2")
        server.start()
    return server


def test_uploads_are_capped_and_their_links_used_once(capped: BilikServer, keys: list[str]) -> None:
    server = capped
    template_id, _ = _request_build(server, server.key, "uploads")
    files = DATA / "template-files" / template_id

    def kept() -> list[Path]:
        return sorted(p for p in files.rglob("*") if p.is_file())

    before = kept()
    # Over the cap for one file: refused as JSON, and nothing of it is kept.
    url = _upload_url(server, server.key, template_id, "a" * 64)
    response = httpx.put(url, content=os.urandom(3 << 19))
    assert response.status_code == 413, response.text
    assert response.json()["code"] == 413 and "MiB" in response.json()["message"]
    assert kept() == before
    _upload_url(server, server.key, template_id, "a" * 64)  # (still not present)

    # Within it: kept, once; the same link again is refused.
    url = _upload_url(server, server.key, template_id, "b" * 64)
    assert httpx.put(url, content=_tar({"f": b"x" * 1000})).status_code == 200
    again = httpx.put(url, content=_tar({"f": b"y" * 1000}))
    assert again.status_code == 403 and again.json()["code"] == 403, again.text
    # A link made for one hash names no other.
    url = _upload_url(server, server.key, template_id, "c" * 64)
    forged = url.replace("c" * 64, "d" * 64)
    assert httpx.put(forged, content=b"z").status_code == 403

    # The key's total: two files of 0.9 MiB fit in 2 MiB, a third does not.
    for n, files_hash in enumerate(("c" * 64, "e" * 64, "f" * 64)):
        url = _upload_url(server, server.key, template_id, files_hash)
        response = httpx.put(url, content=os.urandom(900 << 10))
        assert response.status_code == (413 if n == 2 else 200), response.text
    assert "per key" in response.json()["message"]
    present = httpx.get(
        f"{server.url}/templates/{template_id}/files/{'f' * 64}", headers=_headers(server.key)
    ).json()["present"]
    assert present is False
    # A template's files go with it (and free the key's room).
    httpx.delete(f"{server.url}/templates/{template_id}", headers=_headers(server.key))
    assert kept() == before


def test_a_step_that_prints_100_mb_keeps_the_server_and_its_log_small(
    server: BilikServer, keys: list[str]
) -> None:
    server.start()
    baseline = server.peak_rss_kib()
    template = (
        Template()
        .from_base_image()
        .run_cmd(f"head -c 100000000 /dev/zero | tr '\\0' x | fold -w 200; echo {uuid.uuid4()}")
    )
    logs: list[str] = []
    info = Template.build(
        template, alias="chatty", on_build_logs=lambda e: logs.append(e.message), **_params(server)
    )
    grown_mib = (server.peak_rss_kib() - baseline) / 1024
    assert grown_mib < 64, f"the server grew by {grown_mib:.0f} MiB"
    log_file = DATA / "builds" / f"{info.build_id}.jsonl"
    assert log_file.stat().st_size < 12 << 20, log_file.stat().st_size
    # Its log still streams to the SDK, says it was cut, and goes on to the end of the build.
    assert any("log truncated" in line for line in logs), logs[-5:]
    assert any("Build finished" in line for line in logs), logs[-5:]


def test_a_keys_layers_are_capped(server: BilikServer, keys: list[str]) -> None:
    """Each RUN step keeps a layer on the host's disk: one key's templates, and its builds'
    layers not yet collected (a failed build's too), keep at most BILIK_MAX_LAYERS_MB of
    layers no other image shares (here 3 MiB)."""
    server.extra_env["BILIK_MAX_LAYERS_MB"] = "3"
    server.start()

    def build(name: str, size: int) -> dict[str, Any]:
        template_id, build_id = _request_build(server, server.key, name)
        # (a command of its own each run: a layer cached from an earlier run is made by none)
        command = f"head -c {size} /dev/urandom > /home/user/{name}-{uuid.uuid4().hex}.bin"
        spec = {"fromTemplate": "base", "steps": [{"type": "RUN", "args": [command]}]}
        return _run_build(server, server.key, template_id, build_id, spec)

    assert build("kept", 2 << 20)["status"] == "ready"
    over = build("over", 2 << 20)
    assert over["status"] == "error"
    assert "layer storage cap" in over["reason"]["message"]
    # The failed build's layer is on the host's disk all the same: it counts until collected,
    # and what the key keeps now refuses the next build before it starts.
    refused = build("refused", 1000)
    assert refused["status"] == "error"
    assert "keep 4 MiB of layers" in refused["reason"]["message"]
