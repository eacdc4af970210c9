"""Big files as parallel ranged segments, end to end: a real ``jupyter server`` process, the
real huggingface_hub client and the local hub shaped like a network (per-connection caps).

The repository holds one 2 MiB file, which the server (``download_segment_mb`` 0.25) fetches
as 8 segments of 256 KiB over 8 connections, and a 300 kB file that comes in one stream
alongside. What must hold: each byte is served once (the hub's request log says which
ranges went out), each segment resumes on its own after a fault, the whole file is checked
before it gets its name, and nothing partial (data or segment table) outlives a failure.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from rbee_jupyter.testing.hub import CHUNK_SIZE, HubServer
from rbee_jupyter.testing.server import ServerProcess

from .conftest import StreamReader, settings_for, wait_for
from .test_download_faults import fill

REPO = "rbee-test/segmented"
BIG = "weights.safetensors"
SMALL = "extra.safetensors"
SEGMENT = 256 << 10
SEGMENTS = 8
WAIT_S = 60.0  # bound on waiting for what will happen (a process exits, a stream ends) on a busy machine


def make_repo(hub: HubServer, repo: str = REPO, *, small: bool = False) -> dict[str, bytes]:
    """The big file and a config (plus, with ``small``, a file that comes in one stream alongside)."""
    files = {BIG: os.urandom(SEGMENTS * SEGMENT), "config.json": b'{"model_type": "llama"}'}
    if small:
        files[SMALL] = os.urandom(300_000)
    hub.add_repo(repo, extra_files=files)
    return files


def settings(folder: Path, hub: HubServer, **extra) -> dict:
    return settings_for(folder, hub, download_segment_mb=SEGMENT / 2**20, download_connections=SEGMENTS,
                        download_stall_s=10.0, **extra)


def ranges() -> list[str]:
    return [f"bytes={i * SEGMENT}-{(i + 1) * SEGMENT - 1}" for i in range(SEGMENTS)]


def leftovers(cache: Path) -> list[str]:
    """Partial data files and segment tables: neither may outlive a download."""
    return sorted(p.name for p in cache.rglob("*") if p.name.endswith((".rbee-incomplete", ".rbee-segments")))


def download(server: ServerProcess, repo: str = REPO) -> StreamReader:
    r = server.post("v1/models/download", {"model_ref": f"hf:{repo}"})
    assert r.status_code == 202, r.text
    return StreamReader(server, "GET", r.json()["progress_url"] + "&last_event_id=0")


def finished(stream: StreamReader) -> list[dict]:
    assert stream.ended.wait(120) and stream.done, stream.text[-2000:]
    return stream.events


def in_flight(hub: HubServer, repo: str, name: str) -> list:
    return [g for g in hub.file_gets(repo, name) if g.status == 206 and 0 < g.bytes_sent and not g.completed
            and g.fault is None]


def assert_complete(events: list[dict], files: dict[str, bytes]) -> Path:
    assert events[-1]["stage"] == "complete", events[-1]
    sent = [e["bytes_downloaded"] for e in events if e["stage"] == "downloading"]
    assert sent == sorted(sent) and sent[-1] == sum(map(len, files.values()))
    folder = Path(events[-1]["local_path"])
    for name, data in files.items():
        assert hashlib.sha256((folder / name).read_bytes()).digest() == hashlib.sha256(data).digest(), name
    return folder


# --- the happy path ---------------------------------------------------------------------------

def test_segments_and_files_go_at_once_and_each_byte_is_served_once(rbee_hub, tmp_path):
    files = make_repo(rbee_hub, small=True)
    rbee_hub.faults.connection_rate_bps = 256_000  # ~1 s per segment: all of them are seen in flight
    with ServerProcess(tmp_path, rbee=settings(tmp_path, rbee_hub)) as server:
        stream = download(server)
        most = [0]

        def open_now() -> int:  # GETs with bytes on the wire, over all files, and the most seen at once
            n = sum(1 for g in rbee_hub.requests if g.method == "GET" and g.status in (200, 206) and g.bytes_sent
                    and not g.completed and g.fault is None)
            most[0] = max(most[0], n)
            return n

        # When: the transfer runs, the small file and segments of the big one are on the wire together ...
        assert rbee_hub.wait_until(lambda: open_now() >= 0 and len(in_flight(rbee_hub, REPO, BIG)) >= 2 and any(
            not g.completed and g.bytes_sent for g in rbee_hub.file_gets(REPO, SMALL)), 60)
        # ... and the rest of the segments follow, never more at once than download_connections
        assert rbee_hub.wait_until(lambda: open_now() >= 0 and len(rbee_hub.file_gets(REPO, BIG)) == SEGMENTS, 60)
        rbee_hub.faults.connection_rate_bps = None
        events = finished(stream)

    # Then: one ranged GET per segment, each answered 206 and served exactly once
    gets = rbee_hub.file_gets(REPO, BIG)
    assert sorted(g.range for g in gets) == sorted(ranges())
    assert all(g.status == 206 and g.bytes_sent == SEGMENT for g in gets)
    assert rbee_hub.bytes_served(REPO, BIG) == len(files[BIG])
    assert [g.range for g in rbee_hub.file_gets(REPO, SMALL)] == [None]
    assert_complete(events, files)
    # per-file detail: while both ran, the events said how far each one was
    assert any(set(e.get("files_active") or {}) >= {BIG, SMALL} for e in events[:-1])
    assert leftovers(tmp_path / "cache") == [] and not rbee_hub.errors
    assert 3 <= most[0] <= SEGMENTS


def test_a_fast_first_connection_keeps_the_segments_to_itself(rbee_hub, tmp_path):
    """An uncapped server (loopback, a LAN mirror): more connections would only cost CPU, so the
    segments go one after another over the first one. The threshold is lowered so that the
    verdict does not depend on how fast this machine is: 4 MB/s per connection is "fast" against
    0.25 MB/s, whatever else the machine is doing."""
    files = make_repo(rbee_hub)
    rbee_hub.faults.connection_rate_bps = 4_000_000
    most = [0]

    def open_now() -> bool:
        most[0] = max(most[0], len([g for g in rbee_hub.file_gets(REPO, BIG) if g.bytes_sent and not g.completed]))
        return True

    with ServerProcess(tmp_path, rbee=settings(tmp_path, rbee_hub, download_spread_below_mbps=0.25)) as server:
        stream = download(server)
        # re-checked on every chunk the hub sends: two segments on the wire at once would be seen
        assert rbee_hub.wait_until(lambda: open_now() and sum(g.completed for g in rbee_hub.file_gets(REPO, BIG))
                                   == SEGMENTS, 120)
        events = finished(stream)

    gets = rbee_hub.file_gets(REPO, BIG)
    assert [g.range for g in gets] == ranges()  # in file order, one after another
    assert all(g.status == 206 and g.bytes_sent == SEGMENT for g in gets) and most[0] == 1
    assert rbee_hub.bytes_served(REPO, BIG) == len(files[BIG])
    assert_complete(events, files)
    assert leftovers(tmp_path / "cache") == []


def test_a_hub_that_ignores_ranges_gets_one_stream(rbee_hub, tmp_path):
    files = make_repo(rbee_hub)
    rbee_hub.faults.ignore_range = True
    with ServerProcess(tmp_path, rbee=settings(tmp_path, rbee_hub)) as server:
        events = finished(download(server))
    # the first segment's request is answered 200 with the whole file, and kept as the one stream
    (get,) = rbee_hub.file_gets(REPO, BIG)
    assert get.range == ranges()[0] and get.status == 200 and get.bytes_sent == len(files[BIG])
    assert_complete(events, files)
    assert leftovers(tmp_path / "cache") == []


# --- faults inside segments -------------------------------------------------------------------

def test_a_connection_dropped_inside_a_segment_resumes_that_segment(rbee_hub, tmp_path):
    files = make_repo(rbee_hub)
    rbee_hub.faults.drop_after_bytes = 100_000  # the first response to get that far is cut
    rbee_hub.faults.drop_times = 1
    with ServerProcess(tmp_path, rbee=settings(tmp_path, rbee_hub)) as server:
        events = finished(download(server))

    gets = rbee_hub.file_gets(REPO, BIG)
    (dropped,) = [g for g in gets if g.fault == "dropped"]
    start, end = (int(x) for x in dropped.range.removeprefix("bytes=").split("-"))
    # Then: one more GET, for exactly the rest of that segment; no byte went out twice
    assert len(gets) == SEGMENTS + 1
    (retry,) = [g for g in gets if g.range == f"bytes={start + 100_000}-{end}"]
    assert retry.status == 206 and retry.bytes_sent == end + 1 - start - 100_000
    assert rbee_hub.bytes_served(REPO, BIG) == len(files[BIG])
    assert_complete(events, files)


def test_a_server_killed_halfway_through_eight_segments_resumes_each_after_the_restart(rbee_hub, tmp_path):
    files = make_repo(rbee_hub)
    cache = tmp_path / "cache"
    rbee_hub.faults.connection_rate_bps = 64_000  # ~4 s per segment: seconds to kill it half way, however busy
    first = ServerProcess(tmp_path / "first", rbee=settings(tmp_path, rbee_hub)).start()
    try:
        stream = download(first)
        assert rbee_hub.wait_until(lambda: len([g for g in in_flight(rbee_hub, REPO, BIG)
                                                if g.bytes_sent >= SEGMENT // 2]) == SEGMENTS, 60)
        # When: the server dies hard with every segment half way
        first.proc.kill()
        first.proc.wait(WAIT_S)
    finally:
        first.__exit__(None, None, None)
    assert stream.ended.wait(WAIT_S) and not stream.done
    rbee_hub.faults.connection_rate_bps = None
    blob = hashlib.sha256(files[BIG]).hexdigest()
    assert leftovers(cache) == [f"{blob}.rbee-incomplete", f"{blob}.rbee-segments"]
    assert not list(cache.rglob(f"blobs/{blob}"))  # nothing under the final name
    before = {g.range: g.bytes_sent for g in rbee_hub.file_gets(REPO, BIG)}

    with ServerProcess(tmp_path / "second", rbee=settings(tmp_path, rbee_hub)) as second:
        listing = second.get("v1/models").json()
        (incomplete,) = [i for i in listing["incomplete"] if i["file"].endswith(".rbee-incomplete")]
        assert 0 < incomplete["bytes"] < len(files[BIG])  # what it holds, not its (preallocated) length
        gets_before = len(rbee_hub.file_gets(REPO, BIG))
        events = finished(download(second))

    # Then: each segment resumed from its own bytes on disk, never past what the hub had sent
    resumed = rbee_hub.file_gets(REPO, BIG)[gets_before:]
    assert len(resumed) == SEGMENTS
    by_segment = {int(g.range.removeprefix("bytes=").split("-")[0]) // SEGMENT: g for g in resumed}
    assert sorted(by_segment) == list(range(SEGMENTS))
    for i, g in by_segment.items():
        start = int(g.range.removeprefix("bytes=").split("-")[0])
        first_sent = before[ranges()[i]]
        assert i * SEGMENT < start <= i * SEGMENT + first_sent, (i, g.range, first_sent)
        assert g.range.endswith(f"-{(i + 1) * SEGMENT - 1}") and g.bytes_sent == (i + 1) * SEGMENT - start
    assert_complete(events, files)
    assert leftovers(cache) == []


def test_the_hub_restarting_mid_segments_is_resumed(rbee_hub, tmp_path):
    files = make_repo(rbee_hub)
    rbee_hub.faults.connection_rate_bps = 128_000
    port = int(rbee_hub.url.rsplit(":", 1)[1])
    hub_settings = settings(tmp_path, rbee_hub, download_retries=6, download_backoff_s=0.5)  # 15 s of tries
    with ServerProcess(tmp_path, rbee=hub_settings) as server:
        stream = download(server)
        assert rbee_hub.wait_until(lambda: len([g for g in in_flight(rbee_hub, REPO, BIG)
                                                if g.bytes_sent >= 2 * CHUNK_SIZE]) == SEGMENTS, 60)
        # When: the hub goes away mid-transfer and comes back on the same port
        rbee_hub.stop()
        rbee_hub.faults.connection_rate_bps = None
        rbee_hub.port = port
        rbee_hub.start()
        events = finished(stream)
    assert_complete(events, files)
    stopped = [g for g in rbee_hub.file_gets(REPO, BIG) if g.fault == "stopped"]
    assert len(stopped) == SEGMENTS
    # every segment asked again only for what it missed (at most what the hub had sent)
    later = rbee_hub.file_gets(REPO, BIG)[SEGMENTS:]
    for g in later:
        start = int(g.range.removeprefix("bytes=").split("-")[0])
        assert start % SEGMENT > 0 and g.status == 206


# --- failures with parallel segments: nothing partial is left ---------------------------------

def test_a_wrong_hash_with_segments_is_retried_then_reported(rbee_hub, tmp_path):
    make_repo(rbee_hub)
    rbee_hub.faults.wrong_hash_files = {BIG}
    with ServerProcess(tmp_path, rbee=settings(tmp_path, rbee_hub, download_retries=2)) as server:
        events = finished(download(server))
        error = events[-1]
        assert error["code"] == "CHECKSUM_MISMATCH" and error["details"]["file"] == BIG, error
        assert len(rbee_hub.file_gets(REPO, BIG)) == 2 * SEGMENTS  # each try fetched every segment once
        assert server.get("v1/models").json()["models"] == []
    assert leftovers(tmp_path / "cache") == []
    assert not [p for p in (tmp_path / "cache").rglob("blobs/*") if p.stat().st_size == SEGMENTS * SEGMENT]


def test_cancel_with_segments_in_flight_removes_everything_partial(rbee_hub, tmp_path):
    make_repo(rbee_hub)
    rbee_hub.faults.connection_rate_bps = 64_000
    with ServerProcess(tmp_path, rbee=settings(tmp_path, rbee_hub)) as server:
        r = server.post("v1/models/download", {"model_ref": f"hf:{REPO}"})
        stream = StreamReader(server, "GET", r.json()["progress_url"] + "&last_event_id=0")
        assert rbee_hub.wait_until(lambda: len(in_flight(rbee_hub, REPO, BIG)) == SEGMENTS, 60)
        # When
        assert server.delete(f"v1/models/download/{r.json()['download_id']}").status_code == 204
        events = finished(stream)
        # Then: a cancel event, every connection closed, nothing partial on disk
        assert events[-1]["stage"] == "error" and events[-1]["code"] == "CANCELLED", events[-1]
        assert rbee_hub.wait_until(lambda: all(g.completed or g.fault for g in rbee_hub.file_gets(REPO, BIG)), WAIT_S)
        wait_for(lambda: leftovers(tmp_path / "cache") == [], WAIT_S, "the partial files to go")
        assert server.get("v1/models").json()["models"] == []


def test_a_full_disk_with_segments_is_a_clean_error(rbee_hub, tmp_path, tmpfs):
    make_repo(rbee_hub)
    disk = tmpfs(6 << 20)
    cache = disk / "hub"
    rbee_hub.faults.connection_rate_bps = 64_000  # ~4 s per segment: the disk fills before their end, however busy
    with ServerProcess(tmp_path, rbee={**settings(tmp_path, rbee_hub), "cache_dir": str(cache)}) as server:
        stream = download(server)
        assert rbee_hub.wait_until(lambda: len(in_flight(rbee_hub, REPO, BIG)) == SEGMENTS, 60)
        # When: the disk fills up while every segment is being written
        fill(disk)
        rbee_hub.faults.connection_rate_bps = None
        events = finished(stream)
        # Then
        error = events[-1]
        assert error["stage"] == "error" and error["code"] == "INSUFFICIENT_DISK", error
        assert error["details"]["folder"] == str(cache)
        assert leftovers(cache) == []
        assert server.get("v1/models").json()["models"] == []


# --- one cache shared by two servers ----------------------------------------------------------

def test_a_server_waiting_on_the_shared_cache_takes_over_the_segments_of_a_killed_one(rbee_hub, tmp_path):
    repo = "rbee-test/segmented-shared"
    files = make_repo(rbee_hub, repo)
    cache = tmp_path / "shared-cache"
    rbee_hub.faults.connection_rate_bps = 32_000  # ~8 s per segment: Bob joins before Alice's end, however busy
    alice, bob = (ServerProcess(tmp_path / user, rbee={**settings(tmp_path / user, rbee_hub), "cache_dir": str(cache)})
                  for user in ("alice", "bob"))
    alice.start()
    try:
        bob.start()
        download(alice, repo)
        assert rbee_hub.wait_until(lambda: len([g for g in in_flight(rbee_hub, repo, BIG)
                                                if g.bytes_sent >= 2 * CHUNK_SIZE]) == SEGMENTS, 60)
        # When: Bob asks for the same model, his stream follows Alice's segments, without fetching
        stream = download(bob, repo)
        assert stream.wait_until(lambda s: any((e.get("files_active") or {}).get(BIG, 0) > 0 for e in s.events),
                                 WAIT_S)
        assert len(rbee_hub.file_gets(repo, BIG)) == SEGMENTS
        # When: Alice's server dies (the lock goes with it, the partial file and its table stay)
        alice.proc.kill()
        alice.proc.wait(WAIT_S)
        rbee_hub.faults.connection_rate_bps = None
        events = finished(stream)
    finally:
        alice.__exit__(None, None, None)
        bob.__exit__(None, None, None)

    # Then: Bob resumed each segment from Alice's bytes on disk, and checked the whole file
    assert_complete(events, files)
    gets = rbee_hub.file_gets(repo, BIG)
    first, resumed = gets[:SEGMENTS], gets[SEGMENTS:]
    sent = {int(g.range.removeprefix("bytes=").split("-")[0]) // SEGMENT: g.bytes_sent for g in first}
    assert len(resumed) == SEGMENTS
    for g in resumed:
        start = int(g.range.removeprefix("bytes=").split("-")[0])
        i = start // SEGMENT
        assert i * SEGMENT < start <= i * SEGMENT + sent[i] and g.status == 206, (g.range, sent[i])
    assert leftovers(cache) == []


# --- settings ---------------------------------------------------------------------------------

def test_connection_and_segment_settings_are_validated_and_reach_the_downloader(tmp_path):
    from traitlets import TraitError

    from rbee_jupyter.core.hive import Hive, HiveConfig
    from rbee_jupyter.server.app import RbeeApp

    app = RbeeApp(download_connections=3, download_segment_mb=0.5, download_spread_below_mbps=40)
    assert (app.download_connections, app.download_segment_mb, app.download_spread_below_mbps) == (3, 0.5, 40)
    for bad in ({"download_connections": 0}, {"download_segment_mb": 0.0}, {"download_spread_below_mbps": -1}):
        with pytest.raises(TraitError):
            RbeeApp(**bad)

    hive = Hive(HiveConfig(cache_dir=tmp_path / "c", catalog_path=tmp_path / "catalog.sqlite",
                           download_connections=3, download_segment_mb=0.5, download_spread_below_mbps=40))
    assert (hive.downloader.connections, hive.downloader.segment_bytes) == (3, 512 << 10)
    assert hive.downloader.spread_below_bps == 40e6
