"""Reading Server-Sent Events incrementally, as they arrive (the client side of events.py's framing).

The pool relays worker streams event by event, so it cannot wait for a whole body the way
a test can; this parser takes lines as the transport delivers them and hands out each
message the moment its terminating blank line arrives. It follows the parts of the SSE
spec our servers use: ``id:``, ``data:`` (several lines join with ``\\n``) and ``:``
comments; other fields (``event:``, ``retry:``) are accepted and ignored.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from .events import DONE

__all__ = ["SSEMessage", "SSEParser", "aiter_sse", "aiter_json"]


@dataclass(frozen=True)
class SSEMessage:
    """One dispatched message: ``data`` is the raw text, ``comment`` set for comment-only frames."""

    id: int | None
    data: str | None
    comment: str | None = None

    @property
    def done(self) -> bool:
        """True for the ``[DONE]`` sentinel that ends every rbee stream."""
        return self.data == DONE

    def json(self) -> Any:
        return json.loads(self.data) if self.data is not None else None


class SSEParser:
    """Feed it lines (without their line ending); it returns a message at each blank line."""

    def __init__(self) -> None:
        self._id: int | None = None
        self._data: list[str] = []
        self._comment: str | None = None
        self._pending = b""  # an unfinished line of feed_bytes

    def feed_line(self, line: str) -> SSEMessage | None:
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self._comment = line[1:].strip()
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "id":
            try:
                self._id = int(value)
            except ValueError:  # ids are ours and numeric; a foreign one is just not resumable
                self._id = None
        return None

    def feed(self, lines: Iterable[str]) -> list[SSEMessage]:
        return [m for m in map(self.feed_line, lines) if m is not None]

    def feed_bytes(self, data: bytes) -> list[SSEMessage]:
        """Feed raw bytes as the transport hands them over, cut anywhere; the messages they complete.

        A relay reading the body in the transport's own pieces skips a text decoder and a line
        splitter per piece, which is most of what reading line by line costs per chunk. Lines
        are decoded whole, so a UTF-8 character split across two pieces decodes right; ``\r\n``,
        ``\r`` and ``\n`` all end a line, as the spec says.
        """
        buf = self._pending + data if self._pending else data
        if b"\r" in buf:
            keep_cr = buf.endswith(b"\r")  # maybe the first half of a \r\n
            if keep_cr:
                buf = buf[:-1]
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if keep_cr:
                buf += b"\r"
        *lines, self._pending = buf.split(b"\n")
        out = []
        for line in lines:
            message = self.feed_line(line.decode("utf-8", "replace"))
            if message is not None:
                out.append(message)
        return out

    def _dispatch(self) -> SSEMessage | None:
        if not self._data and self._comment is None:
            return None
        message = SSEMessage(self._id, "\n".join(self._data) if self._data else None,
                             self._comment if not self._data else None)
        self._id, self._data, self._comment = None, [], None
        return message


async def aiter_sse(lines: AsyncIterator[str]) -> AsyncIterator[SSEMessage]:
    """Messages from an async iterator of lines (e.g. ``httpx.Response.aiter_lines()``)."""
    parser = SSEParser()
    async for line in lines:
        message = parser.feed_line(line)
        if message is not None:
            yield message


async def aiter_json(lines: AsyncIterator[str]) -> AsyncIterator[tuple[int | None, dict]]:
    """``(id, event)`` for each JSON event; comments are skipped and ``[DONE]`` ends iteration."""
    async for message in aiter_sse(lines):
        if message.done:
            return
        if message.data is None:
            continue
        yield message.id, message.json()
