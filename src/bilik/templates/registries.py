"""The login for a template's base image, from E2B's ``fromImageRegistry``.

Three kinds, as E2B's build API has them:

- ``registry``: a username and a password, as given.
- ``gcp``: a service account key (JSON). GCR and Artifact Registry take it as the password of
  the user ``_json_key``.
- ``aws``: an access key. ECR takes no access key at its registry endpoint: the key asks ECR's
  API for a pull token (``GetAuthorizationToken``, a SigV4-signed call), which is the password
  of the user ``AWS`` for twelve hours.

A login serves one pull and is then dropped: it is never stored, logged or put in an error
message (its ``repr`` hides the password).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import hmac
import json
import re
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import httpx

# ECR's API; ``BILIK_ECR_ENDPOINT`` replaces it (an ECR-compatible endpoint, or a test's).
ECR_ENDPOINT = "https://api.ecr.{region}.amazonaws.com/"
ECR_TARGET = "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken"
ECR_TIMEOUT_S = 30.0
# AWS region names: us-east-1, eu-central-2, us-gov-west-1, cn-north-1, … The region becomes
# part of a host name, so nothing else may pass (or the key would be sent elsewhere).
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")
# An ECR registry host names its region: 123456789012.dkr.ecr.us-west-2.amazonaws.com
_ECR_HOST = re.compile(r"[0-9]{12}\.dkr\.ecr(-fips)?\.([a-z0-9-]+)\.amazonaws\.com(\.cn)?")
GCP_USER = "_json_key"

Log = Callable[[str], None]


class LoginFailed(Exception):
    """The registry settings are unusable, or the cloud refused them (says which and why)."""


@dataclasses.dataclass(frozen=True)
class Login:
    username: str
    password: str = dataclasses.field(repr=False)
    # How the password was come by, for errors ("the GCP service account key", …).
    source: str = ""


async def login(config: object, image: str, log: Log, *, ecr_endpoint: str = "") -> Login | None:
    """The login ``config`` (a ``fromImageRegistry`` object, or None) stands for."""
    if config is None or config == {}:
        return None
    if not isinstance(config, dict):
        raise LoginFailed("fromImageRegistry must be an object")
    kind = config.get("type", "registry")
    if kind == "registry":
        username, password = _fields(config, "username", "password")
        return Login(username, password)
    if kind == "gcp":
        (key,) = _fields(config, "serviceAccountJson")
        try:
            parsed = json.loads(key)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise LoginFailed("serviceAccountJson is not a JSON service account key")
        return Login(GCP_USER, key, "the GCP service account key")
    if kind == "aws":
        key_id, secret, region = _fields(
            config, "awsAccessKeyId", "awsSecretAccessKey", "awsRegion"
        )
        return await ecr_login(key_id, secret, region, image, log, endpoint=ecr_endpoint)
    raise LoginFailed(f"unknown registry type {kind!r} (registry, aws or gcp)")


def _fields(config: Mapping[str, Any], *names: str) -> list[str]:
    values = [config.get(name) for name in names]
    missing = [n for n, v in zip(names, values, strict=True) if not isinstance(v, str) or not v]
    if missing:
        kind = config.get("type", "registry")
        raise LoginFailed(f"a {kind!r} registry needs {' and '.join(missing)}")
    return [str(v) for v in values]


async def ecr_login(
    key_id: str, secret: str, region: str, image: str, log: Log, *, endpoint: str = ""
) -> Login:
    """A pull token from ECR's ``GetAuthorizationToken``, as the login of the user ``AWS``."""
    if not _REGION.fullmatch(region):
        raise LoginFailed(f"awsRegion {region!r} is not an AWS region name (like us-east-1)")
    host = image.split("/", 1)[0]
    named = _ECR_HOST.fullmatch(host)
    if named and named.group(2) != region:
        # The token would be refused: say why, rather than the registry's bare "denied".
        raise LoginFailed(
            f"the image is in ECR region {named.group(2)!r}, but awsRegion is {region!r}"
        )
    url = endpoint or ECR_ENDPOINT.format(region=region)
    log(f"Getting a pull token from ECR ({region})")
    body = b"{}"
    headers = {
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Target": ECR_TARGET,
    }
    signed = sign_v4("POST", url, headers, body, key_id, secret, region, "ecr")
    try:
        async with httpx.AsyncClient(timeout=ECR_TIMEOUT_S) as client:
            answer = await client.post(url, content=body, headers=signed)
    except httpx.HTTPError as e:
        where = urllib.parse.urlsplit(url).netloc
        # AWS's endpoint is named after the region: one that does not resolve is no region.
        hint = "" if endpoint else f" (is {region!r} an AWS region?)"
        raise LoginFailed(
            f"could not reach ECR at {where}{hint}: {type(e).__name__}: {e}"
        ) from None
    if answer.status_code != 200:
        raise LoginFailed(_ecr_error(answer))
    try:
        data = answer.json()["authorizationData"][0]
        token = base64.b64decode(data["authorizationToken"], validate=True).decode()
    except (ValueError, LookupError, TypeError, binascii.Error):
        raise LoginFailed("ECR answered without a usable authorization token") from None
    username, sep, password = token.partition(":")
    if not sep or not username or not password:
        raise LoginFailed("ECR answered without a usable authorization token")
    return Login(username, password, "the token ECR gave for the AWS access key")


def _ecr_error(answer: httpx.Response) -> str:
    """What ECR's error answer means, in words (AWS's JSON protocol: ``__type``, ``message``)."""
    try:
        body = answer.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    # "com.amazon.coral.service#UnrecognizedClientException" → "UnrecognizedClientException"
    kind = str(body.get("__type") or "").rpartition("#")[2]
    message = str(body.get("message") or body.get("Message") or answer.text or "").strip()
    # AWS's signature errors spell out the canonical request: long, and no help to the user.
    message = message.split("\n", 1)[0][:300]
    meaning = {
        "UnrecognizedClientException": "AWS does not know the access key ID",
        "AccessDeniedException": "the access key may not call ecr:GetAuthorizationToken",
        "ExpiredTokenException": "the access key has expired",
    }.get(kind)
    if kind == "InvalidSignatureException" and "does not match" in message:
        # (Other signature errors, like a clock far off, say what they are themselves.)
        meaning = "the secret access key does not match the access key ID"
    said = f"{kind}: {message}" if kind else message
    head = f"ECR refused the pull token ({answer.status_code})"
    return f"{head}: {meaning} ({said})" if meaning else f"{head}: {said or 'no reason given'}"


def sign_v4(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    key_id: str,
    secret: str,
    region: str,
    service: str,
    now: datetime.datetime | None = None,
) -> dict[str, str]:
    """``headers`` plus ``Host``, ``X-Amz-Date`` and the ``Authorization`` of AWS Signature
    Version 4 (every header given is signed)."""
    when = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%dT%H%M%SZ")
    parts = urllib.parse.urlsplit(url)
    out = {"Host": parts.netloc, **headers, "X-Amz-Date": when}
    canonical_headers = sorted((k.lower(), " ".join(v.split())) for k, v in out.items())
    signed_headers = ";".join(k for k, _ in canonical_headers)
    canonical = "\n".join(
        [
            method,
            urllib.parse.quote(parts.path or "/", safe="/-_.~"),
            _canonical_query(parts.query),
            "".join(f"{k}:{v}\n" for k, v in canonical_headers),
            signed_headers,
            hashlib.sha256(body).hexdigest(),
        ]
    )
    scope = f"{when[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", when, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = f"AWS4{secret}".encode()
    for part in (when[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={key_id}/{scope}, "
        f"SignedHeaders={signed_headers}, Signature={signature}"
    )
    return out


def _canonical_query(query: str) -> str:
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    quoted = sorted(
        (urllib.parse.quote(k, safe="-_.~"), urllib.parse.quote(v, safe="-_.~")) for k, v in pairs
    )
    return "&".join(f"{k}={v}" for k, v in quoted)
