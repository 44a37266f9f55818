"""A real OCI registry for the tests (Debian's docker-registry) on loopback, and a small image
pushed to it: busybox, a data file, an environment variable and a working directory."""

from __future__ import annotations

import contextlib
import crypt  # bcrypt for the registry's htpasswd (glibc's libxcrypt has it)
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

USER, PASSWORD = "robot", "s3cret-pass"
# What GCR and Artifact Registry take (user ``_json_key``, a service account key as the password),
# and what ECR's pull tokens stand for (user ``AWS``). The registry's htpasswd is bcrypt, which
# reads 72 bytes of a password: the test key is shorter, so every byte of it counts.
GCP_USER, GCP_SECRET = "_json_key", "pk-8c2b77a1"
# (Spaced as json.dumps spaces it: E2B's SDK sends a key given as a dict that way.)
GCP_KEY = json.dumps({"type": "service_account", "private_key": GCP_SECRET})
ECR_USER, ECR_PASSWORD = "AWS", "ecr-pull-token-0f3a9c"
assert len(GCP_KEY.encode()) <= 72


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def image_layout(root: Path, data: str = "from the registry\n", name: str = "layout") -> Path:
    """An OCI layout under ``root``: busybox, ``/srv/data.txt`` holding ``data``, an env and
    a workdir (the test image, or another like it)."""
    layout = root / name
    bundle = root / f"{name}-bundle"
    _run("umoci", "init", "--layout", str(layout))
    _run("umoci", "new", "--image", f"{layout}:v1")
    _run("umoci", "unpack", "--image", f"{layout}:v1", str(bundle))
    rootfs = bundle / "rootfs"
    (rootfs / "bin").mkdir()
    shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")
    (rootfs / "bin" / "sh").symlink_to("busybox")
    (rootfs / "srv").mkdir()
    (rootfs / "srv" / "data.txt").write_text(data)
    _run("umoci", "repack", "--image", f"{layout}:v1", str(bundle))
    _run(
        "umoci", "config", "--image", f"{layout}:v1",
        "--config.env", "GREETING=hi-from-registry", "--config.workingdir", "/srv",
    )  # fmt: skip
    return layout


@contextlib.contextmanager
def registry(*, auth: bool) -> Iterator[str]:
    """Start a registry, push the test image as ``test/tiny:v1``; yields ``127.0.0.1:PORT``.
    With ``auth``, it lets in :data:`USER`, :data:`GCP_USER` and :data:`ECR_USER`."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        port = _free_port()
        config = [
            "version: 0.1",
            "log:",
            "  level: error",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {root / 'storage'}",
            "http:",
            f"  addr: 127.0.0.1:{port}",
        ]
        if auth:
            users = {USER: PASSWORD, GCP_USER: GCP_KEY, ECR_USER: ECR_PASSWORD}
            (root / "htpasswd").write_text(
                "".join(
                    f"{user}:{crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))}\n"
                    for user, password in users.items()
                )
            )
            config += ["auth:", "  htpasswd:", "    realm: tests", f"    path: {root / 'htpasswd'}"]
        (root / "config.yml").write_text("\n".join(config) + "\n")
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(root / "config.yml")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                    break
                assert time.monotonic() < deadline, "the test registry did not start"
                time.sleep(0.1)
            address = f"127.0.0.1:{port}"
            creds = ["--dest-creds", f"{USER}:{PASSWORD}"] if auth else []
            _run(
                "skopeo", "copy", "--dest-tls-verify=false", *creds,
                f"oci:{image_layout(root)}:v1", f"docker://{address}/test/tiny:v1",
            )  # fmt: skip
            yield address
        finally:
            proc.kill()
            proc.wait()
