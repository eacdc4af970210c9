"""Finding 7: per-user caps of a shared hive, each a clear 429 USER_LIMIT naming its trait."""

from __future__ import annotations

import asyncio

import pytest

from rbee_jupyter.core.jobs import JobRegistry
from rbee_jupyter.events import InferenceEnd
from rbee_jupyter.testing.sse import read_stream
from rbee_jupyter.worker.protocol import TOKEN_DELAY_ENV

from .conftest import PROMPT, PUBLIC, download, error_of, load_events, start_team


@pytest.fixture(scope="module")
def capped(security_hub, rbee_tiny_model, tmp_path_factory):
    """A shared hive whose users may hold one worker, one download and one stream each (tokens slowed)."""
    server, team = start_team(tmp_path_factory.mktemp("capped"), security_hub, rbee_tiny_model,
                              env={TOKEN_DELAY_ENV: "0.05"}, max_user_workers=1, max_user_downloads=1,
                              max_user_streams=1)
    with server:
        yield team


def assert_user_limit(r, cap, trait, user="bob"):
    error = error_of(r, 429, "USER_LIMIT")
    assert error["details"] == {"cap": cap, "limit": 1, "held": 1, "trait": f"c.RbeeApp.{trait}", "user": user}
    assert f"c.RbeeApp.{trait} = 1" in error["message"]


async def test_one_user_cannot_take_every_worker_or_stream(capped):
    async with capped.clients() as c:
        # Given bob's one worker, shared (so alice may use it too)
        r, stream = await load_events(c["bob"], f"file://{capped.allowed}/tiny", shared=True)
        assert stream.events[-1]["stage"] == "ready", stream.events[-1]
        worker_id = r.json()["worker_id"]
        try:
            # When he asks for a second, Then 429 names the cap, before anything starts
            again = await c["bob"].post("v1/workers", json={"model_ref": f"file://{capped.allowed}/tiny",
                                                            "device": "cpu"})
            assert_user_limit(again, "workers", "max_user_workers")

            # While one generation of his streams, a second is refused; alice (same worker) is not
            async def second_try(_request_id):
                mine = await c["bob"].post("v1/inference", json={"worker_id": worker_id, "prompt": PROMPT,
                                                                 "max_tokens": 2})
                hers = await read_stream(c["alice"], "POST", "v1/inference", timeout=60,
                                         json={"worker_id": worker_id, "prompt": PROMPT, "max_tokens": 2})
                return mine, hers
            answers = {}

            async def on_frame(frame):
                if isinstance(frame.data, dict) and frame.data.get("type") == "token" and not answers:
                    answers["both"] = await second_try(None)
            long = await read_stream(c["bob"], "POST", "v1/inference", on_frame=on_frame, timeout=120,
                                     json={"worker_id": worker_id, "prompt": PROMPT, "max_tokens": 40})
            mine, hers = answers["both"]
            assert_user_limit(mine, "streams", "max_user_streams")
            assert hers.events[-1]["type"] == "end" and hers.done
            assert long.events[-1]["type"] == "end" and long.done

            # Once it ended, he may stream again
            after = await read_stream(c["bob"], "POST", "v1/inference", timeout=60,
                                      json={"worker_id": worker_id, "prompt": PROMPT, "max_tokens": 2})
            assert after.events[-1]["type"] == "end"
        finally:
            assert (await c["bob"].delete(f"v1/workers/{worker_id}")).status_code == 204


async def test_one_user_cannot_take_every_download_slot(capped, rbee_hub):
    rbee_hub.faults.chunk_delay_s = 0.5  # downloads last seconds: time to ask for more, however busy the machine
    capped.publish("sec/capped-a")
    capped.publish("sec/capped-b")
    async with capped.clients() as c:
        first = await c["bob"].post("v1/models/download", json={"model_ref": "hf:sec/capped-a"})
        assert first.status_code == 202, first.text
        # a second download is refused; joining the running one is free; an admin is not capped
        assert_user_limit(await c["bob"].post("v1/models/download", json={"model_ref": "hf:sec/capped-b"}),
                          "downloads", "max_user_downloads")
        joined = await c["bob"].post("v1/models/download", json={"model_ref": "hf:sec/capped-a"})
        assert joined.json()["download_id"] == first.json()["download_id"]
        other = await c["admin"].post("v1/models/download", json={"model_ref": "hf:sec/capped-b"})
        assert other.status_code == 202, other.text
        rbee_hub.faults.chunk_delay_s = 0.0  # asked: the rest may come at once
        for r in (first, other):
            stream = await read_stream(c["admin"], "GET",
                                       f"v1/models/download/progress?id={r.json()['download_id']}",
                                       headers={"Last-Event-ID": "0"}, timeout=120)
            assert stream.events[-1]["stage"] == "complete"
        # with nothing running, bob downloads again
        assert (await download(c["bob"], f"hf:{PUBLIC}")).events[-1]["stage"] == "complete"


async def test_finished_jobs_kept_per_user_are_capped():
    registry = JobRegistry(retention_s=600, kept_per_owner=3)
    jobs = []
    for _i in range(5):
        job = registry.create("inference", owner="bob", error_style="type")
        job.finish(InferenceEnd(job_id=job.id, total_tokens=0, duration_ms=0, stop_reason="eos"))
        jobs.append(job)
    alice = registry.create("inference", owner="alice", error_style="type")
    await asyncio.sleep(0)
    kept = [j.id for j in registry.list()]
    assert kept == [j.id for j in jobs[2:]] + [alice.id]  # bob's 2 oldest forgotten, alice's untouched
