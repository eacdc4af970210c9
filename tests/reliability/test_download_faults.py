"""Faults during downloads, injected end to end: a real ``jupyter server`` process, the real
huggingface_hub client and the local hub.

What must hold after each fault: the transfer resumes instead of starting over (the hub's
request log shows which bytes were sent, and how often), what is on disk is either a
verified whole file or nothing, and the catalog lists exactly the models that are complete.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from rbee_jupyter.testing.hub import HubFile
from rbee_jupyter.testing.pytest_plugin import SHARDED_REPO, TINY_REPO
from rbee_jupyter.testing.server import ServerProcess

from .conftest import StreamReader, partial_files, settings_for, sha256

TINY = f"hf:{TINY_REPO}"
WEIGHTS = "model.safetensors"
WAIT_S = 60.0  # bound on waiting for what will happen (a transfer starts, a process exits) on a busy machine
PADDED_REPO = "rbee-test/padded"


def download(server: ServerProcess, ref: str = TINY) -> list[dict]:
    r = server.post("v1/models/download", {"model_ref": ref})
    assert r.status_code == 202, r.text
    return server.events(r.json()["progress_url"] + "&last_event_id=0", timeout=120)


def blob_of(cache: Path, repo_id: str, data: bytes) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}" / "blobs" / HubFile.make(WEIGHTS, data).etag


def models(server: ServerProcess) -> list[str]:
    r = server.get("v1/models")
    assert r.status_code == 200, r.text
    return [m["ref"] for m in r.json()["models"]]


# --- a connection dropped mid-file ------------------------------------------------------------

def test_dropped_connections_resume_from_the_partial_file(rbee_hub, rbee_tiny_model, tmp_path):
    data = (rbee_tiny_model / WEIGHTS).read_bytes()
    rbee_hub.faults.drop_after_bytes = 300_000  # of each response: 0 → 300000 → 600000 → the rest
    rbee_hub.faults.drop_times = 3
    with ServerProcess(tmp_path, rbee=settings_for(tmp_path, rbee_hub)) as server:
        # When
        events = download(server)

        # Then: one stream, monotonic bytes, complete
        assert events[-1]["stage"] == "complete", events[-1]
        sent = [e["bytes_downloaded"] for e in events if e["stage"] == "downloading"]
        assert sent == sorted(sent) and sent[-1] == events[-1]["size_bytes"]
        # each retry asked for the bytes it did not have, and no byte was sent twice
        gets = rbee_hub.file_gets(TINY_REPO, WEIGHTS)
        assert [g.range for g in gets] == [None, "bytes=300000-", "bytes=600000-"]
        assert [g.fault for g in gets] == ["dropped", "dropped", None]
        assert rbee_hub.bytes_served(TINY_REPO, WEIGHTS) == len(data)
        assert rbee_hub.faults.drop_times == 1  # the third response was too short to drop
        # the file on disk is the hub's, verified, and nothing partial is left
        local = Path(events[-1]["local_path"])
        assert sha256(local / WEIGHTS) == HubFile.make(WEIGHTS, data).sha256
        assert partial_files(tmp_path / "cache") == []
        assert models(server) == [TINY]


# --- the disk fills up ----------------------------------------------------------------------------

def fill(folder: Path) -> Path:
    """Write a file until the disk holding ``folder`` is full (as another user's job would)."""
    filler = folder / "filler.bin"
    block = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    for size in (4096, 1):  # the last pages too
        try:
            with open(filler, "ab", buffering=0) as f:
                while True:
                    f.write(b"\0" * size)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_a_full_disk_is_a_clean_error_and_leaves_nothing_half_written(rbee_hub, rbee_tiny_model, tmp_path,
                                                                      tmpfs):
    disk = tmpfs(4 << 20)
    cache = disk / "hub"
    rbee_hub.add_repo(PADDED_REPO, rbee_tiny_model, extra_files={"padding.safetensors": os.urandom(6 << 20)})
    settings = {**settings_for(tmp_path, rbee_hub), "cache_dir": str(cache)}
    with ServerProcess(tmp_path, rbee=settings) as server:
        assert download(server, f"hf:{SHARDED_REPO}")[-1]["stage"] == "complete"
        before = server.get("v1/models").json()["models"]
        kept = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file() and "sharded" in str(p)}

        # When: a model bigger than the whole disk
        events = download(server, f"hf:{PADDED_REPO}")
        # Then: refused before the first byte, naming the folder
        error = events[-1]
        assert error["stage"] == "error" and error["code"] == "INSUFFICIENT_DISK", error
        assert str(cache) in error["message"] and error["details"]["folder"] == str(cache)
        assert [r for r in rbee_hub.requests if r.repo_id == PADDED_REPO and "/resolve/" in r.path] == []

        # When: the model fits, but the disk fills up while it downloads
        rbee_hub.faults.chunk_delay_s = 0.5  # ~6 s for the weights: filled before their end, however busy
        r = server.post("v1/models/download", {"model_ref": TINY})
        stream = StreamReader(server, "GET", r.json()["progress_url"] + "&last_event_id=0")
        assert rbee_hub.wait_until(lambda: rbee_hub.bytes_served(TINY_REPO, WEIGHTS) >= 128 << 10, WAIT_S)
        filler = fill(disk)
        rbee_hub.faults.chunk_delay_s = 0.0
        assert stream.ended.wait(WAIT_S)

        # Then: an error event naming the folder, then [DONE]
        error = stream.events[-1]
        assert error["stage"] == "error" and error["code"] == "INSUFFICIENT_DISK", error
        assert "filled up during the download" in error["message"] and str(cache) in error["message"]
        assert error["details"]["folder"] == str(cache)
        assert stream.done
        # no partial file, no blob of the weights; the catalog and the other model are untouched
        assert partial_files(cache) == []
        assert not blob_of(cache, TINY_REPO, (rbee_tiny_model / WEIGHTS).read_bytes()).exists()
        assert server.get("v1/models").json()["models"] == before
        assert {p: p.read_bytes() for p in kept} == kept

        # When: space is freed, the same download succeeds; files completed before the fault are kept
        config_gets = len(rbee_hub.file_gets(TINY_REPO, "config.json"))
        filler.unlink()
        events = download(server)
        assert events[-1]["stage"] == "complete", events[-1]
        assert len(rbee_hub.file_gets(TINY_REPO, "config.json")) == config_gets
        assert sorted(models(server)) == sorted([f"hf:{SHARDED_REPO}", TINY])
        assert partial_files(cache) == []


# --- the server restarts mid-download ---------------------------------------------------------------

def test_a_server_killed_mid_download_resumes_it_after_the_restart(rbee_hub, rbee_tiny_model, tmp_path):
    data = (rbee_tiny_model / WEIGHTS).read_bytes()
    settings = settings_for(tmp_path, rbee_hub)
    cache = tmp_path / "cache"
    rbee_hub.faults.chunk_delay_s = 0.5  # ~6 s for the weights: time to kill the server mid-file, however busy
    first = ServerProcess(tmp_path / "first", rbee=settings).start()
    try:
        r = first.post("v1/models/download", {"model_ref": TINY})
        stream = StreamReader(first, "GET", r.json()["progress_url"])
        assert rbee_hub.wait_until(lambda: rbee_hub.bytes_served(TINY_REPO, WEIGHTS) >= 256 << 10, WAIT_S)

        # When: the server dies hard, mid-file
        first.proc.kill()
        first.proc.wait(WAIT_S)
    finally:
        first.__exit__(None, None, None)
    assert stream.ended.wait(WAIT_S) and not stream.done  # its clients see the connection end
    rbee_hub.faults.chunk_delay_s = 0.0
    (partial,) = partial_files(cache)
    on_disk = partial.stat().st_size
    assert 0 < on_disk < len(data)

    with ServerProcess(tmp_path / "second", rbee=settings) as second:
        # Then: the catalog has no entry for the half model; the partial file is reported
        listing = second.get("v1/models").json()
        assert listing["models"] == []
        assert listing["incomplete"] == [{"repo_id": TINY_REPO, "file": partial.name, "bytes": on_disk,
                                          "path": str(partial)}]
        assert f"rbee: 1 unfinished download(s) in {cache} ({TINY_REPO})" in second.log()

        # When: the model is asked for again
        gets_before = len(rbee_hub.file_gets(TINY_REPO, WEIGHTS))
        events = download(second)

        # Then: it resumes from the bytes on disk, fetching only the rest, and verifies the whole file
        assert events[-1]["stage"] == "complete", events[-1]
        (resumed,) = rbee_hub.file_gets(TINY_REPO, WEIGHTS)[gets_before:]
        assert resumed.range == f"bytes={on_disk}-" and resumed.bytes_sent == len(data) - on_disk
        assert sha256(Path(events[-1]["local_path"]) / WEIGHTS) == HubFile.make(WEIGHTS, data).sha256
        assert partial_files(cache) == []
        listing = second.get("v1/models").json()
        assert [m["ref"] for m in listing["models"]] == [TINY] and listing["incomplete"] == []
