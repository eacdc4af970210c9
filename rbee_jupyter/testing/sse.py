"""Reading Server-Sent Events streams in tests, frame by frame, with every wait bounded."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Frame:
    """One SSE frame: ``data`` is the parsed JSON (or the raw text, e.g. ``[DONE]``)."""

    id: int | None
    data: Any
    comment: str | None = None
    arrived: float = field(default_factory=time.monotonic, compare=False)


@dataclass
class Stream:
    status: int
    headers: dict[str, str]
    frames: list[Frame] = field(default_factory=list)
    body: Any = None

    @property
    def events(self) -> list[Any]:
        """The JSON events, without comments and ``[DONE]``."""
        return [f.data for f in self.frames if f.comment is None and f.data != "[DONE]"]

    @property
    def ids(self) -> list[int]:
        return [f.id for f in self.frames if f.id is not None]

    @property
    def done(self) -> bool:
        data = [f for f in self.frames if f.comment is None]
        return bool(data) and data[-1].data == "[DONE]"

    @property
    def comments(self) -> list[str]:
        return [f.comment for f in self.frames if f.comment is not None]


def parse_frames(text: str) -> list[Frame]:
    """Split a complete SSE body into frames (``id:``, ``data:`` and ``:`` comment lines)."""
    frames = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        event_id, data, comment = None, [], None
        for line in block.split("\n"):
            if line.startswith(":"):
                comment = line[1:].strip()
            elif line.startswith("id:"):
                event_id = int(line[3:].strip())
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
        if comment is not None and not data:
            frames.append(Frame(None, None, comment))
            continue
        raw = "\n".join(data)
        frames.append(Frame(event_id, raw if raw == "[DONE]" else json.loads(raw)))
    return frames


async def read_stream(client, method: str, url: str, *, timeout: float = 120.0, stop_after: int | None = None,
                      until: Callable[[list[Frame]], bool] | None = None, on_frame=None, **kwargs: Any) -> Stream:
    """Read a whole SSE response (until the server ends it) within ``timeout`` seconds (a bound only
    against a hang, with room for a machine busy with other work).

    ``stop_after`` closes the connection after that many JSON events, ``until(frames)``
    as soon as it holds for the data frames so far (a client that goes away);
    ``on_frame(frame)`` is awaited for each frame as it arrives.
    """
    async def run() -> Stream:
        async with client.stream(method, url, **kwargs) as r:
            stream = Stream(r.status_code, dict(r.headers))
            if not r.headers.get("content-type", "").startswith("text/event-stream"):
                stream.body = json.loads(await r.aread() or b"null")
                return stream
            buf = ""
            async for chunk in r.aiter_text():
                buf += chunk
                while "\n\n" in buf:
                    block, buf = buf.split("\n\n", 1)
                    for frame in parse_frames(block + "\n\n"):
                        stream.frames.append(frame)
                        if on_frame is not None:
                            await on_frame(frame)
                    if stop_after is not None and len(stream.events) >= stop_after:
                        return stream
                    if until is not None and until([f for f in stream.frames if f.comment is None]):
                        return stream
            return stream
    return await asyncio.wait_for(run(), timeout)
