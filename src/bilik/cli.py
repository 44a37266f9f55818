"""The ``bilik`` command: ``serve``, ``sandbox``, ``template``, ``keys`` and ``bench``.

Commands that make something act as an API key (see :mod:`.cli_identity`), through the same
services as the server, so what they make is that key's team's, as if made through the API.

Startup is kept short: this module and the command modules it wires in (``cli_*``) import
only the standard library's light modules and :mod:`.config` when loaded; a command imports
what it needs (the runtime, the store, the SDK) when it runs. ``tests/test_cli_startup.py``
holds ``bilik --help`` to that.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

# (``import bilik.X as X``, not ``from . import X``: the latter asks the package for the
# attribute first, and ``bilik.__getattr__`` answers by loading the whole SDK)
import bilik.cli_identity as cli_identity
import bilik.cli_lifecycle as cli_lifecycle
import bilik.cli_spawn as cli_spawn
import bilik.cli_template as cli_template

from .config import InvalidSettings, Settings

if TYPE_CHECKING:
    import asyncio

    from .runtime import LocalRuntime, SandboxInfo
    from .store import ApiKey, Store

# The OCI runtimes ``--oci-runtime`` offers and bilik's own templates, named here so that
# parsing the command line needs neither the runtime nor the templates (held equal to
# ``bilik.runtime.backends.RUNTIMES`` and ``bilik.templates.defaults.DEFAULTS`` by the tests).
OCI_RUNTIMES = ("crun", "runsc")
DEFAULT_TEMPLATES = ("base", "code-interpreter-v1")
# The least memory and disk a sandbox may have, MiB (``bilik.runtime.spec``'s, as above).
MIN_MEMORY_MB = 32
MIN_DISK_MB = 16

DESCRIPTION = """\
bilik runs sandboxes for AI agents and speaks E2B's API.

Commands that create act as an API key: --key, else BILIK_API_KEY, else the key the server's
first start wrote to DATA_DIR/api-key. Run `bilik COMMAND --help` for a command's options."""


class CliError(Exception):
    """A mistake the user can fix: printed as one ``bilik: ...`` line, exit status 1."""


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env(
        data_dir=getattr(args, "data_dir", None),
        instance=getattr(args, "instance", None),
        oci_runtime=getattr(args, "oci_runtime", None),
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        database_url=getattr(args, "database_url", None),
        domain=getattr(args, "domain", None),
        warm_pool=getattr(args, "warm_pool", None),
        **{name: getattr(args, name, None) for name in _CAP_FLAGS},
        **{name: getattr(args, name, None) for name in _CONNECTION_FLAGS},
    )


# ``bilik serve`` flags for the operator caps (BILIK_MAX_*), with their help.
_CAP_FLAGS = {
    "max_cpu": "most vCPUs a create may ask for",
    "max_memory_mb": "most memory a create may ask for, MiB",
    "max_disk_mb": "most disk a create may ask for, MiB",
    "max_pids": "most processes a sandbox may run",
    "max_lifetime_s": "longest a sandbox may live, s",
    "max_upload_mb": "largest file upload of a template's COPY step, MiB",
    "max_uploads_mb": "most that one key's uploaded template files may take in all, MiB",
    "max_layers_mb": "most layer storage one key's templates may keep, MiB",
}

# ``bilik serve`` flags for how long clients may take and how many connections they may hold.
_CONNECTION_FLAGS = {
    "header_timeout_s": "longest a client may take to send a request's headers, s (default 10)",
    "body_timeout_s": "longest a request's body may stall, s (default 30)",
    "max_connections": "most connections held at once; past it, 503 (default 1000)",
    "max_streams_per_key": "most requests to one key's sandboxes at once; past it, 429 "
    "(default 256)",
}


def _runtime(args: argparse.Namespace, log: Callable[[str], None] | None = None) -> LocalRuntime:
    """The host's runtime, what it says going to ``log`` (default: stderr)."""
    from .runtime import LocalRuntime

    return LocalRuntime(_settings(args), log=log or (lambda line: print(line, file=sys.stderr)))


def _env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise CliError(f"--env expects NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def _row(info: SandboxInfo, names: dict[str, str] | None = None) -> dict[str, object]:
    """One sandbox for ``list`` and ``inspect``; ``names``: the templates' names by image."""
    return {
        "sandboxId": info.sandbox_id,
        "template": info.template,
        # (a user template's image is TEMPLATE_ID:BUILD_ID; people know it by NAME[:TAG])
        "templateName": (names or {}).get(info.template, info.template),
        "state": info.state,
        "cpu": _whole(info.limits.cpu),
        "memoryMB": info.limits.memory_mb,
        "diskMB": info.limits.disk_mb,
        "internet": info.internet,
        "address": info.address,
        "runtime": info.oci_runtime,
        "warmPool": info.pooled,  # waiting in the server's warm pool, no one's yet
        "endAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.end_at)),
    }


def _in_range(option: str, value: float | None, low: float, high: float) -> None:
    """A CLI value the runtime would refuse, refused first in the CLI's own words."""
    if value is not None and not low <= value <= high:
        raise CliError(
            f"{option} must be between {_number(low)} and {_number(high)}, got {_number(value)}"
        )


def _number(value: float) -> str:
    """A number as people write it: 1, 0.5, 99999999 (never 1e+08)."""
    return str(_whole(value))


def _whole(value: float) -> float:
    """``value`` as an int when it is a whole number (1, not 1.0), in tables and JSON alike."""
    return int(value) if float(value).is_integer() else value


class _Status:
    """What a command tells while it works: on a terminal, one line on stderr that each new
    message replaces and that is cleared when the command is done; elsewhere nothing, so that
    a command that fails says only why (its one ``bilik: ...`` line)."""

    def __init__(self) -> None:
        self.live = sys.stderr.isatty()
        self.shown = False

    def __call__(self, line: str) -> None:
        if self.live and line.strip():
            width = max(20, os.get_terminal_size(sys.stderr.fileno()).columns - 1)
            sys.stderr.write("\r\x1b[2K" + line.strip()[:width])
            sys.stderr.flush()
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
            self.shown = False


def _server_url(args: argparse.Namespace) -> tuple[str, bool]:
    """The server a command talks to: ``--url``, else ``BILIK_URL``, else ``E2B_API_URL``,
    else where ``bilik serve`` listens with these settings (``BILIK_HOST``, ``BILIK_PORT``);
    and whether it was given (by the flag or a variable)."""
    if getattr(args, "url", None):
        return str(args.url).rstrip("/"), True
    for variable in ("BILIK_URL", "E2B_API_URL"):
        if value := os.environ.get(variable, "").strip():
            return value.rstrip("/"), True
    settings = _settings(args)
    host = "127.0.0.1" if settings.host in ("", "0.0.0.0", "::") else settings.host
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.port}", False


def _create_through_server(
    args: argparse.Namespace, url: str, given: bool, chosen: cli_identity.ChosenKey
) -> str | None:
    """Create the sandbox with ``POST /sandboxes`` at ``url``, as the SDKs do; its id, or
    None when no server listens at the address these settings' server would (a server
    ``given`` must answer). (The standard library's client: it loads in milliseconds.)"""
    import http.client
    import json
    import urllib.parse

    body: dict[str, object] = {
        "templateID": args.template,
        "timeout": args.timeout,
        "allow_internet_access": not args.no_internet,
        "envVars": _env_pairs(args.env),
    }
    if args.cpu is not None:
        body["cpuCount"] = int(args.cpu)
    if args.memory_mb is not None:
        body["memoryMB"] = args.memory_mb
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(f"the server's URL must be http(s)://HOST[:PORT], got {url!r}")
    connection = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )(parts.hostname, parts.port, timeout=_CREATE_TIMEOUT_S)
    try:
        connection.request(
            "POST",
            parts.path.rstrip("/") + "/sandboxes",
            json.dumps(body),
            {"X-API-Key": chosen.key, "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        answer = response.read()
    except ConnectionRefusedError:
        if not given:
            return None
        raise CliError(
            f"no server answers at {url}: start `bilik serve`, or give its address with --url "
            "or BILIK_URL (with neither set and no server running, create makes the sandbox "
            "itself)"
        ) from None
    except OSError as e:
        raise CliError(f"the server at {url} did not answer: {e}") from None
    finally:
        connection.close()
    cli_identity.announce(chosen)  # (a server answered: the key is what it judged)
    try:
        data = json.loads(answer)
    except ValueError:
        data = {}
    if response.status == 201 and isinstance(data, dict) and "sandboxID" in data:
        return str(data["sandboxID"])
    if response.status == 401:
        raise cli_identity.NoKey(cli_identity.not_active(chosen))
    message = data.get("message") if isinstance(data, dict) else None
    raise CliError(message or f"the server at {url} answered {response.status} {response.reason}")


# A create may wait for a default template's first build (minutes), never for ever.
_CREATE_TIMEOUT_S = 1800


def _sandbox_create(args: argparse.Namespace) -> int:
    # (not a coroutine: a create through the server needs no event loop, and asyncio takes
    # longer to load than the create takes)
    settings = _settings(args)
    caps = settings.caps
    # (the caps of this host's settings, checked before anything is asked of anyone)
    _in_range("--cpu", args.cpu, 0.1, caps.cpu)
    _in_range("--memory-mb", args.memory_mb, MIN_MEMORY_MB, caps.memory_mb)
    _in_range("--disk-mb", args.disk_mb, MIN_DISK_MB, caps.disk_mb)
    _in_range("--timeout", args.timeout, 1, caps.lifetime_s)
    chosen = cli_identity.choose(args.key, settings.data_dir)
    # A running server makes it, as an API create: fast, and the server's warm pool and
    # caches serve it. What only this host's runtime can honour is made here.
    here_only = args.disk_mb is not None or args.oci_runtime is not None
    if args.cpu is not None and not float(args.cpu).is_integer():
        here_only = True
    if not here_only:
        made = _create_through_server(args, *_server_url(args), chosen)
        if made is not None:
            print(made)
            return 0
    import asyncio

    return asyncio.run(_create_here(args, settings, chosen))


async def _create_here(
    args: argparse.Namespace, settings: Settings, chosen: cli_identity.ChosenKey
) -> int:
    """Create the sandbox in this process, through the same service as the server's API."""
    import contextlib
    import secrets
    from collections.abc import Iterator

    from .api.errors import ApiError
    from .api.limits import CreateLimiter
    from .api.parse import template_ref
    from .runtime import Limits
    from .sandboxes import CreateRequest, SandboxService
    from .store import Store, database_url
    from .templates import TemplateService
    from .templates.service import TemplateUnavailable

    try:
        name, tag = template_ref(args.template, "--template")
    except ApiError as e:
        raise CliError(e.message) from None
    store = await Store.open(database_url(settings.data_dir, settings.database_url))
    status = _Status()
    runtime = _runtime(args, log=status)
    try:
        key = await cli_identity.verify(chosen, store)
        cli_identity.announce(chosen, key)
        await runtime.start()
        want = CreateRequest(
            key_id=key.team_id,
            template=name,
            tag=tag,
            timeout_s=args.timeout,
            cpu=args.cpu,
            memory_mb=args.memory_mb,
            disk_mb=args.disk_mb,
            internet=not args.no_internet,
            env=_env_pairs(args.env),
            access_token=secrets.token_hex(16),
        )

        @contextlib.contextmanager
        def admit(running: int, limits: Limits) -> Iterator[None]:
            # The key's caps, as the API applies them.
            try:
                CreateLimiter().check(key, running, args.timeout, limits.cpu, limits.memory_mb)
            except ApiError as e:
                raise CliError(e.message) from None
            yield

        # Default templates build with names resolved through the host's forwarder (a
        # running server's, else one of this command's own).
        dns = None
        with contextlib.suppress(OSError):
            dns = await runtime.serve_dns()
        templates = TemplateService(runtime, store, settings.data_dir)
        try:
            sandbox = await SandboxService(runtime, store, templates).create(want, admit)
        except TemplateUnavailable as e:
            raise CliError(e.message) from None
        finally:
            await templates.close()
            if dns is not None:
                await dns.close()
    finally:
        status.clear()
        await runtime.close()
        await store.close()
    print(sandbox.info.sandbox_id)
    return 0


async def _sandbox_exec(args: argparse.Namespace) -> int:
    import asyncio

    from .runtime import SandboxNotFound

    runtime = _runtime(args)
    command = list(args.command)
    if command and command[0].startswith("-") and "--" in command:
        # Options after the id end at "--"; the command follows it.
        at = command.index("--")
        _EXEC_OPTIONS.parse_args(command[:at], namespace=args)
        command = command[at + 1 :]
    if not command:
        raise CliError("give the command after the sandbox id: bilik sandbox exec ID COMMAND...")
    record = runtime.records.load(args.sandbox_id)
    if record is None:
        raise SandboxNotFound(args.sandbox_id)
    forward_stdin = not sys.stdin.isatty()
    # Through sh, as the SDKs run commands: a command not found exits 127 and says so.
    proc = await runtime.exec(
        args.sandbox_id,
        ["/bin/sh", "-c", 'exec "$@"', "sh", *command],
        user=args.user or record.user or "root",
        cwd=args.cwd or record.workdir or None,
        env=_env_pairs(args.env),
        stdin=forward_stdin,
    )
    pump = asyncio.create_task(_pump_stdin(proc.stdin)) if forward_stdin else None
    streams = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    async for name, chunk in proc.output():
        streams[name].write(chunk)
        streams[name].flush()
    if pump is not None:
        pump.cancel()
    code = await proc.wait()
    if code < 0 or code > 128:
        # Killed: say so when it was the sandbox that ended under it.
        try:
            info = await runtime.inspect(args.sandbox_id)
            ended = info.state != "running" or info.end_at <= time.time()
        except SandboxNotFound:
            ended = True
        if ended:
            print(
                f"bilik: sandbox {args.sandbox_id} ended (its timeout, or a kill) while the "
                "command ran",
                file=sys.stderr,
            )
    return code


async def _pump_stdin(writer: asyncio.StreamWriter | None) -> None:
    """Copy our stdin (a pipe or file) to the sandbox process, then close its stdin.

    Reads happen in a daemon thread: a blocked read of a pipe that never closes must not keep
    the command from exiting when the process is done.
    """
    import asyncio
    import threading

    if writer is None:
        return
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes] = asyncio.Queue()

    def read() -> None:
        while True:
            chunk = os.read(sys.stdin.fileno(), 65536)
            loop.call_soon_threadsafe(chunks.put_nowait, chunk)
            if not chunk:
                return

    threading.Thread(target=read, daemon=True).start()
    try:
        while chunk := await chunks.get():
            writer.write(chunk)
            await writer.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        writer.close()


async def _sandbox_list(args: argparse.Namespace) -> int:
    rows = await _rows(args, await _runtime(args).list())
    if args.json:
        _print_rows(rows, [], as_json=True)
        return 0
    columns = ["sandboxId", "template", "state", "owner", "cpu", "memoryMB", "internet", "endAt"]
    shown = [{**r, "template": r["templateName"]} for r in rows]
    _print_rows(shown, columns, as_json=False)
    return 0


async def _rows(args: argparse.Namespace, sandboxes: Sequence[SandboxInfo]) -> list[dict[str, Any]]:
    """``sandboxes`` as ``list`` and ``inspect`` show them: with their templates' names and
    their owners (the team whose key made them; a warm-pool sandbox is no one's yet)."""
    names, owners = await _names_and_owners(args, sandboxes)
    rows = []
    for info in sandboxes:
        row = _row(info, names)
        row["owner"] = "(warm pool)" if info.pooled else owners.get(info.sandbox_id, "-")
        rows.append(row)
    return rows


async def _names_and_owners(
    args: argparse.Namespace, sandboxes: Sequence[SandboxInfo]
) -> tuple[dict[str, str], dict[str, str]]:
    """The names templates go by, by image; and each made sandbox's owning team, by id.

    An image is ``NAME:VERSION`` for bilik's own templates (shown as ``NAME``), a user
    template's id for its default build (shown as its name) and ``ID:BUILD_ID`` for a tagged
    build (shown as ``NAME:TAG``)."""
    if not sandboxes:
        return {}, {}  # (nothing to name: the store is not even loaded)
    store = await _open_store(args)
    try:
        made = {r.id: r for r in await store.sandboxes.all()}
        names: dict[str, str] = {}
        for info in sandboxes:
            template_id, _, build_id = info.template.partition(":")
            if template_id in DEFAULT_TEMPLATES:
                names[info.template] = template_id
                continue
            row = made.get(info.sandbox_id)
            if row is None or info.template in names:
                continue
            template = await store.templates.get(template_id, row.key_id)
            if template is None:
                continue
            names[info.template] = template.name
            if build_id:
                tags = await store.templates.tags(template_id)
                tagged = sorted(t.tag for t in tags if t.build_id == build_id)
                if tagged and "default" not in tagged:  # (the default build goes by the name)
                    names[info.template] = f"{template.name}:{tagged[0]}"
    finally:
        await store.close()
    return names, {sandbox_id: row.key_id for sandbox_id, row in made.items()}


def _print_rows(rows: list[dict[str, object]], columns: list[str], *, as_json: bool) -> None:
    """Rows as aligned columns for people, or as JSON for scripts."""
    import json

    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = [columns] + [[str(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


async def _sandbox_inspect(args: argparse.Namespace) -> int:
    import json

    rows = await _rows(args, [await _runtime(args).inspect(args.sandbox_id)])
    print(json.dumps(rows[0], indent=1))
    return 0


async def _sandbox_kill(args: argparse.Namespace) -> int:
    await _runtime(args).kill(args.sandbox_id)
    return 0


async def _sandbox_logs(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    from datetime import UTC, datetime

    lines = await _runtime(args).logs(args.sandbox_id)
    if args.json:
        print(json.dumps([dataclasses.asdict(line) for line in lines], indent=1))
    else:
        for line in lines:
            stamp = datetime.fromtimestamp(line.timestamp, UTC).isoformat(timespec="milliseconds")
            print(f"{stamp} {line.stream} {line.line}")
    return 0


async def _sandbox_metrics(args: argparse.Namespace) -> int:
    usage = await _runtime(args).usage(args.sandbox_id)
    mib = 1024 * 1024
    row: dict[str, object] = {
        "sandboxId": args.sandbox_id,
        "cpuCount": usage.cpu_count,
        "cpuUsedPct": usage.cpu_used_pct,
        "memUsedMiB": round(usage.mem_used / mib, 1),
        "memTotalMiB": round(usage.mem_total / mib, 1),
        "diskUsedMiB": round(usage.disk_used / mib, 1),
        "diskTotalMiB": round(usage.disk_total / mib, 1),
    }
    if args.json:
        import json

        print(json.dumps(row, indent=1))
    else:
        _print_rows([row], list(row), as_json=False)
    return 0


async def _template_build_default(args: argparse.Namespace) -> int:
    from .templates import BuildFailed, default_builds
    from .templates.defaults import DEFAULTS

    runtime = _runtime(args)
    await runtime.start()
    try:
        if unknown := set(args.names) - set(DEFAULTS):
            raise CliError(f"not bilik's own: {sorted(unknown)}; those are {list(DEFAULTS)}")
        async with default_builds.outside_a_server(runtime) as defaults:
            # (in their order: a template's base before it)
            for name in [name for name in DEFAULTS if name in args.names or not args.names]:
                image = await defaults.ensure(name, log=print, rebuild=args.rebuild)
                print(f"{name}: ready ({image})")
    except BuildFailed as e:
        print(f"bilik: {e.message}", file=sys.stderr)
        return 1
    finally:
        await runtime.close()
    return 0


async def _open_store(args: argparse.Namespace) -> Store:
    from .store import Store, database_url

    settings = _settings(args)
    return await Store.open(database_url(settings.data_dir, settings.database_url))


def _key_row(key: ApiKey) -> dict[str, object]:
    return {
        "id": key.id,
        "name": key.name,
        "team": key.team_id,
        "prefix": key.prefix,
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(key.created_at)),
        "state": "active" if key.active else "revoked",
        "maxSandboxes": key.caps.max_sandboxes,
        "createsPerMinute": key.caps.creates_per_minute,
        "maxTimeout": key.caps.max_timeout_s,
        "maxCpu": key.caps.max_cpu,
        "maxMemoryMB": key.caps.max_memory_mb,
    }


_KEY_COLUMNS = [
    "id",
    "name",
    "team",
    "prefix",
    "createdAt",
    "state",
    "maxSandboxes",
    "createsPerMinute",
    "maxTimeout",
    "maxCpu",
    "maxMemoryMB",
]


async def _keys_create(args: argparse.Namespace) -> int:
    from .store import KeyCaps

    store = await _open_store(args)
    try:
        caps = KeyCaps(
            args.max_sandboxes,
            args.creates_per_minute,
            args.max_timeout,
            args.max_cpu,
            args.max_memory_mb,
        )
        record, key = await store.keys.create(args.name, caps)
    finally:
        await store.close()
    print(f"created API key {record.id} ({record.name}); it is shown only now:", file=sys.stderr)
    print(key)
    return 0


async def _keys_list(args: argparse.Namespace) -> int:
    store = await _open_store(args)
    try:
        keys = await store.keys.list(active=not args.all)
    finally:
        await store.close()
    rows = [_key_row(k) for k in keys]
    if not args.json:  # (no cap: "-")
        rows = [{c: "-" if v is None else v for c, v in row.items()} for row in rows]
    _print_rows(rows, _KEY_COLUMNS, as_json=args.json)
    return 0


async def _keys_revoke(args: argparse.Namespace) -> int:
    store = await _open_store(args)
    try:
        before = {k.id: k for k in await store.keys.list()}.get(args.key_id)
        if before is not None and not before.active:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(before.revoked_at or 0))
            raise CliError(f"API key {before.id} ({before.name}) was already revoked at {when}")
        record = await store.keys.revoke(args.key_id)
    finally:
        await store.close()
    print(f"revoked API key {record.id} ({record.name}); it no longer authenticates")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging

    from .api.app import create_app
    from .api.serving import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = _settings(args)
    serve(create_app(settings), settings)
    return 0


def _bench(args: argparse.Namespace) -> int:
    # The benchmarks live in the bench/ tree of the source checkout, beside src/.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    if args.suite == "cli":
        from bench import cli as bench_cli

        return bench_cli.main(_settings(args), samples=args.samples or 9)
    if args.suite == "pause":
        from bench import pause as bench_pause

        runtimes = args.runtimes.split(",")
        return bench_pause.main(_settings(args), samples=args.samples or 20, runtimes=runtimes)
    args.samples = args.samples or 200
    from bench import api as bench_api
    from bench import envd as bench_envd
    from bench import interpreter as bench_interpreter
    from bench import runtime as bench_runtime

    if args.suite == "api":
        return bench_api.main(_settings(args), samples=args.samples, burst=50, held=args.idle)
    if args.suite == "interpreter":
        return bench_interpreter.main(_settings(args), samples=args.samples)
    if args.suite == "envd":
        return bench_envd.main(_settings(args), samples=args.samples, idle=args.idle)
    return bench_runtime.main(
        _settings(args), creates=args.creates, idle=args.idle, runtimes=args.runtimes
    )


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one ``bilik: ...`` line that says where to look (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"bilik: {message} (see `{self.prog} --help`)\n")


def _positive(text: str) -> int:
    """An argparse type: a whole number above 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _exec_options() -> argparse.ArgumentParser:
    """``exec``'s own options: before the sandbox id, or after it and ended by ``--``."""
    options = _Parser(prog="bilik sandbox exec", add_help=False)
    options.add_argument(
        "--user", help="run as this user of the sandbox (default: its template's, as the SDKs)"
    )
    options.add_argument(
        "--cwd", help="working directory (default: its template's, else the user's home)"
    )
    options.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="an environment variable"
    )
    return options


_EXEC_OPTIONS = _exec_options()


def _add_instance(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--instance", help="name of host objects (BILIK_INSTANCE, default bilik)")


def _parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = _Parser(
        prog="bilik", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action=_Version, help="print the version")
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument(
        "--data-dir", type=Path, help="data directory (BILIK_DATA_DIR, default /var/lib/bilik)"
    )
    storage = argparse.ArgumentParser(add_help=False, parents=[data])
    storage.add_argument(
        "--database-url", help="PostgreSQL URL instead of SQLite (BILIK_DATABASE_URL)"
    )
    host = argparse.ArgumentParser(add_help=False, parents=[data])
    _add_instance(host)
    # (every option of the two above, and the OCI runtime new sandboxes run under)
    common = argparse.ArgumentParser(add_help=False, parents=[storage])
    _add_instance(common)
    common.add_argument(
        "--oci-runtime",
        choices=OCI_RUNTIMES,
        help="OCI runtime of new sandboxes (BILIK_OCI_RUNTIME, default crun)",
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="JSON for scripts, not a table")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve", parents=[common], help="run the server (API, sandbox plane, warm pool)"
    )
    serve.add_argument("--host", help="address to listen on (BILIK_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (BILIK_PORT, default 3000)")
    serve.add_argument("--domain", help="sandbox ports as {port}-{id}.DOMAIN (BILIK_DOMAIN)")
    serve.add_argument(
        "--warm-pool",
        metavar="TEMPLATE=N,...",
        help="sandboxes kept ready per template, e.g. code-interpreter-v1=2,base=1; '' for "
        "none (BILIK_WARM_POOL, default code-interpreter-v1=1)",
    )
    for name, help_text in (_CAP_FLAGS | _CONNECTION_FLAGS).items():
        flag = "--" + name.replace("_", "-")
        serve.add_argument(flag, type=int, help=f"{help_text} (BILIK_{name.upper()})")
    serve.set_defaults(func=_serve, sync=True)

    sandbox = sub.add_parser(
        "sandbox",
        help="create, run commands in, inspect and kill sandboxes on this host",
        description="Sandboxes on this host. create acts as an API key (its sandbox is that "
        "key's, as if made through the API); spawn goes through the server's API; the others "
        "are the operator's and act on every key's sandboxes.",
    )
    sb = sandbox.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = sb.add_parser(
        "create",
        parents=[common],
        help="create a sandbox as an API key, print its id",
        description="Create a sandbox as an API key and print its id. It is that key's, as "
        "if made through the API: Sandbox.connect(ID) with the key reaches it. The server "
        "makes it, as an API create (--url, else BILIK_URL, else E2B_API_URL, else where "
        "`bilik serve` listens with these settings); with none of those set and no server "
        "running, or with --disk-mb, a fractional --cpu or --oci-runtime (which only this "
        "host's runtime honours), this command makes it itself.",
    )
    cli_identity.add_key_option(create)
    create.add_argument(
        "--url",
        help="the server (BILIK_URL, else E2B_API_URL, else http://BILIK_HOST:BILIK_PORT, "
        "default http://127.0.0.1:3000)",
    )
    create.add_argument(
        "--template",
        default="base",
        help="template name or id, NAME:TAG for a tagged build (default: %(default)s)",
    )
    create.add_argument("--cpu", type=float, help="vCPUs (default: the template's)")
    create.add_argument("--memory-mb", type=int, help="memory, MiB (default: the template's)")
    create.add_argument("--disk-mb", type=int, help="disk, MiB (default: the template's)")
    create.add_argument(
        "--timeout", type=int, default=300, help="seconds it lives (default: %(default)s)"
    )
    create.add_argument(
        "--no-internet", action="store_true", help="no network access out of the sandbox"
    )
    create.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="an environment variable"
    )
    create.set_defaults(func=_sandbox_create, sync=True)
    exe = sb.add_parser(
        "exec",
        parents=[host, _EXEC_OPTIONS],
        help="run a command in a sandbox, stream its output, exit with its status",
        usage="bilik sandbox exec [OPTIONS] SANDBOX_ID COMMAND [ARG...]",
        description="Run COMMAND in the sandbox and exit with its exit status (127: not "
        "found). Options go before the id (or after it, ended by --). An operator command: "
        "any key's sandbox.",
    )
    exe.add_argument("sandbox_id", metavar="SANDBOX_ID", help="the sandbox's id")
    exe.add_argument(
        "command", metavar="COMMAND", nargs=argparse.REMAINDER, help="the command and its arguments"
    )
    exe.set_defaults(func=_sandbox_exec)
    ls = sb.add_parser(
        "list",
        parents=[host, as_json],
        help="list every key's sandboxes on this host (operator)",
    )
    ls.set_defaults(func=_sandbox_list)
    inspect = sb.add_parser("inspect", parents=[host], help="show one sandbox (operator)")
    inspect.add_argument("sandbox_id", metavar="SANDBOX_ID", help="the sandbox's id")
    inspect.set_defaults(func=_sandbox_inspect)
    kill = sb.add_parser("kill", parents=[host], help="kill any key's sandbox (operator)")
    kill.add_argument("sandbox_id", metavar="SANDBOX_ID", help="the sandbox's id")
    kill.set_defaults(func=_sandbox_kill)
    logs = sb.add_parser(
        "logs", parents=[host, as_json], help="what a sandbox's start command wrote (operator)"
    )
    logs.add_argument("sandbox_id", metavar="SANDBOX_ID", help="the sandbox's id")
    logs.set_defaults(func=_sandbox_logs)
    metrics = sb.add_parser(
        "metrics", parents=[host, as_json], help="a sandbox's CPU, memory and disk (operator)"
    )
    metrics.add_argument("sandbox_id", metavar="SANDBOX_ID", help="the sandbox's id")
    metrics.set_defaults(func=_sandbox_metrics)
    cli_spawn.add_command(sb)
    cli_lifecycle.add_commands(sb)

    template = sub.add_parser("template", help="build, list and delete templates")
    tp = template.add_subparsers(dest="action", required=True, metavar="ACTION")
    default = tp.add_parser(
        "build-default", parents=[common], help="build bilik's default templates ahead of use"
    )
    default.add_argument(
        "names", nargs="*", help=f"which (default: all: {', '.join(DEFAULT_TEMPLATES)})"
    )
    default.add_argument(
        "--rebuild", action="store_true", help="run every step again (packages up to date)"
    )
    default.set_defaults(func=_template_build_default)
    cli_template.add_commands(tp)

    keys = sub.add_parser("keys", help="make, list and revoke API keys (stored only as hashes)")
    kp = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    kcreate = kp.add_parser(
        "create",
        parents=[storage],
        help="make a key and print it, once",
        description="Make an API key (a team of its own) and print it: it is shown only now. "
        "A cap left out is only the server's own.",
    )
    kcreate.add_argument("--name", default="default", help="a label (default: %(default)s)")
    kcreate.add_argument("--max-sandboxes", type=_positive, help="sandboxes running at once")
    kcreate.add_argument(
        "--creates-per-minute", type=_positive, help="creates a minute (past it, 429)"
    )
    kcreate.add_argument(
        "--max-timeout", type=_positive, help="longest lifetime a create may ask for, s"
    )
    kcreate.add_argument("--max-cpu", type=_positive, help="most vCPUs a create may ask for")
    kcreate.add_argument(
        "--max-memory-mb", type=_positive, help="most memory a create may ask for, MiB"
    )
    kcreate.set_defaults(func=_keys_create)
    klist = kp.add_parser(
        "list", parents=[storage, as_json], help="list keys and their caps (never the keys)"
    )
    klist.add_argument("--all", action="store_true", help="revoked keys too")
    klist.set_defaults(func=_keys_list)
    krevoke = kp.add_parser("revoke", parents=[storage], help="revoke a key by its id")
    krevoke.add_argument("key_id", metavar="KEY_ID", help="its id, from `bilik keys list`")
    krevoke.set_defaults(func=_keys_revoke)

    bench = sub.add_parser("bench", parents=[common], help="measure speed and memory")
    bench.add_argument(
        "suite",
        choices=["runtime", "envd", "api", "interpreter", "cli", "pause"],
        help="what to measure (cli: how long commands take to start; pause: pause, resume "
        "and fork)",
    )
    bench.add_argument(
        "--creates", type=int, default=50, help="runtime: creates to time (default: %(default)s)"
    )
    bench.add_argument(
        "--samples",
        type=int,
        default=None,
        help="samples to time (default: 200; cli: 9; pause: 20 cycles per mode)",
    )
    bench.add_argument(
        "--idle",
        type=int,
        default=500,
        help="idle (running) sandboxes to hold at once (default: %(default)s)",
    )
    bench.add_argument(
        "--runtimes",
        default="crun,runsc",
        help="runtime, pause: OCI runtimes to compare (default: %(default)s)",
    )
    bench.set_defaults(func=_bench, sync=True)
    return parser


class _Version(argparse.Action):
    """``--version``: the installed version, looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> NoReturn:
        print(f"bilik {_version()}")
        parser.exit()


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("bilik")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# Errors the user can do something about, by the module that defines them: one ``bilik: ...``
# line each. By name, so that checking for them never imports a module the command did not
# need (an error of a module never imported cannot have been raised).
_USER_ERRORS = {
    "bilik.runtime.errors": "RuntimeFailure",
    "bilik.store.keys": "KeyNotFound",
}


def _is_user_error(error: BaseException) -> bool:
    if isinstance(
        error, CliError | InvalidSettings | cli_identity.NoKey | cli_template.TemplateFileError
    ):
        return True
    for module, name in _USER_ERRORS.items():
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(error, getattr(loaded, name)):
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bilik`` command."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if getattr(args, "sync", False):
            return int(args.func(args))
        import asyncio

        return int(asyncio.run(args.func(args)))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # (the reader went away, as with `| head`: nothing more to say, and nowhere to say it)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"bilik: {_one_line(str(e))}", file=sys.stderr)
        return 1


def _one_line(message: str) -> str:
    """A message of several lines (a start command's last output) as one line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return " / ".join(lines).replace(": / ", ": ") if lines else message


if __name__ == "__main__":
    sys.exit(main())
