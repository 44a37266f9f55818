"""``AsyncSandbox``: create, connect to, list and kill sandboxes; their files, commands,
terminals and code interpreter. The one implementation: ``Sandbox`` runs this one."""

from __future__ import annotations

import builtins
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, TypedDict
from urllib.parse import quote, urlencode

import httpx

from bilik.sdk._dual import dual
from bilik.sdk.api import ApiClient, http_client
from bilik.sdk.code import AsyncCodeInterpreter
from bilik.sdk.commands import AsyncCommands, AsyncPty
from bilik.sdk.config import ConnectionConfig
from bilik.sdk.envd import Envd
from bilik.sdk.exceptions import (
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
    SandboxNotFoundException,
)
from bilik.sdk.files import AsyncFilesystem
from bilik.sdk.models import (
    ResourceUsage,
    SandboxInfo,
    SandboxMetrics,
    SandboxQuery,
    SnapshotInfo,
)

DEFAULT_TEMPLATE = "code-interpreter-v1"
DEFAULT_TIMEOUT = 300
MIB = 1024 * 1024


class NetworkOpts(TypedDict, total=False):
    """Egress rules: addresses, CIDRs or domain names allowed or denied."""

    allow_out: list[str]
    deny_out: list[str]


class SandboxLifecycle(TypedDict, total=False):
    """What a sandbox's timeout does: ``on_timeout`` ``"kill"`` (the default) or ``"pause"``
    (or ``{"action": "pause", "mode": "full" | "filesystem"}``); with ``auto_resume``, a
    request reaching the paused sandbox resumes it (not with a files-only pause)."""

    on_timeout: str | dict[str, str]
    auto_resume: bool


def lifecycle_body(lifecycle: SandboxLifecycle) -> dict[str, Any]:
    """A lifecycle as a create sends it (E2B's ``autoPause``, ``autoPauseMemory``,
    ``autoResume``); what cannot be is refused here, as E2B's SDK does."""
    on_timeout = lifecycle.get("on_timeout")
    mode = None
    if isinstance(on_timeout, dict):
        mode = on_timeout.get("mode")
        on_timeout = on_timeout.get("action")
    if on_timeout not in (None, "kill", "pause"):
        raise InvalidArgumentException(f"on_timeout must be kill or pause, got {on_timeout!r}")
    if mode not in (None, "full", "filesystem") or (mode and on_timeout != "pause"):
        raise InvalidArgumentException("mode is full or filesystem, and only for a pause")
    auto_resume = lifecycle.get("auto_resume")
    if auto_resume and (on_timeout != "pause" or mode == "filesystem"):
        raise InvalidArgumentException(
            "auto_resume needs on_timeout pause, keeping memory (a files-only pause is "
            "resumed with connect())"
        )
    body: dict[str, Any] = {}
    if on_timeout is not None:
        body["autoPause"] = on_timeout == "pause"
    if mode is not None:
        body["autoPauseMemory"] = mode == "full"
    if auto_resume is not None:
        body["autoResume"] = {"enabled": bool(auto_resume)}
    return body


def pause_memory(mode: str | None) -> bool:
    if mode not in (None, "full", "filesystem"):
        raise InvalidArgumentException(f"mode must be full or filesystem, got {mode!r}")
    return mode != "filesystem"


class AsyncSnapshotPaginator:
    """Pages of snapshots, newest first: ``await next_items()`` while ``has_next``."""

    next_token: str | None
    has_next: bool

    def __init__(
        self,
        sandbox_id: str | None,
        name: str | None,
        limit: int | None,
        next_token: str | None,
        **opts: Any,
    ) -> None:
        self._api = ApiClient(ConnectionConfig.from_params(opts))
        self._params = {
            k: v for k, v in (("sandboxID", sandbox_id), ("name", name), ("limit", limit)) if v
        }
        self.next_token = next_token
        self.has_next = True

    async def next_items(self) -> list[SnapshotInfo]:
        """The next page."""
        if not self.has_next:
            raise StopAsyncIteration("no more pages")
        params = dict(self._params)
        if self.next_token:
            params["nextToken"] = self.next_token
        response = await self._api.request("GET", "/snapshots", params=params)
        self.next_token = response.headers.get("X-Next-Token") or None
        self.has_next = self.next_token is not None
        return [SnapshotInfo.from_json(s) for s in response.json()]

    async def __aiter__(self) -> AsyncIterator[SnapshotInfo]:
        while self.has_next:
            for info in await self.next_items():
                yield info


class AsyncSandboxPaginator:
    """Pages of sandboxes, newest last: ``await next_items()`` while ``has_next``."""

    next_token: str | None
    has_next: bool

    def __init__(
        self, query: SandboxQuery | None, limit: int | None, next_token: str | None, **opts: Any
    ) -> None:
        self._api = ApiClient(ConnectionConfig.from_params(opts))
        self._query = query
        self._limit = limit
        self.next_token = next_token
        self.has_next = True

    async def next_items(self) -> list[SandboxInfo]:
        """The next page."""
        if not self.has_next:
            raise StopAsyncIteration("no more pages")
        params: dict[str, Any] = {}
        if self._query and self._query.metadata:
            # As E2B's SDK: each key and value quoted, then the whole encoded (the server
            # decodes both, so values with "&", "=", "%" or "+" match).
            quoted = {quote(k): quote(v) for k, v in self._query.metadata.items()}
            params["metadata"] = urlencode(quoted)
        if self._query and self._query.state:
            params["state"] = ",".join(self._query.state)
        if self._limit:
            params["limit"] = self._limit
        if self.next_token:
            params["nextToken"] = self.next_token
        response = await self._api.request("GET", "/v2/sandboxes", params=params)
        self.next_token = response.headers.get("X-Next-Token") or None
        self.has_next = self.next_token is not None
        return [SandboxInfo.from_json(s) for s in response.json()]

    async def __aiter__(self) -> AsyncIterator[SandboxInfo]:
        while self.has_next:
            for info in await self.next_items():
                yield info


class AsyncSandbox(AsyncCodeInterpreter):
    """A sandbox: an isolated Linux machine with files, processes, terminals and, in
    code-interpreter templates, stateful code contexts. Make one with :meth:`create`."""

    sandbox_id: str
    envd_version: str
    template_id: str
    connection_config: ConnectionConfig
    files: AsyncFilesystem
    commands: AsyncCommands
    pty: AsyncPty

    def __init__(
        self,
        sandbox_id: str,
        config: ConnectionConfig,
        access_token: str | None = None,
        envd_version: str = "",
        template_id: str = "",
    ) -> None:
        self.sandbox_id = sandbox_id
        self.envd_version = envd_version
        self.template_id = template_id
        self.connection_config = config
        self._opts = config.params()
        super().__init__(Envd(config, sandbox_id, access_token))
        self.files = AsyncFilesystem(self._envd)
        self.commands = AsyncCommands(self._envd)
        self.pty = AsyncPty(self._envd, self.commands)

    @property
    def envd_access_token(self) -> str | None:
        return self._envd.access_token

    def __repr__(self) -> str:
        return f"AsyncSandbox(sandbox_id={self.sandbox_id!r}, template={self.template_id!r})"

    @classmethod
    async def create(
        cls,
        template: str | None = None,
        timeout: int | None = None,
        metadata: dict[str, str] | None = None,
        envs: dict[str, str] | None = None,
        secure: bool = True,
        allow_internet_access: bool = True,
        network: NetworkOpts | None = None,
        cpu_count: int | None = None,
        memory_mb: int | None = None,
        lifecycle: SandboxLifecycle | None = None,
        **opts: Any,
    ) -> AsyncSandbox:
        """Create a sandbox from a template (``code-interpreter-v1`` unless given; a
        snapshot's id or name too) and return it once it is ready. ``timeout`` is its
        lifetime in seconds (300 by default); ``envs`` are set for everything it runs;
        ``allow_internet_access`` and ``network`` (``allow_out``/``deny_out``) set its egress;
        ``cpu_count`` and ``memory_mb`` its size; ``lifecycle`` what its timeout does (a kill,
        or a pause; see :class:`SandboxLifecycle`). Connection options: ``api_key``,
        ``api_url``, ``request_timeout``, ``retries``."""
        config = ConnectionConfig.from_params(opts)
        body: dict[str, Any] = {
            "templateID": template or DEFAULT_TEMPLATE,
            "timeout": DEFAULT_TIMEOUT if timeout is None else timeout,
            "secure": secure,
            "allow_internet_access": allow_internet_access,
        }
        if metadata:
            body["metadata"] = metadata
        if envs:
            body["envVars"] = envs
        if network:
            body["network"] = {
                wire: network[name]  # type: ignore[literal-required]
                for name, wire in (("allow_out", "allowOut"), ("deny_out", "denyOut"))
                if name in network
            }
        if cpu_count is not None:
            body["cpuCount"] = cpu_count
        if memory_mb is not None:
            body["memoryMB"] = memory_mb
        if lifecycle:
            body.update(lifecycle_body(lifecycle))
        # Retried creates (a 502 from a proxy, say) must not make two sandboxes.
        once = {"Idempotency-Key": uuid.uuid4().hex}
        response = await ApiClient(config).request("POST", "/sandboxes", json=body, headers=once)
        return cls._from_answer(response.json(), config)

    @classmethod
    def _from_answer(cls, data: dict[str, Any], config: ConnectionConfig) -> AsyncSandbox:
        return cls(
            data["sandboxID"],
            config,
            data.get("envdAccessToken"),
            data.get("envdVersion", ""),
            data.get("templateID", ""),
        )

    @classmethod
    async def connect(
        cls, sandbox_id: str, timeout: int | None = None, **opts: Any
    ) -> AsyncSandbox:
        """Connect to a sandbox by id: a running one's lifetime only extends (to ``timeout``
        seconds from now, when given); a paused one is resumed, with the same id, and lives
        ``timeout`` seconds (300 if not given) from now."""
        config = ConnectionConfig.from_params(opts)
        body = {"timeout": timeout} if timeout is not None else {}
        response = await ApiClient(config).request(
            "POST",
            f"/sandboxes/{sandbox_id}/connect",
            json=body,
            not_found=SandboxNotFoundException,
        )
        return cls._from_answer(response.json(), config)

    @staticmethod
    def list(
        query: SandboxQuery | None = None,
        limit: int | None = None,
        next_token: str | None = None,
        **opts: Any,
    ) -> AsyncSandboxPaginator:
        """The caller's running sandboxes, a page at a time, filtered by ``query``."""
        return AsyncSandboxPaginator(query, limit, next_token, **opts)

    @dual
    async def kill(cls, sandbox_id: str, /, **opts: Any) -> bool:
        """Kill the sandbox: ``sandbox.kill()`` or ``AsyncSandbox.kill(sandbox_id)``;
        ``False`` if it did not exist."""
        try:
            await ApiClient(ConnectionConfig.from_params(opts)).request(
                "DELETE", f"/sandboxes/{sandbox_id}", not_found=SandboxNotFoundException
            )
        except SandboxNotFoundException:
            return False
        return True

    @dual
    async def pause(cls, sandbox_id: str, /, mode: str | None = None, **opts: Any) -> bool:
        """Pause the sandbox: ``mode`` ``"full"`` (the default) keeps its memory, and a
        resume (:meth:`connect`) goes on where it was; ``"filesystem"`` keeps only its files,
        and a resume boots it afresh. ``False`` if it was paused already."""
        body = {"memory": pause_memory(mode)}
        try:
            await ApiClient(ConnectionConfig.from_params(opts)).request(
                "POST",
                f"/sandboxes/{sandbox_id}/pause",
                json=body,
                not_found=SandboxNotFoundException,
            )
        except InvalidArgumentException as e:
            if e.status_code == 409:
                return False
            raise
        return True

    @dual
    async def fork(
        cls, sandbox_id: str, /, timeout: int | None = None, count: int | None = None, **opts: Any
    ) -> builtins.list[AsyncSandbox | Exception]:
        """``count`` new sandboxes (1 by default, 20 at most), each with a copy of this one's
        files, from one snapshot of them; this one goes on. Each boots afresh (its processes
        are not this one's) and succeeds or fails on its own: a sandbox or an exception each."""
        config = ConnectionConfig.from_params(opts)
        body: dict[str, Any] = {}
        if timeout is not None:
            body["timeout"] = timeout
        if count is not None:
            body["count"] = count
        response = await ApiClient(config).request(
            "POST", f"/sandboxes/{sandbox_id}/fork", json=body, not_found=SandboxNotFoundException
        )
        results: builtins.list[AsyncSandbox | Exception] = []
        for result in response.json():
            if result.get("sandbox"):
                results.append(cls._from_answer(result["sandbox"], config))
                continue
            error = result.get("error") or {}
            code, message = error.get("code", 500), error.get("message", "the fork failed")
            if code == 404:
                results.append(NotFoundException(f"{code}: {message}"))
            else:
                results.append(SandboxException(f"{code}: {message}", status_code=code))
        return results

    @dual
    async def create_snapshot(
        cls, sandbox_id: str, /, name: str | None = None, mode: str | None = None, **opts: Any
    ) -> SnapshotInfo:
        """A snapshot of the sandbox's files (it goes on, running or paused): a template of
        the caller's that sandboxes are created from. Named ``name`` (a new build of it, if
        that snapshot exists), else by its id. This server keeps files only, whatever
        ``mode`` asks: sandboxes made from a snapshot boot afresh."""
        body: dict[str, Any] = {}
        if name:
            body["name"] = name
        if mode is not None:
            body["memory"] = pause_memory(mode)
        response = await ApiClient(ConnectionConfig.from_params(opts)).request(
            "POST",
            f"/sandboxes/{sandbox_id}/snapshots",
            json=body,
            not_found=SandboxNotFoundException,
        )
        return SnapshotInfo.from_json(response.json())

    @staticmethod
    def list_snapshots(
        sandbox_id: str | None = None,
        limit: int | None = None,
        next_token: str | None = None,
        name: str | None = None,
        **opts: Any,
    ) -> AsyncSnapshotPaginator:
        """The caller's snapshots, newest first, a page at a time: of one sandbox, or of one
        name or id."""
        return AsyncSnapshotPaginator(sandbox_id, name, limit, next_token, **opts)

    @staticmethod
    async def delete_snapshot(snapshot_id: str, **opts: Any) -> bool:
        """Delete a snapshot (the template it is); ``False`` if there was none."""
        try:
            await ApiClient(ConnectionConfig.from_params(opts)).request(
                "DELETE", f"/templates/{snapshot_id}"
            )
        except NotFoundException:
            return False
        return True

    @dual
    async def set_timeout(cls, sandbox_id: str, /, timeout: int, **opts: Any) -> None:
        """Set how many seconds from now the sandbox lives (it is killed then)."""
        await ApiClient(ConnectionConfig.from_params(opts)).request(
            "POST",
            f"/sandboxes/{sandbox_id}/timeout",
            json={"timeout": timeout},
            not_found=SandboxNotFoundException,
        )

    @dual
    async def get_info(cls, sandbox_id: str, /, **opts: Any) -> SandboxInfo:
        """The sandbox as the server describes it: template, metadata, times, size, state."""
        response = await ApiClient(ConnectionConfig.from_params(opts)).request(
            "GET", f"/sandboxes/{sandbox_id}", not_found=SandboxNotFoundException
        )
        return SandboxInfo.from_json(response.json())

    @dual
    async def get_metrics(
        cls,
        sandbox_id: str,
        /,
        start: datetime | None = None,
        end: datetime | None = None,
        **opts: Any,
    ) -> builtins.list[SandboxMetrics]:
        """Samples of the sandbox's CPU, memory and disk use."""
        params = {
            name: int(when.timestamp())
            for name, when in (("start", start), ("end", end))
            if when is not None
        }
        response = await ApiClient(ConnectionConfig.from_params(opts)).request(
            "GET",
            f"/sandboxes/{sandbox_id}/metrics",
            params=params,
            not_found=SandboxNotFoundException,
        )
        return [SandboxMetrics.from_json(m) for m in response.json()]

    @dual
    async def get_logs(cls, sandbox_id: str, /, **opts: Any) -> builtins.list[str]:
        """What the sandbox's start command (its PID 1) wrote, a line each."""
        response = await ApiClient(ConnectionConfig.from_params(opts)).request(
            "GET", f"/sandboxes/{sandbox_id}/logs", not_found=SandboxNotFoundException
        )
        return [entry["line"] for entry in response.json().get("logs", [])]

    async def get_resource_usage(self, request_timeout: float | None = None) -> ResourceUsage:
        """What the sandbox uses right now: CPU in percent, memory and disk in MiB."""
        samples = await self.get_metrics(request_timeout=request_timeout)
        now = samples[-1]
        return ResourceUsage(
            cpu_used_pct=now.cpu_used_pct,
            cpu_count=now.cpu_count,
            memory_used_mb=now.mem_used / MIB,
            memory_total_mb=now.mem_total / MIB,
            disk_used_mb=now.disk_used / MIB,
            disk_total_mb=now.disk_total / MIB,
        )

    async def is_running(self, request_timeout: float | None = None) -> bool:
        """Whether the sandbox's agent answers (``False`` once it is killed or timed out)."""
        try:
            response = await self._envd_http("GET", "/health", request_timeout)
        except (httpx.HTTPError, OSError):
            return False
        return response.status_code == 204 or response.is_success

    async def _envd_http(
        self, method: str, path: str, request_timeout: float | None
    ) -> httpx.Response:
        return await http_client().request(
            method,
            self._envd.url + path,
            headers=self._envd.headers(),
            timeout=self.connection_config.timeout(request_timeout),
        )

    def get_host(self, port: int, domain: str = "localhost") -> str:
        """``{port}-{sandbox_id}.{domain}`` on the server's port: the host name under which
        the server forwards HTTP and websockets to ``port`` in the sandbox."""
        server = httpx.URL(self.connection_config.sandbox_url)
        suffix = f":{server.port}" if server.port else ""
        return f"{port}-{self.sandbox_id}.{domain}{suffix}"

    def port_headers(self, port: int) -> dict[str, str]:
        """Headers that send a request to the server's URL on to ``port`` in the sandbox."""
        return self._envd.headers(port)

    def http_client(self, port: int, **kwargs: Any) -> httpx.AsyncClient:
        """An HTTP client whose requests go to ``port`` in the sandbox (close it when done)."""
        return httpx.AsyncClient(
            base_url=self.connection_config.sandbox_url, headers=self.port_headers(port), **kwargs
        )

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.kill()
