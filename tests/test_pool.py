"""LocalProcessPool against real worker processes and a real tiny model.

Every test opens its own pool and closes it; an autouse check then asserts that no worker
process outlived it. Test-only delays (``RBEE_WORKER_BLOCK_DELAY_S`` after each block,
``RBEE_WORKER_TOKEN_DELAY_S`` after each chunk, both cut short by a cancel) make "between
layers" and "mid-generation" deterministic. Starting a worker costs a torch import, so
tests that need several workers start them concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from rbee_jupyter.errors import InvalidRequest, WorkerBusy, WorkerNotFound
from rbee_jupyter.events import ErrorEvent, InferenceEnd, InferenceStarted, LoadingProgress, Ready, Token
from rbee_jupyter.core.jobs import Job, JobState
from rbee_jupyter.pools.local import LocalProcessPool, WorkerInfo, WorkerSpec
from rbee_jupyter.protocol import GenerationRequest
from rbee_jupyter.worker.process import child_worker_pids
from rbee_jupyter.worker.protocol import BLOCK_DELAY_ENV, TOKEN_DELAY_ENV

PROMPT = "Once upon a time"
LOAD_S = 90.0  # bound on a load (a torch import on a busy 2-core machine included)
WAIT_S = 60.0  # bound on waiting for what will happen (a job ends, a worker goes idle) on a busy machine
SLOW_LOAD = {BLOCK_DELAY_ENV: "300"}  # a load that sits after each block (longer than WAIT_S) until cancelled or killed
SLOW_TOKENS = {TOKEN_DELAY_ENV: "0.05"}

pytestmark = pytest.mark.usefixtures("no_worker_left_behind")  # (conftest.py) after every test


# --- helpers -------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def opened(**kwargs) -> AsyncIterator[LocalProcessPool]:
    pool = LocalProcessPool(**kwargs)
    try:
        yield pool
    finally:
        await pool.close()
    assert pool.list() == []


def spec(path: Path, **kwargs) -> WorkerSpec:
    return WorkerSpec(model_ref="local:tiny-llama", model_path=str(path), **kwargs)


def alive(pid: int) -> bool:
    return pid in child_worker_pids()


async def next_event(job: Job, predicate: Callable[[object], bool], timeout: float):
    """The first event of ``job`` (from its start) that satisfies ``predicate``, within ``timeout``."""
    async def find():
        async for record in job.subscribe(last_event_id=0):
            if predicate(record.event):
                return record.event
        raise AssertionError(f"job ended without such an event: {job.last.data if job.last else None}")
    return await asyncio.wait_for(find(), timeout)


async def until(predicate: Callable[[], object], timeout: float, what: str):
    """Poll a condition another process decides, with a bounded deadline."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.02)
    return value


async def loaded(pool: LocalProcessPool, path: Path, **kwargs) -> WorkerInfo:
    job = Job("load")
    info = await pool.start(spec(path, **kwargs), job)
    assert await job.wait(LOAD_S) is JobState.COMPLETE, job.last.data
    return info


def generating(pool: LocalProcessPool, worker_id: str, body: dict) -> Job:
    """A generation running as its job's task, as the hive runs it (which parses the body first)."""
    job = Job("inference", error_style="type")
    job.task = asyncio.ensure_future(pool.generate(worker_id, GenerationRequest.from_json(body), job))
    return job


def error_of(job: Job) -> dict:
    event = job.last.event
    assert isinstance(event, ErrorEvent), job.last.data
    return event.to_dict()


# --- the pieces that need no process ------------------------------------------------------------

def test_the_sse_parser_hands_out_each_message_when_its_blank_line_arrives():
    from rbee_jupyter.sse_client import SSEParser

    parser = SSEParser()
    lines = ["id: 1", 'data: {"a":', "data: 1}", "", ": keep-alive", "", "event: x", "retry: 5",
             "data: [DONE]", "\r\n", ""]
    out = [(i, m) for i, line in enumerate(lines) if (m := parser.feed_line(line)) is not None]
    assert [i for i, _ in out] == [3, 5, 9]
    first, comment, done = (m for _, m in out)
    assert (first.id, first.json()) == (1, {"a": 1}) and not first.done
    assert (comment.comment, comment.data) == ("keep-alive", None)
    assert done.done and done.id is None


@pytest.mark.parametrize("payload, status, cls, code, http", [
    ({"error": {"code": "WORKER_BUSY", "message": "busy", "details": {"queue_depth": 0}}}, 503,
     WorkerBusy, "WORKER_BUSY", 503),
    ({"type": "error", "code": "INVALID_REQUEST", "message": "bad", "details": {"field": "prompt"}}, None,
     InvalidRequest, "INVALID_REQUEST", 400),
    ({"stage": "error", "code": "SOMETHING_NEW", "message": "?"}, 418, None, "SOMETHING_NEW", 418),
    ("<html>oops</html>", 502, None, "INTERNAL_ERROR", 502),
])
def test_worker_errors_are_rebuilt_as_their_own_classes(payload, status, cls, code, http):
    from rbee_jupyter.errors import RbeeError
    from rbee_jupyter.worker.protocol import error_from_json

    error = error_from_json(payload, status)
    assert type(error) is (cls or RbeeError)
    assert (error.code, error.status) == (code, http)
    if isinstance(payload, dict) and "details" in payload.get("error", payload):
        assert error.details == payload.get("error", payload)["details"]


# --- the happy path -------------------------------------------------------------------------

async def test_load_then_generate_then_keep_alive_unload(rbee_tiny_model, reference):
    from rbee_jupyter.engine.loader import plan_blocks

    blocks = [b.name for b in plan_blocks(rbee_tiny_model)]
    chunks, stats = reference
    async with opened(keep_alive_s=1.0) as pool:
        seen: list[tuple[str, str, str | None]] = []
        pool.listen(lambda event, info: seen.append((event, info.state, info.exit_reason)))
        job = Job("load")
        info = await pool.start(spec(rbee_tiny_model), job)
        assert info.state == "loading" and alive(info.pid) and [i.id for i in pool.list()] == [info.id]
        assert await job.wait(LOAD_S) is JobState.COMPLETE

        *progress, ready = [r.event for r in job.records]
        assert all(isinstance(e, LoadingProgress) for e in progress)
        assert [e.layers_loaded for e in progress] == list(range(1, len(blocks) + 1))
        assert [e.block for e in progress] == blocks
        assert {(e.layers_total, e.device) for e in progress} == {(len(blocks), "cpu")}
        assert all(e.vram_mb > 0 and e.memory_mb == {"cpu": e.vram_mb} for e in progress)
        assert ready == Ready(worker_id=info.id, memory_mb=progress[-1].memory_mb)
        now = pool.get(info.id)
        assert (now.state, now.layers_loaded, now.layers_total) == ("idle", len(blocks), len(blocks))
        assert now.memory_mb == ready.memory_mb and now.devices == ["cpu"]

        gen = Job("inference", error_style="type")
        await asyncio.wait_for(pool.generate(info.id, GenerationRequest(prompt=PROMPT, max_tokens=12), gen), WAIT_S)
        finished = time.monotonic()
        started, *tokens, end = [r.event for r in gen.records]
        assert gen.state is JobState.COMPLETE
        assert isinstance(started, InferenceStarted) and started.job_id == gen.id
        assert tokens == [Token(t=text, i=i) for text, i in chunks]
        assert isinstance(end, InferenceEnd) and end.job_id == gen.id
        assert (end.total_tokens, end.prompt_tokens, end.stop_reason) == \
            (stats.completion_tokens, stats.prompt_tokens, stats.stop_reason)
        health = await pool.health(info.id)
        assert health["tokens_computed"] == stats.completion_tokens and health["state"] == "idle"

        await until(lambda: not pool.list(), WAIT_S, "the idle worker to be unloaded")
        assert time.monotonic() - finished >= 1.0 - 0.05  # not before keep_alive_s of idleness
        assert not alive(info.pid)
        events = [e for e, _, _ in seen if e != "progress"]
        assert events == ["loading", "ready", "busy", "idle", "draining", "stopped"]
        assert "keep_alive" in seen[-1][2]


# --- cancelling and failing loads ---------------------------------------------------------------

async def test_cancel_or_timeout_stops_a_load_between_layers_and_names_the_block(rbee_tiny_model):
    """Two slow loads side by side: one cancelled, one timed out, both after block 1 of 7."""
    async with opened(env=SLOW_LOAD) as pool, opened(env=SLOW_LOAD, loading_timeout_s=None) as timing_out:
        cancelled_job, timed_out_job = Job("load"), Job("load")
        cancelled = await pool.start(spec(rbee_tiny_model), cancelled_job)
        timed_out = await timing_out.start(spec(rbee_tiny_model), timed_out_job)
        await asyncio.gather(*(next_event(job, lambda e: isinstance(e, LoadingProgress), LOAD_S)
                               for job in (cancelled_job, timed_out_job)))

        assert cancelled_job.cancel()
        timing_out.loading_timeout_s = 0.5  # applies to the load in progress, already older than that
        # Both end while block 2 is still 300 s away (the waits give up at WAIT_S): the cancel and the
        # timeout cut the block delay short, by the order of events rather than a clock a busy machine stretches.
        assert await cancelled_job.wait(WAIT_S) is JobState.CANCELLED
        assert await timed_out_job.wait(WAIT_S) is JobState.ERROR

        for job in (cancelled_job, timed_out_job):  # stopped between block 1 and block 2
            assert [e.layers_loaded for e in (r.event for r in job.records[:-1])] == [1]
        assert error_of(cancelled_job)["stage"] == "error" and error_of(cancelled_job)["code"] == "CANCELLED"
        assert not alive(cancelled.pid)  # reported only once the process is gone
        assert pool.list() == []
        with pytest.raises(WorkerNotFound):
            pool.get(cancelled.id)

        error = error_of(timed_out_job)
        assert error["code"] == "LOADING_TIMEOUT"
        assert "stuck after block embeddings (1/7)" in error["message"]
        assert error["details"]["block"] == "embeddings" and error["details"]["layers_loaded"] == 1
        now = timing_out.get(timed_out.id)
        assert now.state == "failed" and "stuck after block embeddings (1/7)" in now.exit_reason
        assert not alive(timed_out.pid)


async def test_a_corrupt_checkpoint_fails_with_invalid_checkpoint(rbee_tiny_model, tmp_path):
    broken = Path(shutil.copytree(rbee_tiny_model, tmp_path / "broken"))
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    async with opened() as pool:
        job = Job("load")
        info = await pool.start(spec(broken), job)
        assert await job.wait(LOAD_S) is JobState.ERROR
        error = error_of(job)
        assert error["stage"] == "error" and error["code"] == "INVALID_CHECKPOINT"
        assert "truncated" in error["message"]
        now = pool.get(info.id)
        assert now.state == "failed" and now.exit_reason.startswith("INVALID_CHECKPOINT")
        assert not alive(info.pid)
        await pool.stop(info.id)
        assert pool.list() == []
        with pytest.raises(WorkerNotFound):
            await pool.stop(info.id)
        with pytest.raises(WorkerNotFound):
            await pool.generate(info.id, GenerationRequest(prompt=PROMPT), Job("inference", error_style="type"))


# --- generation: refusals and cancels ------------------------------------------------------------

async def test_queue_full_is_worker_busy_cancel_frees_the_slot_and_a_stall_is_reported(rbee_tiny_model):
    async with opened(env=SLOW_TOKENS) as pool:
        info = await loaded(pool, rbee_tiny_model, queue_depth=0, max_batch_size=1)
        with pytest.raises(InvalidRequest) as bad:  # the worker's 400, rebuilt as its own class
            await pool.generate(info.id, GenerationRequest(prompt=""), Job("inference", error_style="type"))
        assert bad.value.details["field"] == "prompt"

        first = generating(pool, info.id, {"prompt": PROMPT, "max_tokens": 200})
        await next_event(first, lambda e: isinstance(e, Token), WAIT_S)
        assert pool.get(info.id).state == "busy"
        second = Job("inference", error_style="type")
        with pytest.raises(WorkerBusy):
            await pool.generate(info.id, GenerationRequest(prompt=PROMPT, max_tokens=10), second)
        assert second.records == []  # refused before any event

        first.cancel()  # what the server does when the client goes away
        assert await first.wait(WAIT_S) is JobState.CANCELLED
        assert error_of(first)["code"] == "CANCELLED"
        await asyncio.wait_for(first.task, WAIT_S)
        health = await pool.health(info.id)
        assert (health["state"], health["requests"]) == ("idle", [])
        assert pool.get(info.id).state == "idle"
        # it stopped early in its 200 tokens: counted in tokens, not in seconds a busy machine stretches
        assert health["tokens_computed"] < 200 // 2
        # the thing under test: the idle counter stays still; a busy machine can only hide a move, not fake one
        await asyncio.sleep(0.3)  # six token delays: a generation still running would have counted
        assert (await pool.health(info.id))["tokens_computed"] == health["tokens_computed"]

        pool.inference_stall_s = 0.02  # shorter than one token (0.05 s): the next generation stalls
        stalled = generating(pool, info.id, {"prompt": PROMPT, "max_tokens": 200})
        assert await stalled.wait(WAIT_S) is JobState.ERROR
        error = error_of(stalled)
        assert error["code"] == "INFERENCE_STALLED" and "produced nothing for 0.02 s" in error["message"]
        await until(lambda: pool.get(info.id).state == "idle", WAIT_S, "the worker to be idle again")


async def test_time_in_line_or_without_text_is_not_a_stall(rbee_tiny_model):
    """``inference_stall_s`` measures a worker that stops, not a request that waits in line behind
    a long generation, nor one whose tokens make no text yet (this random model spends hundreds
    of tokens on bytes that never form a character, as a real one may on a long emoji run).
    While its batch moves, the worker sends such requests a heartbeat the pool keeps to itself.
    The limit is 200 token delays, so that a busy machine does not stall the generation itself."""
    async with opened(env=SLOW_TOKENS, inference_stall_s=10.0) as pool:
        info = await loaded(pool, rbee_tiny_model, queue_depth=1, max_batch_size=1)
        first = generating(pool, info.id, {"prompt": PROMPT, "max_tokens": 400})
        await next_event(first, lambda e: isinstance(e, Token), WAIT_S)
        second = generating(pool, info.id, {"prompt": PROMPT, "max_tokens": 5})
        await next_event(second, lambda e: isinstance(e, InferenceStarted), WAIT_S)
        queued_at = time.monotonic()
        assert await first.wait(120) is JobState.COMPLETE, first.last.data
        assert time.monotonic() - queued_at > 10.0  # the precondition: it waited longer than the limit
        # the precondition of the other case: 400 tokens made far fewer pieces of text
        assert first.last.event.total_tokens == 400 and len(first.records) < 200
        assert await second.wait(60) is JobState.COMPLETE, second.last.data
        kinds = [r.event.type for r in second.records]
        assert kinds == ["started", "token", "token", "token", "token", "token", "end"]


# --- deaths ---------------------------------------------------------------------------------------

async def test_sigkill_while_loading_idle_or_generating_is_worker_died(rbee_tiny_model):
    async with opened(env=SLOW_LOAD) as slow, opened(env=SLOW_TOKENS) as fast:
        seen: list[tuple[str, str]] = []
        fast.listen(lambda event, info: seen.append((event, info.id)))
        loading_job = Job("load")
        loading = await slow.start(spec(rbee_tiny_model), loading_job)
        idle, busy = await asyncio.gather(loaded(fast, rbee_tiny_model), loaded(fast, rbee_tiny_model))
        await next_event(loading_job, lambda e: isinstance(e, LoadingProgress), LOAD_S)
        stream = generating(fast, busy.id, {"prompt": PROMPT, "max_tokens": 200})
        await next_event(stream, lambda e: isinstance(e, Token), WAIT_S)

        for pool, info in ((slow, loading), (fast, idle), (fast, busy)):
            killed = time.monotonic()
            os.kill(info.pid, signal.SIGKILL)
            await until(lambda: pool.get(info.id).state == "failed", WAIT_S, f"{info.id} to be failed")
            # 2 s per the error table on an idle machine, measured by bench/worker_died.py; this bound holds
            # on a busy one and is still far below a stall (inference_stall_s) or a loading timeout
            assert time.monotonic() - killed < 10.0
            now = pool.get(info.id)
            assert "signal 9" in now.exit_reason and not alive(info.pid)

        for job in (loading_job, stream):  # every stream it fed ended, within the bound above
            assert job.state is JobState.ERROR
            error = error_of(job)
            assert error["code"] == "WORKER_DIED" and "killed by signal 9" in error["message"]
        assert error_of(loading_job)["stage"] == "error" and error_of(stream)["type"] == "error"
        await asyncio.wait_for(stream.task, WAIT_S)
        assert ("died", idle.id) in seen and ("died", busy.id) in seen
