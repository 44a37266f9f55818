"""envd's files, as a tenant's signed URL or SDK call reaches them: every file operation acts as
the user it is made for, and a signed URL grants only what was signed.

The attacks: envd did everything as the sandbox's root, so a URL signed for the default user
read a root-only 0600 file through a symlink at the signed path; a URL signed to write one file
wrote a second multipart part wherever its file name said (``/etc``), as whatever user an
unsigned ``Authorization: Basic root:`` header named; and the signed fields were parsed
loosely (a username with ``:``, an expiration in any script's digits). Each runs under both
OCI runtimes: credentials are the kernel's, and gVisor's kernel is another one.
"""

from __future__ import annotations

import base64
import hashlib
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from e2b import Sandbox, SandboxException

from bilik.runtime.backends import RUNTIMES
from server import BilikServer

SECRET = "root-only secret"
DENIED = r"(?i)permission"  # how the SDK's exception tells a refusal by the kernel


class _Server(BilikServer):
    """A server whose sandboxes run under one OCI runtime."""

    def __init__(self, oci_runtime: str) -> None:
        super().__init__()
        self.oci_runtime = oci_runtime

    def env(self) -> dict[str, str]:
        return {**super().env(), "BILIK_OCI_RUNTIME": self.oci_runtime}


@pytest.fixture(scope="module", params=RUNTIMES)
def srv(request: pytest.FixtureRequest) -> Iterator[BilikServer]:
    server = _Server(request.param)
    server.start()
    yield server
    server.finish()


@pytest.fixture(scope="module")
def sbx(srv: BilikServer) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(
        "base", secure=True, timeout=600, api_key=srv.key, api_url=srv.url, sandbox_url=srv.url
    )
    # A root-only file, a link to it where the user's own files are, and root's own corner.
    sandbox.commands.run(
        f"printf '{SECRET}' > /opt/secret.txt && chmod 600 /opt/secret.txt"
        " && ln -s /opt/secret.txt /home/user/link.txt && chown -h user:user /home/user/link.txt"
        " && ln -s /etc /home/user/etc-link && chown -h user:user /home/user/etc-link"
        " && mkdir -m 700 /opt/private && echo x > /opt/private/inner.txt",
        user="root",
    )
    yield sandbox
    sandbox.kill()


def _exists(sbx: Sandbox, path: str) -> bool:
    return sbx.commands.run(f"test -e {path} && echo yes || true", user="root").stdout == "yes\n"


def _refused(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert SECRET not in response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == status and body["message"]
    return body


def _with_query(url: str, **changes: str) -> str:
    """``url`` with query parameters replaced (an attacker's edit of a signed URL)."""
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    query.update(changes)
    encoded = urllib.parse.urlencode(query, quote_via=urllib.parse.quote)
    return parts._replace(query=encoded).geturl()


def _basic(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:".encode()).decode()}


def test_a_signed_url_reads_only_what_its_user_may(sbx: Sandbox) -> None:
    for user in (None, "user"):  # the default user (signed as "") and the user by name
        for path in ("/home/user/link.txt", "/opt/secret.txt", "/opt/private/inner.txt"):
            url = sbx.download_url(path, user=user, use_signature_expiration=60)
            _refused(httpx.get(url), 403)
            # An unsigned header naming root changes nothing: the signed user is the user.
            _refused(httpx.get(url, headers=_basic("root")), 403)
    # Root still reads everything, through the link too.
    for path in ("/home/user/link.txt", "/opt/secret.txt"):
        assert httpx.get(sbx.download_url(path, user="root")).text == SECRET
    # The SDK's own calls, as the user and as root.
    with pytest.raises(SandboxException, match=DENIED):
        sbx.files.read("/home/user/link.txt")
    with pytest.raises(SandboxException, match=DENIED):
        sbx.files.read("/opt/secret.txt", user="user")
    assert sbx.files.read("/home/user/link.txt", user="root") == SECRET


def test_every_file_operation_acts_as_its_user(sbx: Sandbox) -> None:
    """The Filesystem service too: what the user may not do, envd does not do for it."""
    with pytest.raises(SandboxException, match=DENIED):
        sbx.files.list("/opt/private")
    with pytest.raises(SandboxException, match=DENIED):
        sbx.files.get_info("/opt/private/inner.txt")
    with pytest.raises(SandboxException, match=DENIED):
        sbx.files.make_dir("/opt/made-by-user")
    with pytest.raises(SandboxException, match=DENIED):
        sbx.files.rename("/opt/secret.txt", "/home/user/stolen.txt")
    with pytest.raises(SandboxException, match=DENIED):
        sbx.files.remove("/opt/secret.txt")
    with pytest.raises(SandboxException, match=DENIED):
        sbx.files.write("/etc/written-by-user", "x")
    with pytest.raises(SandboxException, match=DENIED):
        sbx.files.write("/home/user/etc-link/written-by-user", "x")  # through a link
    with pytest.raises(SandboxException, match=DENIED):
        sbx.files.watch_dir("/opt/private")
    for path in ("/opt/made-by-user", "/home/user/stolen.txt", "/etc/written-by-user"):
        assert not _exists(sbx, path), path
    assert _exists(sbx, "/opt/secret.txt")
    # Root may do all of it.
    assert [e.name for e in sbx.files.list("/opt/private", user="root")] == ["inner.txt"]
    assert sbx.files.make_dir("/opt/made-by-root", user="root")
    assert sbx.files.get_info("/opt/made-by-root", user="root").owner == "root"
    sbx.files.remove("/opt/made-by-root", user="root")


def test_a_signed_upload_writes_its_one_path_as_its_user(sbx: Sandbox) -> None:
    allowed = "/home/user/allowed.txt"
    url = sbx.upload_url(allowed, use_signature_expiration=60)
    # A second part aimed at /etc, and a header naming root: refused whole, nothing written.
    two_parts = [("file", ("allowed.txt", b"ok")), ("file", ("/etc/rv_pwned", b"pwned"))]
    _refused(httpx.post(url, files=two_parts, headers=_basic("root")), 400)
    # One part whose file name is another path; a part that is not the file.
    _refused(httpx.post(url, files=[("file", ("/etc/rv_pwned", b"pwned"))]), 400)
    other = [("note", ("note.txt", b"n")), ("file", ("allowed.txt", b"ok"))]
    _refused(httpx.post(url, files=other), 400)
    for path in ("/etc/rv_pwned", allowed, "/home/user/note.txt"):
        assert not _exists(sbx, path), path
    # The one file, to the signed path, as the signed user whatever the header says.
    done = httpx.post(url, files={"file": ("allowed.txt", b"ok")}, headers=_basic("root"))
    assert done.status_code == 200, done.text
    assert [entry["path"] for entry in done.json()] == [allowed]
    assert sbx.files.read(allowed) == "ok"
    assert sbx.files.get_info(allowed).owner == "user"
    # A signed path that leads, through a link, where the user may not write.
    through = sbx.upload_url("/home/user/etc-link/rv_pwned")
    _refused(httpx.post(through, files={"file": ("rv_pwned", b"pwned")}), 403)
    assert not _exists(sbx, "/etc/rv_pwned")


def test_tampered_signed_fields_are_refused(sbx: Sandbox) -> None:
    token = sbx._envd_access_token
    assert token
    # The fields are joined with ':', so a path with ':' signed for the default user would
    # verify for another path and the "user" 'root:read:' as well: such a name is no user.
    url = sbx.download_url("/opt/secret.txt:read:root", use_signature_expiration=60)
    forged = _with_query(url, path="/opt/secret.txt", username="root:read:")
    # (Named to its sandbox, the URL reaches envd, which refuses it; unnamed, the plane finds
    # no sandbox it was signed for.)
    to_envd = {"E2b-Sandbox-Id": sbx.sandbox_id}
    assert "not a user name" in _refused(httpx.get(forged, headers=to_envd), 401)["message"]
    _refused(httpx.get(forged), 404)
    # An expiration must be the SDK's: ASCII digits. Even correctly signed (by a client
    # holding the token), digits of another script are no Unix time.
    later = str(int(time.time()) + 600)
    for expiration in ("".join(chr(0x0660 + int(d)) for d in later), f"+{later}", f"{later}.0"):
        raw = f"/opt/secret.txt:read:root:{token}:{expiration}"
        digest = base64.b64encode(hashlib.sha256(raw.encode()).digest()).rstrip(b"=").decode()
        signed = _with_query(
            sbx.download_url("/opt/secret.txt", user="root"),
            signature=f"v1_{digest}",
            signature_expiration=expiration,
        )
        _refused(httpx.get(signed, headers=to_envd), 401)
        _refused(httpx.get(signed), 404)
    # What a signed URL names appears once: a second path is refused, not chosen between
    # (by envd; the plane, finding no sandbox the URL was signed for, may not get that far).
    url = sbx.download_url("/home/user/allowed-read.txt", user="root")
    twice = httpx.get(url + "&path=%2Fopt%2Fsecret.txt")
    _refused(twice, twice.status_code)
    assert twice.status_code in (400, 401, 404)


def test_the_sdks_files_still_work_as_user_and_root(sbx: Sandbox) -> None:
    info = sbx.files.write("notes/mine.txt", "mine")
    assert info.path == "/home/user/notes/mine.txt"
    assert sbx.files.read("notes/mine.txt") == "mine"
    entry = sbx.files.get_info("/home/user/notes")
    assert (entry.owner, entry.group) == ("user", "user")
    sbx.files.write("/root/theirs.txt", "theirs", user="root")
    assert sbx.files.read("/root/theirs.txt", user="root") == "theirs"
    assert sbx.files.get_info("/root/theirs.txt", user="root").owner == "root"
    infos = sbx.files.write_files(
        [{"path": "/tmp/many/a.txt", "data": "A"}, {"path": "/tmp/many/b.txt", "data": "B"}]
    )
    assert [i.path for i in infos] == ["/tmp/many/a.txt", "/tmp/many/b.txt"]
    assert sbx.files.get_info("/tmp/many/b.txt").owner == "user"
    moved = sbx.files.rename("/tmp/many/a.txt", "/tmp/many/sub/a.txt")
    assert sbx.files.read(moved.path) == "A"
    assert sorted(e.name for e in sbx.files.list("/tmp/many")) == ["b.txt", "sub"]
    sbx.files.remove("/tmp/many")
    assert not sbx.files.exists("/tmp/many")
    # A watch as the user sees what the user does, below it too.
    sbx.files.make_dir("/home/user/watched")
    handle = sbx.files.watch_dir("/home/user/watched", recursive=True)
    try:
        sbx.files.make_dir("/home/user/watched/sub")
        sbx.files.write("/home/user/watched/sub/inner.txt", "w")
        names: set[str] = set()
        deadline = time.monotonic() + 10
        while "sub/inner.txt" not in names and time.monotonic() < deadline:
            names |= {e.name for e in handle.get_new_events()}
            time.sleep(0.1)
        assert {"sub", "sub/inner.txt"} <= names
    finally:
        handle.stop()
    # Signed URLs, both ways, for the default user.
    upload = sbx.upload_url("/home/user/via-url.txt")
    assert httpx.post(upload, files={"file": ("via-url.txt", b"up")}).status_code == 200
    assert httpx.get(sbx.download_url("/home/user/via-url.txt")).text == "up"
