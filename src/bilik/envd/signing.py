"""Signed ``/files`` URLs: E2B's signature, and the checks that make it grant one thing only.

The signature is E2B's, computed client side by the official SDKs (so its format cannot
change): ``"v1_" + base64(sha256("path:operation:username:token[:expiration]"))``, unpadded.
The fields are joined with ``:``, which the path may contain. The encoding is still
unambiguous because of what is accepted: read from the right, the string is the expiration
(present exactly when the query names one, and then 1 to 12 ASCII digits, no leading zero),
the token (envd's own, hex: no ``:``), the username (a valid user name, which has no ``:``;
anything else is refused), the operation (fixed by the method), and the rest, which is the path.
So one string belongs to at most one accepted (path, operation, username, expiration), and a
signature made for one grants no other. SHA-256 length extension cannot forge one either: a
signed string ends with the token or with the expiration after it, and whoever extends it does
not know the token, so cannot write it again; what is appended (glue padding that starts with
byte 0x80, then a suffix) could only be read as part of an expiration, and an expiration of
anything but digits is refused (the 0x80 after an ASCII digit is not even UTF-8). Query
parameters are decoded strictly (UTF-8, percent-encoding) and any signed one given twice is
refused, so every reader of the URL sees the same fields.

envd checks signatures; the server's sandbox plane checks them too, to route a signed URL (which
names no sandbox) to the sandbox whose token made it, with these same functions (stdlib only).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
import urllib.parse

from .users import valid_name

UNAUTHORIZED = (
    "unauthorized access, please provide a valid access token or method signing if supported"
)
# A Unix time, as the SDKs write it (str of an int): ASCII digits, no sign, no leading zero.
EXPIRATION = re.compile(r"0|[1-9][0-9]{0,11}")
# The query parameters a signed URL is made of: each may appear once.
SIGNED_FIELDS = ("path", "username", "signature", "signature_expiration")


def signature(path: str, operation: str, user: str, token: str, expiration: str | None) -> str:
    """E2B's file URL signature (``e2b.sandbox.signature.get_signature``)."""
    raw = f"{path}:{operation}:{user}:{token}" + (f":{expiration}" if expiration else "")
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode()


def parse_query(raw: bytes) -> dict[str, str]:
    """The query's parameters, decoded strictly; ValueError for anything unclear."""
    pairs = urllib.parse.parse_qsl(raw.decode(), keep_blank_values=True, errors="strict")
    found: dict[str, str] = {}
    for name, value in pairs:
        if name in found and name in SIGNED_FIELDS:
            raise ValueError(f"the query parameter {name!r} is given more than once")
        found[name] = value
    return found


def malformed(query: dict[str, str]) -> str | None:
    """Why the signed fields of ``query`` can be no signed URL's, or None."""
    if not query.get("signature"):
        return UNAUTHORIZED
    username = query.get("username", "")
    if username and not valid_name(username):
        return "the signed username is not a user name"
    expiration = query.get("signature_expiration")
    if expiration is not None and not EXPIRATION.fullmatch(expiration):
        return "the signature expiration is not a Unix time"
    return None


def signed_with(query: dict[str, str], operation: str, token: str) -> bool:
    """Whether ``token`` signed ``query`` (whose fields passed :func:`malformed`) for
    ``operation``, expired or not."""
    want = signature(
        query.get("path", ""),
        operation,
        query.get("username", ""),
        token,
        query.get("signature_expiration"),
    )
    return hmac.compare_digest(query.get("signature", "").encode(), want.encode())


def signature_problem(query: dict[str, str], operation: str, token: str) -> str | None:
    """Why a signed ``/files`` request for ``operation`` is refused, or None when it is not."""
    if problem := malformed(query):
        return problem
    if not signed_with(query, operation, token):
        return UNAUTHORIZED
    expiration = query.get("signature_expiration")
    if expiration is not None and int(expiration) < time.time():
        return "signature is already expired"
    return None
