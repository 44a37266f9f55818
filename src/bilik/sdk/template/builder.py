"""The fluent template definition: a base, then steps, then a start command.

Names and behaviour follow E2B's ``Template``: ``Template().from_python_image("3.11")
.copy("requirements.txt", "/app/").pip_install().set_start_cmd("python app.py",
wait_for_port(8000))``. A definition does no I/O (but for reading a GCP key file it is
given, as E2B's); building it is the business of ``Template.build`` (sync) and
``AsyncTemplate.build`` (async). Every step remembers the line of user code that added it, so
a step that fails at build time points there.
"""

from __future__ import annotations

import functools
import json
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypedDict, TypeVar, overload

from bilik.sdk.exceptions import InvalidArgumentException, TemplateException
from bilik.sdk.template.origin import Origin, caller, caller_directory
from bilik.sdk.template.readycmd import ReadyCmd
from bilik.sdk.template.types import InstructionType

# The registry name SDKs use for E2B's base image; bilik builds its own base from Debian.
DEFAULT_BASE_IMAGE = "e2bdev/base"
# Symlinks are copied as links unless a step says otherwise (as E2B).
RESOLVE_SYMLINKS = False
# COPY uploads are gzipped unless a step says otherwise (as E2B).
GZIP = True

PathLike = str | Path


class CopyItem(TypedDict, total=False):
    """One source of :meth:`TemplateBuilder.copy_items` (``src`` and ``dest`` required)."""

    src: PathLike | list[PathLike]
    dest: PathLike
    forceUpload: Literal[True] | None
    user: str | None
    mode: int | None
    resolveSymlinks: bool | None
    gzip: bool | None


@dataclass
class Step:
    """One build step as the server takes it, and where the user added it."""

    type: InstructionType
    args: list[str]
    force: bool
    origin: Origin | None
    force_upload: bool | None = None
    resolve_symlinks: bool | None = None
    gzip: bool | None = None

    def summary(self) -> str:
        """The step as a Dockerfile-like line, for messages."""
        if self.type is InstructionType.RUN:
            as_user = f" (as {self.args[1]})" if len(self.args) > 1 and self.args[1] else ""
            return f"RUN {self.args[0]}{as_user}"
        if self.type is InstructionType.COPY:
            return f"COPY {self.args[0]} {self.args[1]}"
        return f"{self.type.value} {' '.join(self.args)}"


def pad_octal(mode: int) -> str:
    """``0o755`` as ``"0755"``."""
    return f"{mode:04o}"


def _as_list(value: PathLike | Sequence[PathLike]) -> list[PathLike]:
    return [value] if isinstance(value, (str, Path)) else list(value)


def _validate_source(src: str, origin: Origin | None) -> None:
    """A COPY source must be relative and stay inside the context directory."""
    problem = None
    if src.startswith("/"):
        problem = "absolute paths are not allowed"
    else:
        parts: list[str] = []
        for part in src.split("/"):
            if part == "..":
                if not parts:
                    problem = "it leaves the context directory"
                    break
                parts.pop()
            elif part not in ("", "."):
                parts.append(part)
    if problem:
        error = TemplateException(
            f"invalid source path {src!r}: {problem}; use a path inside the context directory"
        )
        raise error.with_traceback(origin.traceback if origin else None)


T = TypeVar("T")


class _Either(Generic[T]):
    """E2B's static ``Template.to_dockerfile(template)`` that also works as
    ``template.to_dockerfile()``."""

    def __init__(self, fn: Callable[[Any], T]) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__

    @overload
    def __get__(self, obj: None, owner: type) -> Callable[[Any], T]: ...

    @overload
    def __get__(self, obj: object, owner: type) -> Callable[[], T]: ...

    def __get__(self, obj: object, owner: type) -> Callable[..., T]:
        if obj is None:
            return self.fn
        return functools.partial(self.fn, obj)


def definition(template: object) -> TemplateBase:
    """The :class:`TemplateBase` behind a template, a builder or a final template."""
    if isinstance(template, TemplateBase):
        return template
    if isinstance(template, (TemplateBuilder, TemplateFinal)):
        return template._template
    raise InvalidArgumentException(
        f"expected a template (Template().from_…(…)…), got {type(template).__name__}"
    )


def _to_dockerfile(template: object) -> str:
    """The template as a Dockerfile (no ready check; templates from templates cannot be)."""
    t = definition(template)
    if t._base_template is not None:
        raise ValueError(
            "a template based on another template cannot be a Dockerfile: build it with "
            "Template.build"
        )
    if t._base_image is None:
        raise ValueError("the template has no base image")
    lines = [f"FROM {t._base_image}"]
    for step in t._steps:
        if step.type is InstructionType.COPY:
            src, dest, user, mode = [*step.args, "", "", "", ""][:4]
            flags = (f"--chown={user} " if user else "") + (f"--chmod={mode} " if mode else "")
            lines.append(f"COPY {flags}{src} {dest}")
        elif step.type is InstructionType.ENV:
            pairs = zip(step.args[::2], step.args[1::2], strict=True)
            lines.append("ENV " + " ".join(f"{k}={shlex.quote(v)}" for k, v in pairs))
        elif step.type is InstructionType.RUN:
            lines.append(f"RUN {step.args[0]}")
        else:
            lines.append(f"{step.type.value} {' '.join(step.args)}")
    if t._start_cmd:
        lines.append(f"ENTRYPOINT {t._start_cmd}")
    return "\n".join(lines) + "\n"


def _to_json(template: object) -> str:
    """The build request's template part (file hashes left out), as JSON."""
    return json.dumps(definition(template)._spec({}), indent=2)


def _quoted(packages: str | Sequence[str] | None) -> list[str]:
    """Package names for a shell command: ``numpy>=2`` stays one argument, not a redirect."""
    names = [packages] if isinstance(packages, str) else list(packages or [])
    return [shlex.quote(name) for name in names]


class TemplateBuilder:
    """Adds steps to a template; every method returns the builder, to chain calls."""

    to_dockerfile = _Either(_to_dockerfile)
    to_json = _Either(_to_json)

    def __init__(self, template: TemplateBase) -> None:
        self._template = template

    def _add(self, kind: InstructionType, args: list[str], **extra: Any) -> TemplateBuilder:
        t = self._template
        t._steps.append(Step(kind, args, t._force_next_layer, caller(), **extra))
        return self

    def copy(
        self,
        src: PathLike | Sequence[PathLike],
        dest: PathLike,
        force_upload: Literal[True] | None = None,
        user: str | None = None,
        mode: int | None = None,
        resolve_symlinks: bool | None = None,
        gzip: bool | None = None,
    ) -> TemplateBuilder:
        """Copy files, directories or globs from the context directory into the template.

        :param src: a path relative to the context directory (or several), a glob allowed
            (``*.py``, ``src/**/*.json``); ``.dockerignore`` in the context applies
        :param dest: where it goes in the template; a file into a directory when ``dest``
            ends with "/", a directory's contents into ``dest``
        :param force_upload: upload the files even if the server has them
        :param user: owner of what is copied (default: the template's user at that step)
        :param mode: mode of what is copied, e.g. ``0o755``
        :param resolve_symlinks: copy what links point to, not the links
        :param gzip: compress the upload (default True)
        """
        origin = caller()
        for item in _as_list(src):
            source = str(item)
            _validate_source(source, origin)
            args = [source, str(dest), user or "", pad_octal(mode) if mode is not None else ""]
            t = self._template
            t._steps.append(
                Step(
                    InstructionType.COPY,
                    args,
                    bool(force_upload) or t._force_next_layer,
                    origin,
                    force_upload=force_upload,
                    resolve_symlinks=resolve_symlinks,
                    gzip=gzip,
                )
            )
        return self

    def copy_items(self, items: Sequence[CopyItem]) -> TemplateBuilder:
        """:meth:`copy` for each of ``items`` (dicts of its arguments)."""
        for item in items:
            self.copy(
                item["src"],
                item["dest"],
                item.get("forceUpload"),
                item.get("user"),
                item.get("mode"),
                item.get("resolveSymlinks"),
                item.get("gzip"),
            )
        return self

    def run_cmd(self, command: str | Sequence[str], user: str | None = None) -> TemplateBuilder:
        """Run a shell command (several are joined with ``&&``), as ``user`` if given, else as
        the template's user at that step."""
        commands = [command] if isinstance(command, str) else list(command)
        args = [" && ".join(commands)]
        if user:
            args.append(user)
        return self._add(InstructionType.RUN, args)

    def remove(
        self,
        path: PathLike | Sequence[PathLike],
        force: bool = False,
        recursive: bool = False,
        user: str | None = None,
    ) -> TemplateBuilder:
        """Remove files or directories (``rm``; ``-r`` and ``-f`` on request)."""
        args = ["rm", *(["-r"] if recursive else []), *(["-f"] if force else [])]
        args += [shlex.quote(str(p)) for p in _as_list(path)]
        return self.run_cmd(" ".join(args), user=user)

    def rename(
        self, src: PathLike, dest: PathLike, force: bool = False, user: str | None = None
    ) -> TemplateBuilder:
        """Rename or move a file or directory (``mv``)."""
        args = ["mv", shlex.quote(str(src)), shlex.quote(str(dest)), *(["-f"] if force else [])]
        return self.run_cmd(" ".join(args), user=user)

    def make_dir(
        self, path: PathLike | Sequence[PathLike], mode: int | None = None, user: str | None = None
    ) -> TemplateBuilder:
        """Create directories, with their parents (``mkdir -p``), with ``mode`` if given."""
        args = ["mkdir", "-p", *([f"-m {pad_octal(mode)}"] if mode is not None else [])]
        args += [shlex.quote(str(p)) for p in _as_list(path)]
        return self.run_cmd(" ".join(args), user=user)

    def make_symlink(
        self, src: PathLike, dest: PathLike, user: str | None = None, force: bool = False
    ) -> TemplateBuilder:
        """Make ``dest`` a symbolic link to ``src`` (``ln -s``)."""
        args = ["ln", "-s", *(["-f"] if force else [])]
        args += [shlex.quote(str(src)), shlex.quote(str(dest))]
        return self.run_cmd(" ".join(args), user=user)

    def pip_install(
        self, packages: str | Sequence[str] | None = None, g: bool = True
    ) -> TemplateBuilder:
        """Install Python packages with pip: system-wide as root (``g=True``), else for the
        template's user (``--user``); no packages means ``pip install .`` in the workdir."""
        names = _quoted(packages)
        args = ["pip", "install", *([] if g else ["--user"]), *(names or ["."])]
        # Debian's own Python refuses pip installs outside a venv (PEP 668); a template's
        # image is what it is for, so say yes. Pips that predate the setting ignore it.
        return self.run_cmd(
            "PIP_BREAK_SYSTEM_PACKAGES=1 " + " ".join(args), user="root" if g else None
        )

    def npm_install(
        self, packages: str | Sequence[str] | None = None, g: bool = False, dev: bool = False
    ) -> TemplateBuilder:
        """Install Node.js packages with npm (globally as root with ``g=True``); no packages
        means the workdir's ``package.json``."""
        names = _quoted(packages)
        args = ["npm", "install", *(["-g"] if g else []), *(["--save-dev"] if dev else [])]
        return self.run_cmd(" ".join(args + names), user="root" if g else None)

    def apt_install(
        self,
        packages: str | Sequence[str],
        no_install_recommends: bool = False,
        fix_missing: bool = False,
    ) -> TemplateBuilder:
        """Install Debian packages with apt-get, as root."""
        names = _quoted(packages)
        flags = ("--no-install-recommends " if no_install_recommends else "") + (
            "--fix-missing " if fix_missing else ""
        )
        return self.run_cmd(
            [
                "apt-get update",
                "DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes apt-get install -y "
                + flags
                + " ".join(names),
            ],
            user="root",
        )

    def git_clone(
        self,
        url: str,
        path: PathLike | None = None,
        branch: str | None = None,
        depth: int | None = None,
        user: str | None = None,
    ) -> TemplateBuilder:
        """Clone a git repository (into ``path`` if given; one ``branch``; ``depth`` commits)."""
        args = ["git", "clone", shlex.quote(url)]
        if branch:
            args += [f"--branch {shlex.quote(branch)}", "--single-branch"]
        if depth:
            args.append(f"--depth {int(depth)}")
        if path:
            args.append(shlex.quote(str(path)))
        return self.run_cmd(" ".join(args), user=user)

    def set_envs(self, envs: dict[str, str]) -> TemplateBuilder:
        """Set environment variables for the steps after this one and for sandboxes."""
        if not envs:
            return self
        return self._add(InstructionType.ENV, [x for k, v in envs.items() for x in (k, str(v))])

    def set_workdir(self, workdir: PathLike) -> TemplateBuilder:
        """Set the working directory (made if missing) for later steps and for sandboxes."""
        return self._add(InstructionType.WORKDIR, [str(workdir)])

    def set_user(self, user: str) -> TemplateBuilder:
        """Set the user later steps run as and sandboxes' commands default to."""
        return self._add(InstructionType.USER, [user])

    def set_runtime(self, runtime: Literal["crun", "runsc"]) -> TemplateBuilder:
        """bilik's own: the OCI runtime the template's sandboxes run under, ``"crun"`` (the
        server's default) or ``"runsc"`` (gVisor: a user-space kernel between the sandbox and
        the host, slower to start). Templates built from this one inherit it."""
        if runtime not in ("crun", "runsc"):
            raise InvalidArgumentException(f"unknown runtime {runtime!r}: use 'crun' or 'runsc'")
        self._template._oci_runtime = runtime
        return self

    def skip_cache(self) -> TemplateBuilder:
        """Rebuild every step from here on, even those the server has cached."""
        self._template._force_next_layer = True
        return self

    def set_start_cmd(self, start_cmd: str, ready_cmd: str | ReadyCmd) -> TemplateFinal:
        """The command every sandbox of the template starts with, and the check that says it
        is ready (``wait_for_port(8000)``, ``wait_for_url(…)``, … or a shell command). The
        build ends by starting it once: the build is ready only when the check passes."""
        t = self._template
        t._start_cmd = start_cmd
        t._ready_cmd = ready_cmd.get_cmd() if isinstance(ready_cmd, ReadyCmd) else ready_cmd
        t._final_origin = caller()
        return TemplateFinal(t)

    def set_ready_cmd(self, ready_cmd: str | ReadyCmd) -> TemplateFinal:
        """Only the ready check (for images whose start command is their own)."""
        t = self._template
        t._ready_cmd = ready_cmd.get_cmd() if isinstance(ready_cmd, ReadyCmd) else ready_cmd
        t._final_origin = caller()
        return TemplateFinal(t)


class TemplateFinal:
    """A template whose start command is set: nothing more can be added."""

    to_dockerfile = _Either(_to_dockerfile)
    to_json = _Either(_to_json)

    def __init__(self, template: TemplateBase) -> None:
        self._template = template


class TemplateBase:
    """A template definition: its base (``from_…``), steps, start command and ready check.

    :param file_context_path: where COPY sources are found (default: the directory of the
        file that made the template)
    :param file_ignore_patterns: more ``.dockerignore`` patterns (after the context's own)
    """

    to_dockerfile = _Either(_to_dockerfile)
    to_json = _Either(_to_json)

    def __init__(
        self,
        file_context_path: PathLike | None = None,
        file_ignore_patterns: list[str] | None = None,
    ) -> None:
        self._base_image: str | None = DEFAULT_BASE_IMAGE
        self._base_template: str | None = None
        self._registry: dict[str, str] | None = None
        self._start_cmd: str | None = None
        self._oci_runtime: str | None = None
        self._ready_cmd: str | None = None
        self._force = False
        self._force_next_layer = False
        self._steps: list[Step] = []
        self._base_origin: Origin | None = caller()
        self._final_origin: Origin | None = None
        context = file_context_path if file_context_path is not None else caller_directory()
        self._file_context_path = str(context) if context is not None else "."
        self._file_ignore_patterns = list(file_ignore_patterns or [])

    def skip_cache(self) -> TemplateBase:
        """Rebuild everything, the base included, even what the server has cached."""
        self._force_next_layer = True
        return self

    def _from(self, image: str | None, template: str | None) -> TemplateBuilder:
        self._base_image, self._base_template = image, template
        if self._force_next_layer:
            self._force = True
        self._base_origin = caller()
        return TemplateBuilder(self)

    def from_image(
        self, image: str, username: str | None = None, password: str | None = None
    ) -> TemplateBuilder:
        """Start from an OCI image of any registry (``registry.example:5000/app:v1``), a
        private one with ``username`` and ``password`` (used for the pull, never stored)."""
        if username is not None or password is not None:
            if not username or not password:
                origin = caller()
                raise InvalidArgumentException(
                    "registry credentials need both username and password"
                ).with_traceback(origin.traceback if origin else None)
            self._registry = {"type": "registry", "username": username, "password": password}
        else:
            self._registry = None
        return self._from(image, None)

    def from_aws_registry(
        self, image: str, access_key_id: str, secret_access_key: str, region: str
    ) -> TemplateBuilder:
        """Start from an image in AWS ECR, like
        ``123456789012.dkr.ecr.us-west-2.amazonaws.com/app:v1``. The server trades the access
        key for an ECR pull token (``GetAuthorizationToken``) at build time; neither is stored."""
        self._registry = {
            "type": "aws",
            "awsAccessKeyId": access_key_id,
            "awsSecretAccessKey": secret_access_key,
            "awsRegion": region,
        }
        return self._from(image, None)

    def from_gcp_registry(
        self, image: str, service_account_json: str | dict[str, Any]
    ) -> TemplateBuilder:
        """Start from an image in GCP Artifact Registry or Container Registry
        (``us-docker.pkg.dev/project/repo/app:v1``, ``gcr.io/project/app:v1``), pulled with a
        service account key: a dict, the key's JSON text, or the path of its file (relative to
        the context directory). Used for the pull only, never stored."""
        if isinstance(service_account_json, dict):
            key = json.dumps(service_account_json)
        elif service_account_json.lstrip().startswith("{"):
            key = service_account_json
        else:
            # (As E2B: the file is read here, so a wrong path fails at this line.)
            path = Path(self._file_context_path) / service_account_json
            try:
                key = path.read_text()
            except OSError as e:
                origin = caller()
                raise InvalidArgumentException(
                    f"cannot read the service account key {str(path)!r}: {e.strerror}"
                ).with_traceback(origin.traceback if origin else None) from None
        self._registry = {"type": "gcp", "serviceAccountJson": key}
        return self._from(image, None)

    def from_template(self, template: str) -> TemplateBuilder:
        """Start from another template of the same API key (by name or id), or from one of
        the server's own (``base``, ``code-interpreter-v1``)."""
        self._registry = None
        return self._from(None, template)

    def from_base_image(self) -> TemplateBuilder:
        """Start from the base image sandboxes get by default (Debian with Python, git,
        curl and the ``user`` account; built by the server, no registry needed)."""
        return self.from_image(DEFAULT_BASE_IMAGE)

    def from_debian_image(self, variant: str = "stable") -> TemplateBuilder:
        """Start from ``debian:{variant}`` (the server's own Debian release is built from its
        apt sources, no registry needed)."""
        return self.from_image(f"debian:{variant}")

    def from_ubuntu_image(self, variant: str = "latest") -> TemplateBuilder:
        """Start from ``ubuntu:{variant}``."""
        return self.from_image(f"ubuntu:{variant}")

    def from_python_image(self, version: str = "3") -> TemplateBuilder:
        """Start from ``python:{version}``."""
        return self.from_image(f"python:{version}")

    def from_node_image(self, variant: str = "lts") -> TemplateBuilder:
        """Start from ``node:{variant}``."""
        return self.from_image(f"node:{variant}")

    # What the server needs.

    def _origin_of(self, step: str | None) -> tuple[Origin | None, str]:
        """The user's line behind a build step ("base", "1", …, "finalize") and a label."""
        if step == "base":
            source = self._base_template or self._base_image
            return self._base_origin, f"base {source}"
        if step == "finalize":
            return self._final_origin, f"start command {self._start_cmd or ''}".rstrip()
        if step is not None and step.isdigit() and 1 <= int(step) <= len(self._steps):
            found = self._steps[int(step) - 1]
            return found.origin, f"step {step}/{len(self._steps)} {found.summary()}"
        return None, ""

    def _spec(self, hashes: dict[int, str]) -> dict[str, Any]:
        """E2B's ``TemplateBuildStartV2``: the base, the steps (COPY ones with the hash of
        their files, by step index) and the start command."""
        steps: list[dict[str, Any]] = []
        for index, step in enumerate(self._steps):
            entry: dict[str, Any] = {
                "type": step.type.value,
                "args": step.args,
                "force": step.force,
            }
            if index in hashes:
                entry["filesHash"] = hashes[index]
            if step.force_upload is not None:
                entry["forceUpload"] = step.force_upload
            steps.append(entry)
        spec: dict[str, Any] = {"steps": steps, "force": self._force}
        if self._base_image is not None:
            spec["fromImage"] = self._base_image
        if self._base_template is not None:
            spec["fromTemplate"] = self._base_template
        if self._registry is not None:
            spec["fromImageRegistry"] = dict(self._registry)
        if self._oci_runtime is not None:
            spec["ociRuntime"] = self._oci_runtime
        if self._start_cmd is not None:
            spec["startCmd"] = self._start_cmd
        if self._ready_cmd is not None:
            spec["readyCmd"] = self._ready_cmd
        return spec
