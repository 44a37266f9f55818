"""A streaming ``multipart/form-data`` reader: parts come out as they arrive, in pieces, so an
upload of any size passes through a small, fixed amount of memory."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

MAX_HEADER_BYTES = 16 * 1024


class MultipartError(ValueError):
    pass


@dataclass
class Part:
    name: str
    filename: str | None


def boundary_of(content_type: str) -> bytes:
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise MultipartError("multipart body without a boundary")
    return match.group(1).encode()


def _disposition(headers: bytes) -> Part:
    text = headers.decode(errors="replace")
    for line in text.split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-disposition":
            params = dict(
                (k.lower(), v1 if v1 else v2)
                for k, v1, v2 in re.findall(r';\s*([\w*]+)=(?:"((?:[^"\\]|\\.)*)"|([^;]*))', value)
            )
            return Part(name=params.get("name", ""), filename=params.get("filename"))
    raise MultipartError("a part has no Content-Disposition")


async def parts(
    chunks: AsyncIterator[bytes], boundary: bytes
) -> AsyncIterator[tuple[Part, AsyncIterator[bytes]]]:
    """Each part and an iterator over its body; consume the body before the next part."""
    delimiter = b"\r\n--" + boundary
    buf = bytearray(b"\r\n")  # so the first boundary matches the same pattern as the rest
    source = chunks.__aiter__()
    done = False

    async def more() -> bool:
        nonlocal done
        if done:
            return False
        try:
            buf.extend(await anext(source))
        except StopAsyncIteration:
            done = True
            return False
        return True

    # Preamble up to the first delimiter.
    while (at := buf.find(delimiter)) < 0:
        del buf[: max(0, len(buf) - len(delimiter))]
        if not await more():
            raise MultipartError("multipart body without any part")
    del buf[: at + len(delimiter)]
    while True:
        while len(buf) < 2:
            if not await more():
                raise MultipartError("truncated multipart body")
        if buf[:2] == b"--":
            return
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > MAX_HEADER_BYTES or not await more():
                raise MultipartError("truncated or oversized part headers")
        part = _disposition(bytes(buf[2:end]))
        del buf[: end + 4]
        finished = False

        async def body() -> AsyncIterator[bytes]:
            nonlocal finished
            while True:
                at = buf.find(delimiter)
                if at >= 0:
                    if at:
                        yield bytes(buf[:at])
                    del buf[: at + len(delimiter)]
                    finished = True
                    return
                keep = len(delimiter) - 1
                if len(buf) > keep:
                    out = bytes(buf[: len(buf) - keep])
                    del buf[: len(buf) - keep]
                    yield out
                if not await more():
                    raise MultipartError("truncated multipart body")

        reader = body()
        yield part, reader
        if not finished:  # the caller skipped (part of) the body
            async for _ in reader:
                pass
