"""Files a template's COPY steps upload: each in its template's own scope, known by the hash
this server computed over it.

The SDK names an upload by a hash it computes itself (``filesHash``): here that is only the
name of a slot of one template, and so of one key (a template is its key's). What the slot
holds is the SHA-256 of the content as this server received it, and the content lies beside
it under that hash (``blobs/<sha256>``, never changed once there). A COPY layer's cache key
is made of the server's hash, never the client's: two keys share a layer only when their
files are the same bytes, and a key that uploads other bytes under someone's ``filesHash``
changes only its own slot.

The SDK PUTs the files to a URL it calls without the API key, so the URL carries its own
proof: an HMAC, made with a secret of this installation, over the key, the template, the
slot, an expiry and a nonce. A URL is good for one upload (its nonce is spent on use), and an
upload is capped per file and per key in total.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..runtime.fsutil import write_bytes_atomic

UPLOAD_URL_TTL_S = 3600
# Read (and thrown away) after an upload is refused, so the client hears why before the
# connection closes; a larger body is cut off.
DRAIN_BYTES = 16 << 20
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
# A scope: a template's id, or the image name of one of bilik's own templates.
_SCOPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
BLOBS = "blobs"
SPENT = ".spent"


class BadUpload(ValueError):
    pass


class TooLarge(BadUpload):
    """An upload over a cap (per file or per key)."""


@dataclasses.dataclass(frozen=True)
class Grant:
    """What one upload URL lets its holder do: fill one slot of one template of one key."""

    key_id: str
    template_id: str
    files_hash: str


class FileStore:
    def __init__(
        self,
        data_dir: Path,
        *,
        max_file_bytes: int | None = None,
        max_key_bytes: int | None = None,
    ) -> None:
        self.root = data_dir / "template-files"
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        (self.root / SPENT).mkdir(exist_ok=True)
        self.max_file_bytes = max_file_bytes
        self.max_key_bytes = max_key_bytes
        self._key_locks: dict[str, asyncio.Lock] = {}
        self._pruned_at = 0.0
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

    def _scope(self, scope: str) -> Path:
        if not _SCOPE_RE.match(scope):
            raise BadUpload(f"{scope!r} is not a template")
        return self.root / scope

    def _slot(self, scope: str, files_hash: str) -> Path:
        self.check_hash(files_hash)
        return self._scope(scope) / files_hash

    def digest(self, scope: str, files_hash: str) -> str | None:
        """The server's hash of the files in ``scope``'s slot ``files_hash``; None if none."""
        try:
            with open(self._slot(scope, files_hash), "rb") as f:
                digest = f.read(65).decode(errors="replace").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not _HASH_RE.match(digest) or not self.blob(scope, digest).is_file():
            return None
        return digest

    def blob(self, scope: str, digest: str) -> Path:
        """The files whose hash (the server's) is ``digest``."""
        self.check_hash(digest)
        return self._scope(scope) / BLOBS / digest

    def present(self, scope: str, files_hash: str) -> bool:
        return self.digest(scope, files_hash) is not None

    def put(self, scope: str, files_hash: str, data: bytes) -> None:
        """Keep ``data`` in the slot (the host's own files: bilik's templates)."""
        partial = self._partial(scope)
        try:
            partial.write_bytes(data)
            self._keep(partial, scope, files_hash, hashlib.sha256(data).hexdigest())
        finally:
            partial.unlink(missing_ok=True)

    # -- upload URLs ------------------------------------------------------------------------

    def _mac(self, message: str) -> str:
        return hmac.new(self._secret, message.encode(), hashlib.sha256).hexdigest()

    def upload_token(self, key_id: str, template_id: str, files_hash: str) -> str:
        """A token for one upload of ``files_hash``'s files to the key's template."""
        if not _ID_RE.match(key_id) or not _ID_RE.match(template_id):
            raise BadUpload("not a key and template")
        self.check_hash(files_hash)
        expires = int(time.time()) + UPLOAD_URL_TTL_S
        message = f"{key_id}.{template_id}.{files_hash}.{expires}.{secrets.token_hex(16)}"
        return f"{message}.{self._mac(message)}"

    def redeem(self, token: str) -> Grant:
        """What an upload token is good for, spending it; BadUpload if it is not good (forged,
        expired, or used already)."""
        parts = token.split(".")
        if len(parts) != 6:
            raise BadUpload("malformed upload token")
        key_id, template_id, files_hash, expires, nonce, mac = parts
        message = ".".join(parts[:5])
        if not hmac.compare_digest(mac, self._mac(message)):
            raise BadUpload("upload token does not verify")
        if not expires.isdigit() or int(expires) < time.time():
            raise BadUpload("upload token has expired")
        self._prune_spent()
        try:  # (a file, so a token stays spent across a restart of the server)
            os.close(os.open(self.root / SPENT / nonce, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            raise BadUpload("this upload URL was used already; ask for a new one") from None
        return Grant(key_id, template_id, files_hash)

    def _prune_spent(self) -> None:
        """Forget spent tokens that have expired anyway (at most once a minute)."""
        now = time.time()
        if now - self._pruned_at < 60:
            return
        self._pruned_at = now
        for entry in os.scandir(self.root / SPENT):
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < now - UPLOAD_URL_TTL_S - 60:
                    os.unlink(entry.path)

    # -- receiving ----------------------------------------------------------------------------

    def used(self, scopes: list[str]) -> int:
        """Bytes the files of these scopes (a key's templates) take."""
        total = 0
        for scope in scopes:
            with contextlib.suppress(FileNotFoundError, BadUpload):
                for entry in os.scandir(self._scope(scope) / BLOBS):
                    total += entry.stat(follow_symlinks=False).st_size
        return total

    def key_lock(self, key_id: str) -> asyncio.Lock:
        """Held by a key's upload while it is received: one at a time per key, so what its
        files take is known while it is counted against its cap."""
        return self._key_locks.setdefault(key_id, asyncio.Lock())

    @contextlib.contextmanager
    def receiving(self, grant: Grant, key_scopes: list[str]) -> Iterator[Receiver]:
        """A receiver for the grant's upload, kept when the block ends without an error
        (called with :meth:`key_lock` held). ``key_scopes``: the key's templates, whose
        files count against its cap."""
        room = None
        if self.max_key_bytes is not None:
            room = max(0, self.max_key_bytes - self.used(key_scopes))
        partial = self._partial(grant.template_id)
        try:
            with open(partial, "wb") as f:
                receiver = Receiver(f, self.max_file_bytes, room)
                yield receiver
            self._keep(partial, grant.template_id, grant.files_hash, receiver.hash.hexdigest())
        finally:
            partial.unlink(missing_ok=True)

    def _partial(self, scope: str) -> Path:
        directory = self._scope(scope) / BLOBS
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f".partial-{secrets.token_hex(8)}"

    def _keep(self, partial: Path, scope: str, files_hash: str, digest: str) -> None:
        """Make the received files the slot's: the blob first, then the slot names it (each
        one rename, so a build sees the old files or the new, never part of either)."""
        blob = self.blob(scope, digest)
        slot = self._slot(scope, files_hash)
        old = self.digest(scope, files_hash)
        os.replace(partial, blob)  # (the same bytes again: the same blob)
        write_bytes_atomic(slot, (digest + "\n").encode())
        if old is not None and old != digest and not self._named(scope, old):
            self.blob(scope, old).unlink(missing_ok=True)

    def _named(self, scope: str, digest: str) -> bool:
        """Whether any slot of ``scope`` holds ``digest``."""
        for entry in os.scandir(self._scope(scope)):
            if _HASH_RE.match(entry.name) and self.digest(scope, entry.name) == digest:
                return True
        return False

    def forget(self, template_id: str) -> None:
        """Drop every file uploaded for a template that is deleted."""
        with contextlib.suppress(BadUpload):
            shutil.rmtree(self._scope(template_id), ignore_errors=True)


class Receiver:
    """One upload as it arrives: written, hashed and counted; TooLarge past a cap."""

    def __init__(self, file: BinaryIO, max_bytes: int | None, room: int | None) -> None:
        self.file = file
        self.max_bytes = max_bytes
        self.room = room
        self.size = 0
        self.hash = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.check(self.size)
        self.hash.update(chunk)
        self.file.write(chunk)

    def check(self, size: int) -> None:
        """TooLarge if an upload of ``size`` bytes is over a cap."""
        if self.max_bytes is not None and size > self.max_bytes:
            raise TooLarge(f"an upload may be at most {_mib(self.max_bytes)} MiB")
        if self.room is not None and size > self.room:
            raise TooLarge(
                f"this key's uploads would take more than the {_mib(self.room)} MiB left of "
                "what it may keep (per key, over all its templates)"
            )


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g}"
