"""A hostile (or broken) hub: every name it answers that would become a path is checked first.

The commit sha names the snapshot folder, a file's hash names its blob and lock, and each
path of the tree names a link in the snapshot. Each bad answer here must fail the download
with ``DOWNLOAD_FAILED`` before a single file is requested, and write nothing anywhere.
"""

import pytest

from rbee_jupyter.testing.pytest_plugin import TINY_REPO
from rbee_jupyter.testing.sse import read_stream

TINY = f"hf:{TINY_REPO}"
WEIGHTS = "model.safetensors"


async def download_events(http) -> list[dict]:
    r = await http.post("v1/models/download", json={"model_ref": TINY})
    assert r.status_code == 202, r.text
    stream = await read_stream(http, "GET", f"v1/models/download/progress?id={r.json()['download_id']}")
    assert stream.done
    return stream.events


@pytest.mark.parametrize("fault, value, field", [
    ("announce_commit", "../../../../tmp/rbee-escape", "commit sha"),
    ("announce_commit", "abc123", "commit sha"),
    ("announce_commit", "A" * 40, "commit sha"),
    ("announce_paths", {"config.json": "../../../escape.json"}, "file path"),
    ("announce_paths", {"config.json": "/etc/escape.json"}, "file path"),
    ("announce_paths", {"config.json": "sub\\..\\..\\escape.json"}, "file path"),
    ("announce_paths", {"config.json": "sub/./config.json"}, "file path"),
    ("announce_paths", {"config.json": "nul\0.json"}, "file path"),
    ("announce_oids", {WEIGHTS: "../../../escape"}, "file hash"),
    ("announce_oids", {WEIGHTS: "ab" * 20}, "file hash"),  # 40 hex where an LFS sha256 has 64
    ("announce_oids", {"config.json": "../" + "0" * 37}, "file hash"),
])
async def test_unsafe_names_from_the_hub_fail_before_any_file_is_fetched(rbee_http, rbee_hub, rbee_cache_dir,
                                                                           tmp_path, fault, value, field):
    setattr(rbee_hub.faults, fault, value)
    # When
    events = await download_events(rbee_http)
    # Then: one clear error, naming what was wrong, and not one file requested or written
    error = events[-1]
    assert error["stage"] == "error" and error["code"] == "DOWNLOAD_FAILED", error
    assert error["details"]["reason"] == "unsafe_hub_answer" and error["details"]["field"] == field
    assert "unsafe" in error["message"] and "hub_endpoint" in error["message"]
    assert [r.path for r in rbee_hub.requests if "/resolve/" in r.path] == []
    assert not list(rbee_cache_dir.rglob("*escape*")) and not list(tmp_path.parent.rglob("rbee-escape"))
    assert not list(rbee_cache_dir.rglob("snapshots/*"))
    assert (await rbee_http.get("v1/models")).json()["models"] == []


async def test_a_snapshot_folder_linked_elsewhere_is_refused(rbee_http, rbee_hub, rbee_cache_dir, tmp_path):
    """A path of the tree that is fine as text but lands outside the snapshot through a link on disk."""
    outside = tmp_path / "outside"
    outside.mkdir()
    sha = rbee_hub.add_repo(TINY_REPO + "-linked", extra_files={"sub/config.json": b"{}",
                                                                "model.safetensors": b"\0" * 16})
    snapshot = rbee_cache_dir / f"models--{TINY_REPO.replace('/', '--')}-linked" / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (snapshot / "sub").symlink_to(outside)
    r = await rbee_http.post("v1/models/download", json={"model_ref": TINY + "-linked"})
    stream = await read_stream(rbee_http, "GET", f"v1/models/download/progress?id={r.json()['download_id']}")
    error = stream.events[-1]
    assert error["code"] == "DOWNLOAD_FAILED" and error["details"]["field"] == "file path", error
    assert list(outside.iterdir()) == []
