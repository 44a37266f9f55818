"""Building a template: its steps, each a read-only layer made in a build sandbox.

A RUN or COPY step runs in a sandbox started from the layers below it (same isolation as any
sandbox, network on); what it changed (the sandbox's overlay upper directory) becomes a layer
keyed by the hash of the key below, the step and the image settings it ran with, and the
hash of the files it copied. A step whose key exists is not run again. ENV, WORKDIR and USER
change the image's settings (and so the keys above them). Then the start command runs in a
sandbox of the finished image, and the build is ready once its ready check passes.

A COPY step's files are known by the hash this server computed over them as they arrived
(``files``), never by the client's ``filesHash``: the layer cache is shared by every key.

The upper directory is the sandbox's own work, copied by host root: no host code walks it
while anything can change it. A step's sandbox is committed (``Runtime.commit`` stops it: every
process in it, envd and what a step left running included, is gone, under crun and gVisor
alike, while its disk stays mounted), so the tree is still; then ``layers.copy_tree`` reads it
by directory descriptors, name by name, never following a link and never leaving the tree; only
then is the sandbox released. (``cp -a`` does not follow links in a still tree either, but it
walks by paths, so one directory swapped for a link while it runs sends it anywhere.)

What a build logs is bounded: its steps' output is kept up to ``LOG_OUTPUT_BYTES`` (then one
line says the log was cut), its own messages up to ``LOG_BYTES``, in memory and on disk alike;
a failed step's message quotes the end of its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import fnmatch
import json
import posixpath
import secrets
import shlex
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..runtime import Runtime, RuntimeFailure, SandboxSpec, debian_image
from ..runtime.backends import RUNTIMES
from ..runtime.envd_client import EnvdClient
from ..runtime.layers import Image, layer_key
from ..runtime.spec import Limits
from . import registries
from .files import FileStore

# Debian images (``from_debian_image``) of the host's release are built from its own apt
# sources, with no registry; others are pulled.
DEBIAN_TAGS = {"debian", "debian:stable", "debian:latest", "debian:stable-slim"}
STEP_TIMEOUT_S = 3600
BUILD_DISK_MB = 8192
# Each RUN or COPY step keeps a layer of up to BUILD_DISK_MB on the host's disk.
MAX_STEPS = 256
# Raised when what a COPY step makes changes (so copies cached the old way are not reused).
# 4: keyed by the server's hash of the files (layers keyed by a client's hash are never reused).
COPY_VERSION = 4
# A build's log keeps this much of its steps' output, and this much in all; a message is cut
# to MESSAGE_BYTES. Each entry counts ENTRY_COST more (what keeping it costs beyond its text).
LOG_OUTPUT_BYTES = 4 << 20
LOG_BYTES = 8 << 20
MESSAGE_BYTES = 64 << 10
ENTRY_COST = 256
# A COPY upload is read on the host for its names only, at most this many.
MAX_COPY_ENTRIES = 1_000_000


class BuildFailed(Exception):
    def __init__(self, message: str, step: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.step = step


@dataclasses.dataclass(slots=True)
class LogEntry:
    timestamp: str
    level: str
    message: str
    step: str | None = None

    def to_json(self) -> dict[str, Any]:
        entry = {"timestamp": self.timestamp, "level": self.level, "message": self.message}
        if self.step is not None:
            entry["step"] = self.step
        return entry


class BuildLog:
    """A build's log: in memory for the status endpoint, and a JSON-lines file that outlives
    the server; both bounded (see the module's docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[LogEntry] = []
        # Also told each message as it comes (the CLI prints them).
        self.listeners: list[Callable[[str], None]] = []
        self._size = 0  # what the entries cost, as counted against LOG_BYTES
        self._output = 0  # of that, the steps' output
        self._cut: set[str | None] = set()  # steps whose output was cut
        if path.exists():
            self._load()

    def _load(self) -> None:
        with self.path.open() as f:
            for line in f:
                try:
                    entry = LogEntry(**json.loads(line))
                except (ValueError, TypeError):
                    continue
                self._size += len(line) + ENTRY_COST
                if self._size > LOG_BYTES:  # (a log written before logs were bounded)
                    self.entries.append(dataclasses.replace(entry, message=_CUT_ON_LOAD))
                    break
                self.entries.append(entry)

    def __call__(self, message: str, level: str = "info", step: str | None = None) -> None:
        """Log one of the build's own messages."""
        text = message.rstrip("\n")
        if len(text) > MESSAGE_BYTES:
            text = text[: MESSAGE_BYTES // 2] + " [...] " + text[-MESSAGE_BYTES // 2 :]
        self._add(self._entry(text, level, step), essential=level == "error")

    def output(self, text: str, step: str | None) -> None:
        """Log what a step printed, while the log has room for it."""
        if not text.strip():
            return  # (blank output says nothing, and shows as an empty line)
        room = LOG_OUTPUT_BYTES - self._output
        if room > ENTRY_COST:
            kept = self._add(self._entry(text.rstrip("\n")[: room - ENTRY_COST], "info", step))
            self._output += kept
            if kept:
                return
        if step not in self._cut:
            self._cut.add(step)
            self._add(
                self._entry(
                    f"log truncated: a build's log keeps {LOG_OUTPUT_BYTES >> 20} MiB of its "
                    "steps' output; the rest of this step's is not kept",
                    "warn",
                    step,
                ),
                essential=True,
            )

    @staticmethod
    def _entry(message: str, level: str, step: str | None) -> LogEntry:
        now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
        return LogEntry(now, level, message, step)

    def _add(self, entry: LogEntry, *, essential: bool = False) -> int:
        """Keep ``entry`` (past LOG_BYTES only if ``essential``); what it cost."""
        line = json.dumps(dataclasses.asdict(entry)) + "\n"
        cost = len(line) + ENTRY_COST
        if self._size + cost > LOG_BYTES and not essential:
            return 0
        self._size += cost
        self.entries.append(entry)
        # Once each: every create waiting for one default build listens with the server's log.
        for listener in dict.fromkeys(self.listeners):
            listener(entry.message)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(line)
        return cost


_CUT_ON_LOAD = f"log truncated: only its first {LOG_BYTES >> 20} MiB are shown"


@dataclasses.dataclass
class Settings:
    """The image settings steps run with (and that sandboxes start with)."""

    env: dict[str, str]
    user: str
    workdir: str

    def identity(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Builder:
    def __init__(self, runtime: Runtime, files: FileStore) -> None:
        self.runtime = runtime
        self.files = files

    async def build(
        self,
        template_id: str,
        build_id: str,
        spec: dict[str, Any],
        limits: Limits,
        log: BuildLog,
        *,
        rebuild_base: bool = False,
        layer_budget: int | None = None,
        made_layers: set[str] | None = None,
    ) -> Image:
        """Build ``spec`` (E2B's TemplateBuildStartV2) into the image named ``template_id``.

        ``rebuild_base`` makes plain Debian anew if the spec starts there (never a user's
        ``force``: that image is every template's). ``layer_budget``: bytes of new layers the
        build may make (the key's layer cap less what its templates keep); past it, it fails.
        ``made_layers`` is told each layer the build makes (kept even when the build fails)."""
        check_spec(spec)
        new_bytes = 0
        layers, settings, inherited = await self._base(spec, log, rebuild=rebuild_base)
        oci_runtime = spec.get("ociRuntime") or inherited
        force = bool(spec.get("force"))
        below = layer_key("image", list(layers))
        steps = spec.get("steps") or []
        scratch_image = scratch_image_of(build_id)
        try:
            for number, step in enumerate(steps, start=1):
                tag = str(number)
                if not isinstance(step, dict) or not isinstance(step.get("type"), str):
                    raise BuildFailed(f"step {number} is not a step", tag)
                kind, args = step["type"].upper(), [str(a) for a in step.get("args") or []]
                log(f"[{number}/{len(steps)}] {describe_step(kind, args)}", step=tag)
                force = force or bool(step.get("force"))
                if kind == "ENV":
                    if len(args) % 2:
                        raise BuildFailed("ENV takes name, value pairs", tag)
                    settings.env.update(zip(args[::2], args[1::2], strict=True))
                elif kind == "USER":
                    if not args:
                        raise BuildFailed("USER takes a user name", tag)
                    settings.user = args[0]
                elif kind in ("RUN", "COPY", "WORKDIR"):
                    if kind == "WORKDIR":
                        if not args:
                            raise BuildFailed("WORKDIR takes a path", tag)
                        settings.workdir = posixpath.join(settings.workdir, args[0])
                    files = None
                    if kind == "COPY":
                        files = await asyncio.to_thread(
                            self._files_of, template_id, args, step, tag
                        )
                    key = layer_key(below, kind, args, files, settings.identity())
                    if kind == "COPY":  # (cached copies made the old way are not reused)
                        key = layer_key(key, COPY_VERSION)
                    made = await asyncio.to_thread(self.runtime.layers.newest, key)
                    if made is not None and not force:
                        log("CACHED", step=tag)
                        key = made
                    else:
                        if made is not None:  # (forced)
                            key = self.runtime.layers.remake(key)
                        image = Image(scratch_image, tuple(layers), dict(settings.env),
                                      settings.user, settings.workdir)  # fmt: skip
                        await self._make_layer(key, image, kind, args, files, template_id,
                                               limits, log, tag)  # fmt: skip
                        if made_layers is not None:
                            made_layers.add(key)
                        new_bytes += await asyncio.to_thread(self.runtime.layers.size, key)
                        if layer_budget is not None and new_bytes > layer_budget:
                            raise BuildFailed(
                                "this build's layers take the key past its layer storage cap "
                                f"({new_bytes >> 20} MiB made, {layer_budget >> 20} MiB left)",
                                tag,
                            )
                    layers.append(key)
                    below = key
                else:
                    raise BuildFailed(f"unknown step type {kind!r}", tag)
            final = Image(
                template_id,
                tuple(layers),
                dict(settings.env),
                settings.user,
                settings.workdir,
                oci_runtime=oci_runtime,
                start_cmd=spec.get("startCmd") or None,
                ready_cmd=spec.get("readyCmd") or None,
            )
            if final.start_cmd:
                await self._check_start(dataclasses.replace(final, name=scratch_image), limits, log)
            return final
        finally:
            self.runtime.layers.remove_image(scratch_image)

    async def _base(
        self, spec: dict[str, Any], log: BuildLog, *, rebuild: bool = False
    ) -> tuple[list[str], Settings, str | None]:
        """The base's layers, its settings, and its OCI runtime (a template's is inherited).

        ``fromTemplate`` names an image of this runtime (the caller resolved the template's
        name, ``default_builds`` bilik's own templates, ``e2bdev/base`` among them)."""
        source = spec.get("fromTemplate") or spec.get("fromImage")
        if not isinstance(source, str) or not source:
            raise BuildFailed("fromImage or fromTemplate must name the base", "base")
        log(f"FROM {source}", step="base")
        how = ""
        try:
            if spec.get("fromTemplate"):
                image = await asyncio.to_thread(self.runtime.image, source)
            elif source in DEBIAN_TAGS or source in _host_debian_tags():
                log("Debian from this host's apt sources", step="base")
                image = await asyncio.to_thread(
                    self.runtime.image,
                    debian_image.NAME,
                    rebuild=rebuild,
                    log=lambda line: log(line, step="base"),
                )
            else:
                # The login lives for this pull only: nothing keeps the spec or the login.
                login = await registries.login(
                    spec.get("fromImageRegistry"),
                    source,
                    lambda line: log(line, step="base"),
                    ecr_endpoint=self.runtime.settings.ecr_endpoint,
                )
                how = f" (pulled with {login.source})" if login and login.source else ""
                image = await asyncio.to_thread(
                    self.runtime.pull_image,
                    source,
                    lambda line: log(line, step="base"),
                    username=login.username if login else None,
                    password=login.password if login else None,
                )
        except registries.LoginFailed as e:
            raise BuildFailed(f"base {source!r}: {e}", "base") from None
        except RuntimeFailure as e:
            raise BuildFailed(f"base {source!r}{how}: {e}", "base") from None
        settings = Settings(dict(image.env), image.user, image.workdir)
        return list(image.layers), settings, image.oci_runtime

    def _files_of(self, template_id: str, args: list[str], step: dict[str, Any], tag: str) -> str:
        """The server's hash of a COPY step's files (uploaded to the template's own slot that
        the step's ``filesHash`` names)."""
        source = args[0] if args else ""
        files_hash = step.get("filesHash")
        if not isinstance(files_hash, str):
            raise BuildFailed(f"COPY {source}: the step carries no files hash", tag)
        try:
            digest = self.files.digest(template_id, files_hash)
        except ValueError:
            raise BuildFailed(f"COPY {source}: {files_hash!r} is not a files hash", tag) from None
        if digest is None:
            raise BuildFailed(f"COPY {source}: its files were never uploaded", tag)
        return digest

    async def _make_layer(
        self,
        key: str,
        image: Image,
        kind: str,
        args: list[str],
        files: str | None,
        template_id: str,
        limits: Limits,
        log: BuildLog,
        tag: str,
    ) -> None:
        """Run one step in a build sandbox and keep what it changed as layer ``key``."""
        runtime = self.runtime
        await asyncio.to_thread(runtime.layers.save_image, image)
        spec = SandboxSpec(
            template=image.name,
            limits=dataclasses.replace(limits, disk_mb=BUILD_DISK_MB),
            timeout_s=STEP_TIMEOUT_S,
            access_token=secrets.token_hex(16),
        )
        try:
            info = await runtime.create(spec)
        except RuntimeFailure as e:
            raise BuildFailed(f"could not start a build sandbox: {e}", tag) from None
        try:
            async with runtime.envd(info.sandbox_id) as envd:
                if kind == "RUN":
                    user = args[1] if len(args) > 1 and args[1] else image.user
                    finished = await envd.run(
                        args[0] if args else "true",
                        user=user,
                        cwd=image.workdir,
                        env=image.env,
                        timeout_s=STEP_TIMEOUT_S,
                        on_output=lambda text: log.output(text, step=tag),
                    )
                    if finished.exit_code != 0:
                        tail = finished.output.strip()[-2000:]
                        raise BuildFailed(
                            f"command '{args[0] if args else ''}' failed with exit code "
                            f"{finished.exit_code}" + (f":\n{tail}" if tail else ""),
                            tag,
                        )
                elif kind == "WORKDIR":
                    await _must(envd.run(f"mkdir -p {shlex.quote(image.workdir)}"), tag)
                else:
                    assert files is not None
                    await self._copy(envd, template_id, args, files, image, tag)
            try:
                await runtime.commit(info.sandbox_id, key)
            except RuntimeFailure as e:
                raise BuildFailed(f"the step's changes could not be kept: {e}", tag) from None
        finally:
            await runtime.kill(info.sandbox_id)

    async def _copy(
        self,
        envd: EnvdClient,
        template_id: str,
        args: list[str],
        files: str,
        image: Image,
        tag: str,
    ) -> None:
        if len(args) < 2:
            raise BuildFailed("COPY takes a source and a destination", tag)
        src, dest = args[0], args[1]
        user = args[2] if len(args) > 2 and args[2] else image.user
        mode = args[3] if len(args) > 3 and args[3] else ""
        # The very files the layer's key was made of (a blob is never changed once there).
        archive = self.files.blob(template_id, files)
        if not archive.is_file():
            raise BuildFailed(f"COPY {src}: its files were never uploaded", tag)
        try:
            moves = await asyncio.to_thread(_copy_plan, archive, src, dest, image.workdir)
        except BuildFailed as e:
            raise BuildFailed(f"COPY {src}: {e.message}", tag) from None
        if not moves:
            raise BuildFailed(f"COPY {src}: nothing in the upload matches it", tag)
        staging = f"/tmp/.bilik-copy-{secrets.token_hex(4)}"
        await envd.write(f"{staging}.tar", archive)
        zipped = await asyncio.to_thread(_is_gzip, archive)
        script = [
            "set -e",
            f"mkdir -p {staging}",
            f"tar -x{'z' if zipped else ''}f {staging}.tar -C {staging}",
        ]
        owner = shlex.quote(user)
        for member, target, whole_dir in moves:
            source = shlex.quote(f"{staging}/{member}")
            quoted = shlex.quote(target)
            script.append(f"mkdir -p {shlex.quote(posixpath.dirname(target) or '/')}")
            if whole_dir:
                # Owner and mode go to what was copied, never to what was already there: a
                # destination directory keeps its own (cp -a would give it the upload's), one
                # the copy makes is new, so the user's, as in Docker.
                script.append(
                    f"was=$(stat -c '%u:%g %a' {quoted} 2>/dev/null || echo {owner}: 755)"
                )
                script.append(f"mkdir -p {quoted} && cp -a {source}/. {quoted}/")
                script.append(f'chown "${{was% *}}" {quoted} && chmod "${{was#* }}" {quoted}')
                script.append(
                    f"(cd {source} && find . -mindepth 1) | while IFS= read -r p; do "
                    f'chown -h {owner}: {quoted}/"$p"'
                    + (f' && chmod {shlex.quote(mode)} {quoted}/"$p"' if mode else "")
                    + "; done"
                )
            else:
                script.append(f"cp -a {source} {quoted} && chown -h {owner}: {quoted}")
                if mode:
                    script.append(f"chmod {shlex.quote(mode)} {quoted}")
        script.append(f"rm -rf {staging} {staging}.tar")
        finished = await envd.run("\n".join(script), user="root")
        if finished.exit_code != 0:
            raise BuildFailed(f"COPY {src} → {dest} failed: {finished.output.strip()}", tag)

    async def abandon(self, build_id: str) -> None:
        """Undo what a build that a crash cut short left: its sandboxes (they would run on for
        the step's whole time limit) and the image they ran on (so its layers can go)."""
        scratch_image = scratch_image_of(build_id)
        for info in await self.runtime.list():
            if info.template == scratch_image:
                with contextlib.suppress(RuntimeFailure):
                    await self.runtime.kill(info.sandbox_id)
        await asyncio.to_thread(self.runtime.layers.remove_image, scratch_image)

    async def _check_start(self, image: Image, limits: Limits, log: BuildLog) -> None:
        """Start the finished image once (under the build's own name: the template's image is
        saved only once it passed): its start command must come up and pass its check."""
        log(f"Starting: {image.start_cmd}", step="finalize")
        await asyncio.to_thread(self.runtime.layers.save_image, image)
        try:
            info = await self.runtime.create(
                SandboxSpec(template=image.name, limits=limits, access_token=secrets.token_hex(16))
            )
        except RuntimeFailure as e:
            raise BuildFailed(f"the start command did not become ready: {e}", "finalize") from None
        await self.runtime.kill(info.sandbox_id)
        log("Ready", step="finalize")


def describe_step(kind: str, args: list[str]) -> str:
    """A step as the build log shows it, read as a Dockerfile line: ``RUN (as root) CMD``,
    ``COPY --chown=USER --chmod=MODE SRC DEST``, ``ENV NAME=VALUE`` (the SDK's positional
    user and mode are not shown as if they were arguments of the command)."""
    if kind == "RUN" and args:
        user = f"(as {args[1]}) " if len(args) > 1 and args[1] else ""
        return f"RUN {user}{args[0]}"
    if kind == "COPY" and len(args) >= 2:
        flags = []
        if len(args) > 2 and args[2]:
            flags.append(f"--chown={args[2]}")
        if len(args) > 3 and args[3]:
            flags.append(f"--chmod={args[3]}")
        return " ".join(["COPY", *flags, shlex.quote(args[0]), shlex.quote(args[1])])
    if kind == "ENV" and args and len(args) % 2 == 0:
        pairs = zip(args[::2], args[1::2], strict=True)
        return "ENV " + " ".join(f"{name}={shlex.quote(value)}" for name, value in pairs)
    return f"{kind} {' '.join(args)}".rstrip()


def scratch_image_of(build_id: str) -> str:
    """The image a build's steps and start check run on; gone when the build ends."""
    return f"build-{build_id}"


def check_spec(spec: dict[str, Any]) -> None:
    """Raise BuildFailed if ``spec`` is not a build request (before anything is built for it)."""
    for name in ("fromImage", "fromTemplate"):
        if spec.get(name) is not None and not isinstance(spec[name], str):
            raise BuildFailed(f"{name} must be a name", "base")
    chosen = spec.get("ociRuntime")
    if chosen is not None and chosen not in RUNTIMES:
        raise BuildFailed(f"ociRuntime must be one of {', '.join(RUNTIMES)}", "base")
    steps = spec.get("steps") or []
    if not isinstance(steps, list):
        raise BuildFailed("steps must be a list", "base")
    if len(steps) > MAX_STEPS:
        raise BuildFailed(f"a build has at most {MAX_STEPS} steps, not {len(steps)}", "base")


def _host_debian_tags() -> set[str]:
    release = debian_image.host_release()
    version = {"bookworm": "12", "trixie": "13"}.get(release, release)
    return {f"debian:{release}", f"debian:{release}-slim", f"debian:{version}"}


async def _must(run: Any, tag: str) -> None:
    finished = await run
    if finished.exit_code != 0:
        raise BuildFailed(finished.output.strip(), tag)


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _copy_plan(archive: Path, src: str, dest: str, workdir: str) -> list[tuple[str, str, bool]]:
    """What to put where, Docker's way: ``(member, target, whole directory?)`` for each match.

    A file goes to ``dest`` (or into it, when ``dest`` ends with "/"); a directory's contents go
    into ``dest``; each file a pattern matches goes into ``dest``.
    """
    target = dest if dest.startswith("/") else posixpath.join(workdir, dest)
    clean = posixpath.normpath(src).lstrip("./") if src not in (".", "./") else ""
    pattern = any(c in src for c in "*?[")
    matched, found, exact, inside = [], False, False, False
    for name in _names(archive):
        found = True
        if pattern:
            if fnmatch.fnmatch(name, clean) and "/" not in name[len(clean) :]:
                matched.append(name)
        elif clean:
            exact = exact or name == clean
            inside = inside or name.startswith(clean + "/")
    if pattern:
        return [(n, posixpath.join(target, posixpath.basename(n)), False) for n in matched]
    if clean == "":
        return [(".", target, True)] if found else []
    if exact and not inside:
        into = dest.endswith("/")
        return [(clean, posixpath.join(target, posixpath.basename(clean)) if into else target,
                 False)]  # fmt: skip
    if inside:
        return [(clean, target, True)]
    return []


def _names(archive: Path) -> Iterator[str]:
    """The names in an upload, read as a stream: at most MAX_COPY_ENTRIES of them, and no more
    of it than a build sandbox's disk could hold unpacked (BuildFailed past either)."""
    try:
        with tarfile.open(archive, "r|*") as tar:
            for count, member in enumerate(tar, start=1):
                if count > MAX_COPY_ENTRIES:
                    raise BuildFailed(f"the upload holds more than {MAX_COPY_ENTRIES} files")
                if tar.offset > BUILD_DISK_MB << 20:
                    raise BuildFailed(f"the upload unpacks to more than {BUILD_DISK_MB} MiB")
                # (kept by TarFile for a later getmembers(), which a stream never needs)
                tar.members.clear()  # type: ignore[attr-defined]
                yield member.name.rstrip("/")
    except tarfile.TarError as e:
        raise BuildFailed(f"the upload is not a tar archive ({e})") from None
