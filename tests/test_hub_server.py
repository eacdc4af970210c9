"""The local hub server, driven by the real huggingface_hub client.

These tests pin down what the download code may rely on: that huggingface_hub accepts
the server's answers as the hub's (cache layout, hashes, error classes), and that each
fault knob does what it says, observed through ``HubServer.requests`` rather than timing.

huggingface_hub reads ``HF_ENDPOINT`` when imported, so every call passes
``endpoint=hub.url``; ``token=False`` keeps a developer's own token out of the requests.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import threading
import time
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from rbee_jupyter.testing.hub import CHUNK_SIZE, HubServer, RequestRecord, make_hub_repo

REPO = "rbee-test/tiny-llama"
MiB = 1024 * 1024
CLIENT_CHUNK = constants.DOWNLOAD_CHUNK_SIZE  # 10 MiB: huggingface_hub keeps only whole chunks of a cut transfer


def _blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture(autouse=True)
def _hf_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server
    assert server.errors == []


@pytest.fixture
def blob_repo(hub: HubServer) -> dict[str, bytes]:
    """A repo of synthetic files: fast to make, sizes chosen per test."""
    files = {
        "big.safetensors": _blob(CLIENT_CHUNK + 2 * MiB, seed=1),
        "small.bin": _blob(MiB, seed=2),
        "four_chunks.bin": _blob(4 * CHUNK_SIZE, seed=3),
        "config.json": b'{"model_type": "llama"}',
    }
    hub.add_repo(REPO, None, extra_files=files)
    return files


def _get(hub: HubServer, path: str, headers: dict[str, str] | None = None,
         method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    port = int(hub.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


class _BackgroundGet(threading.Thread):
    """A raw GET in a thread, so a test can watch the server while the body comes."""

    def __init__(self, hub: HubServer, path: str) -> None:
        super().__init__(daemon=True)
        self.port = int(hub.url.rsplit(":", 1)[1])
        self.path = path
        self.body: bytes | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", self.path)
            self.body = conn.getresponse().read()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
        finally:
            conn.close()


def _record(hub: HubServer, filename: str) -> RequestRecord | None:
    gets = hub.file_gets(REPO, filename)
    return gets[-1] if gets else None


# --------------------------------------------------------------------------- happy path


@pytest.mark.parametrize("shard", [None, "200KB"], ids=["single", "sharded"])
def test_snapshot_download_is_byte_identical_and_loads(hub: HubServer, tmp_path: Path, shard: str | None) -> None:
    folder, sha = make_hub_repo(tmp_path, hub, max_shard_size=shard)

    local = Path(snapshot_download(REPO, endpoint=hub.url, cache_dir=tmp_path / "cache", token=False))

    assert local.name == sha
    served = sorted(p.name for p in local.iterdir())
    assert served == sorted(p.name for p in folder.iterdir())
    for name in served:
        assert (local / name).read_bytes() == (folder / name).read_bytes(), name
    assert len(list(local.glob("*.safetensors"))) == (1 if shard is None else 5)
    # The order huggingface_hub calls in: info by branch, tree by sha, then HEAD/GET on resolve by sha.
    assert hub.requests[0].path == f"/api/models/{REPO}/revision/main"
    assert hub.requests[1].path.startswith(f"/api/models/{REPO}/tree/{sha}?recursive=true")
    assert {r.method for r in hub.requests[2:]} == {"HEAD", "GET"}
    assert all(f"/resolve/{sha}/" in r.path and r.status == 200 for r in hub.requests[2:])

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(local)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape[:2] == (1, 3)


def test_commit_sha_is_a_function_of_content(hub: HubServer) -> None:
    a = hub.add_repo("x/a", None, extra_files={"f.txt": b"one"})
    b = hub.add_repo("x/b", None, revision="v1", extra_files={"f.txt": b"one"})
    c = hub.add_repo("x/a", None, revision="v2", extra_files={"f.txt": b"two"})
    assert a == b != c
    assert len(a) == 40 and int(a, 16) >= 0


def test_model_info_and_tree(hub: HubServer, tmp_path: Path) -> None:
    folder, sha = make_hub_repo(tmp_path, hub, extra_files={"docs/deep/notes.txt": b"hello\n"})
    sha_v2 = hub.add_repo(REPO, folder, revision="refs/pr/1", extra_files={"extra.txt": b"v2"})
    api = HfApi(endpoint=hub.url, token=False)

    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == sha and info.id == REPO and info.private is False and info.gated is False
    assert info.config == {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    siblings = {s.rfilename: s for s in info.siblings}
    weights = (folder / "model.safetensors").read_bytes()
    assert siblings["model.safetensors"].size == len(weights)
    assert siblings["model.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert siblings["config.json"].lfs is None
    # Like the hub: without files_metadata, names only.
    assert {s.size for s in api.model_info(REPO).siblings} == {None}
    # A revision with a "/" travels URL-encoded; a full sha works too.
    assert api.model_info(REPO, revision="refs/pr/1").sha == sha_v2
    assert api.model_info(REPO, revision=sha).sha == sha

    tree = {e.path: e for e in api.list_repo_tree(REPO, revision=sha, recursive=True)}
    assert {"docs", "docs/deep", "docs/deep/notes.txt", "config.json", "model.safetensors"} <= set(tree)
    assert not hasattr(tree["docs"], "size")  # a RepoFolder
    config = (folder / "config.json").read_bytes()
    assert tree["config.json"].size == len(config) and tree["config.json"].lfs is None
    assert tree["config.json"].blob_id == hashlib.sha1(b"blob %d\0" % len(config) + config).hexdigest()
    lfs = tree["model.safetensors"].lfs
    assert (lfs.sha256, lfs.size) == (hashlib.sha256(weights).hexdigest(), len(weights))
    assert lfs.pointer_size == 125 + len(str(len(weights)))  # the git-lfs pointer file's length

    top = {e.path for e in api.list_repo_tree(REPO, revision=sha)}
    assert "docs" in top and "docs/deep/notes.txt" not in top
    assert [e.path for e in api.list_repo_tree(REPO, "docs", revision=sha, recursive=True)] == [
        "docs/deep", "docs/deep/notes.txt"]


def test_resolve_headers_and_ranges(hub: HubServer, blob_repo: dict[str, bytes]) -> None:
    data = blob_repo["small.bin"]
    sha = hub.add_repo(REPO, None, extra_files=blob_repo)
    path = f"/{REPO}/resolve/main/small.bin"

    status, headers, body = _get(hub, path, method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["X-Repo-Commit"] == sha
    assert headers["ETag"] == headers["X-Linked-Etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert headers["Content-Length"] == headers["X-Linked-Size"] == str(len(data))
    assert headers["Accept-Ranges"] == "bytes"
    _, headers, _ = _get(hub, f"/{REPO}/resolve/main/config.json", method="HEAD")
    assert "X-Linked-Etag" not in headers and len(headers["ETag"].strip('"')) == 40  # git sha1

    status, headers, body = _get(hub, path, {"Range": "bytes=1000-"})
    assert status == 206 and body == data[1000:]
    assert headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert _get(hub, path, {"Range": "bytes=10-19"})[2] == data[10:20]
    assert _get(hub, path, {"Range": "bytes=-5"})[2] == data[-5:]
    assert _get(hub, path, {"Range": f"bytes={len(data)}-"})[0] == 416
    assert hub.file_gets(REPO, "small.bin")[0].range == "bytes=1000-"
    assert hub.bytes_served(REPO, "small.bin") == len(data) - 1000 + 10 + 5


# --------------------------------------------------------------------------- errors


def test_missing_repo_revision_and_file(hub: HubServer, tmp_path: Path, blob_repo: dict[str, bytes]) -> None:
    api = HfApi(endpoint=hub.url, token=False)
    cache = tmp_path / "cache"
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("nobody/nothing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("nobody/nothing", "config.json", endpoint=hub.url, cache_dir=cache, token=False)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("nobody/nothing", endpoint=hub.url, cache_dir=cache, token=False)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO, revision="no-such-branch", endpoint=hub.url, cache_dir=cache, token=False)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="f" * 40, endpoint=hub.url, cache_dir=cache, token=False)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.json", endpoint=hub.url, cache_dir=cache, token=False)

    status, headers, body = _get(hub, "/api/agent-harnesses")
    assert status == 404 and isinstance(json.loads(body), dict)
    status, headers, body = _get(hub, "/somewhere/else")
    assert status == 404 and "X-Error-Code" not in headers and "error" in json.loads(body)


def test_gated_repo_needs_the_token(hub: HubServer, tmp_path: Path) -> None:
    hub.token = "hf_test_token"
    hub.add_repo("org/gated", None, gated=True, extra_files={"config.json": b"{}"})
    kwargs = dict(endpoint=hub.url, cache_dir=tmp_path / "cache")

    # Like the hub, the card and file list are public; the files are not.
    assert HfApi(endpoint=hub.url, token=False).model_info("org/gated").gated == "manual"
    with pytest.raises(GatedRepoError):
        snapshot_download("org/gated", token=False, **kwargs)
    with pytest.raises(GatedRepoError) as wrong:
        hf_hub_download("org/gated", "config.json", token="hf_wrong", **kwargs)
    assert wrong.value.response.status_code == 403
    assert hub.requests[-1].status == 403

    local = snapshot_download("org/gated", token="hf_test_token", **kwargs)
    assert (Path(local) / "config.json").read_bytes() == b"{}"


def test_private_repo_looks_missing_without_the_token(hub: HubServer, tmp_path: Path) -> None:
    hub.token = "hf_test_token"
    hub.add_repo("org/private", None, private=True, extra_files={"config.json": b"{}"})
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info("org/private")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/private", "config.json", endpoint=hub.url, cache_dir=tmp_path, token=False)
    assert hub.requests[-1].status == 401
    assert HfApi(endpoint=hub.url, token="hf_test_token").model_info("org/private").private is True


# --------------------------------------------------------------------------- faults


def test_dropped_connection_is_resumed_with_a_range(hub: HubServer, tmp_path: Path,
                                                    blob_repo: dict[str, bytes]) -> None:
    data = blob_repo["big.safetensors"]
    cut = CLIENT_CHUNK + MiB
    hub.faults.drop_after_bytes = cut

    local = hf_hub_download(REPO, "big.safetensors", endpoint=hub.url, cache_dir=tmp_path, token=False)

    assert Path(local).read_bytes() == data
    first, second = hub.file_gets(REPO, "big.safetensors")
    assert (first.fault, first.bytes_sent, first.completed) == ("dropped", cut, False)
    # huggingface_hub keeps what it had flushed (whole 10 MiB chunks) and asks for the rest.
    assert (second.range, second.status) == (f"bytes={CLIENT_CHUNK}-", 206)
    assert hub.wait_until(lambda: second.completed, 60)
    assert len(data) <= hub.bytes_served(REPO, "big.safetensors") < 1.2 * len(data)
    assert hub.faults.drop_times == 0


def test_drop_of_a_small_file_restarts_it(hub: HubServer, tmp_path: Path, blob_repo: dict[str, bytes]) -> None:
    """Below 10 MiB the client has kept nothing when the connection drops: it starts over."""
    data = blob_repo["small.bin"]
    hub.faults.drop_after_bytes = 300_000
    local = hf_hub_download(REPO, "small.bin", endpoint=hub.url, cache_dir=tmp_path, token=False)
    assert Path(local).read_bytes() == data
    first, second = hub.file_gets(REPO, "small.bin")
    assert (first.fault, second.range, second.status) == ("dropped", None, 200)
    assert hub.bytes_served(REPO, "small.bin") == 300_000 + len(data)


def test_wrong_hash_serves_corrupt_bytes_of_the_right_length(hub: HubServer, tmp_path: Path,
                                                             blob_repo: dict[str, bytes]) -> None:
    data = blob_repo["small.bin"]
    hub.faults.wrong_hash_files = {"small.bin"}
    local = Path(hf_hub_download(REPO, "small.bin", endpoint=hub.url, cache_dir=tmp_path, token=False))
    served = local.read_bytes()
    assert len(served) == len(data)
    assert sum(a != b for a, b in zip(served, data)) == 1
    # The hub still publishes the true hash (and the client names the blob after it).
    true_sha = hashlib.sha256(data).hexdigest()
    assert local.resolve().name == true_sha != hashlib.sha256(served).hexdigest()
    tree = {e.path: e for e in HfApi(endpoint=hub.url, token=False).list_repo_tree(REPO)}
    assert tree["small.bin"].lfs.sha256 == true_sha


def test_stop_returns_promptly_during_a_stall(hub: HubServer, blob_repo: dict[str, bytes]) -> None:
    hub.faults.stall_after_bytes = CHUNK_SIZE
    client = _BackgroundGet(hub, f"/{REPO}/resolve/main/small.bin")
    assert hub.wait_until(lambda: (r := _record(hub, "small.bin")) is not None and r.fault == "stalled", 60)
    record = _record(hub, "small.bin")
    assert record.bytes_sent == CHUNK_SIZE

    hub.stop()
    # returned with the stall (stall_s: an hour) cut short, not waited out: by the order of events (the
    # record says so once stop() returns), not by a clock a busy machine stretches
    assert record.fault == "stopped" and not record.completed
    client.join(60)
    assert not client.is_alive()
    assert isinstance(client.error, http.client.IncompleteRead)


def test_client_times_out_on_a_stall_and_resumes(hub: HubServer, tmp_path: Path, blob_repo: dict[str, bytes],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)  # read timeout, seconds
    data = blob_repo["big.safetensors"]
    hub.faults.stall_after_bytes = CLIENT_CHUNK + MiB
    local = hf_hub_download(REPO, "big.safetensors", endpoint=hub.url, cache_dir=tmp_path, token=False)
    assert Path(local).read_bytes() == data
    first, second = hub.file_gets(REPO, "big.safetensors")
    assert first.fault == "stalled" and not first.completed  # still held open, until stop()
    assert (second.range, second.status) == (f"bytes={CLIENT_CHUNK}-", 206)
    assert hub.wait_until(lambda: second.completed, 60)
    assert hub.faults.stall_times == 0


def test_chunk_delay_slows_a_transfer_and_can_be_lifted(hub: HubServer, blob_repo: dict[str, bytes]) -> None:
    data = blob_repo["small.bin"]  # 16 chunks
    hub.faults.chunk_delay_s = 0.5
    client = _BackgroundGet(hub, f"/{REPO}/resolve/main/small.bin")
    assert hub.wait_until(lambda: (r := _record(hub, "small.bin")) is not None and r.bytes_sent > 0, 60)
    record = _record(hub, "small.bin")
    assert record.bytes_sent < len(data) and not record.completed  # crawling: one chunk per 0.5 s

    hub.faults.chunk_delay_s = 0.0  # mutable at run time: the rest comes at once
    assert hub.wait_until(lambda: record.completed, 60)
    client.join(60)
    assert client.body == data and record.bytes_sent == len(data)


def test_chunk_delay_with_the_real_client(hub: HubServer, tmp_path: Path, blob_repo: dict[str, bytes]) -> None:
    hub.faults.chunk_delay_s = 0.05
    started = time.monotonic()
    local = hf_hub_download(REPO, "four_chunks.bin", endpoint=hub.url, cache_dir=tmp_path, token=False)
    elapsed = time.monotonic() - started
    assert Path(local).read_bytes() == blob_repo["four_chunks.bin"]
    assert elapsed >= 3 * 0.05  # three pauses between four chunks; no upper bound on a shared machine
    assert len(hub.file_gets(REPO, "four_chunks.bin")) == 1
    assert hub.bytes_served(REPO, "four_chunks.bin") == 4 * CHUNK_SIZE


# --------------------------------------------------------------------------- the network's shape

def _fetch_at_once(hub: HubServer, data: bytes, n: int) -> float:
    """``n`` concurrent GETs of small.bin; asserts each got ``data``, returns the seconds they took."""
    started = time.monotonic()
    clients = [_BackgroundGet(hub, f"/{REPO}/resolve/main/small.bin") for _ in range(n)]
    for c in clients:
        c.join(30)
    elapsed = time.monotonic() - started
    assert all(c.body == data for c in clients)
    return elapsed


def test_a_connection_cap_paces_each_response(hub: HubServer, blob_repo: dict[str, bytes]) -> None:
    data = blob_repo["small.bin"]  # 1 MiB
    hub.faults.connection_rate_bps = 4 * MiB
    elapsed = _fetch_at_once(hub, data, 2)
    # each response alone is capped (the burst is one chunk); two at once are not slower than one
    assert elapsed >= (len(data) - CHUNK_SIZE) / (4 * MiB)  # no upper bound on a shared machine


def test_a_link_cap_is_shared_by_every_connection(hub: HubServer, blob_repo: dict[str, bytes]) -> None:
    data = blob_repo["small.bin"]
    hub.faults.link_rate_bps = 8 * MiB
    elapsed = _fetch_at_once(hub, data, 4)
    assert elapsed >= (4 * len(data) - CHUNK_SIZE) / (8 * MiB)  # 4 MiB through an 8 MiB/s link


def test_a_hub_that_ignores_ranges_answers_the_whole_file(hub: HubServer, blob_repo: dict[str, bytes]) -> None:
    hub.faults.ignore_range = True
    status, headers, body = _get(hub, f"/{REPO}/resolve/main/small.bin", {"Range": "bytes=100-199"})
    assert status == 200 and body == blob_repo["small.bin"]
    assert "Accept-Ranges" not in headers and "Content-Range" not in headers


def test_hostile_answers_rename_what_the_tree_and_info_announce(hub: HubServer, blob_repo: dict[str, bytes]) -> None:
    hub.faults.announce_commit = "../../x"
    hub.faults.announce_paths = {"small.bin": "../small.bin"}
    hub.faults.announce_oids = {"big.safetensors": "../blob", "config.json": "f" * 40}
    api = HfApi(endpoint=hub.url, token=False)
    assert api.model_info(REPO).sha == "../../x"
    tree = {e.path: e for e in api.list_repo_tree(REPO, recursive=True)}
    assert "../small.bin" in tree and "small.bin" not in tree
    assert tree["big.safetensors"].lfs.sha256 == "../blob" and tree["config.json"].blob_id == "f" * 40
