"""Finding 1, last gaps: what was checked is what is read, for embedding models and GGUF files too.

sentence-transformers reads every file of a model by name, and a GGUF import reads its file
several times, in a child process: a folder of a group-writable cache swapped for a link
between the check and a read would redirect those reads. Embedding models are read from a
private copy made through checked descriptors, a GGUF through one descriptor the child
inherits. A worker killed inside the private-copy window leaves its copy; the next copy
sweeps it, and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile

import pytest

from rbee_jupyter.errors import InvalidCheckpoint

MIB = 1 << 20


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """This test's own temp folder, where private copies go (and must not stay)."""
    where = tmp_path / "tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


def _vectors(path, texts):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True)


# --- embedding models ---------------------------------------------------------------------------

def test_an_embedding_load_reads_what_was_checked_not_a_folder_swapped_in_later(
        rbee_tiny_embedder, tmp_path, private_tmp, monkeypatch):
    import numpy as np
    import sentence_transformers

    from rbee_jupyter.engine.embed import Embedder
    from rbee_jupyter.testing.tiny_embedder import make_tiny_embedder

    texts = ["the checked model", "answers this"]
    # Given an embedding model in a shared place, and an attacker's look-alike (other weights) elsewhere
    folder = tmp_path / "shared" / "embedder"
    shutil.copytree(rbee_tiny_embedder, folder)
    attackers = make_tiny_embedder(tmp_path / "attackers", seed=7)
    assert not np.allclose(_vectors(folder, texts), _vectors(attackers, texts))

    # When the folder is swapped for a link to the attacker's just before sentence-transformers reads it
    real = sentence_transformers.SentenceTransformer
    seen = []

    class Swapping(real):
        def __init__(self, path, *args, **kwargs):
            seen.append(path)
            folder.rename(folder.with_name("moved"))
            folder.symlink_to(attackers)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(sentence_transformers, "SentenceTransformer", Swapping)
    embedder = Embedder.load(str(folder))
    monkeypatch.undo()

    # Then the vectors are the checked model's own, read from a private copy that is gone now
    assert folder.is_symlink()
    mine = embedder.model.encode(texts, convert_to_numpy=True)
    assert np.allclose(mine, _vectors(rbee_tiny_embedder, texts), atol=1e-6)
    (copy,) = seen
    assert str(copy).startswith(str(private_tmp)) and not os.path.exists(copy)
    assert list(private_tmp.iterdir()) == []


def test_the_private_copy_of_an_embedding_model(rbee_tiny_embedder, tmp_path, private_tmp, monkeypatch):
    from rbee_jupyter.core import confine
    from rbee_jupyter.engine.embed import Embedder, _module_folders

    folder = tmp_path / "embedder"
    shutil.copytree(rbee_tiny_embedder, folder)
    (folder / "onnx").mkdir()  # what a hub snapshot also holds, and a torch load never reads
    (folder / "onnx" / "model.onnx").write_bytes(b"x" * 1000)
    (folder / "openvino").mkdir()
    (folder / "openvino" / "openvino_model.bin").write_bytes(b"x" * 1000)
    where = confine.check_folder(folder)
    modules = _module_folders(where)
    assert "1_Pooling" in modules

    # The copy holds the module folders and the safetensors weights, 0700, and nothing of ONNX/OpenVINO
    with confine.private_copy(where, weights=True, folders=modules) as copy:
        assert stat.S_IMODE(copy.stat().st_mode) == 0o700
        names = {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()}
        assert {"modules.json", "config.json", "model.safetensors", "1_Pooling/config.json"} <= names
        assert not any(n.startswith(("onnx", "openvino")) for n in names)
    assert not copy.exists()

    # A module folder named outside the model is refused; so is a model larger than the stated cap
    with pytest.raises(InvalidCheckpoint, match="absolute names and '..' are not allowed"):
        with confine.private_copy(where, weights=True, folders=["../elsewhere"]):
            pass
    monkeypatch.setattr(confine, "COPY_BYTES", 1000)
    with pytest.raises(InvalidCheckpoint, match="may take at most") as refused:
        Embedder.load(str(folder))
    assert refused.value.code == "INVALID_CHECKPOINT"
    assert list(private_tmp.iterdir()) == []


def test_an_embedding_model_linking_outside_its_folder_is_refused(rbee_tiny_embedder, tmp_path):
    from rbee_jupyter.engine.embed import Embedder

    # a module's config linked to a file outside the model folder (another user's, say)
    folder = tmp_path / "embedder"
    shutil.copytree(rbee_tiny_embedder, folder)
    secret = tmp_path / "secret.json"
    shutil.copy(folder / "1_Pooling" / "config.json", secret)
    (folder / "1_Pooling" / "config.json").unlink()
    (folder / "1_Pooling" / "config.json").symlink_to(secret)
    with pytest.raises(InvalidCheckpoint, match="resolves outside the folder"):
        Embedder.load(str(folder))
    assert Embedder.load(str(folder), confined=False).dimension == 32  # a single user's own folder: as before


def test_an_asymmetric_model_loads_from_its_copy_and_its_branches_stay_inside(rbee_tiny_embedder, tmp_path,
                                                                               private_tmp):
    """A Router's query and document branches live in folders only its router_config.json names: the copy
    holds them (the model loads, and encodes as sentence-transformers does from the folder itself), and a
    branch named outside the model is refused like any module folder."""
    from sentence_transformers import SentenceTransformer

    from rbee_jupyter.engine.embed import Embedder
    from rbee_jupyter.testing.tiny_embedder import make_tiny_router_embedder

    folder = make_tiny_router_embedder(tmp_path / "routed", rbee_tiny_embedder)
    texts = ["a question", "a passage of text"]
    direct = SentenceTransformer(str(folder), device="cpu")
    want = {task: direct.encode(texts, task=task) for task in ("query", "document")}
    assert not (want["query"] == want["document"]).all()  # two branches, two different models

    embedder = Embedder.load(str(folder))
    for task, vectors in want.items():
        assert (embedder.model.encode(texts, task=task) == vectors).all()
    assert list(private_tmp.iterdir()) == []

    config = json.loads((folder / "router_config.json").read_text())
    config["types"] = {"../../elsewhere": next(iter(config["types"].values()))}
    (folder / "router_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidCheckpoint, match="absolute names and '..' are not allowed"):
        Embedder.load(str(folder))
    config["types"] = {f"branch_{i}": "sentence_transformers.sentence_transformer.modules.Transformer"
                       for i in range(300)}
    (folder / "router_config.json").write_text(json.dumps(config))  # a hostile config: bounded, not walked
    with pytest.raises(InvalidCheckpoint, match="names more than 256 module folders"):
        Embedder.load(str(folder))


# --- GGUF ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_ggufs(tmp_path_factory):
    from rbee_jupyter.testing.tiny_gguf import make_tiny_gguf

    base = tmp_path_factory.mktemp("gguf")
    return (make_tiny_gguf(base / "a" / "tiny.Q8_0.gguf", quant="Q8_0"),
            make_tiny_gguf(base / "b" / "tiny.Q8_0.gguf", quant="Q8_0", seed=5))


def test_a_gguf_is_read_through_the_descriptor_checked_not_a_file_swapped_in(two_ggufs, tmp_path):
    from safetensors.torch import load_file

    from rbee_jupyter.core.confine import resolve_inside
    from rbee_jupyter.hub.gguf import MARKER, import_gguf, import_gguf_isolated, imported_dir, opened

    mine, attackers = two_ggufs
    folder = tmp_path / "shared" / "m"
    folder.mkdir(parents=True)
    shutil.copy(mine, folder / "tiny.Q8_0.gguf")
    checked = resolve_inside(folder, "tiny.Q8_0.gguf")
    reference = import_gguf(mine, tmp_path / "reference")

    # Given a GGUF checked and opened, When its folder is then swapped for a link to an attacker's GGUF
    with opened(checked, resolved=True) as fd:
        target = imported_dir(tmp_path / "cache", checked, fd=fd)
        folder.rename(folder.with_name("moved"))
        folder.symlink_to(attackers.parent)
        out = import_gguf_isolated(checked, target, fd=fd, memory_bytes=2048 * MIB)
    # Then the child imported the file that was checked, not the attacker's
    got, want = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)
    source = json.loads((out / MARKER).read_text())["source"]
    assert source["head_tail_sha256"] == json.loads((reference / MARKER).read_text())["source"]["head_tail_sha256"]

    # And a checked path that leads through a link now is refused, before anything is read
    with pytest.raises(InvalidCheckpoint, match="replaced by a link") as refused:
        with opened(checked, resolved=True):
            pass
    assert refused.value.code == "INVALID_CHECKPOINT"


async def test_a_local_gguf_swapped_for_a_link_after_post_is_not_read(two_ggufs, tmp_path):
    """Service mode: a ``file://`` GGUF is allowed at POST; by the time its import runs, bob has swapped it
    for a link to a GGUF outside the allowed folders. The import checks again and reads nothing of it."""
    from rbee_jupyter.core.hive import Hive, HiveConfig
    from rbee_jupyter.core.jobs import JobState
    from rbee_jupyter.core.owners import Principal

    mine, outside = two_ggufs
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    path = allowed / "tiny.Q8_0.gguf"
    shutil.copy(mine, path)
    hive = Hive(HiveConfig(cache_dir=tmp_path / "cache", catalog_path=tmp_path / "catalog.sqlite", service_mode=True,
                           allowed_local_dirs=(str(allowed),)))
    try:
        job = hive.download(f"file://{path}", principal=Principal("alice"))  # checked here: inside the allowed folder
        path.unlink()
        path.symlink_to(outside)  # before the job's first step runs
        assert await job.wait(120) is JobState.ERROR
        error = job.last.event
        assert error.code == "ACCESS_DENIED" and "outside the folders" in error.message
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))
        assert hive.catalog.get(f"file://{path}") is None
    finally:
        await hive.stop()


async def test_a_local_folder_swapped_for_a_link_after_post_is_not_loaded(rbee_tiny_model, tmp_path):
    """Service mode: a ``file://`` folder allowed at POST is checked again when its load starts; swapped by
    then for a link to a model outside the allowed folders, the load fails and no worker starts.
    (A swap after this check is the worker's to refuse: ``test_worker.py``, a pinned path.)"""
    from rbee_jupyter.core.hive import Hive, HiveConfig
    from rbee_jupyter.core.jobs import JobState
    from rbee_jupyter.core.owners import Principal

    allowed = tmp_path / "allowed"
    path = allowed / "tiny"
    shutil.copytree(rbee_tiny_model, path)
    hive = Hive(HiveConfig(cache_dir=tmp_path / "cache", catalog_path=tmp_path / "catalog.sqlite", service_mode=True,
                           allowed_local_dirs=(str(allowed),)))
    try:  # registered once (a file:// model is catalogued like a download), then loaded: no download step
        assert await hive.download(f"file://{path}", principal=Principal("alice")).wait(120) is JobState.COMPLETE
        job = await hive.load_async({"model_ref": f"file://{path}", "device": "cpu"}, principal=Principal("alice"))
        shutil.rmtree(path)
        path.symlink_to(rbee_tiny_model)  # outside the allowed folders; before the job's first step runs
        assert await job.wait(120) is JobState.ERROR
        error = job.last.event
        assert error.code == "ACCESS_DENIED" and "outside the folders" in error.message
        assert hive.workers() == []
    finally:
        await hive.stop()


# --- private copies left by killed workers ----------------------------------------------------------

_HOLD_A_COPY = """
import sys, tempfile
tempfile.tempdir = sys.argv[2]
from rbee_jupyter.core.confine import private_copy
with private_copy(sys.argv[1]) as copy:
    print(copy, flush=True)
    sys.stdin.read()
"""


def test_a_copy_left_by_a_killed_process_is_swept_and_nothing_else(rbee_tiny_model, tmp_path, private_tmp):
    from rbee_jupyter.core.confine import private_copy

    # Given a process killed with SIGKILL inside its private-copy window
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_A_COPY, str(rbee_tiny_model), str(private_tmp)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    left = proc.stdout.readline().strip()
    assert os.path.basename(left).startswith(f"rbee-load-{proc.pid}-")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    # and, beside its copy, one of a live process, a folder of another name, and a link of the pattern
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "keep.txt").write_text("keep")
        kept = [private_tmp / f"rbee-load-{live.pid}-x", private_tmp / "rbee-load-other", private_tmp / "unrelated"]
        for path in kept:
            path.mkdir()
            (path / "file").write_text("x")
        link = private_tmp / f"rbee-load-{proc.pid}-link"
        link.symlink_to(outside)
        kept.append(link)
        (private_tmp / os.path.basename(left) / "planted").symlink_to(outside / "keep.txt")

        # When another load makes its private copy
        with private_copy(rbee_tiny_model):
            pass
    finally:
        live.kill()
        live.wait(30)

    # Then the dead process's copy is gone; everything else, and what links pointed at, is kept
    assert not os.path.exists(left)
    assert all(os.path.lexists(p) for p in kept)
    assert (outside / "keep.txt").read_text() == "keep"
    assert sorted(p.name for p in private_tmp.iterdir()) == sorted(p.name for p in kept)
