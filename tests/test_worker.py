"""The worker process on its own: its routes, streams, queue, cancels, auth and lifeline.

One real worker (a tiny Llama, slowed to 20 ms per chunk so cancels land mid-stream) serves
the whole module: starting a worker means importing torch, which is most of its cost.
Tests that need a fresh process start cheap ones that never get past the import.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from rbee_jupyter.core.procs import wait_exited
from rbee_jupyter.testing.sse import read_stream
from rbee_jupyter.worker.process import child_worker_pids
from rbee_jupyter.worker.protocol import SECRET_ENV, TOKEN_DELAY_ENV

SECRET = "worker-test-secret"
PROMPT = "Once upon a time"
WAIT_S = 60.0  # bound on waiting for what will happen (a load, a stream's end, an exit) on a busy machine
SHARED: set[int] = set()  # pids of module-scoped workers, alive on purpose between tests


# --- helpers -------------------------------------------------------------------------------

@dataclass
class Spawned:
    proc: subprocess.Popen
    port: int
    stop_draining: threading.Event = field(default_factory=threading.Event)
    drainer: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, authorization: str | None = f"Bearer {SECRET}") -> httpx.AsyncClient:
        headers = {"Authorization": authorization} if authorization is not None else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, trust_env=False, timeout=WAIT_S)


def spawn(model_path: Path, *, env: dict[str, str] | None = None, stderr_pipe: bool = False, **spec) -> Spawned:
    """Start ``python -m rbee_jupyter.worker`` the way the pool does and read its port line.

    ``stderr_pipe``: give it a stderr pipe that a thread drains (as the pool does) until
    ``stop_draining`` is set, so a test can then close the pipe like a dying parent would.
    """
    proc = subprocess.Popen([sys.executable, "-m", "rbee_jupyter.worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE if stderr_pipe else None,
                            env={**os.environ, SECRET_ENV: SECRET, **(env or {})})
    proc.stdin.write(json.dumps({"model_path": str(model_path), **spec}).encode() + b"\n")
    proc.stdin.flush()
    ready, _, _ = select.select([proc.stdout], [], [], WAIT_S)
    assert ready, f"the worker did not announce its port within {WAIT_S} s"
    line = json.loads(proc.stdout.readline())
    assert set(line) == {"port", "pid"} and line["pid"] == proc.pid
    spawned = Spawned(proc, line["port"])
    if stderr_pipe:
        def drain() -> None:
            fd = proc.stderr.fileno()
            while not spawned.stop_draining.is_set():
                readable, _, _ = select.select([fd], [], [], 0.05)
                if readable and not os.read(fd, 65536):
                    return
        spawned.drainer = threading.Thread(target=drain, daemon=True)
        spawned.drainer.start()
    return spawned


async def until(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll another process's state with a bounded deadline; returns the predicate's value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(interval)


# --- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def worker(rbee_tiny_model: Path) -> Iterator[Spawned]:
    w = spawn(rbee_tiny_model, env={TOKEN_DELAY_ENV: "0.02"}, worker_id="w-test", queue_depth=1,
              max_batch_size=1, max_tokens_limit=200, stderr_pipe=True)
    SHARED.add(w.proc.pid)
    yield w
    SHARED.discard(w.proc.pid)
    # The parent "dies": every pipe end it held closes. The loaded worker must notice (stdin EOF),
    # survive its stderr being gone (EPIPE), and exit at once without a slow interpreter teardown.
    w.stop_draining.set()
    w.drainer.join(WAIT_S)  # it no longer reads the pipe we are about to close
    assert not w.drainer.is_alive()
    w.proc.stderr.close()
    w.proc.stdin.close()
    gone = time.monotonic()
    assert w.proc.wait(WAIT_S) == 0
    # "at once" is milliseconds on an idle machine; the bound holds on a busy one and still catches a
    # worker that waits out its generation thread or a lifeline poll instead of exiting
    assert time.monotonic() - gone < 20


@pytest.fixture(autouse=True)
def no_stray_workers() -> Iterator[None]:
    """After each test, no worker but the shared one may be alive."""
    yield
    wait_exited(child_worker_pids() - SHARED, 120)  # bounded for a busy machine, ends when they exit
    assert child_worker_pids() - SHARED == set()


@pytest.fixture(scope="module")
def reference(rbee_tiny_model: Path):
    """The same request run in this process with the loader and Generator: what the worker must send."""
    from transformers import AutoTokenizer

    from rbee_jupyter.engine.generate import GenerationRequest, Generator
    from rbee_jupyter.engine.loader import load_model

    gen = Generator(load_model(rbee_tiny_model), AutoTokenizer.from_pretrained(rbee_tiny_model))
    stream = gen.stream(GenerationRequest(prompt=PROMPT, max_tokens=12))
    chunks = [(c.text, c.index) for c in stream]
    return chunks, stream.stats


async def load_stream(worker: Spawned, **headers) -> list[dict]:
    async with worker.client() as c:
        s = await read_stream(c, "GET", "/load", timeout=WAIT_S, headers=headers)
    assert s.status == 200 and s.done
    return [f for f in s.frames if f.comment is None]  # keep-alives come while loading is slow


async def health(c: httpx.AsyncClient) -> dict:
    r = await c.get("/health")
    assert r.status_code == 200
    return r.json()


async def until_idle(c: httpx.AsyncClient, timeout: float = WAIT_S) -> dict:
    async def idle():
        h = await health(c)
        return h if h["state"] == "idle" and not h["requests"] else None
    return await until(idle, timeout, "the worker to be idle")


async def assert_compute_stopped(c: httpx.AsyncClient) -> None:
    """tokens_computed does not move over many token delays: the generation really stopped."""
    before = (await health(c))["tokens_computed"]
    # the thing under test: nothing moves during the wait; a busy machine can only hide a move, not fake one
    await asyncio.sleep(0.2)  # ten token delays: a generation still running would have moved it
    assert (await health(c))["tokens_computed"] == before


# --- loading -------------------------------------------------------------------------------

async def test_load_stream_reports_every_block_then_ready(worker, rbee_tiny_model):
    from rbee_jupyter.engine.loader import plan_blocks

    blocks = [b.name for b in plan_blocks(rbee_tiny_model)]
    frames = await load_stream(worker, **{"Last-Event-ID": "0"})
    events = [f.data for f in frames[:-1]]
    progress, ready = events[:-1], events[-1]
    assert [f.id for f in frames[:-1]] == list(range(1, len(blocks) + 2))
    assert [e["layers_loaded"] for e in progress] == list(range(1, len(blocks) + 1))
    assert [e["block"] for e in progress] == blocks
    for e in progress:
        assert e["stage"] == "loading_to_vram" and e["layers_total"] == len(blocks)
        assert e["device"] == "cpu" and e["vram_mb"] > 0 and e["memory_mb"] == {"cpu": e["vram_mb"]}
    assert [e["vram_mb"] for e in progress] == sorted(e["vram_mb"] for e in progress)
    assert ready == {"stage": "ready", "worker_id": "w-test", "memory_mb": progress[-1]["memory_mb"]}

    resumed = await load_stream(worker, **{"Last-Event-ID": "3"})
    assert [f.id for f in resumed[:-1]] == list(range(4, len(blocks) + 2))
    late = await load_stream(worker)  # no Last-Event-ID: the current state, i.e. the terminal event
    assert [f.data for f in late] == [ready, "[DONE]"]

    async with worker.client() as c:
        h = await health(c)
    assert h["state"] == "idle" and h["layers_loaded"] == h["layers_total"] == len(blocks)
    assert h["memory_mb"] == ready["memory_mb"] and h["pid"] == worker.proc.pid
    # Where the load's time went, from the process start to ready: every phase, in order, adding
    # up to no more than the process's age.
    timeline = h["load_seconds"]
    assert list(timeline) == ["start", "imports", "cuda_init", "first_block", "blocks", "finish"]
    assert all(s >= 0 for s in timeline.values())
    assert sum(timeline.values()) <= timeline["start"] + h["uptime_s"] + 0.01


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {SECRET}", SECRET, "Bearer"])
async def test_requests_without_the_secret_are_refused(worker, authorization):
    async with worker.client(authorization) as c:
        for method, path in [("GET", "/health"), ("GET", "/load"), ("POST", "/generate"),
                             ("DELETE", "/generate/x"), ("POST", "/shutdown")]:
            r = await c.request(method, path, json={"prompt": PROMPT} if method == "POST" else None)
            assert r.status_code == 403, (method, path)
            assert r.json()["error"]["code"] == "ACCESS_DENIED"
    assert worker.proc.poll() is None


# --- generation -----------------------------------------------------------------------------

async def test_generation_stream_equals_the_in_process_generator(worker, reference):
    chunks, stats = reference
    await load_stream(worker)
    async with worker.client() as c:
        s = await read_stream(c, "POST", "/generate", timeout=WAIT_S,
                              json={"prompt": PROMPT, "max_tokens": 12, "request_id": "req-1"})
    assert s.status == 200 and s.done
    started, *tokens, end = s.events
    assert started["type"] == "started" and started["job_id"] == "req-1" and started["timestamp"] > 0
    assert [(t["type"], t["t"], t["i"]) for t in tokens] == [("token", text, i) for text, i in chunks]
    assert [t["i"] for t in tokens] == list(range(len(tokens)))
    assert end["type"] == "end" and end["job_id"] == "req-1"
    assert (end["total_tokens"], end["prompt_tokens"], end["stop_reason"]) == \
        (stats.completion_tokens, stats.prompt_tokens, stats.stop_reason)
    assert end["duration_ms"] >= 0 and end["tokens_per_second"] > 0 and end["time_to_first_token_ms"] > 0
    assert s.ids == list(range(1, len(s.events) + 1))


@pytest.mark.parametrize("body, code, field", [
    ({"prompt": ""}, "INVALID_REQUEST", "prompt"),
    ({"prompt": PROMPT, "max_tokens": 201}, "INVALID_REQUEST", "max_tokens"),  # over max_tokens_limit
    ({"prompt": PROMPT * 300, "max_tokens": 100}, "CONTEXT_TOO_LONG", None),
    ({"prompt": PROMPT, "request_id": 7}, "INVALID_REQUEST", "request_id"),
    ("not json", "INVALID_REQUEST", "body"),
])
async def test_invalid_requests_get_a_400_json_error(worker, body, code, field):
    await load_stream(worker)
    async with worker.client() as c:
        r = await (c.post("/generate", content=body) if isinstance(body, str) else c.post("/generate", json=body))
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    if field:
        assert error["details"]["field"] == field


async def test_delete_stops_the_generation_within_one_token_and_frees_the_slot(worker):
    await load_stream(worker)
    computed_at_delete = []
    async with worker.client() as c, worker.client() as control:
        async def on_frame(frame):
            if isinstance(frame.data, dict) and frame.data.get("i") == 2:
                assert (await control.delete("/generate/req-del")).status_code == 204
                computed_at_delete.append((await health(control))["tokens_computed"])

        s = await read_stream(c, "POST", "/generate", timeout=WAIT_S, on_frame=on_frame,
                              json={"prompt": PROMPT, "max_tokens": 200, "request_id": "req-del"})
        assert s.done
        assert s.events[-1] == {"type": "error", "message": s.events[-1]["message"], "code": "CANCELLED",
                                "details": {"request_id": "req-del"}}
        h = await until_idle(control)
        assert h["tokens_computed"] - computed_at_delete[0] <= 1  # at most the step already under way
        await assert_compute_stopped(control)
        for _ in range(2):  # idempotent, unknown ids included
            assert (await control.delete("/generate/req-del")).status_code == 204
        assert (await control.delete("/generate/never-existed")).status_code == 204


async def test_a_client_that_disconnects_cancels_its_generation(worker):
    await load_stream(worker)
    async with worker.client() as c, worker.client() as control:
        at_start = (await health(control))["tokens_computed"]
        s = await read_stream(c, "POST", "/generate", timeout=WAIT_S, stop_after=3,
                              json={"prompt": PROMPT, "max_tokens": 200})
        assert [e["type"] for e in s.events] == ["started", "token", "token"]
        h = await until_idle(control)
        # it stopped before the end of its 200 tokens (4 s at 20 ms each; this model reaches no EOS): by the
        # order of events, not a clock a busy machine stretches; the latency itself is measured by
        # bench/inference.py (its cancel rounds)
        assert h["tokens_computed"] - at_start < 200
        await assert_compute_stopped(control)


async def test_a_full_queue_answers_503_worker_busy(worker):
    """queue_depth=1: one running, one waiting, the third is refused before any event."""
    await load_stream(worker)
    async with worker.client() as a, worker.client() as b, worker.client() as control:
        body = {"prompt": PROMPT, "max_tokens": 200}
        running = asyncio.ensure_future(read_stream(a, "POST", "/generate", timeout=WAIT_S,
                                                    json={**body, "request_id": "req-a"}))

        async def first_running():
            return (await health(control))["running"] == "req-a"
        # two requests sent at once may be accepted in either order: send the second only once the
        # first runs, so which one waits is known
        await until(first_running, WAIT_S, "the first request to run")
        queued = asyncio.ensure_future(read_stream(b, "POST", "/generate", timeout=WAIT_S,
                                                   json={**body, "request_id": "req-b"}))

        async def both_accepted():
            h = await health(control)
            return h if h["requests"] == ["req-a", "req-b"] else None
        h = await until(both_accepted, WAIT_S, "both requests to be accepted")
        assert h["state"] == "busy" and h["running"] == "req-a" and h["queue_length"] == 1

        r = await control.post("/generate", json=body)
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "WORKER_BUSY" and error["details"] == {"queue_length": 1, "queue_depth": 1}

        for request_id in ("req-b", "req-a"):  # a queued request is dropped, the running one stops
            assert (await control.delete(f"/generate/{request_id}")).status_code == 204
        for stream in (await queued, await running):
            assert stream.done and stream.events[-1]["code"] == "CANCELLED"
        assert (await queued).events[0]["type"] == "started" and len((await queued).events) == 2
        await until_idle(control)


async def test_a_pinned_path_that_now_leads_elsewhere_is_not_loaded(rbee_tiny_model, tmp_path):
    """A shared server hands a worker the real path it checked (``pinned``); a part of it swapped for a
    link since then makes the load fail before anything is read, and the worker serves nothing."""
    real = tmp_path / "allowed" / "model"
    real.parent.mkdir()
    real.symlink_to(rbee_tiny_model)  # what the path is now: a link (to a model, as an attacker would make it)
    w = spawn(real, pinned=True, worker_id="w-pinned")
    try:
        events = [f.data for f in await load_stream(w)]
        assert events[-1] == "[DONE]" and events[-2]["stage"] == "error"
        assert events[-2]["code"] == "INVALID_CHECKPOINT" and "a part of it is a link now" in events[-2]["message"]
        assert str(rbee_tiny_model) not in events[-2]["message"]  # where the link leads is not said
        assert not any(e.get("stage") == "progress" for e in events[:-2] if isinstance(e, dict))
    finally:
        async with w.client() as c:
            await c.post("/shutdown")
        assert await asyncio.get_running_loop().run_in_executor(None, w.proc.wait, WAIT_S) == 0


# --- lifecycle -------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["shutdown", "parent gone"])
async def test_the_worker_exits_when_told_or_when_its_parent_is_gone(rbee_tiny_model, how):
    w = spawn(rbee_tiny_model, worker_id="w-exit")
    if how == "shutdown":
        async with w.client() as c:
            assert (await c.post("/shutdown")).status_code == 202
    else:
        w.proc.stdin.close()
    assert await asyncio.get_running_loop().run_in_executor(None, w.proc.wait, WAIT_S) == 0


# --- batching --------------------------------------------------------------------------------

async def test_the_kv_budget_makes_requests_wait_instead_of_running_out_of_memory(rbee_tiny_model):
    """A budget of ~100 KV slots: two requests of ~45 slots run together, the third waits for room."""
    from transformers import AutoTokenizer

    from rbee_jupyter.engine.generate import GenerationRequest, Generator
    from rbee_jupyter.engine.loader import load_model

    gen = Generator(load_model(rbee_tiny_model), AutoTokenizer.from_pretrained(rbee_tiny_model))
    prompts = [f"{PROMPT} {i}" for i in range(3)]
    expected = ["".join(c.text for c in gen.stream(GenerationRequest(prompt=p, max_tokens=40))) for p in prompts]
    w = spawn(rbee_tiny_model, env={TOKEN_DELAY_ENV: "0.02"}, worker_id="w-kv", kv_budget_mb=0.1,
              max_batch_size=8, queue_depth=4)
    try:
        await load_stream(w)
        async with w.client() as c, w.client() as control:
            streams = [asyncio.ensure_future(read_stream(c, "POST", "/generate", timeout=WAIT_S,
                                                         json={"prompt": p, "max_tokens": 40, "request_id": f"kv-{i}"}))
                       for i, p in enumerate(prompts)]

            async def queued():
                h = await health(control)
                return h if len(h["requests"]) == 3 else None
            h = await until(queued, WAIT_S, "the three requests to be accepted")
            assert (h["active_sequences"], h["queue_length"]) == (2, 1)  # whichever two arrived first
            assert 0 < h["kv_reserved_tokens"] <= h["kv_budget_tokens"] == int(0.1 * (1 << 20)) // 1024
            assert h["max_batch_size"] == 8
            for stream, text in zip(streams, expected, strict=True):
                s = await stream
                assert s.done and s.events[-1]["type"] == "end"
                assert "".join(e["t"] for e in s.events if e["type"] == "token") == text
            h = await until_idle(control)
            assert (h["active_sequences"], h["queue_length"], h["kv_reserved_tokens"]) == (0, 0, 0)
    finally:
        w.proc.stdin.close()
        w.proc.wait(WAIT_S)
