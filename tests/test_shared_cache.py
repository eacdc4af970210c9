"""One model cache shared by several servers (JupyterHub: every user's server, one folder).

Real ``jupyter server`` processes with their own catalogs and one ``cache_dir``, the local
hub throttled so that transfers overlap: a blob is fetched once, the waiting server shows
the other's progress, takes over if the other dies, and an unwritable cache is a clear
error naming the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from rbee_jupyter.testing.hub import CHUNK_SIZE, HubServer
from rbee_jupyter.testing.server import ServerProcess
from rbee_jupyter.testing.sse import parse_frames

BIG = "model.safetensors"
WAIT_S = 60.0  # bound on waiting for what will happen (a transfer starts, a stream ends) on a busy machine


def start_server(folder: Path, hub: HubServer, cache: Path, user: str) -> ServerProcess:
    settings = {"cache_dir": str(cache), "catalog_path": str(folder / f"{user}.sqlite"), "hub_endpoint": hub.url,
                "sse_keepalive_s": 0.5, "download_backoff_s": 0.05,
                # a holder whose partial file shows no growth is given up on after this: huggingface_hub's
                # shows none for its whole (short, paced) transfer, which a busy machine stretches
                "download_stall_s": 30.0}
    return ServerProcess(folder / user, rbee=settings, base_url=f"/user/{user}/").start()


@pytest.fixture
def servers(rbee_hub_session: HubServer, tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess, Path]]:
    """Alice's and Bob's servers: separate processes and catalogs, one cache folder."""
    cache = tmp_path / "shared-cache"
    with ThreadPoolExecutor(2) as pool:
        alice, bob = pool.map(lambda user: start_server(tmp_path, rbee_hub_session, cache, user), ["alice", "bob"])
    try:
        yield alice, bob, cache
    finally:
        for server in (alice, bob):
            server.client.close()
            server.stop()


def stream_events(server: ServerProcess, url: str, *, timeout: float = 120.0,
                  on_event: Callable[[dict[str, Any]], None] | None = None) -> tuple[list[dict[str, Any]], bool]:
    """The JSON events of a whole SSE stream and whether it ended with [DONE]; ``on_event`` sees each at once."""
    deadline = time.monotonic() + timeout
    events: list[dict[str, Any]] = []
    with server.client.stream("GET", f"http://127.0.0.1:{server.port}{url}", timeout=WAIT_S) as r:
        assert r.status_code == 200, r.read()
        buf = ""
        for chunk in r.iter_text():
            assert time.monotonic() < deadline, f"stream still open after {timeout} s: {events[-3:]}"
            buf += chunk
            while "\n\n" in buf:
                block, buf = buf.split("\n\n", 1)
                for frame in parse_frames(block + "\n\n"):
                    if frame.data == "[DONE]":
                        return events, True
                    if frame.comment is None:
                        events.append(frame.data)
                        if on_event is not None:
                            on_event(frame.data)
    return events, False


def post_download(server: ServerProcess, ref: str) -> dict[str, Any]:
    r = server.post("v1/models/download", {"model_ref": ref})
    assert r.status_code == 202, r.text
    return r.json()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_matches_the_model(snapshot: Path, model: Path) -> None:
    """Every file of the model, byte for byte (hash), behind the snapshot's links."""
    files = sorted(p.name for p in model.iterdir() if p.is_file())
    assert sorted(p.name for p in snapshot.iterdir()) == files
    for name in files:
        assert sha256(snapshot / name) == sha256(model / name), name


def incomplete_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*") if "incomplete" in p.name)


def sizes(model: Path) -> tuple[int, int, int]:
    """(bytes before the big file in download order, the big file's size, the total)."""
    files = {p.name: p.stat().st_size for p in model.iterdir() if p.is_file()}
    return sum(s for n, s in files.items() if n < BIG), files[BIG], sum(files.values())


def progress_inside_big_file(events: list[dict[str, Any]], model: Path) -> list[int]:
    before, big, _ = sizes(model)
    return sorted({e["bytes_downloaded"] for e in events if e["stage"] == "downloading"
                   and before < e["bytes_downloaded"] < before + big})


def assert_progress_shape(events: list[dict[str, Any]], total: int) -> None:
    progress = events[:-1]
    assert progress and all(e["stage"] == "downloading" for e in progress), events
    for e in progress:
        assert set(e) >= {"bytes_downloaded", "bytes_total", "speed_mbps"} and e["bytes_total"] == total
        assert isinstance(e["speed_mbps"], float) and e["speed_mbps"] >= 0
    sent = [e["bytes_downloaded"] for e in progress]
    assert sent == sorted(sent) and sent[-1] == total


# --- one transfer for two servers -------------------------------------------------------------

def test_two_servers_asking_at_once_share_one_transfer(servers, rbee_hub, rbee_tiny_model):
    alice, bob, cache = servers
    repo = "rbee-test/shared-once"
    rbee_hub.add_repo(repo, rbee_tiny_model)
    rbee_hub.faults.chunk_delay_s = 0.15  # the big file takes about two seconds
    ref = f"hf:{repo}"

    # When: both users ask for the same model at the same moment
    with ThreadPoolExecutor(2) as pool:
        started = list(pool.map(lambda s: post_download(s, ref), (alice, bob)))
        streams = list(pool.map(lambda s, st: stream_events(s, st["progress_url"]), (alice, bob), started))

    # Then: both streams complete, through progress, and end with [DONE]
    _, _, total = sizes(rbee_tiny_model)
    for events, done in streams:
        assert done and events[-1]["stage"] == "complete", events[-1]
        assert_progress_shape(events, total)
        # the server that waited for the other's transfer showed it too, byte by byte
        assert len(progress_inside_big_file(events, rbee_tiny_model)) >= 3, events
    assert streams[0][0][-1]["local_path"] == streams[1][0][-1]["local_path"]
    # ... the hub sent every file once
    for path in sorted(p.name for p in rbee_tiny_model.iterdir()):
        gets = rbee_hub.file_gets(repo, path)
        assert len(gets) == 1 and gets[0].range is None, (path, gets)
        assert rbee_hub.bytes_served(repo, path) == (rbee_tiny_model / path).stat().st_size
    # ... each catalog lists it, and the files are the model's, whole
    for server in (alice, bob):
        (entry,) = server.get("v1/models").json()["models"]
        assert entry["ref"] == ref and entry["local_path"] == streams[0][0][-1]["local_path"]
    assert_matches_the_model(Path(streams[0][0][-1]["local_path"]), rbee_tiny_model)
    assert incomplete_files(cache) == []


def test_the_waiting_server_takes_over_when_the_downloading_one_dies(servers, rbee_hub, rbee_tiny_model):
    alice, bob, cache = servers
    repo = "rbee-test/shared-takeover"
    rbee_hub.add_repo(repo, rbee_tiny_model)
    rbee_hub.faults.chunk_delay_s = 0.1
    ref = f"hf:{repo}"
    before, big, total = sizes(rbee_tiny_model)

    # Alice's server is half way through the big file ...
    post_download(alice, ref)
    assert rbee_hub.wait_until(lambda: any(g.bytes_sent >= 4 * CHUNK_SIZE for g in rbee_hub.file_gets(repo, BIG)),
                               WAIT_S)
    rbee_hub.faults.chunk_delay_s = 1.0  # from now on crawling: Bob joins before her end, however busy the machine
    # ... when Bob asks for the same model: his stream follows her partial file
    bob_started = post_download(bob, ref)
    waiting = threading.Event()

    def on_event(e: dict[str, Any]) -> None:
        if e["stage"] == "downloading" and before < e["bytes_downloaded"] < before + big:
            waiting.set()

    with ThreadPoolExecutor(1) as pool:
        bob_stream = pool.submit(stream_events, bob, bob_started["progress_url"], on_event=on_event)
        assert waiting.wait(WAIT_S), "Bob's stream never showed Alice's transfer"
        assert len(rbee_hub.file_gets(repo, BIG)) == 1  # Bob is waiting, not fetching

        # When: Alice's server dies (the lock goes with it, the partial file stays)
        alice.proc.kill()
        alice.proc.wait(WAIT_S)
        rbee_hub.faults.chunk_delay_s = 0.1
        events, done = bob_stream.result(timeout=2 * WAIT_S)

    # Then: Bob's server resumed from her partial file and finished
    assert done and events[-1]["stage"] == "complete", events[-1]
    assert_progress_shape(events, total)
    gets = rbee_hub.file_gets(repo, BIG)
    assert len(gets) == 2, gets
    resumed_at = int(gets[1].range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at < big and gets[1].status == 206
    assert resumed_at <= gets[0].bytes_sent  # never more than Alice got: nothing is skipped
    (entry,) = bob.get("v1/models").json()["models"]
    assert entry["ref"] == ref
    assert_matches_the_model(Path(events[-1]["local_path"]), rbee_tiny_model)
    assert incomplete_files(cache) == []


def test_a_server_waits_for_huggingface_hub_fetching_the_same_blob(rbee_hub, rbee_tiny_model, tmp_path):
    """transformers in a kernel (huggingface_hub's own download) and the server share one lock."""
    from huggingface_hub import hf_hub_download

    repo = "rbee-test/shared-with-hf"
    rbee_hub.add_repo(repo, rbee_tiny_model)
    cache = tmp_path / "cache"
    server = start_server(tmp_path, rbee_hub, cache, "erin")
    try:
        rbee_hub.faults.chunk_delay_s = 0.15
        with ThreadPoolExecutor(1) as pool:
            kernel = pool.submit(hf_hub_download, repo, BIG, cache_dir=str(cache), endpoint=rbee_hub.url)
            assert rbee_hub.wait_until(lambda: any(g.bytes_sent > 0 for g in rbee_hub.file_gets(repo, BIG)), WAIT_S)
            # When: the server is asked for the model while huggingface_hub is fetching its weights
            events, done = stream_events(server, post_download(server, f"hf:{repo}")["progress_url"])
            hf_path = Path(kernel.result(timeout=WAIT_S))
        # Then: the server waited for that transfer instead of repeating it, and both see the same checked
        # file (huggingface_hub writes its partial file in 10 MB steps: for this small file the waiting
        # stream sees no bytes in between, unlike when the other side is a server)
        assert done and events[-1]["stage"] == "complete", events[-1]
        assert_progress_shape(events, sizes(rbee_tiny_model)[2])
        assert len(rbee_hub.file_gets(repo, BIG)) == 1
        assert hf_path.resolve() == (Path(events[-1]["local_path"]) / BIG).resolve()
        assert_matches_the_model(Path(events[-1]["local_path"]), rbee_tiny_model)
        assert incomplete_files(cache) == []
    finally:
        server.client.close()
        server.stop()


def test_a_waiting_download_gives_up_on_a_stuck_holder_and_can_be_cancelled(rbee_hub, rbee_tiny_model, tmp_path):
    """The waiting side in-process: a lock held by someone whose partial file stops growing."""
    from filelock import FileLock

    from rbee_jupyter.hub.download import Downloader
    from rbee_jupyter.errors import Cancelled, DownloadStalled
    from rbee_jupyter.core.refs import parse_ref

    repo = "rbee-test/shared-stuck"
    rbee_hub.add_repo(repo, rbee_tiny_model)
    downloader = Downloader(cache_dir=tmp_path / "cache", endpoint=rbee_hub.url, stall_s=0.2, retries=1,
                            lock_poll_s=0.05)
    plan = downloader.resolve(parse_ref(f"hf:{repo}"))
    (big,) = [f for f in plan.files if f.path == BIG]
    before, _, _ = sizes(rbee_tiny_model)
    partial = plan.blob(big).with_name(big.etag + ".rbee-incomplete")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * 1000)  # what the stuck holder got so far
    plan.lock(big).parent.mkdir(parents=True)
    holder = FileLock(str(plan.lock(big)))
    holder.acquire()
    try:
        # When: the holder makes no progress for longer than the stall budget (0.2 s x (1 try + 1))
        events: list[Any] = []
        with pytest.raises(DownloadStalled) as info:
            downloader.fetch(plan, emit=events.append, cancel=threading.Event())
        # Then: the error names the lock, the holder's partial file is left alone, its bytes were shown
        assert str(plan.lock(big)) in info.value.message and info.value.details["stall_s"] == 0.4
        assert partial.read_bytes() == b"x" * 1000
        # (the other files come in parallel, so the whole-repo count holds the holder's 1000 and more)
        assert events[-1].files_active == {BIG: 1000} and events[-1].bytes_downloaded >= before + 1000

        # When: a waiting download is cancelled (one that would wait an hour for a stuck holder, so that
        # only the cancel can end it: no race with the stall budget on a busy machine)
        patient = Downloader(cache_dir=tmp_path / "cache", endpoint=rbee_hub.url, stall_s=3600, retries=1,
                             lock_poll_s=0.05)
        cancel, waiting = threading.Event(), threading.Event()
        events = []

        def emit(e: Any) -> None:
            events.append(e)
            if (e.files_active or {}).get(BIG) == 1000:
                waiting.set()

        with ThreadPoolExecutor(1) as pool:
            run = pool.submit(patient.fetch, plan, emit=emit, cancel=cancel)
            assert waiting.wait(WAIT_S)
            cancel.set()
            # Then: it stops (at the next lock poll, 0.05 s; the bound is for a busy machine), and still
            # leaves the holder's partial file alone
            with pytest.raises(Cancelled):
                run.result(timeout=WAIT_S)
        assert partial.read_bytes() == b"x" * 1000
        assert rbee_hub.file_gets(repo, BIG) == []
    finally:
        holder.release()


# --- a cache this server cannot write ---------------------------------------------------------

@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make ``folder`` unwritable, for root too: a read-only tmpfs mounted on it.

    As root, permission bits do not stop writes, so ``chmod`` proves nothing; a read-only
    mount does. Without the right to mount (an unprivileged container), a non-root user
    falls back to ``chmod 0555``; root without it skips.
    """
    folder.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                           capture_output=True, text=True, check=False)
    if mount.returncode == 0:
        try:
            yield
        finally:
            if subprocess.run(["umount", str(folder)], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(folder)], check=True)
        return
    if os.geteuid() == 0:
        pytest.skip(f"cannot mount a read-only tmpfs ({mount.stderr.strip() or mount.returncode}), and as root "
                    "chmod does not stop writes: nothing here can make a folder unwritable")
    folder.chmod(0o555)
    try:
        yield
    finally:
        folder.chmod(0o755)


def test_an_unwritable_cache_is_refused_naming_the_folder(rbee_hub, rbee_tiny_model, tmp_path):
    repo = "rbee-test/shared-denied"
    rbee_hub.add_repo(repo, rbee_tiny_model)
    cache = tmp_path / "cache"
    server = start_server(tmp_path, rbee_hub, cache, "carol")
    try:
        # When: the cache folder is read-only (at POST time)
        with read_only(cache):
            download = server.post("v1/models/download", {"model_ref": f"hf:{repo}"})
            load = server.post("v1/workers", {"model_ref": f"hf:{repo}", "device": "cpu"})
        # Then: 403 before anything starts, naming the folder and the setting
        for r in (download, load):
            assert r.status_code == 403, r.text
            error = r.json()["error"]
            assert error["code"] == "CACHE_NOT_WRITABLE"
            assert error["details"]["folder"] == str(cache) and error["details"]["setting"] == "c.RbeeApp.cache_dir"
            assert str(cache) in error["message"] and "c.RbeeApp.cache_dir" in error["message"]
        assert [r for r in rbee_hub.requests if repo in r.path] == []  # not even resolved
        assert server.get("v1/workers").json()["workers"] == []

        # When: a folder of the cache turns read-only while the download runs
        refs = cache / f"models--{repo.replace('/', '--')}" / "refs"
        refs.mkdir(parents=True)
        rbee_hub.faults.chunk_delay_s = 1.0  # crawling (13 s in all): read-only before the end, however busy
        started = post_download(server, f"hf:{repo}")
        assert rbee_hub.wait_until(lambda: any(g.bytes_sent > 0 for g in rbee_hub.file_gets(repo, BIG)), WAIT_S)
        with read_only(refs):
            rbee_hub.faults.chunk_delay_s = 0.0  # now the rest may come at once
            events, done = stream_events(server, started["progress_url"])
        # Then: an error event naming that folder, [DONE], nothing half-written, the catalog unchanged
        error = events[-1]
        assert done and error["stage"] == "error" and error["code"] == "CACHE_NOT_WRITABLE", error
        assert error["details"]["folder"] == str(refs) and str(refs) in error["message"]
        assert "c.RbeeApp.cache_dir" in error["message"]
        assert incomplete_files(cache) == []
        assert server.get("v1/models").json()["models"] == []
    finally:
        server.client.close()
        server.stop()
