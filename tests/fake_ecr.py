"""ECR's API for the tests, on loopback: ``GetAuthorizationToken`` only.

It checks each call's AWS Signature Version 4 the way AWS does, recomputing the signature from
the request as it arrived and the secret it knows for the access key, and answers with a pull
token for the test registry's user ``AWS`` (``registry.ECR_USER``). The check is written here,
apart from the server's signing code, so the two cannot share a mistake.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import http.server
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import registry

KEY_ID, SECRET = "AKIDBILIKTESTKEY0001", "bilik/Test+Secret/Key0000000000000000000"
REGION = "eu-west-1"
TARGET = "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken"
# AWS refuses requests signed more than 15 minutes away from its clock.
MAX_SKEW_S = 15 * 60
_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, ?SignedHeaders=(?P<headers>[a-z0-9;-]+), ?"
    r"Signature=(?P<signature>[0-9a-f]{64})"
)


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FakeEcr

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        problem = self._check(body)
        self.server.calls.append(problem or "ok")
        if problem:
            kind, message = problem.split(": ", 1)
            self._answer(400, {"__type": f"com.amazon.coral.service#{kind}", "message": message})
            return
        token = base64.b64encode(f"{registry.ECR_USER}:{registry.ECR_PASSWORD}".encode())
        self._answer(
            200,
            {
                "authorizationData": [
                    {
                        "authorizationToken": token.decode(),
                        "expiresAt": time.time() + 12 * 3600,
                        "proxyEndpoint": f"https://123456789012.dkr.ecr.{REGION}.amazonaws.com",
                    }
                ]
            },
        )

    def _check(self, body: bytes) -> str | None:
        """None if the call is a well-signed GetAuthorizationToken, else AWS's error."""
        if self.headers.get("X-Amz-Target") != TARGET:
            return "UnknownOperationException: no such operation"
        found = _AUTH.fullmatch(self.headers.get("Authorization") or "")
        if not found:
            return "IncompleteSignatureException: no AWS4-HMAC-SHA256 Authorization header"
        if found["key"] != KEY_ID:
            return (
                "UnrecognizedClientException: "
                "The security token included in the request is invalid."
            )
        signed = found["headers"].split(";")
        if not {"host", "x-amz-date", "x-amz-target"} <= set(signed):
            return "IncompleteSignatureException: host, x-amz-date and x-amz-target must be signed"
        stamp = self.headers.get("X-Amz-Date") or ""
        try:
            when = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
        except ValueError:
            return "IncompleteSignatureException: bad X-Amz-Date"
        if abs(time.time() - when.timestamp()) > MAX_SKEW_S or found["date"] != stamp[:8]:
            return "InvalidSignatureException: Signature expired or not yet current."
        if found["region"] != REGION or found["service"] != "ecr":
            return f"InvalidSignatureException: Credential should be scoped to {REGION}/ecr."
        canonical = "\n".join(
            [
                self.command,
                self.path.split("?", 1)[0] or "/",
                "",  # no query string
                *(f"{name}:{' '.join((self.headers.get(name) or '').split())}" for name in signed),
                "",
                found["headers"],
                hashlib.sha256(body).hexdigest(),
            ]
        )
        to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256",
                stamp,
                f"{found['date']}/{REGION}/ecr/aws4_request",
                hashlib.sha256(canonical.encode()).hexdigest(),
            ]
        )
        key = _hmac(
            _hmac(_hmac(_hmac(f"AWS4{SECRET}".encode(), found["date"]), REGION), "ecr"),
            "aws4_request",
        )
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, found["signature"]):
            return (
                "InvalidSignatureException: The request signature we calculated does not match "
                "the signature you provided. Check your AWS Secret Access Key and signing method."
                f"\n\nThe Canonical String for this request should have been\n'{canonical}'"
            )
        return None

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class FakeEcr(http.server.ThreadingHTTPServer):
    calls: list[str]


@contextlib.contextmanager
def fake_ecr() -> Iterator[FakeEcr]:
    """The fake ECR on a free loopback port; ``.calls`` says how each call went."""
    server = FakeEcr(("127.0.0.1", 0), _Handler)
    server.calls = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def url(server: FakeEcr) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/"
