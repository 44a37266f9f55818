"""The host's package-index settings, carried into template builds that install packages.

Packages come from the machine's configured sources: pip's index URLs (and the CA bundle pip
trusts for them, which may hold a local mirror's certificate) go into the image as
``/etc/pip.conf``. Only http(s) indexes travel: a ``file://`` index is the host's alone.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

CA_IN_IMAGE = "/etc/bilik/host-ca.crt"


def _pip_settings() -> dict[str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    )
    found = {}
    for line in proc.stdout.splitlines():
        name, _, value = line.partition("=")
        found[name.split(".", 1)[-1]] = value.strip().strip("'")
    return found


def pip_bundle() -> bytes:
    """A tar of ``pip-settings/etc/pip.conf`` (and the CA bundle it names)."""
    settings = _pip_settings()
    indexes = [
        url
        for key in ("index-url", "extra-index-url")
        for url in settings.get(key, "").split()
        if url.startswith(("http://", "https://"))
    ]
    lines = ["[global]"]
    if indexes:
        lines.append(f"index-url = {indexes[0]}")
        if indexes[1:]:
            lines.append(f"extra-index-url = {' '.join(indexes[1:])}")
    cert = settings.get("cert") or os.environ.get("PIP_CERT", "")
    files: dict[str, bytes] = {}
    if cert and Path(cert).is_file():
        files["pip-settings" + CA_IN_IMAGE] = Path(cert).read_bytes()
        lines.append(f"cert = {CA_IN_IMAGE}")
    files["pip-settings/etc/pip.conf"] = ("\n".join(lines) + "\n").encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def bundle_hash(bundle: bytes) -> str:
    return hashlib.sha256(bundle).hexdigest()
