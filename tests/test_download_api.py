"""Downloads through a real Jupyter server, the real huggingface_hub client and the local hub."""

import asyncio
import json
from pathlib import Path

import pytest

from rbee_jupyter.testing.pytest_plugin import GATED_REPO, SHARDED_REPO, TINY_REPO
from rbee_jupyter.testing.sse import read_stream

TINY = f"hf:{TINY_REPO}"


def hub_files(folder: Path) -> dict[str, int]:
    """What the local hub publishes for a repo made from ``folder``: {path: size}."""
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}


async def start(http, ref=TINY):
    r = await http.post("v1/models/download", json={"model_ref": ref})
    assert r.status_code == 202, r.text
    return r.json()


async def watch(http, download_id, **kw):
    return await read_stream(http, "GET", f"v1/models/download/progress?id={download_id}", **kw)


def leftovers(cache: Path):
    return sorted(p.name for p in cache.rglob("*") if "incomplete" in p.name)


async def until(predicate, timeout=60.0):  # room for a busy machine
    """Wait (bounded) for a condition that another task or thread makes true."""
    async def run():
        while not predicate():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(run(), timeout)


def rbee_app(jp_serverapp):
    return next(iter(jp_serverapp.extension_manager.extension_apps["rbee_jupyter"]))


# --- the happy path ---------------------------------------------------------------------

async def test_download_event_sequence_field_by_field(rbee_http, rbee_hub, rbee_cache_dir, jp_base_url, rbee_tiny_model):
    # When
    started = await start(rbee_http)
    stream = await watch(rbee_http, started["download_id"], headers={"Last-Event-ID": "0"})

    # Then: 202 body
    assert started["model_ref"] == TINY
    assert started["progress_url"] == f"{jp_base_url}rbee/v1/models/download/progress?id={started['download_id']}"
    # ... the stream: downloading*, complete, [DONE], with increasing ids
    assert stream.status == 200 and stream.headers["content-type"].startswith("text/event-stream")
    assert stream.done
    events = stream.events
    *progress, complete = events
    total = sum(hub_files(rbee_tiny_model).values())
    assert progress and all(e["stage"] == "downloading" for e in progress)
    for e in progress:
        assert set(e) >= {"stage", "bytes_downloaded", "bytes_total", "speed_mbps"}
        assert e["bytes_total"] == total
        assert isinstance(e["speed_mbps"], float) and e["speed_mbps"] >= 0
    sent = [e["bytes_downloaded"] for e in progress]
    assert sent[0] == 0 and sent[-1] == total and sent == sorted(sent)
    assert progress[-1]["files_done"] == progress[-1]["files_total"] == len(hub_files(rbee_tiny_model))
    assert stream.ids == list(range(1, len(events) + 1))
    assert complete["stage"] == "complete"
    assert complete["model_ref"] == TINY and complete["size_bytes"] == total
    local = Path(complete["local_path"])
    assert local.parent.parent == rbee_cache_dir / "models--rbee-test--tiny-llama"
    assert complete["revision"] == local.name and len(local.name) == 40
    # only what loading needs, byte-identical to the hub's files
    assert sorted(p.name for p in local.iterdir()) == sorted(hub_files(rbee_tiny_model))
    for name, size in hub_files(rbee_tiny_model).items():
        assert (local / name).stat().st_size == size
    assert leftovers(rbee_cache_dir) == []


async def test_downloaded_model_loads_with_transformers_from_the_cache(rbee_http, rbee_cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stream = await watch(rbee_http, (await start(rbee_http, f"hf:{SHARDED_REPO}"))["download_id"])
    assert stream.events[-1]["stage"] == "complete"
    # transformers finds the files by repo id in the cache, offline
    model = AutoModelForCausalLM.from_pretrained(SHARDED_REPO, cache_dir=rbee_cache_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(stream.events[-1]["local_path"])
    assert model.config.num_hidden_layers == 4 and tok("hello").input_ids


async def test_catalog_lists_the_download(rbee_http):
    complete = (await watch(rbee_http, (await start(rbee_http))["download_id"])).events[-1]
    models = (await rbee_http.get("v1/models")).json()["models"]
    assert [m["ref"] for m in models] == [TINY]
    (m,) = models
    assert m["local_path"] == complete["local_path"] and m["revision"] == complete["revision"]
    assert m["size_bytes"] == complete["size_bytes"] and "model.safetensors" in m["files"]
    assert m["downloaded_at"] > 0


async def test_late_subscriber_and_two_subscribers_agree(rbee_http, rbee_hub):
    rbee_hub.faults.chunk_delay_s = 0.02
    download_id = (await start(rbee_http))["download_id"]
    a, b = await asyncio.gather(watch(rbee_http, download_id), watch(rbee_http, download_id))
    assert a.events[-1] == b.events[-1] and a.events[-1]["stage"] == "complete"
    assert a.done and b.done
    # joining after the end: the terminal event, then [DONE]
    late = await watch(rbee_http, download_id)
    assert late.events == [a.events[-1]] and late.done


async def test_same_ref_twice_is_one_download(rbee_http, rbee_hub, rbee_tiny_model):
    rbee_hub.faults.chunk_delay_s = 0.1  # > 1 s: the second ask arrives before the end, however busy the machine
    first, second = await asyncio.gather(start(rbee_http), start(rbee_http))
    assert first["download_id"] == second["download_id"]
    await watch(rbee_http, first["download_id"])
    for name in hub_files(rbee_tiny_model):
        assert len(rbee_hub.file_gets(TINY_REPO, name)) == 1, name


async def test_a_second_download_of_a_cached_model_fetches_nothing(rbee_http, rbee_hub):
    await watch(rbee_http, (await start(rbee_http))["download_id"])
    gets = len([r for r in rbee_hub.requests if "/resolve/" in r.path])
    again = await watch(rbee_http, (await start(rbee_http))["download_id"], headers={"Last-Event-ID": "0"})
    assert again.events[-1]["stage"] == "complete"
    assert len([r for r in rbee_hub.requests if "/resolve/" in r.path]) == gets


async def test_keep_alive_comments_while_nothing_happens(rbee_http, rbee_hub):
    rbee_hub.faults.stall_after_bytes = 1000
    rbee_hub.faults.stall_s = 1.5  # shorter than the stall limit: the transfer goes on afterwards
    stream = await watch(rbee_http, (await start(rbee_http))["download_id"])
    assert "keep-alive" in stream.comments
    assert stream.events[-1]["stage"] == "complete" and stream.done


async def test_last_event_id_resumes_the_stream(rbee_http):
    download_id = (await start(rbee_http))["download_id"]
    full = await watch(rbee_http, download_id, headers={"Last-Event-ID": "0"})
    resumed = await watch(rbee_http, download_id, headers={"Last-Event-ID": "2"})
    assert resumed.ids == full.ids[2:] and resumed.events == full.events[2:]


# --- cancel, faults -----------------------------------------------------------------

async def test_cancel_mid_download_removes_partial_files(rbee_http, rbee_hub, rbee_cache_dir):
    rbee_hub.faults.chunk_delay_s = 0.25  # ~3 s: the cancel arrives before the end, however busy the machine
    download_id = (await start(rbee_http))["download_id"]
    seen_bytes = asyncio.Event()

    async def on_frame(frame):
        if isinstance(frame.data, dict) and frame.data.get("bytes_downloaded", 0) > 100_000:
            seen_bytes.set()

    watcher = asyncio.ensure_future(watch(rbee_http, download_id, on_frame=on_frame))
    await asyncio.wait_for(seen_bytes.wait(), 60)
    # When
    r = await rbee_http.delete(f"v1/models/download/{download_id}")
    # Then
    assert r.status_code == 204
    stream = await watcher
    assert stream.events[-1] == {"stage": "error", "message": "Download cancelled.", "code": "CANCELLED"}
    assert stream.done
    assert leftovers(rbee_cache_dir) == []
    assert not list(rbee_cache_dir.rglob("model.safetensors"))
    assert (await rbee_http.get("v1/models")).json()["models"] == []
    # cancelling again is fine (idempotent)
    assert (await rbee_http.delete(f"v1/models/download/{download_id}")).status_code == 204


async def test_dropped_connection_resumes_without_fetching_bytes_twice(rbee_http, rbee_hub, rbee_tiny_model):
    rbee_hub.faults.drop_after_bytes = 300_000
    rbee_hub.faults.drop_times = 1
    stream = await watch(rbee_http, (await start(rbee_http))["download_id"], headers={"Last-Event-ID": "0"})
    assert stream.events[-1]["stage"] == "complete"
    size = hub_files(rbee_tiny_model)["model.safetensors"]
    gets = rbee_hub.file_gets(TINY_REPO, "model.safetensors")
    assert len(gets) == 2 and gets[1].range == "bytes=300000-"
    assert rbee_hub.bytes_served(TINY_REPO, "model.safetensors") == size
    sent = [e["bytes_downloaded"] for e in stream.events[:-1]]
    assert sent == sorted(sent) and sent[-1] == sum(hub_files(rbee_tiny_model).values())


@pytest.mark.rbee_config(download_stall_s=0.5, download_retries=2)
async def test_stalled_transfer_is_retried_then_reported(rbee_http, rbee_hub, rbee_cache_dir):
    rbee_hub.faults.stall_after_bytes = 1000
    rbee_hub.faults.stall_times = 100
    stream = await watch(rbee_http, (await start(rbee_http))["download_id"])
    error = stream.events[-1]
    assert error["stage"] == "error" and error["code"] == "DOWNLOAD_STALLED"
    assert "No bytes arrived for 0.5 s" in error["message"] and "download_stall_s" in error["message"]
    assert stream.done
    stalled_file = error["details"]["file"]
    assert len(rbee_hub.file_gets(TINY_REPO, stalled_file)) == 2
    assert leftovers(rbee_cache_dir) == []


@pytest.mark.rbee_config(download_stall_s=1.0)
async def test_one_stall_then_the_transfer_resumes(rbee_http, rbee_hub):
    rbee_hub.faults.stall_after_bytes = 200_000
    rbee_hub.faults.stall_times = 1
    stream = await watch(rbee_http, (await start(rbee_http))["download_id"])
    assert stream.events[-1]["stage"] == "complete"
    assert rbee_hub.file_gets(TINY_REPO, "model.safetensors")[-1].range == "bytes=200000-"


async def test_wrong_hash_is_retried_then_reported_and_deleted(rbee_http, rbee_hub, rbee_cache_dir):
    rbee_hub.faults.wrong_hash_files = {"model.safetensors"}
    stream = await watch(rbee_http, (await start(rbee_http))["download_id"])
    error = stream.events[-1]
    assert error["code"] == "CHECKSUM_MISMATCH" and error["details"]["file"] == "model.safetensors"
    assert len(rbee_hub.file_gets(TINY_REPO, "model.safetensors")) == 3  # download_retries
    assert leftovers(rbee_cache_dir) == [] and not list(rbee_cache_dir.rglob("model.safetensors"))
    assert (await rbee_http.get("v1/models")).json()["models"] == []


@pytest.mark.parametrize("ref, code, words", [
    ("hf:rbee-test/does-not-exist", "MODEL_NOT_FOUND", "is not on the hub"),
    (f"hf:{TINY_REPO}@no-such-branch", "REVISION_NOT_FOUND", "no revision 'no-such-branch'"),
    (f"hf:{GATED_REPO}", "ACCESS_DENIED", "HF_TOKEN"),
])
async def test_hub_errors_arrive_as_error_events(rbee_http, ref, code, words):
    started = await start(rbee_http, ref)
    stream = await watch(rbee_http, started["download_id"])
    assert stream.events[-1]["stage"] == "error" and stream.events[-1]["code"] == code
    assert words in stream.events[-1]["message"]
    assert stream.done


@pytest.mark.rbee_config(disk_reserve_mb=1 << 40)
async def test_not_enough_disk_is_refused_before_the_first_byte(rbee_http, rbee_hub):
    stream = await watch(rbee_http, (await start(rbee_http))["download_id"])
    error = stream.events[-1]
    assert error["code"] == "INSUFFICIENT_DISK" and "Not enough disk space" in error["message"]
    assert error["details"]["need_mb"] >= 0 and "free_mb" in error["details"]
    assert [r for r in rbee_hub.requests if "/resolve/" in r.path] == []


# --- local folders, deleting -----------------------------------------------------------

async def test_file_ref_registers_a_local_folder_in_place(rbee_http, rbee_tiny_model, tmp_path):
    ref = f"file://{rbee_tiny_model}"
    stream = await watch(rbee_http, (await start(rbee_http, ref))["download_id"])
    assert stream.events == [{"stage": "complete", "local_path": str(rbee_tiny_model), "model_ref": ref,
                              "size_bytes": sum(p.stat().st_size for p in rbee_tiny_model.iterdir())}]
    # deleting a registered folder forgets it but never touches the user's files
    assert (await rbee_http.delete("v1/models", params={"ref": ref})).status_code == 204
    assert (await rbee_http.get("v1/models")).json()["models"] == []
    assert (rbee_tiny_model / "config.json").exists()

    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    stream = await watch(rbee_http, (await start(rbee_http, f"file://{empty}"))["download_id"])
    assert stream.events[-1]["code"] == "INVALID_CHECKPOINT" and "safetensors" in stream.events[-1]["message"]


async def test_delete_model_removes_it_from_disk_and_catalog(rbee_http, rbee_cache_dir):
    await watch(rbee_http, (await start(rbee_http))["download_id"])
    r = await rbee_http.delete("v1/models", params={"ref": TINY})
    assert r.status_code == 204
    assert (await rbee_http.get("v1/models")).json()["models"] == []
    assert not (rbee_cache_dir / "models--rbee-test--tiny-llama").exists()
    r = await rbee_http.delete("v1/models", params={"ref": TINY})
    assert r.status_code == 404 and r.json()["error"]["code"] == "MODEL_NOT_FOUND"


async def test_a_folder_deleted_by_hand_leaves_the_catalog(rbee_http, rbee_cache_dir):
    import shutil

    await watch(rbee_http, (await start(rbee_http))["download_id"])
    shutil.rmtree(rbee_cache_dir / "models--rbee-test--tiny-llama")
    assert (await rbee_http.get("v1/models")).json()["models"] == []


async def test_disconnected_client_drops_its_subscription(rbee_http, rbee_hub, jp_serverapp):
    rbee_hub.faults.chunk_delay_s = 0.05
    download_id = (await start(rbee_http))["download_id"]
    job = rbee_app(jp_serverapp).hive.job(download_id)
    stream = await watch(rbee_http, download_id, stop_after=1)  # reads one event, then hangs up
    assert stream.events[0]["stage"] == "downloading"
    await until(lambda: not job.subscriptions)
    job.cancel()


# --- bad input, auth ------------------------------------------------------------------

BAD_REFS = ["hf:../../x", "hf:org/repo name", "", "gpt2", "s3://bucket/model", "hf:org/-repo", "hf:org/repo.",
            "hf:org/re..po", "hf:a/b/c", "hf:org/repo@", "hf:org/repo@../main", "file://relative/path",
            "file:///tmp/../etc", "hf:" + "a" * 97 + "/x", "hf:org/repo\n", 42, None, ["hf:a/b"]]


@pytest.mark.parametrize("ref", BAD_REFS, ids=[repr(r)[:30] for r in BAD_REFS])
async def test_bad_model_refs_are_400_naming_the_accepted_forms(rbee_http, ref):
    r = await rbee_http.post("v1/models/download", json={"model_ref": ref})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "INVALID_MODEL_REF"
    assert "hf:org/repo" in error["message"] and "file:///absolute/path" in error["message"]
    assert error["details"]["accepted_forms"]


@pytest.mark.parametrize("method, path, kwargs, status, code", [
    ("POST", "v1/models/download", {"content": b"{not json"}, 400, "INVALID_REQUEST"),
    ("POST", "v1/models/download", {"content": b"[1, 2]"}, 400, "INVALID_REQUEST"),
    ("POST", "v1/models/download", {"content": b"\xff\xfe"}, 400, "INVALID_REQUEST"),
    ("POST", "v1/models/download", {"content": b"x" * (2 << 20)}, 413, "BODY_TOO_LARGE"),
    ("GET", "v1/models/download/progress", {}, 400, "INVALID_REQUEST"),
    ("GET", "v1/models/download/progress?id=nope", {}, 404, "JOB_NOT_FOUND"),
    ("GET", "v1/models/download/progress?id=../../etc/passwd", {}, 404, "JOB_NOT_FOUND"),
    ("DELETE", "v1/models/download/nope", {}, 404, "JOB_NOT_FOUND"),
    ("DELETE", "v1/models", {}, 400, "INVALID_REQUEST"),
    ("DELETE", "v1/models?ref=hf:../x", {}, 400, "INVALID_MODEL_REF"),
    ("DELETE", "v1/models?ref=hf:rbee-test/never-downloaded", {}, 404, "MODEL_NOT_FOUND"),
    ("PUT", "v1/models", {}, 405, "METHOD_NOT_ALLOWED"),
    ("GET", "v1/models/download", {}, 405, "METHOD_NOT_ALLOWED"),
])
async def test_bad_requests_get_json_errors_and_the_server_keeps_serving(rbee_http, method, path, kwargs,
                                                                         status, code):
    r = await rbee_http.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert (await rbee_http.get("v1/models")).status_code == 200


@pytest.mark.parametrize("method, path", [
    ("POST", "v1/models/download"), ("GET", "v1/models/download/progress?id=x"),
    ("DELETE", "v1/models/download/x"), ("GET", "v1/models"), ("DELETE", "v1/models?ref=hf:a/b"),
])
async def test_every_route_is_403_without_a_token(rbee_http, method, path):
    r = await rbee_http.request(method, path, headers={"Authorization": ""}, json={"model_ref": TINY})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "FORBIDDEN"
    assert "location" not in r.headers


# --- restart (a real `jupyter server` process) -------------------------------------------

def test_catalog_survives_a_server_restart(rbee_hub, tmp_path):
    from rbee_jupyter.testing.server import ServerProcess

    settings = {"cache_dir": str(tmp_path / "cache"), "catalog_path": str(tmp_path / "catalog.sqlite"),
                "hub_endpoint": rbee_hub.url}
    with ServerProcess(tmp_path / "server1", rbee=settings, base_url="/jh/user/") as server:
        r = server.post("v1/models/download", {"model_ref": TINY})
        assert r.status_code == 202
        events = server.events(r.json()["progress_url"])
        assert events[-1]["stage"] == "complete"
    with ServerProcess(tmp_path / "server2", rbee=settings, base_url="/jh/user/") as server:
        models = server.get("v1/models").json()["models"]
        assert [m["ref"] for m in models] == [TINY]
        assert json.loads(json.dumps(models))[0]["local_path"] == events[-1]["local_path"]
