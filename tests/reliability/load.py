"""Load on a real server: many SSE subscribers, concurrent downloads and generations at once.

Used by ``test_load.py`` (completeness) and ``bench/reliability_load.py`` (delays). The
subscribers are raw asyncio sockets speaking HTTP/1.1 (chunked), doing little per byte so
that the measuring side is not what is measured. Each records when every frame arrived.

Event delay: the server does not stamp its events, so a frame's delay is its arrival at a
subscriber minus its *first* arrival at any subscriber of the same stream: the cost of
fanning the event out to everyone, which is what grows with the number of subscribers.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from rbee_jupyter.testing.rawsse import RawSSEProtocol
from rbee_jupyter.testing.server import ServerProcess


class Subscriber(RawSSEProtocol):
    """One SSE subscriber over a raw socket; records every frame with its arrival time."""

    def __init__(self, request: bytes, finished: asyncio.Future) -> None:
        super().__init__(request, finished)
        self.frames: list[tuple[int | None, Any, float]] = []  # (id, data, arrival)
        self.done = False

    def on_frame(self, block: bytes, now: float) -> None:
        event_id, data = None, None
        for line in block.split(b"\n"):
            if line.startswith(b"id: "):
                event_id = int(line[4:])
            elif line.startswith(b"data: "):
                data = line[6:]
        if data is None:
            return  # a keep-alive comment
        if data == b"[DONE]":
            self.frames.append((None, "[DONE]", now))
            self.done = True
            self.finish()
            return
        self.frames.append((event_id, json.loads(data), now))

    @property
    def events(self) -> list[Any]:
        return [d for _, d, _ in self.frames if d != "[DONE]"]


@dataclass
class LoadResult:
    subscribers: list[Subscriber]
    streams: list[str]  # the progress URL each subscriber read (same order)
    generations: list[list[Any]] = field(default_factory=list)
    connect_s: float = 0.0
    run_s: float = 0.0
    connected_at: float = 0.0  # time.monotonic() once every subscriber had its first event

    def delays(self) -> list[float]:
        """Every delivery's delay behind the first delivery of the same (stream, event id).

        Only events first delivered after every subscriber was connected count: an older
        one reaches a late subscriber as a replay, whose delay is its connect time.
        """
        first: dict[tuple[str, int], float] = {}
        for sub, url in zip(self.subscribers, self.streams):
            for event_id, _, at in sub.frames:
                if event_id is not None:
                    key = (url, event_id)
                    first[key] = min(first.get(key, at), at)
        return [at - first[(url, event_id)] for sub, url in zip(self.subscribers, self.streams)
                for event_id, _, at in sub.frames
                if event_id is not None and first[(url, event_id)] > self.connected_at]

    def terminal_after_connect(self) -> bool:
        """Whether every stream's terminal event was first delivered after all subscribers were in."""
        last: dict[str, float] = {}
        for sub, url in zip(self.subscribers, self.streams):
            if len(sub.frames) >= 2:
                at = sub.frames[-2][2]
                last[url] = min(last.get(url, at), at)
        return bool(last) and all(at > self.connected_at for at in last.values())

    def incomplete(self) -> list[int]:
        """Indexes of subscribers that did not get a terminal event followed by ``[DONE]``."""
        bad = []
        for i, sub in enumerate(self.subscribers):
            data = [d for _, d, _ in sub.frames]
            if len(data) < 2 or data[-1] != "[DONE]" or data[-2].get("stage") not in ("complete", "error"):
                bad.append(i)
        return bad


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def add_load_repos(hub, model: Path, n: int, *, padding_bytes: int = 1_500_000) -> list[str]:
    """``n`` distinct repos (the same tiny model under other names, plus a padding file so a
    crawling transfer lasts while 1000 subscribers connect): ``n`` separate downloads."""
    refs = []
    padding = {"padding.safetensors": bytes(range(256)) * (padding_bytes // 256)}
    for i in range(n):
        repo = f"rbee-test/load-{i}"
        hub.add_repo(repo, model, extra_files=padding)
        refs.append(f"hf:{repo}")
    return refs


def load_worker(server: ServerProcess, model: Path, timeout: float = 180.0) -> str:
    r = server.post("v1/workers", {"model_ref": f"file://{model}", "device": "cpu"})
    assert r.status_code == 202, r.text
    events = server.events(r.json()["progress_url"] + "&last_event_id=0", timeout=timeout)
    assert events[-1]["stage"] == "ready", events[-1]
    return r.json()["worker_id"]


async def run_load(server: ServerProcess, hub, refs: list[str], worker_id: str, *, subscribers: int = 1000,
                   generations: int = 2, max_tokens: int = 48, chunk_delay_s: float = 0.05,
                   timeout: float = 120.0) -> LoadResult:
    """Start the downloads (held back by the hub), connect the subscribers, start the
    generations, then let the downloads run; returns when every stream ended."""
    loop = asyncio.get_running_loop()
    hub.faults.chunk_delay_s = 1.0  # a crawl (~36 s a download) while the subscribers connect
    urls = []
    for ref in refs:
        r = server.post("v1/models/download", {"model_ref": ref})
        assert r.status_code == 202, r.text
        urls.append(r.json()["progress_url"])
    streams = [urls[i % len(urls)] for i in range(subscribers)]
    token = server.token
    finished = [loop.create_future() for _ in streams]
    subs: list[Subscriber] = []
    gate = asyncio.Semaphore(100)  # connect in waves, not 1000 SYNs at once

    async def connect(url: str, fut: asyncio.Future) -> None:
        request = (f"GET {url}&last_event_id=0 HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                   f"Authorization: token {token}\r\nAccept: text/event-stream\r\n\r\n").encode()
        async with gate:
            _, proto = await loop.create_connection(lambda: Subscriber(request, fut), "127.0.0.1", server.port)
        subs.append(proto)

    t0 = time.monotonic()
    await asyncio.gather(*(connect(u, f) for u, f in zip(streams, finished)))
    # every subscriber has its first event (the current state) before anything moves on
    deadline = time.monotonic() + timeout
    while not all(s.frames or s.finished.done() for s in subs):
        assert time.monotonic() < deadline, "subscribers did not get their first event"
        await asyncio.sleep(0.05)
    connect_s = time.monotonic() - t0

    async def generate() -> list[Any]:
        body = {"worker_id": worker_id, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0}
        async with httpx.AsyncClient(base_url=server.url + "rbee/", headers=server.auth_header,
                                     timeout=timeout) as client:
            async with client.stream("POST", "v1/inference", json=body) as r:
                assert r.status_code == 200, await r.aread()
                text = "".join([chunk async for chunk in r.aiter_text()])
        return [f for f in text.split("\n\n") if f.startswith(("id:", "data:"))]

    t1 = time.monotonic()
    gens = [asyncio.ensure_future(generate()) for _ in range(generations)]
    hub.faults.chunk_delay_s = chunk_delay_s  # re-read before every chunk: the transfers speed up
    result = LoadResult(subs, [s.request.split(b" ")[1].decode() for s in subs], connected_at=t1)
    await asyncio.wait_for(asyncio.gather(*finished), timeout)
    result.generations = [_frames(g) for g in await asyncio.wait_for(asyncio.gather(*gens), timeout)]
    result.connect_s, result.run_s = connect_s, time.monotonic() - t1
    return result


def _frames(blocks: list[str]) -> list[Any]:
    out = []
    for block in blocks:
        data = [line[6:] for line in block.split("\n") if line.startswith("data: ")]
        if data:
            out.append(data[0] if data[0] == "[DONE]" else json.loads(data[0]))
    return out
