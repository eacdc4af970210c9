"""The server-wide feed ``GET v1/events`` through a real Jupyter server and the local hub."""

import itertools
import json

from rbee_jupyter.testing.pytest_plugin import TINY_REPO
from rbee_jupyter.testing.sse import read_stream

TINY = f"hf:{TINY_REPO}"


async def follow(http, until, *, headers=None, on_frame=None, timeout=60.0):
    """Read ``v1/events`` until ``until(frames)`` holds; returns (arrival time, frame) pairs."""
    async def data_frame(frame):
        if frame.comment is None and on_frame is not None:
            await on_frame(frame)

    stream = await read_stream(http, "GET", "v1/events", headers=headers or {}, until=until, on_frame=data_frame,
                               timeout=timeout)
    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    return [(f.arrived, f) for f in stream.frames if f.comment is None]


def of_job(frames, job_id):
    return [f.data for f in frames if f.data["topic"] == "job" and f.data["job"]["id"] == job_id]


async def test_snapshot_first_then_a_download_and_the_catalog_change(rbee_http):
    started = {}

    async def on_frame(frame):
        if frame.data["topic"] == "snapshot":  # When: a download starts once we listen
            r = await rbee_http.post("v1/models/download", json={"model_ref": TINY})
            assert r.status_code == 202, r.text
            started.update(r.json())

    def added(frames):  # the catalog changes just before the download's job finishes
        return (any(f.data["topic"] == "catalog" and f.data["action"] == "added" for f in frames)
                and any(f.data["topic"] == "job" and f.data["action"] == "finished" for f in frames))

    timed = await follow(rbee_http, added, on_frame=on_frame)
    frames = [f for _, f in timed]

    # Then: one snapshot first, with the whole state
    snapshot = frames[0].data
    assert snapshot["topic"] == "snapshot"
    assert set(snapshot) >= {"devices", "models", "workers", "jobs"}
    assert snapshot["models"] == [] and snapshot["workers"] == []
    assert any(d["name"] == "cpu" and d["total_bytes"] > 0 for d in snapshot["devices"])
    assert all(f.data["topic"] != "snapshot" for f in frames[1:])
    # ... ids increase
    ids = [f.id for f in frames]
    assert all(b > a for a, b in itertools.pairwise(ids[1:])) and ids[1] == ids[0] + 1
    # ... the download's life: created, progress (throttled), finished
    events = of_job(frames, started["download_id"])
    actions = [e["action"] for e in events]
    assert actions[0] == "created" and actions[-1] == "finished"
    assert set(actions[1:-1]) <= {"progress"}
    assert events[0]["job"]["kind"] == "download" and events[0]["job"]["model_ref"] == TINY
    assert events[-1]["job"]["state"] == "complete"
    assert events[-1]["job"]["last_event"]["stage"] == "complete"
    for e in events[1:-1]:
        assert e["job"]["last_event"]["stage"] == "downloading"
    times = [t for t, f in timed if f.data["topic"] == "job" and f.data["job"]["id"] == started["download_id"]
             and f.data["action"] == "progress"]
    assert all(b - a >= 0.2 for a, b in itertools.pairwise(times)), "progress is throttled per job"
    # ... and the catalog change names the model
    catalog = [f.data for f in frames if f.data["topic"] == "catalog"]
    assert catalog[0]["action"] == "added" and catalog[0]["model"]["ref"] == TINY
    # ... device memory went out too
    assert any(f.data["topic"] == "devices" for f in frames)


async def test_last_event_id_resumes_without_a_snapshot(rbee_http):
    # Given: a first reader that saw a download start
    async def start(frame):
        if frame.data["topic"] == "snapshot":
            r = await rbee_http.post("v1/models/download", json={"model_ref": TINY})
            assert r.status_code == 202

    def finished(frames):
        return any(f.data["topic"] == "job" and f.data["action"] == "finished" for f in frames)

    first = [f for _, f in await follow(rbee_http, finished, on_frame=start)]
    created = next(f for f in first if f.data["topic"] == "job" and f.data["action"] == "created")

    # When: it comes back with the id of "created"
    again = [f for _, f in await follow(rbee_http, finished, headers={"Last-Event-ID": str(created.id)})]

    # Then: the stream goes on right after it, with the same events
    assert again[0].id == created.id + 1
    assert all(f.data["topic"] != "snapshot" for f in again)
    later = [(f.id, json.dumps(f.data, sort_keys=True)) for f in first if f.id > created.id]
    assert [(f.id, json.dumps(f.data, sort_keys=True)) for f in again][:len(later)] == later


async def test_a_worker_load_shows_its_states(rbee_http):
    async def load(frame):
        if frame.data["topic"] == "snapshot":
            r = await rbee_http.post("v1/workers", json={"model_ref": TINY, "device": "cpu"})
            assert r.status_code == 202, r.text

    def ready(frames):
        return any(f.data["topic"] == "worker" and f.data["action"] == "ready" for f in frames)

    frames = [f for _, f in await follow(rbee_http, ready, on_frame=load, timeout=120)]
    workers = [f.data for f in frames if f.data["topic"] == "worker"]
    assert workers[0]["action"] == "loading" and workers[-1]["worker"]["state"] == "idle"
    progress = [w["worker"]["layers_loaded"] for w in workers if w["action"] == "progress"]
    assert progress == sorted(progress)
    # a newcomer's snapshot lists the worker
    snap = next(f for _, f in await follow(rbee_http, lambda fs: True)).data
    assert [w["state"] for w in snap["workers"]] == ["idle"]
    worker_id = snap["workers"][0]["id"]
    r = await rbee_http.delete(f"v1/workers/{worker_id}")
    assert r.status_code == 204


async def test_the_feed_needs_a_token(rbee_http):
    r = await rbee_http.get("v1/events", headers={"Authorization": ""})
    assert r.status_code == 403
