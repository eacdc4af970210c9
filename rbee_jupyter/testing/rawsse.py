"""A bare SSE subscriber over an asyncio socket, for load tests and benchmarks.

Thousands of httpx streams would cost more CPU than the server they measure; this
protocol does the least per byte (HTTP/1.1 head, chunked decoding, frames split on blank
lines) and hands each frame to a subclass with the time its bytes arrived.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class RawSSEProtocol(asyncio.Protocol):
    """Send ``request``, then call :meth:`on_frame` for every SSE frame of a 200 chunked answer.

    ``finished`` gets ``None`` when a subclass calls :meth:`finish` (after ``[DONE]``), or the
    error (a non-200 answer, a lost connection). The arrival time is read once per
    ``data_received``, before any parsing, with ``clock``.
    """

    def __init__(self, request: bytes, finished: asyncio.Future, *, clock: Callable[[], float] = time.monotonic):
        self.request, self.finished, self.clock = request, finished, clock
        self.raw = b""
        self.status: int | None = None
        self.headers_done = False
        self.chunk_left = 0  # body bytes of the current chunk still to come
        self.crlf_left = 0  # the CRLF that ends a chunk (it may arrive split)
        self.sse = b""
        self.transport: asyncio.Transport | None = None

    def on_frame(self, block: bytes, now: float) -> None:
        """One frame (its lines, without the blank line that ended it)."""
        raise NotImplementedError

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = self.clock()
        self.raw += data
        if not self.headers_done:
            head, sep, rest = self.raw.partition(b"\r\n\r\n")
            if not sep:
                return
            self.status = int(head.split(b" ", 2)[1])
            if self.status != 200 or b"chunked" not in head.lower():
                self.finish(RuntimeError(head[:300].decode(errors="replace")))
                return
            self.headers_done, self.raw = True, rest
        self._dechunk()
        while b"\n\n" in self.sse:
            block, self.sse = self.sse.split(b"\n\n", 1)
            self.on_frame(block, now)

    def _dechunk(self) -> None:
        raw = self.raw
        while raw:
            if self.crlf_left:
                k = min(self.crlf_left, len(raw))
                raw, self.crlf_left = raw[k:], self.crlf_left - k
                continue
            if self.chunk_left == 0:  # a chunk-size line
                line, sep, rest = raw.partition(b"\r\n")
                if not sep:
                    break
                size, raw = int(line.split(b";")[0], 16), rest
                if size == 0:  # the last chunk: the response is over
                    raw = b""
                    break
                self.chunk_left = size
                continue
            take = raw[:self.chunk_left]
            raw = raw[len(take):]
            self.chunk_left -= len(take)
            self.sse += take
            if self.chunk_left == 0:
                self.crlf_left = 2
        self.raw = raw

    def finish(self, error: BaseException | None = None) -> None:
        if error is None and self.transport is not None:
            self.transport.close()
        if not self.finished.done():
            self.finished.set_result(error)

    def connection_lost(self, exc) -> None:
        self.finish(exc)
