"""Registry images and package indexes: what a registry or the host's settings could plant in,
or leak into, the images sandboxes run on.

- A registry that answers the same tag differently to each request (or a digest with other
  content) must not plant content under the digest a build keyed on: the build gets exactly
  that digest's content, or fails.
- Only ``localhost`` and literal loopback addresses are reached without TLS; a name that
  merely starts like one is a remote host.
- The host's pip index credentials never go into an image.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import re
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import BuildException, Sandbox, Template

import registry
from bilik.runtime import registry_image
from bilik.runtime.errors import StepFailed
from bilik.templates import host_settings
from server import BilikServer

GOOD = "from the registry\n"  # what tests/registry.py's test/tiny:v1 holds
PLANTED = "planted by the registry\n"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _run(*argv: str) -> bytes:
    return subprocess.run(argv, check=True, capture_output=True).stdout


def _push_planted(address: str, root: Path) -> None:
    """Push ``test/tiny:evil``: the test image, but its ``/srv/data.txt`` says :data:`PLANTED`."""
    layout = registry.image_layout(root, PLANTED, name="evil")
    _run(
        "skopeo", "copy", "--dest-tls-verify=false",
        f"oci:{layout}:v1", f"docker://{address}/test/tiny:evil",
    )  # fmt: skip


def _manifest(address: str, tag: str) -> tuple[str, int]:
    raw = _run(
        "skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{address}/test/tiny:{tag}"
    )
    return "sha256:" + hashlib.sha256(raw).hexdigest(), len(raw)


def _push_index(address: str) -> str:
    """Push ``test/tiny:multi``, an index: the planted image first (for another architecture),
    then the good one for this machine's. Returns the good manifest's digest."""
    _, arch = registry_image.host_platform()
    other = "s390x" if arch != "s390x" else "riscv64"
    entries = []
    for tag, platform_arch in (("evil", other), ("v1", arch)):
        digest, size = _manifest(address, tag)
        entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest,
                "size": size,
                "platform": {"os": "linux", "architecture": platform_arch},
            }
        )
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    answer = httpx.put(
        f"http://{address}/v2/test/tiny/manifests/multi",
        content=json.dumps(index).encode(),
        headers={"Content-Type": OCI_INDEX},
    )
    assert answer.status_code == 201, answer.text
    return str(entries[1]["digest"])


class FickleRegistry(http.server.ThreadingHTTPServer):
    """A registry in front of the test registry that tells the truth to the first manifest
    request only. After it, a request for a tag is answered with ``test/tiny:evil``'s manifest
    (the tag "moved"); with ``lie``, so is a request for a digest."""

    def __init__(self, upstream: str, *, lie: bool) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.upstream, self.lie = upstream, lie
        self.honest = False  # (set: everything passes through)
        self.first_answered = False
        self.lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def target(self, method: str, path: str) -> str:
        asked = re.fullmatch(r"/v2/test/tiny/manifests/([^/?]+)", path)
        if not asked or self.honest:
            return path
        with self.lock:
            if not self.first_answered:
                self.first_answered = method == "GET"
                return path
        if asked.group(1).startswith("sha256:") and not self.lie:
            return path
        return "/v2/test/tiny/manifests/evil"


class _Forward(http.server.BaseHTTPRequestHandler):
    server: FickleRegistry
    _KEPT = ("content-type", "docker-content-digest", "docker-distribution-api-version", "location")

    def do_GET(self) -> None:
        self._forward()

    def do_HEAD(self) -> None:
        self._forward()

    def _forward(self) -> None:
        path = self.server.target(self.command, self.path)
        headers = [("Accept", value) for value in self.headers.get_all("Accept") or []]
        answer = httpx.request(
            self.command, f"http://{self.server.upstream}{path}", headers=headers
        )
        self.send_response(answer.status_code)
        for name, value in answer.headers.items():
            if name.lower() in self._KEPT:
                self.send_header(name, value)
        length = answer.headers.get("content-length", "0")
        self.send_header(
            "Content-Length", length if self.command == "HEAD" else str(len(answer.content))
        )
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer.content)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def fickle(upstream: str, *, lie: bool = False) -> Iterator[FickleRegistry]:
    proxy = FickleRegistry(upstream, lie=lie)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join()


@pytest.fixture(scope="module")
def images() -> Iterator[tuple[str, str, str]]:
    """The test registry with ``test/tiny:v1`` (good), ``:evil`` (planted) and ``:multi`` (an
    index): its address, the good manifest's digest, and the planted one's."""
    with registry.registry(auth=False) as address, tempfile.TemporaryDirectory() as scratch:
        _push_planted(address, Path(scratch))
        # The good image again, as a Docker v2 manifest (what most registries still serve).
        _run(
            "skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
            "--format", "v2s2", f"docker://{address}/test/tiny:v1",
            f"docker://{address}/test/tiny:docker",
        )  # fmt: skip
        good = _push_index(address)
        yield address, good, _manifest(address, "evil")[0]


@pytest.fixture(scope="module")
def built_server() -> Iterator[BilikServer]:
    srv = BilikServer()
    srv.start()
    yield srv
    headers = {"X-API-Key": srv.key}
    for template in httpx.get(f"{srv.url}/templates", headers=headers).json():
        httpx.delete(f"{srv.url}/templates/{template['templateID']}", headers=headers)
    srv.finish()


def _build(server: BilikServer, ref: str, name: str) -> list[str]:
    logs: list[str] = []
    Template.build(
        Template().from_image(ref).run_cmd("true"),
        alias=name,
        cpu_count=1,
        memory_mb=512,
        on_build_logs=lambda entry: logs.append(entry.message),
        api_key=server.key,
        api_url=server.url,
    )
    return logs


def _data(server: BilikServer, name: str) -> str:
    params = {"api_key": server.key, "api_url": server.url, "sandbox_url": server.url}
    with Sandbox.create(name, **params) as sbx:
        return str(sbx.files.read("/srv/data.txt"))


@pytest.mark.parametrize("tag", ["v1", "docker", "multi"], ids=["oci", "docker", "index"])
def test_a_tag_moved_between_requests_plants_nothing(
    built_server: BilikServer, images: tuple[str, str, str], tag: str
) -> None:
    """The registry answers the tag with the good image first, and with the planted one after:
    the build gets the good image, by the digest it resolved (for an index: this platform's
    manifest, not the other platform's planted one)."""
    address, good, _ = images
    with fickle(address) as proxy:
        logs = _build(built_server, f"{proxy.address}/test/tiny:{tag}", f"sec-moved-{tag}")
    assert _data(built_server, f"sec-moved-{tag}") == GOOD
    if tag != "docker":  # (its manifest is another, with the same content)
        assert any(f"test/tiny@{good}" in line for line in logs), logs


def test_a_registry_that_lies_about_a_digest_fails_the_build(
    built_server: BilikServer, images: tuple[str, str, str]
) -> None:
    """The registry answers the digest the build resolved with another manifest: the build
    fails, and nothing is kept under that digest (an honest pull afterwards gets the good
    image, not a cached planted one)."""
    address, good, _ = images
    with fickle(address, lie=True) as proxy:
        ref = f"{proxy.address}/test/tiny:v1"
        with pytest.raises(BuildException, match=r"(?i)digest|other content"):
            _build(built_server, ref, "sec-lied")
        proxy.honest = True
        logs = _build(built_server, ref, "sec-lied")
        assert not any("is cached" in line for line in logs), logs
        assert _data(built_server, "sec-lied") == GOOD
        # Pinned to the good digest, through the same registry name: the good image.
        _build(built_server, f"{proxy.address}/test/tiny@{good}", "sec-lied-pinned")
    assert _data(built_server, "sec-lied-pinned") == GOOD


@pytest.mark.parametrize(
    ("ref", "plain_http"),
    [
        ("localhost.example.com/img", False),
        ("localhost.example.com:5000/img", False),
        ("127.foo.com/img", False),
        ("127.0.0.1.nip.io/img", False),
        ("[::1].example.com/img", None),  # (no registry name at all)
        ("localhostx:5000/img", False),
        ("127.1:5000/img", False),
        ("docker.io/library/debian", False),
        ("debian", False),
        ("localhost/img", True),
        ("localhost:5000/img", True),
        ("127.0.0.1:5000/img", True),
        ("127.0.0.1/img", True),
        ("127.8.9.10:5000/img", True),
        ("[::1]:5000/img", True),
        ("[::1]/img", True),
    ],
)
def test_only_loopback_registries_go_without_tls(ref: str, plain_http: bool | None) -> None:
    if plain_http is None:
        with pytest.raises(StepFailed, match="not an image reference"):
            registry_image.Reference.parse(ref)
        return
    parsed = registry_image.Reference.parse(ref)
    assert parsed.insecure is plain_http, parsed
    # The name skopeo is given names the same registry that was judged.
    assert parsed.source().startswith(f"docker://{parsed.registry}/")


def test_localhost_by_name_is_still_pulled(
    built_server: BilikServer, images: tuple[str, str, str]
) -> None:
    """``localhost:PORT`` is a loopback registry: pulled over plain HTTP, as before."""
    address, _, _ = images
    port = address.rsplit(":", 1)[1]
    _build(built_server, f"localhost:{port}/test/tiny:v1", "sec-localhost")
    assert _data(built_server, "sec-localhost") == GOOD


def _pip_conf(bundle: bytes) -> str:
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        member = tar.extractfile("pip-settings/etc/pip.conf")
        assert member is not None
        return member.read().decode()


def test_pip_index_credentials_stay_out_of_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host's pip config names indexes with a user and password, and with a token in the
    query: the image's pip.conf has the indexes, without any of them."""
    config = tmp_path / "pip.conf"
    config.write_text(
        "[global]\n"
        "index-url = https://robot:s3cret-index-pass@pypi.example.test/simple\n"
        "extra-index-url = https://token-4f1c9e@extra.example.test/simple/?token=tok-9a8b7c#frag"
        " file:///opt/local/simple\n"
    )
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    bundle = host_settings.pip_bundle()
    conf = _pip_conf(bundle)
    for secret in ("s3cret-index-pass", "robot", "token-4f1c9e", "tok-9a8b7c", "frag", "@"):
        assert secret not in conf, conf
        assert secret.encode() not in bundle
    assert "index-url = https://pypi.example.test/simple\n" in conf, conf
    assert "extra-index-url = https://extra.example.test/simple/\n" in conf, conf
    assert "file://" not in conf


def test_pip_ca_bundle_carries_certificates_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``cert`` file that also holds a private key: only its certificates go in."""
    ca = Path("/etc/ssl/certs/ca-certificates.crt").read_bytes()
    first = ca[: ca.index(b"-----END CERTIFICATE-----") + len(b"-----END CERTIFICATE-----")]
    key = b"-----BEGIN PRIVATE KEY-----\nTUlJQ2VRSUJBREFO\n-----END PRIVATE KEY-----\n"
    mixed = tmp_path / "mixed.pem"
    mixed.write_bytes(key + first[first.index(b"-----BEGIN CERTIFICATE-----") :] + b"\n")
    config = tmp_path / "pip.conf"
    config.write_text(f"[global]\ncert = {mixed}\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    bundle = host_settings.pip_bundle()
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        member = tar.extractfile("pip-settings" + host_settings.CA_IN_IMAGE)
        assert member is not None
        copied = member.read()
    assert b"PRIVATE KEY" not in copied and b"BEGIN CERTIFICATE" in copied
