"""The job and event core: ordering, late subscribers, slow subscribers, cancel, expiry."""

import asyncio

import pytest

from rbee_jupyter.errors import Cancelled, InvalidModelRef
from rbee_jupyter.events import (DownloadComplete, DownloadProgress, ErrorEvent, Token, sse_comment, sse_done,
                                 sse_event)
from rbee_jupyter.core.jobs import JobRegistry, JobState
from rbee_jupyter.testing.sse import parse_frames


WAIT_S = 60.0  # bound on waiting for what will happen, with room for a busy machine


def progress(n: int) -> DownloadProgress:
    return DownloadProgress(bytes_downloaded=n, bytes_total=100, speed_mbps=0.0)


async def drain(sub, timeout=WAIT_S):
    out = []
    async def run():
        async for record in sub:
            out.append(record)
    await asyncio.wait_for(run(), timeout)
    return out


async def test_subscribers_see_every_event_in_order_then_stop():
    job = JobRegistry().create("download")
    a, b = job.subscribe(last_event_id=0), job.subscribe(last_event_id=0)
    for n in range(5):
        job.publish(progress(n))
    job.finish(DownloadComplete(local_path="/x"))
    for sub in (a, b):
        records = await drain(sub)
        assert [r.id for r in records] == [1, 2, 3, 4, 5, 6]
        assert records[-1].event == DownloadComplete(local_path="/x")
    assert job.state is JobState.COMPLETE
    assert job.subscriptions == set()


async def test_late_subscriber_starts_at_the_current_state():
    job = JobRegistry().create("download")
    for n in range(10):
        job.publish(progress(n))
    sub = job.subscribe()
    first = await sub.get(timeout=WAIT_S)
    assert first.id == 10 and first.event.bytes_downloaded == 9
    job.finish(DownloadComplete(local_path="/x"))
    late = await drain(job.subscribe())
    assert [r.event.to_dict()["stage"] for r in late] == ["complete"]


async def test_last_event_id_resumes_after_that_event():
    job = JobRegistry().create("inference", error_style="type")
    for i in range(6):
        job.publish(Token(t=str(i), i=i))
    job.finish(ErrorEvent(message="stop", code="CANCELLED", style="type"), JobState.CANCELLED)
    records = await drain(job.subscribe(last_event_id=3))
    assert [r.id for r in records] == [4, 5, 6, 7]
    assert records[-1].data == '{"type":"error","message":"stop","code":"CANCELLED"}'


async def test_slow_subscriber_skips_progress_but_never_tokens_or_the_end():
    job = JobRegistry().create("download")
    sub = job.subscribe(last_event_id=0, max_lag=4)
    for n in range(100):
        job.publish(progress(n))
    job.publish(Token(t="kept", i=0))
    for n in range(100, 150):
        job.publish(progress(n))
    job.finish(DownloadComplete(local_path="/x"))
    records = await drain(sub)
    kinds = [type(r.event).__name__ for r in records]
    assert "Token" in kinds and kinds[-1] == "DownloadComplete"
    assert len(records) <= 2 * 4 + 2  # bounded by the lag, not by what was published
    assert sub.skipped == 152 - len(records)
    ids = [r.id for r in records]
    assert ids == sorted(ids)
    # the newest progress before the end is delivered, so the last state is never lost
    assert records[-2].event.bytes_downloaded == 149


async def test_get_times_out_for_keepalives_and_wakes_on_publish():
    job = JobRegistry().create("download")
    sub = job.subscribe(last_event_id=0)
    assert await sub.get(timeout=0.05) is None
    waiter = asyncio.ensure_future(sub.get(timeout=WAIT_S))
    await asyncio.sleep(0)
    job.publish(progress(1))
    assert (await asyncio.wait_for(waiter, WAIT_S)).id == 1


async def test_closing_a_subscription_wakes_its_reader_and_detaches_it():
    job = JobRegistry().create("download")
    sub = job.subscribe(last_event_id=0)
    waiter = asyncio.ensure_future(sub.get(timeout=WAIT_S))
    await asyncio.sleep(0)
    sub.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiter, WAIT_S)
    assert job.subscriptions == set()


async def test_work_failures_become_the_terminal_error_event():
    registry = JobRegistry()

    async def work(job):
        job.publish(progress(1))
        raise InvalidModelRef("bad ref", details={"model_ref": "x"})

    job = registry.start(registry.create("download"), work)
    assert await job.wait(WAIT_S) is JobState.ERROR
    assert job.last.event.to_dict() == {"stage": "error", "message": "bad ref", "code": "INVALID_MODEL_REF",
                                        "details": {"model_ref": "x"}}


async def test_cancel_reaches_the_work_which_ends_the_job_as_cancelled():
    registry = JobRegistry()
    started = asyncio.Event()

    async def work(job):
        started.set()
        while not job.cancel_event.is_set():
            await asyncio.sleep(0.01)
        raise Cancelled("stopped at layer 3")

    job = registry.start(registry.create("load"), work)
    await asyncio.wait_for(started.wait(), WAIT_S)
    assert job.cancel() is True
    assert await job.wait(WAIT_S) is JobState.CANCELLED
    assert job.last.event.to_dict()["code"] == "CANCELLED"
    assert job.cancel() is False  # idempotent once finished


async def test_same_key_gives_the_running_job_and_finished_jobs_expire():
    registry = JobRegistry(retention_s=0.05)
    job = registry.create("download", key=("download", "hf:a/b"))
    assert registry.find_active(("download", "hf:a/b")) is job
    job.finish(DownloadComplete(local_path="/x"))
    assert registry.find_active(("download", "hf:a/b")) is None
    assert registry.get(job.id) is job
    async def dropped():
        while job.id in {j.id for j in registry.list()}:
            await asyncio.sleep(0.01)
    await asyncio.wait_for(dropped(), WAIT_S)
    with pytest.raises(LookupError):
        registry.get(job.id)


def test_sse_framing_round_trips():
    body = (sse_event(1, {"stage": "downloading", "t": "é 🙂"}) + sse_comment() + sse_event(2, '{"a":1}')
            + sse_done()).decode()
    assert body.startswith('id: 1\ndata: {"stage":"downloading","t":"é 🙂"}\n\n: keep-alive\n\n')
    frames = parse_frames(body)
    assert [(f.id, f.data, f.comment) for f in frames] == [
        (1, {"stage": "downloading", "t": "é 🙂"}, None), (None, None, "keep-alive"), (2, {"a": 1}, None),
        (None, "[DONE]", None)]
