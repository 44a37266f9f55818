"""The sandbox REST API and the sandbox plane as E2B's behave, with the official ``e2b`` and
``e2b-code-interpreter`` SDKs as the clients: listing and its filters, the metrics history,
kills that clients see as kills, connects that only extend, what E2B takes and bilik cannot do
yet refused by name, v2 logs, refreshes, and a server log without noise."""

from __future__ import annotations

import datetime
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from e2b import Sandbox, SandboxException, SandboxQuery, SandboxState, TimeoutException
from e2b.api.client.models import SandboxLogsV2Response, SandboxMetric
from e2b_code_interpreter import Sandbox as CodeSandbox

from server import SERVER_SETTINGS, BilikServer, code_interpreter_server

SERVER_LOG = SERVER_SETTINGS.data_dir / "server.log"


@pytest.fixture(scope="module")
def server() -> Iterator[BilikServer]:
    with code_interpreter_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def log_start(server: BilikServer) -> int:
    """Where the server's log stood when this module's tests began."""
    return SERVER_LOG.stat().st_size


def _params(server: BilikServer) -> dict[str, Any]:
    return {"api_key": server.key, "api_url": server.url, "sandbox_url": server.url}


def _headers(server: BilikServer) -> dict[str, str]:
    return {"X-API-Key": server.key}


def _later(seconds: float, action: Callable[[], object]) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_list_pages_newest_first_with_every_filter(server: BilikServer, log_start: int) -> None:
    params = _params(server)
    tag = uuid.uuid4().hex
    made = []
    try:
        for n in range(3):
            metadata = {"suite": tag, "n": str(n)}
            if n == 1:
                metadata["odd key"] = "a&b=c %+d"
            made.append(Sandbox.create("base", timeout=120, metadata=metadata, **params))
        ids = [s.sandbox_id for s in made]
        mine = SandboxQuery(metadata={"suite": tag})

        def listed(query: SandboxQuery | None = mine, **opts: Any) -> list[str]:
            pages = Sandbox.list(query=query, **opts, **params)
            seen: list[str] = []
            while pages.has_next:
                seen += [s.sandbox_id for s in pages.next_items()]
            return seen

        # Newest first, one to a page; oldest first when asked.
        assert listed(limit=1) == ids[::-1]
        assert listed(limit=2, order="asc") == ids
        # States: none is paused; running and the SDK's default (both) list them all.
        assert listed(SandboxQuery(metadata={"suite": tag}, state=[SandboxState.PAUSED])) == []
        running = SandboxQuery(metadata={"suite": tag}, state=[SandboxState.RUNNING])
        assert listed(running) == ids[::-1]
        # Started at or after a time (the middle one's start included).
        middle = made[1].get_info().started_at
        assert listed(SandboxQuery(metadata={"suite": tag}, started_after=middle)) == ids[:0:-1]
        assert listed(SandboxQuery(metadata={"suite": tag}, template="base")) == ids[::-1]
        assert listed(SandboxQuery(metadata={"suite": tag}, template="nosuch")) == []
        # Metadata with characters the query string escapes.
        odd = SandboxQuery(metadata={"suite": tag, "odd key": "a&b=c %+d"})
        assert listed(odd) == [ids[1]]

        # What cannot be honoured is a 400, never ignored.
        url = f"{server.url}/v2/sandboxes"
        for query, message in (
            ({"startedBefore": "2020-01-01T00:00:00Z"}, "startedBefore"),
            ({"state": "running,stopped"}, "state"),
            ({"order": "sideways"}, "order"),
            ({"limit": "101"}, "limit"),
            ({"nextToken": "not-a-token"}, "nextToken"),
            ({"startedAfter": "yesterday"}, "startedAfter"),
            ({"metadata": "novalue"}, "metadata"),
        ):
            answer = httpx.get(url, params=query, headers=_headers(server))
            assert answer.status_code == 400 and message in answer.json()["message"], query
        first = httpx.get(url, params={"limit": 1}, headers=_headers(server))
        token = first.headers["x-next-token"]
        flipped: dict[str, str | int] = {"limit": 1, "order": "asc", "nextToken": token}
        assert httpx.get(url, params=flipped, headers=_headers(server)).status_code == 400
        # The legacy list is newest first too.
        legacy = httpx.get(
            f"{server.url}/sandboxes", params={"metadata": f"suite={tag}"}, headers=_headers(server)
        ).json()
        assert [s["sandboxID"] for s in legacy] == ids[::-1]
    finally:
        for sandbox in made:
            sandbox.kill()


def test_metrics_keep_a_history(server: BilikServer, log_start: int) -> None:
    with Sandbox.create("base", timeout=120, **_params(server)) as sbx:
        started = sbx.get_info().started_at
        first = sbx.get_metrics()
        assert first and first[-1].mem_total == 512 << 20 and first[-1].cpu_count == 1
        # A range before the sandbox existed holds nothing.
        long_ago = started - datetime.timedelta(minutes=10)
        assert sbx.get_metrics(start=long_ago, end=started - datetime.timedelta(minutes=5)) == []
        sbx.commands.run("timeout 6 sh -c 'while :; do :; done' || true")
        time.sleep(6)
        history = sbx.get_metrics()
        times = [m.timestamp for m in history]
        assert len(history) >= 3 and times == sorted(times), history
        # (the first was taken on demand; the sampler's come 5 s apart)
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times[1:])]
        assert all(3 <= gap <= 7 for gap in gaps), gaps
        assert max(m.cpu_used_pct for m in history) > 50, history
        assert min(times) >= started - datetime.timedelta(seconds=1)
        # Only the samples in the range asked for.
        later = times[-1]
        assert [m.timestamp for m in sbx.get_metrics(start=later)] == [later]
        assert all(m.timestamp <= times[1] for m in sbx.get_metrics(end=times[1]))

        # Many sandboxes at once (E2B's shape): the latest sample of each that is the caller's.
        many = httpx.get(
            f"{server.url}/sandboxes/metrics",
            params={"sandbox_ids": f"{sbx.sandbox_id},nosuchsandbox1"},
            headers=_headers(server),
        )
        assert many.status_code == 200 and set(many.json()["sandboxes"]) == {sbx.sandbox_id}
        latest = SandboxMetric.from_dict(many.json()["sandboxes"][sbx.sandbox_id])
        assert latest.mem_total == 512 << 20 and latest.timestamp_unix >= int(later.timestamp())
        for query in ({}, {"sandbox_ids": "a,a"}, {"sandbox_ids": "../x"}):
            bad = httpx.get(
                f"{server.url}/sandboxes/metrics", params=query, headers=_headers(server)
            )
            assert bad.status_code == 400, query
        backwards = httpx.get(
            f"{server.url}/sandboxes/{sbx.sandbox_id}/metrics",
            params={"start": 200, "end": 100},
            headers=_headers(server),
        )
        assert backwards.status_code == 400


def test_connect_only_extends_and_refresh(server: BilikServer, log_start: int) -> None:
    params = _params(server)
    with Sandbox.create("base", timeout=600, **params) as sbx:
        end = sbx.get_info().end_at
        Sandbox.connect(sbx.sandbox_id, **params)  # (the SDK's default: 300 s)
        Sandbox.connect(sbx.sandbox_id, timeout=60, **params)
        assert sbx.get_info().end_at == end
        Sandbox.connect(sbx.sandbox_id, timeout=900, **params)
        extended = sbx.get_info().end_at
        assert extended > end + datetime.timedelta(seconds=250)
        # A timeout set is set as asked, sooner too.
        sbx.set_timeout(60)
        assert sbx.get_info().end_at < end

        url = f"{server.url}/sandboxes/{sbx.sandbox_id}/refreshes"
        assert httpx.post(url, json={"duration": 700}, headers=_headers(server)).status_code == 204
        refreshed = sbx.get_info().end_at
        now = datetime.datetime.now(datetime.UTC)
        assert refreshed > now + datetime.timedelta(seconds=690)
        # (a refresh, like a connect, never shortens)
        assert httpx.post(url, json={"duration": 30}, headers=_headers(server)).status_code == 204
        assert sbx.get_info().end_at == refreshed
        assert httpx.post(url, headers=_headers(server)).status_code == 204
        for body in ({"duration": 3601}, {"duration": -1}, {"duration": "7"}):
            assert httpx.post(url, json=body, headers=_headers(server)).status_code == 400
        gone = f"{server.url}/sandboxes/nosuchsandbox1/refreshes"
        assert httpx.post(gone, json={}, headers=_headers(server)).status_code == 404


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"autoResume": {"enabled": True}}, "auto-resume"),
        (
            {"autoPause": True, "autoPauseMemory": False, "autoResume": {"enabled": True}},
            "auto-resume",
        ),
        ({"mcp": {"github": {"token": "x"}}}, "mcp"),
        ({"volumeMounts": [{"name": "v", "path": "/data"}]}, "volumeMounts"),
        ({"network": {"rules": {"example.com": [{"transform": {}}]}}}, "network.rules"),
        ({"network": {"allowPublicTraffic": False}}, "allowPublicTraffic"),
        ({"network": {"egressProxy": {"address": "proxy:1080"}}}, "network.egressProxy"),
        ({"network": {"dnsServers": []}}, "network.dnsServers"),
        ({"iam": {"tokens": {"t": {"audience": "a", "tokenType": "jwt"}}}}, "iam"),
        ({"secure": False}, "secure"),
        ({"autoPause": "yes"}, "autoPause"),
    ],
)
def test_what_cannot_be_honoured_is_refused(
    server: BilikServer, log_start: int, body: dict[str, Any], named: str
) -> None:
    for path in ("/v2/sandboxes", "/sandboxes"):
        answer = httpx.post(
            server.url + path, json={"templateID": "base", **body}, headers=_headers(server)
        )
        assert answer.status_code == 400, answer.text
        assert named in answer.json()["message"] and answer.json()["code"] == 400


def test_what_sdks_send_by_default_is_accepted(server: BilikServer, log_start: int) -> None:
    defaults = {
        "templateID": "base",
        "timeout": 60,
        "autoPause": False,
        "autoResume": {"enabled": False},
        "secure": True,
        "mcp": None,
        "volumeMounts": [],
        "lifecycle": {"onTimeout": "kill", "autoResume": False},
        "network": {"allowPublicTraffic": True, "rules": {}, "allowOut": []},
        "allow_internet_access": True,
    }
    answer = httpx.post(f"{server.url}/sandboxes", json=defaults, headers=_headers(server))
    assert answer.status_code == 201, answer.text
    Sandbox.kill(answer.json()["sandboxID"], **_params(server))
    # The official SDK's own options for what bilik cannot do yet are refused by name.
    for options in (
        {"network": {"allow_public_traffic": False}},
        {"mcp": {"exa": {"apiKey": "x"}}},
    ):
        with pytest.raises(SandboxException, match="not supported"):
            Sandbox.create("base", timeout=60, **options, **_params(server))
    assert Sandbox.list(**_params(server)).next_items() == []


def test_v2_logs(server: BilikServer, log_start: int) -> None:
    with Sandbox.create("base", timeout=60, **_params(server)) as sbx:
        sbx.commands.run("echo to-the-console > /proc/1/fd/1", user="root")
        url = f"{server.url}/v2/sandboxes/{sbx.sandbox_id}/logs"

        def logs(**query: Any) -> list[str]:
            answer = httpx.get(url, params=query, headers=_headers(server))
            assert answer.status_code == 200, answer.text
            return [e.message for e in SandboxLogsV2Response.from_dict(answer.json()).logs]

        lines = logs()
        assert "to-the-console" in lines
        assert logs(search="to-the-console") == ["to-the-console"]
        assert logs(limit=1) == lines[:1]
        assert logs(direction="backward") == lines[::-1]
        assert logs(level="error") == []
        started_ms = int(sbx.get_info().started_at.timestamp() * 1000)
        assert logs(cursor=started_ms + 60_000) == []
        assert logs(cursor=started_ms + 60_000, direction="backward") == lines[::-1]
        for query in ({"limit": 1001}, {"direction": "up"}, {"level": "loud"}, {"since": 1}):
            assert httpx.get(url, params=query, headers=_headers(server)).status_code == 400
        gone = f"{server.url}/v2/sandboxes/nosuchsandbox1/logs"
        assert httpx.get(gone, headers=_headers(server)).status_code == 404


def test_a_command_whose_sandbox_is_killed_raises_timeout(
    server: BilikServer, log_start: int
) -> None:
    params = _params(server)
    sbx = Sandbox.create("base", timeout=120, **params)
    out: list[str] = []
    _later(1.5, lambda: Sandbox.kill(sbx.sandbox_id, **params))
    with pytest.raises(TimeoutException, match="killed or reached its end of life"):
        sbx.commands.run("for i in $(seq 200); do echo $i; sleep 0.1; done", on_stdout=out.append)
    assert out  # (it streamed before the kill)
    assert not sbx.is_running()
    # The plane answers E2B's 502 for it from then on.
    health = httpx.get(
        f"{server.url}/health",
        headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"},
    )
    assert health.status_code == 502 and "The sandbox was not found" in health.json()["message"]


def test_a_command_whose_sandbox_times_out_raises_timeout(
    server: BilikServer, log_start: int
) -> None:
    sbx = Sandbox.create("base", timeout=120, **_params(server))
    sbx.set_timeout(3)
    with pytest.raises(TimeoutException, match="killed or reached its end of life"):
        sbx.commands.run("sleep 30")
    assert not sbx.is_running()


def test_run_code_whose_sandbox_is_killed_raises_timeout(
    server: BilikServer, log_start: int
) -> None:
    params = _params(server)
    sbx = CodeSandbox.create(timeout=120, **params)
    _later(2.0, lambda: CodeSandbox.kill(sbx.sandbox_id, **params))
    with pytest.raises(TimeoutException, match="killed"):
        sbx.run_code(
            "import time\nfor i in range(300):\n    print(i, flush=True)\n    time.sleep(0.1)"
        )
    assert not sbx.is_running()


def test_the_server_log_has_no_noise(server: BilikServer, log_start: int) -> None:
    """Streams cut by kills are one line each, never a traceback; the server's own requests
    are not logged at INFO. (Last in the module: it reads what the tests above made.)"""
    with open(SERVER_LOG, "rb") as f:
        f.seek(log_start)
        text = f.read().decode(errors="replace")
    assert "was cut" in text
    for noise in (
        "Exception in ASGI application",
        "ASGI callable returned without completing response",
        "HTTP Request:",
        "Traceback",
    ):
        assert noise not in text, noise
