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
from bilik.sdk.exceptions import SandboxNotFoundException
from bilik.sdk.files import AsyncFilesystem
from bilik.sdk.models import ResourceUsage, SandboxInfo, SandboxMetrics, SandboxQuery

DEFAULT_TEMPLATE = "code-interpreter-v1"
DEFAULT_TIMEOUT = 300
MIB = 1024 * 1024


class NetworkOpts(TypedDict, total=False):
    """Egress rules: addresses, CIDRs or domain names allowed or denied."""

    allow_out: list[str]
    deny_out: list[str]


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
        **opts: Any,
    ) -> AsyncSandbox:
        """Create a sandbox from a template (``code-interpreter-v1`` unless given) and return
        it once it is ready. ``timeout`` is its lifetime in seconds (300 by default);
        ``envs`` are set for everything it runs; ``allow_internet_access`` and ``network``
        (``allow_out``/``deny_out``) set its egress; ``cpu_count`` and ``memory_mb`` its size.
        Connection options: ``api_key``, ``api_url``, ``request_timeout``, ``retries``."""
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
        """Connect to a running sandbox by id (and set its remaining lifetime, when given)."""
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
