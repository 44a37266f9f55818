"""The host's package-index settings, carried into template builds that install packages.

Packages come from the machine's configured sources: pip's index URLs (and the CA bundle pip
trusts for them, which may hold a local mirror's certificate) go into the image as
``/etc/pip.conf``. Only http(s) indexes travel: a ``file://`` index is the host's alone.

The image is every sandbox's, so no credential goes into it: an index URL loses its user and
password (``https://user:secret@host/simple`` becomes ``https://host/simple``) and its query
and fragment (where tokens hide; the simple index API uses neither), and the CA bundle carries
certificates only, never a private key. Each removal is logged. An index that needs
credentials therefore refuses the builds' installs: let the build sandboxes' address reach it
without them, or mirror it; the host's credentials (in URLs, netrc or a keyring) stay on the
host.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import subprocess
import sys
import tarfile
import urllib.parse
from pathlib import Path

CA_IN_IMAGE = "/etc/bilik/host-ca.crt"
# A CA bundle larger than this is no CA bundle (Debian's whole store is about 200 KiB).
MAX_CA_BYTES = 8 << 20
_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.S)

log = logging.getLogger("bilik.templates")


def _pip_settings() -> dict[str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    )
    found = {}
    for line in proc.stdout.splitlines():
        name, _, value = line.partition("=")
        found[name.split(".", 1)[-1]] = value.strip().strip("'")
    return found


def image_url(url: str) -> str | None:
    """``url`` as it may go into an image: http(s) only, with no user, password, query or
    fragment (None for any other URL)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    removed = [
        what
        for what, there in (
            ("credentials", "@" in parts.netloc),
            ("query", bool(parts.query)),
            ("fragment", bool(parts.fragment)),
        )
        if there
    ]
    if not removed:
        return url
    host = parts.hostname
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    clean = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    # (the URL without them: what was removed is never logged either)
    log.warning("pip index %s: its %s are kept out of images", clean, ", ".join(removed))
    return clean


def _ca_bundle(path: Path) -> bytes | None:
    """The CA bundle at ``path`` as it may go into an image: certificates only."""
    try:
        if path.stat().st_size > MAX_CA_BYTES:
            log.warning("pip's CA bundle %s is over %d bytes: not copied", path, MAX_CA_BYTES)
            return None
        data = path.read_bytes()
    except OSError:
        return None
    certificates = _CERTIFICATE.findall(data)
    if b"PRIVATE KEY" not in data:
        return data if certificates else None
    log.warning("pip's CA bundle %s holds a private key: only its certificates are copied", path)
    return b"\n".join(certificates) + b"\n" if certificates else None


def pip_bundle() -> bytes:
    """A tar of ``pip-settings/etc/pip.conf`` (and the CA bundle it names)."""
    settings = _pip_settings()
    indexes = [
        clean
        for key in ("index-url", "extra-index-url")
        for url in settings.get(key, "").split()
        if url.startswith(("http://", "https://")) and (clean := image_url(url))
    ]
    lines = ["[global]"]
    if indexes:
        lines.append(f"index-url = {indexes[0]}")
        if indexes[1:]:
            lines.append(f"extra-index-url = {' '.join(indexes[1:])}")
    cert = settings.get("cert") or os.environ.get("PIP_CERT", "")
    files: dict[str, bytes] = {}
    ca = _ca_bundle(Path(cert)) if cert and Path(cert).is_file() else None
    if ca is not None:
        files["pip-settings" + CA_IN_IMAGE] = ca
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
