"""Finding 7 (import side) and hostile inputs: what a user publishes cannot hurt the server.

A GGUF is parsed and dequantized in a helper process with a memory limit; a corrupt one
is a clean error for its loader only; a tokenizer.json that is not one fails that load, and
nothing else; ids of jobs and workers cannot be guessed.
"""

from __future__ import annotations

import os
import re
import threading

import pytest

from rbee_jupyter.errors import Cancelled, InvalidCheckpoint, OutOfMemory
from rbee_jupyter.hub.gguf import import_gguf, import_gguf_isolated, imported_dir
from rbee_jupyter.testing.tiny_gguf import make_tiny_gguf

from .conftest import PUBLIC, download, load_events

MIB = 1 << 20


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf", quant="Q8_0")


def test_an_import_runs_in_a_child_within_its_memory_limit(tiny_gguf, tmp_path):
    from safetensors.torch import load_file

    # Given enough memory, the child's import equals the in-process one
    progress = []
    out = import_gguf_isolated(tiny_gguf, imported_dir(tmp_path / "a", tiny_gguf), memory_bytes=2048 * MIB,
                               on_progress=progress.append)
    reference = import_gguf(tiny_gguf, imported_dir(tmp_path / "b", tiny_gguf))
    mine, theirs = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert mine.keys() == theirs.keys() and all((mine[k] == theirs[k]).all() for k in mine)
    assert progress[-1].step == "done" and progress[-1].fraction == 1.0

    # When the limit is too small for the file, Then OUT_OF_MEMORY, this process is untouched, nothing is left
    target = imported_dir(tmp_path / "c", tiny_gguf)
    with pytest.raises(OutOfMemory) as refused:
        import_gguf_isolated(tiny_gguf, target, memory_bytes=1 * MIB)
    assert refused.value.code == "OUT_OF_MEMORY"
    assert not target.exists() and (not target.parent.exists() or list(target.parent.iterdir()) == [])


def test_a_cancelled_child_import_leaves_nothing(tiny_gguf, tmp_path):
    cancel = threading.Event()
    target = imported_dir(tmp_path, tiny_gguf)

    def on_progress(p):
        if p.step == "reading gguf":
            cancel.set()
    with pytest.raises(Cancelled):
        import_gguf_isolated(tiny_gguf, target, memory_bytes=2048 * MIB, cancel=cancel, on_progress=on_progress)
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("damage", ["random", "header-only"])
def test_a_hostile_gguf_is_refused_in_the_child(tiny_gguf, tmp_path, damage):
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes({"random": os.urandom(64 * 1024), "header-only": data[:100]}[damage])
    with pytest.raises(InvalidCheckpoint) as refused:
        import_gguf_isolated(bad, tmp_path / "out", memory_bytes=2048 * MIB)
    assert "bad.gguf" in refused.value.message


async def test_a_hostile_gguf_on_the_hub_fails_only_its_own_load(team, tiny_gguf):
    team.publish("sec/hostile-gguf", base=tiny_gguf.parent,
                 files={"model.gguf": b"GGUF" + os.urandom(4096)})
    async with team.clients() as c:
        r, stream = await load_events(c["bob"], "hf:sec/hostile-gguf/model.gguf")
        assert r.status_code == 202, r.text
        last = stream.events[-1]
        assert last["stage"] == "error" and last["code"] == "INVALID_CHECKPOINT", last
        assert stream.done
        # the service goes on serving everyone
        assert (await c["alice"].get("v1/models")).status_code == 200


async def test_a_hostile_tokenizer_fails_only_its_own_load(team):
    team.publish("sec/hostile-tokenizer", files={"tokenizer.json": b'{"model": {"type": "BPE", "vocab": 7}}'})
    async with team.clients() as c:
        assert (await download(c["bob"], "hf:sec/hostile-tokenizer")).events[-1]["stage"] == "complete"
        r, stream = await load_events(c["bob"], "hf:sec/hostile-tokenizer")
        assert r.status_code == 202, r.text
        last = stream.events[-1]
        assert last["stage"] == "error" and last["code"] == "INVALID_CHECKPOINT", last
        assert "tokenizer" in last["message"] and stream.done
        workers = (await c["admin"].get("v1/workers")).json()["workers"]
        assert all(w["state"] == "failed" for w in workers if w["id"] == r.json()["worker_id"])


async def test_ids_cannot_be_guessed(team):
    async with team.clients() as c:
        ids = []
        for _ in range(3):
            r = await c["alice"].post("v1/models/download", json={"model_ref": f"hf:{PUBLIC}"})
            ids.append(r.json()["download_id"])
            await download(c["alice"], f"hf:{PUBLIC}")
        r, stream = await load_events(c["alice"], f"file://{team.allowed}/tiny")
        assert stream.events[-1]["stage"] == "ready"
        worker_id = r.json()["worker_id"]
        assert (await c["alice"].delete(f"v1/workers/{worker_id}")).status_code == 204
    # 128 random bits each: 32 hex digits, nothing shared between consecutive ones
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == 3
    assert re.fullmatch(r"w-[0-9a-f]{32}", worker_id)
    common = os.path.commonprefix(ids)
    assert len(common) < 6, ids


def test_header_reads_in_the_helper_stop_at_its_memory_limit(tmp_path):
    import json
    import struct

    from rbee_jupyter.hub.isolate import run_isolated

    # Given a folder whose (valid-looking, 25 MB) header parses into far more than 64 MB of objects
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    header = json.dumps({f"t{i}": entry for i in range(300_000)}).encode()
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)

    # When the hive's helper reads it with 64 MB to spare, Then OUT_OF_MEMORY there, not here
    with pytest.raises(OutOfMemory):
        run_isolated("rbee_jupyter.core.checkpoint:probe", {"folder": str(tmp_path)}, memory_bytes=64 * MIB)
    # and with room, the same helper reads it
    assert run_isolated("rbee_jupyter.core.checkpoint:probe", {"folder": str(tmp_path)},
                        memory_bytes=2048 * MIB) == 300_000
