"""A COPY step's files: which ones (globs, ``.dockerignore``), their hash, and their archive.

The hash is E2B's (``calculate_files_hash``): SHA-256 over ``"COPY {src} {dest}"``, then each
matched path relative to the context with its mode, its size (files only) and its contents (a
link's target for links that are not followed). uid, gid and mtime are left out, so the same
files hash the same on any machine; the server keeps uploads by this hash, so unchanged files
are never sent twice.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import stat
import tarfile
import tempfile
from typing import IO

_CHUNK = 1024 * 1024
_MAGIC = re.compile(r"[*?\[]")


class NoFilesMatched(ValueError):
    """A COPY source that matches nothing in the context."""


def _translate(pattern: str) -> str:
    """A glob as a regular expression over "/"-separated relative paths.

    ``*`` and ``?`` stay within one path segment, ``**`` spans any number of them, ``[...]``
    is a character class (``[!...]`` negated) and ``\\`` escapes. Dotfiles match like any
    other name, as in Docker.
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                out.append("(?:.*/)?")
                i += 1
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            start = i + 1
            start += pattern[start : start + 1] in ("!", "^")
            start += pattern[start : start + 1] == "]"  # a leading "]" is a member
            end = pattern.find("]", start)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                negate = body[:1] in ("!", "^")
                body = body[1:] if negate else body
                body = body.replace("\\", "\\\\")
                out.append(f"[^/{body}]" if negate else f"(?!/)[{body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _clean(pattern: str) -> str:
    pattern = posixpath.normpath(pattern.strip().replace(os.sep, "/")).lstrip("/")
    return "" if pattern == "." else pattern


class IgnoreMatcher:
    """``.dockerignore`` rules: a pattern also excludes everything under what it matches;
    ``!`` patterns take paths back; the last matching pattern decides."""

    def __init__(self, patterns: list[str]) -> None:
        self.rules: list[tuple[re.Pattern[str], bool]] = []
        for raw in patterns:
            negated = raw.strip().startswith("!")
            pattern = _clean(raw.strip()[1:] if negated else raw)
            if pattern:
                self.rules.append((re.compile(_translate(pattern)), negated))
        self.has_negations = any(negated for _, negated in self.rules)

    def matches(self, relative: str) -> bool:
        """Whether the context-relative path ``relative`` is excluded."""
        candidates = [relative]
        parent = posixpath.dirname(relative)
        while parent:
            candidates.append(parent)
            parent = posixpath.dirname(parent)
        excluded = False
        for regex, negated in self.rules:
            if any(regex.fullmatch(c) for c in candidates):
                excluded = not negated
        return excluded


def read_dockerignore(context: str) -> list[str]:
    """The patterns of the context's ``.dockerignore`` (none when there is none)."""
    try:
        with open(os.path.join(context, ".dockerignore"), encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def matched_files(src: str, context: str, ignore: list[str]) -> list[str]:
    """The absolute paths a COPY source takes from the context, sorted: matched files, and
    matched directories with everything in them, less what ``ignore`` excludes."""
    root = os.path.abspath(context)
    matcher = IgnoreMatcher(ignore)
    pattern = _clean(src)
    matches: list[str] = []
    if _MAGIC.search(pattern):
        regex = re.compile(_translate(pattern))
        for dirpath, dirnames, filenames in os.walk(root):
            base = os.path.relpath(dirpath, root).replace(os.sep, "/")
            for name in dirnames + filenames:
                relative = name if base == "." else f"{base}/{name}"
                if regex.fullmatch(relative):
                    matches.append(relative)
    elif os.path.lexists(os.path.join(root, pattern or ".")):
        matches.append(pattern or ".")
    found: set[str] = set()

    def walk(directory: str, relative: str) -> None:
        with os.scandir(directory) as entries:
            for entry in entries:
                inner = entry.name if relative == "." else f"{relative}/{entry.name}"
                ignored = matcher.matches(inner)
                if not ignored:
                    found.add(entry.path)
                if entry.is_dir(follow_symlinks=False) and (not ignored or matcher.has_negations):
                    walk(entry.path, inner)

    walked: list[str] = []
    # Parents before children, so nothing is walked twice.
    for relative in sorted(matches, key=lambda m: (0 if m == "." else m.count("/") + 1, m)):
        if any(relative == w or relative.startswith(f"{w}/") or w == "." for w in walked):
            continue
        if relative != "." and matcher.matches(relative):
            continue
        path = os.path.normpath(os.path.join(root, relative))
        if os.path.isdir(path) and not os.path.islink(path):
            found.add(path)
            walk(path, relative)
            walked.append(relative)
        else:
            found.add(path)
    return sorted(found)


def files_hash(src: str, dest: str, context: str, ignore: list[str], resolve_symlinks: bool) -> str:
    """The hash of a COPY step's files (see the module's doc); NoFilesMatched if none."""
    digest = hashlib.sha256(f"COPY {src} {dest}".encode())
    files = matched_files(src, context, ignore)
    if not files:
        raise NoFilesMatched(f"no files match {src!r} in {os.path.abspath(context)}")

    def add_stat(info: os.stat_result) -> None:
        digest.update(str(info.st_mode).encode())
        # A directory's size is the filesystem's business, not the files'.
        if not stat.S_ISDIR(info.st_mode):
            digest.update(str(info.st_size).encode())

    for path in files:
        digest.update(os.path.relpath(path, context).encode())
        if os.path.islink(path):
            follow = resolve_symlinks and (os.path.isfile(path) or os.path.isdir(path))
            if not follow:
                add_stat(os.lstat(path))
                digest.update(os.readlink(path).encode())
                continue
        info = os.stat(path)
        add_stat(info)
        if stat.S_ISREG(info.st_mode):
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
    return digest.hexdigest()


def archive(
    src: str, context: str, ignore: list[str], resolve_symlinks: bool, gzip: bool
) -> IO[bytes]:
    """A tar of a COPY step's files, members relative to the context, in a temporary file
    (deleted when closed) positioned at its start."""
    out = tempfile.TemporaryFile()  # noqa: SIM115 (the caller closes it)
    try:
        with tarfile.open(
            fileobj=out, mode="w:gz" if gzip else "w", dereference=resolve_symlinks
        ) as tar:
            for path in matched_files(src, context, ignore):
                tar.add(path, arcname=os.path.relpath(path, context), recursive=False)
        out.seek(0)
    except BaseException:
        out.close()
        raise
    return out
