"""The server held to its own OpenAPI document: every route it serves is described, and
requests generated from the document (schemathesis) get no 5xx and answers as described."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import checks
from starlette.routing import Route

from bilik.api import keys, sandboxes, templates
from bilik.api.openapi import DOCUMENT
from server import BilikServer

# Routes the application itself adds beside the API modules' own.
APP_ROUTES = {("/health", "get"), ("/openapi.json", "get")}
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]
# Generated requests per operation (a few hundred in all).
EXAMPLES = 6

schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture(scope="module")
def srv() -> Iterator[BilikServer]:
    server = BilikServer()
    server.start()
    yield server
    headers = {"X-API-Key": server.key}
    for template in httpx.get(f"{server.url}/templates", headers=headers).json():
        httpx.delete(f"{server.url}/templates/{template['templateID']}", headers=headers)
    server.finish()


def _shape(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


def test_every_route_is_described() -> None:
    served = set(APP_ROUTES)
    for route in [*sandboxes.routes, *templates.routes, *keys.routes]:
        assert isinstance(route, Route)
        served |= {(route.path, m.lower()) for m in route.methods or () if m != "HEAD"}
    described = {(p, m) for p, ops in DOCUMENT["paths"].items() for m in ops}
    assert {(_shape(p), m) for p, m in served} == {(_shape(p), m) for p, m in described}


def test_the_served_document_is_this_one(srv: BilikServer) -> None:
    assert httpx.get(f"{srv.url}/openapi.json").json() == DOCUMENT


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_described(case: schemathesis.Case, srv: BilikServer) -> None:
    case.call_and_validate(base_url=srv.url, headers={"X-API-Key": srv.key}, checks=CHECKS)
