"""The ``bilik`` command: ``serve``, ``sandbox``, ``template`` and ``bench``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from . import cli_spawn, cli_template
from .config import InvalidSettings, Settings
from .runtime import Limits, LocalRuntime, Runtime, RuntimeFailure, SandboxInfo, SandboxSpec
from .runtime.backends import RUNTIMES
from .store import ApiKey, KeyCaps, KeyNotFound, Store, database_url
from .templates import BuildFailed, default_builds
from .templates.defaults import DEFAULTS


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


def _runtime(args: argparse.Namespace) -> Runtime:
    return LocalRuntime(_settings(args), log=lambda line: print(line, file=sys.stderr))


def _env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--env expects NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def _row(info: SandboxInfo) -> dict[str, object]:
    return {
        "sandboxId": info.sandbox_id,
        "template": info.template,
        "state": info.state,
        "cpu": info.limits.cpu,
        "memoryMB": info.limits.memory_mb,
        "diskMB": info.limits.disk_mb,
        "internet": info.internet,
        "address": info.address,
        "runtime": info.oci_runtime,
        "warmPool": info.pooled,  # waiting in the server's warm pool, no one's yet
        "endAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.end_at)),
    }


async def _sandbox_create(args: argparse.Namespace) -> int:
    runtime = _runtime(args)
    await runtime.start()
    spec = SandboxSpec(
        template=args.template,
        limits=Limits(cpu=args.cpu, memory_mb=args.memory_mb, disk_mb=args.disk_mb, pids=args.pids),
        timeout_s=args.timeout,
        internet=not args.no_internet,
        env=_env_pairs(args.env),
    )
    try:
        if args.template in DEFAULTS:
            async with default_builds.outside_a_server(runtime) as defaults:
                image = await defaults.ensure(
                    args.template, log=lambda line: print(line, file=sys.stderr)
                )
            spec = dataclasses.replace(spec, template=image)
        info = await runtime.create(spec, oci_runtime=args.runtime)
    except BuildFailed as e:
        print(f"bilik: {e.message}", file=sys.stderr)
        return 1
    finally:
        await runtime.close()
    print(info.sandbox_id)
    return 0


async def _sandbox_exec(args: argparse.Namespace) -> int:
    runtime = _runtime(args)
    command = list(args.command)
    if not command:
        raise SystemExit("bilik sandbox exec: give a command after --")
    forward_stdin = not sys.stdin.isatty()
    proc = await runtime.exec(
        args.sandbox_id,
        command,
        user=args.user,
        cwd=args.cwd,
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
    return await proc.wait()


async def _pump_stdin(writer: asyncio.StreamWriter | None) -> None:
    """Copy our stdin (a pipe or file) to the sandbox process, then close its stdin.

    Reads happen in a daemon thread: a blocked read of a pipe that never closes must not keep
    the command from exiting when the process is done.
    """
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
    rows = [_row(i) for i in await _runtime(args).list()]
    columns = ["sandboxId", "template", "state", "cpu", "memoryMB", "internet", "endAt"]
    _print_rows(rows, columns, as_json=args.json)
    return 0


def _print_rows(rows: list[dict[str, object]], columns: list[str], *, as_json: bool) -> None:
    """Rows as aligned columns for people, or as JSON for scripts."""
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = [columns] + [[str(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


async def _sandbox_inspect(args: argparse.Namespace) -> int:
    print(json.dumps(_row(await _runtime(args).inspect(args.sandbox_id)), indent=1))
    return 0


async def _sandbox_kill(args: argparse.Namespace) -> int:
    await _runtime(args).kill(args.sandbox_id)
    return 0


async def _sandbox_logs(args: argparse.Namespace) -> int:
    lines = await _runtime(args).console(args.sandbox_id)
    if args.json:
        print(json.dumps(lines, indent=1))
    else:
        print("\n".join(lines))
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
        print(json.dumps(row, indent=1))
    else:
        _print_rows([row], list(row), as_json=False)
    return 0


async def _template_build_default(args: argparse.Namespace) -> int:
    runtime = _runtime(args)
    await runtime.start()
    try:
        if unknown := set(args.names) - set(DEFAULTS):
            raise SystemExit(
                f"bilik: not bilik's own: {sorted(unknown)}; those are {list(DEFAULTS)}"
            )
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
    settings = _settings(args)
    return await Store.open(database_url(settings.data_dir, settings.database_url))


def _key_row(key: ApiKey) -> dict[str, object]:
    return {
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(key.created_at)),
        "state": "active" if key.active else "revoked",
        "maxSandboxes": key.caps.max_sandboxes,
        "createsPerMinute": key.caps.creates_per_minute,
        "maxTimeout": key.caps.max_timeout_s,
        "maxCpu": key.caps.max_cpu,
        "maxMemoryMB": key.caps.max_memory_mb,
    }


async def _keys_create(args: argparse.Namespace) -> int:
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
        rows = [_key_row(k) for k in await store.keys.list()]
    finally:
        await store.close()
    _print_rows(rows, ["id", "name", "prefix", "createdAt", "state"], as_json=args.json)
    return 0


async def _keys_revoke(args: argparse.Namespace) -> int:
    store = await _open_store(args)
    try:
        await store.keys.revoke(args.key_id)
    finally:
        await store.close()
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bilik", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, help="data directory (BILIK_DATA_DIR)")
    common.add_argument("--instance", help="name of host objects (BILIK_INSTANCE)")
    common.add_argument(
        "--database-url", help="PostgreSQL URL instead of SQLite (BILIK_DATABASE_URL)"
    )
    common.add_argument(
        "--oci-runtime",
        choices=list(RUNTIMES),
        help="default OCI runtime (BILIK_OCI_RUNTIME)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common], help="run the bilik server")
    serve.add_argument("--host", help="address to listen on (BILIK_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (BILIK_PORT)")
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

    sandbox = sub.add_parser("sandbox", help="create, inspect and kill sandboxes on this host")
    sb = sandbox.add_subparsers(dest="action", required=True)
    create = sb.add_parser("create", parents=[common], help="create a sandbox, print its id")
    create.add_argument("--template", default="base")
    create.add_argument("--cpu", type=float, default=1)
    create.add_argument("--memory-mb", type=int, default=512)
    create.add_argument("--disk-mb", type=int, default=1024)
    create.add_argument("--pids", type=int, default=1024)
    create.add_argument("--timeout", type=float, default=300, help="lifetime in seconds")
    create.add_argument("--no-internet", action="store_true")
    create.add_argument("--runtime", choices=list(RUNTIMES))
    create.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    create.set_defaults(func=_sandbox_create)
    exe = sb.add_parser("exec", parents=[common], help="run a command, stream its output")
    exe.add_argument("sandbox_id")
    exe.add_argument("--user", default="root")
    exe.add_argument("--cwd")
    exe.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    exe.add_argument("command", nargs="*", help="the command, after --")
    exe.set_defaults(func=_sandbox_exec)
    ls = sb.add_parser("list", parents=[common], help="list sandboxes")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_sandbox_list)
    inspect = sb.add_parser("inspect", parents=[common], help="show one sandbox")
    inspect.add_argument("sandbox_id")
    inspect.set_defaults(func=_sandbox_inspect)
    kill = sb.add_parser("kill", parents=[common], help="kill a sandbox")
    kill.add_argument("sandbox_id")
    kill.set_defaults(func=_sandbox_kill)
    logs = sb.add_parser("logs", parents=[common], help="what a sandbox's start command wrote")
    logs.add_argument("sandbox_id")
    logs.add_argument("--json", action="store_true")
    logs.set_defaults(func=_sandbox_logs)
    metrics = sb.add_parser("metrics", parents=[common], help="a sandbox's CPU, memory and disk")
    metrics.add_argument("sandbox_id")
    metrics.add_argument("--json", action="store_true")
    metrics.set_defaults(func=_sandbox_metrics)
    cli_spawn.add_command(sb)

    template = sub.add_parser("template", help="templates")
    tp = template.add_subparsers(dest="action", required=True)
    default = tp.add_parser(
        "build-default", parents=[common], help="build bilik's default templates ahead of use"
    )
    default.add_argument("names", nargs="*", help=f"which (default: all: {', '.join(DEFAULTS)})")
    default.add_argument(
        "--rebuild", action="store_true", help="run every step again (packages up to date)"
    )
    default.set_defaults(func=_template_build_default)
    cli_template.add_commands(tp)

    keys = sub.add_parser("keys", help="API keys (stored only as hashes)")
    kp = keys.add_subparsers(dest="action", required=True)
    kcreate = kp.add_parser("create", parents=[common], help="make a key and print it, once")
    kcreate.add_argument("--name", default="default", help="a label for people")
    kcreate.add_argument("--max-sandboxes", type=int, help="sandboxes running at once")
    kcreate.add_argument("--creates-per-minute", type=int, help="creates a minute (then 429)")
    kcreate.add_argument("--max-timeout", type=int, help="longest lifetime a create may ask, s")
    kcreate.add_argument("--max-cpu", type=int, help="most vCPUs a create may ask for")
    kcreate.add_argument("--max-memory-mb", type=int, help="most memory a create may ask, MiB")
    kcreate.set_defaults(func=_keys_create)
    klist = kp.add_parser("list", parents=[common], help="list keys (never the keys themselves)")
    klist.add_argument("--json", action="store_true")
    klist.set_defaults(func=_keys_list)
    krevoke = kp.add_parser("revoke", parents=[common], help="revoke a key by its id")
    krevoke.add_argument("key_id")
    krevoke.set_defaults(func=_keys_revoke)

    bench = sub.add_parser("bench", parents=[common], help="measure speed and memory")
    bench.add_argument("suite", choices=["runtime", "envd", "api", "interpreter"])
    bench.add_argument("--creates", type=int, default=50, help="runtime: creates to time")
    bench.add_argument(
        "--samples", type=int, default=200, help="envd, api, interpreter: samples to time"
    )
    bench.add_argument(
        "--idle", type=int, default=500, help="idle (running) sandboxes to hold at once"
    )
    bench.add_argument("--runtimes", default="crun,runsc")
    bench.set_defaults(func=_bench, sync=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bilik`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" is the sandbox command, verbatim (argparse mangles it in subparsers).
    tail: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, tail = argv[:at], argv[at + 1 :]
    args = _parser().parse_args(argv)
    if tail:
        args.command = [*getattr(args, "command", []), *tail]
    try:
        if getattr(args, "sync", False):
            return int(args.func(args))
        return int(asyncio.run(args.func(args)))
    except (RuntimeFailure, InvalidSettings, KeyNotFound) as e:
        print(f"bilik: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
