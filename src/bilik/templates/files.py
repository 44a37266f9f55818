"""Files a template's COPY steps upload, kept by the hash the SDK computes over them.

The SDK asks whether a hash is present; if not, it PUTs a tar (gzipped or not: it does not
say) to a URL it calls without the API key, so the URL carries its own proof: an HMAC, made
with a secret of this installation, over the template, the hash and an expiry.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import shutil
import time
from pathlib import Path

UPLOAD_URL_TTL_S = 3600
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


class BadUpload(ValueError):
    pass


class FileStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "template-files"
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        secret_file = data_dir / "upload-secret"
        if not secret_file.exists():
            fd = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        self._secret = secret_file.read_text().strip().encode()

    @staticmethod
    def check_hash(files_hash: str) -> None:
        if not _HASH_RE.match(files_hash):
            raise BadUpload(f"files hash {files_hash!r} is not a SHA-256 in hex")

    def path(self, template_id: str, files_hash: str) -> Path:
        self.check_hash(files_hash)
        return self.root / template_id / files_hash

    def present(self, template_id: str, files_hash: str) -> bool:
        return self.path(template_id, files_hash).is_file()

    def upload_token(self, template_id: str, files_hash: str) -> str:
        expires = int(time.time()) + UPLOAD_URL_TTL_S
        message = f"{template_id}.{files_hash}.{expires}"
        mac = hmac.new(self._secret, message.encode(), hashlib.sha256).hexdigest()
        return f"{message}.{mac}"

    def redeem(self, token: str) -> tuple[str, str]:
        """The template and hash an upload token is good for; BadUpload if it is not."""
        parts = token.split(".")
        if len(parts) != 4:
            raise BadUpload("malformed upload token")
        template_id, files_hash, expires, mac = parts
        message = f"{template_id}.{files_hash}.{expires}"
        want = hmac.new(self._secret, message.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(mac, want):
            raise BadUpload("upload token does not verify")
        if not expires.isdigit() or int(expires) < time.time():
            raise BadUpload("upload token has expired")
        self.check_hash(files_hash)
        return template_id, files_hash

    def receiving(self, template_id: str, files_hash: str) -> Path:
        """Where an upload is written before :meth:`keep` makes it present."""
        directory = self.root / template_id
        directory.mkdir(exist_ok=True)
        return directory / f".{files_hash}.{secrets.token_hex(4)}"

    def forget(self, template_id: str) -> None:
        """Drop every file uploaded for a template that is deleted."""
        shutil.rmtree(self.root / template_id, ignore_errors=True)

    def keep(self, partial: Path, template_id: str, files_hash: str) -> None:
        os.replace(partial, self.path(template_id, files_hash))
