"""The layer-by-layer loader against transformers' from_pretrained, on real tiny checkpoints.

Parity is exact (torch.equal): the loader must build the very same model, not a close one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from rbee_jupyter.errors import Cancelled, DeviceNotAvailable, InvalidCheckpoint, InvalidRequest, ModelNotFound
from rbee_jupyter.engine.loader import BlockInfo, LoadProgress, load_model, plan_blocks
from rbee_jupyter.testing import make_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore")

PROMPT = torch.tensor([[1, 5, 9, 33, 7, 100, 42]])
ROOT = Path(__file__).resolve().parents[1]

# mode → (load_model kwargs, from_pretrained kwargs); each side is written out, not derived.
MODES = {
    "default": ({}, {}),
    "bf16": ({"dtype": "bfloat16"}, {"dtype": torch.bfloat16}),
    "nf4": ({"quantization": "nf4"},
            {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")}),
    "fp4-double-quant": ({"quantization": "fp4", "double_quant": True},
                         {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                                                    bnb_4bit_use_double_quant=True)}),
    "int8": ({"quantization": "int8"}, {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Make (once per module) and return the folder of a tiny checkpoint."""
    cache: dict[tuple, Path] = {}

    def make(arch: str = "llama", **kwargs) -> Path:
        key = (arch, *sorted(kwargs.items()))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{arch}-model")
            cache[key] = make_tiny_model(folder, arch=arch, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="module")
def llama_sharded(model_dir) -> Path:
    return model_dir("llama", max_shard_size="100KB")


@pytest.fixture(scope="module")
def gpt2_tied(model_dir) -> Path:
    return model_dir("gpt2", tie_word_embeddings=True)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


def _greedy(model) -> torch.Tensor:
    return model.generate(PROMPT, max_new_tokens=5, do_sample=False)


def _assert_same_model(ours, reference) -> None:
    a, b = _logits(ours), _logits(reference)
    assert a.dtype == b.dtype
    assert torch.equal(a, b), f"max abs diff {(a - b).abs().max().item()}"
    assert torch.equal(_greedy(ours), _greedy(reference))


# --- parity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which", ["llama_sharded", "gpt2_tied"])
def test_parity_with_from_pretrained(request, which, mode):
    folder = request.getfixturevalue(which)
    ours_kwargs, theirs_kwargs = MODES[mode]
    reference = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", **theirs_kwargs)
    ours = load_model(folder, **ours_kwargs)
    assert not ours.training
    _assert_same_model(ours, reference)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "mistral", "gpt_neox", "phi"])
def test_every_architecture_loads_fp32_exactly(model_dir, arch):
    folder = model_dir(arch)
    reference = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    ours = load_model(folder, dtype="float32")
    a, b = _logits(ours), _logits(reference)
    assert torch.equal(a, b), f"{arch}: max abs diff {(a - b).abs().max().item()}"


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_prequantized_checkpoint_loads_as_saved(tmp_path, llama_sharded, quant):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True) \
        if quant == "nf4" else BitsAndBytesConfig(load_in_8bit=True)
    quantized = AutoModelForCausalLM.from_pretrained(llama_sharded, device_map="cpu", quantization_config=config)
    quantized.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "bitsandbytes"

    progress: list[LoadProgress] = []
    ours = load_model(tmp_path / "q", on_progress=progress.append)
    _assert_same_model(ours, quantized)
    planned = sum(b.bytes_after_quant for b in plan_blocks(tmp_path / "q"))
    assert progress[-1].bytes_on_device == {"cpu": planned}

    other = "fp4" if quant == "nf4" else "nf4"
    with pytest.raises(InvalidRequest, match="already quantized"):
        load_model(tmp_path / "q", quantization=other)


# --- blocks, progress, cancel ------------------------------------------------------------------

def test_blocks_are_found_by_structure_in_execution_order(gpt2_tied, llama_sharded):
    names = [b.name for b in plan_blocks(llama_sharded)]
    assert names == ["embeddings", "layers.0", "layers.1", "layers.2", "layers.3", "norm", "head"]
    gpt2 = {b.name: b for b in plan_blocks(gpt2_tied)}
    assert gpt2["embeddings"].modules == ("transformer.wte", "transformer.wpe")
    assert gpt2["layers.2"].modules == ("transformer.h.2",)
    assert gpt2["head"].tied_to == "embeddings" and gpt2["head"].bytes_after_quant == 0


@pytest.mark.parametrize("options", [{}, {"quantization": "nf4"}, {"quantization": "int8"},
                                     {"dtype": "float16"}])
def test_progress_counts_every_block_and_matches_the_plan(llama_sharded, options):
    blocks: list[BlockInfo] = plan_blocks(llama_sharded, **options)
    progress: list[LoadProgress] = []
    load_model(llama_sharded, on_progress=progress.append, **options)

    assert [p.layers_loaded for p in progress] == list(range(1, len(blocks) + 1))
    assert {p.layers_total for p in progress} == {len(blocks)}
    assert [p.block for p in progress] == [b.name for b in blocks]
    assert {p.device for p in progress} == {"cpu"}
    running = 0
    for block, event in zip(blocks, progress):  # planned sizes (from headers) equal the loaded tensors
        running += block.bytes_after_quant
        assert event.bytes_on_device == {"cpu": running}, block.name


def test_quantized_plan_is_smaller(llama_sharded):
    sizes = {q: sum(b.bytes for b in plan_blocks(llama_sharded, quantization=q)) for q in (None, "int8", "nf4")}
    assert sizes["nf4"] < sizes["int8"] < sizes[None]


def test_cancel_stops_between_blocks(llama_sharded):
    cancel = threading.Event()
    seen: list[int] = []

    def on_progress(p: LoadProgress) -> None:
        seen.append(p.layers_loaded)
        if p.layers_loaded == 2:
            cancel.set()

    with pytest.raises(Cancelled) as info:
        load_model(llama_sharded, on_progress=on_progress, cancel=cancel)
    assert seen == [1, 2]
    assert info.value.code == "CANCELLED" and info.value.details["layers_loaded"] == 2


# --- bad input ------------------------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_folder_without_config_is_invalid(tmp_path, llama_sharded):
    folder = _copy(llama_sharded, tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(InvalidCheckpoint, match="config.json"):
        load_model(folder)


def test_folder_without_safetensors_is_invalid(tmp_path, llama_sharded):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((llama_sharded / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(InvalidCheckpoint, match="No model.safetensors.*pytorch_model.bin"):
        load_model(folder)


def test_missing_folder_is_not_found(tmp_path):
    with pytest.raises(ModelNotFound):
        load_model(tmp_path / "nope")


@pytest.mark.parametrize("damage", ["truncate", "garbage-header"])
def test_corrupt_safetensors_fails_before_any_layer_loads(tmp_path, llama_sharded, damage):
    folder = _copy(llama_sharded, tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"\xff" * 64 + data[64:])
    progress: list[LoadProgress] = []
    with pytest.raises(InvalidCheckpoint, match=shard.name) as info:
        load_model(folder, on_progress=progress.append)
    assert progress == []
    assert info.value.code == "INVALID_CHECKPOINT" and info.value.status == 400


def test_missing_weight_is_named(tmp_path, model_dir):
    from safetensors.torch import load_file, save_file

    folder = _copy(model_dir("qwen2"), tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InvalidCheckpoint, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(folder)


def test_config_that_does_not_match_the_weights_is_invalid(tmp_path, llama_sharded):
    folder = _copy(llama_sharded, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidCheckpoint, match=r"does not match.*mlp\.\w+_proj\.weight"):
        load_model(folder)


def test_quantized_model_cannot_straddle_cpu_and_gpu(llama_sharded):
    plan = {b.name: "cpu" for b in plan_blocks(llama_sharded)} | {"head": "cuda:0"}
    with pytest.raises(InvalidRequest, match="split between the CPU and GPUs"):
        load_model(llama_sharded, quantization="nf4", device_map=plan)


@pytest.mark.parametrize("kwargs, field", [({"quantization": "q3"}, "quantization"),
                                           ({"dtype": "float8"}, "dtype"),
                                           ({"quantization": "nf4", "compute_dtype": "int4"}, "compute_dtype")])
def test_unknown_options_are_invalid_requests(llama_sharded, kwargs, field):
    with pytest.raises(InvalidRequest) as info:
        load_model(llama_sharded, **kwargs)
    assert info.value.details["field"] == field and info.value.status == 400


def test_plan_must_name_every_block(llama_sharded):
    with pytest.raises(InvalidRequest, match="missing"):
        load_model(llama_sharded, device_map={"embeddings": "cpu"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device_map", ["cuda:0", "auto", ["cuda:0"]])
def test_gpu_asked_for_without_gpu_is_refused(llama_sharded, device_map):
    with pytest.raises(DeviceNotAvailable) as info:
        load_model(llama_sharded, device_map=device_map)
    assert "cpu" in info.value.details["available"]


def test_explicit_per_block_plan_and_device_list_on_cpu(llama_sharded):
    plan = {b.name: "cpu" for b in plan_blocks(llama_sharded)}
    reference = _logits(AutoModelForCausalLM.from_pretrained(llama_sharded, device_map="cpu"))
    assert torch.equal(_logits(load_model(llama_sharded, device_map=plan)), reference)
    assert torch.equal(_logits(load_model(llama_sharded, device_map=["cpu"])), reference)


# --- host memory -------------------------------------------------------------------------------------

_MEMORY_PROBE = textwrap.dedent("""
    import gc, json, sys
    from rbee_jupyter.engine.loader import load_model, plan_blocks

    def rss_mb(field):
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith(field + ":")) / 1024

    folder = sys.argv[1]
    blocks = plan_blocks(folder, dtype="bfloat16")       # also warms every import and code path
    checkpoint_blocks = plan_blocks(folder, dtype="float32")
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:       # reset the peak (VmHWM) to the current RSS
        fh.write("5")
    before = rss_mb("VmRSS")
    model = load_model(folder, dtype="bfloat16")
    print(json.dumps({"grew_mb": rss_mb("VmHWM") - before,
                      "model_mb": sum(b.bytes for b in blocks) / 2**20,
                      "checkpoint_mb": sum(b.bytes for b in checkpoint_blocks) / 2**20,
                      "largest_checkpoint_block_mb": max(b.bytes for b in checkpoint_blocks) / 2**20}))
""")


def _random_llama_checkpoint(folder: Path, *, hidden: int, layers: int) -> Path:
    """A Llama checkpoint (~75 MB at hidden 512, 8 layers) written straight from random tensors.

    make_tiny_model would do, but its initialisation takes seconds at this size.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, vocab_size=512, tie_word_embeddings=False)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(p.shape, generator=generator) for name, p in skeleton.named_parameters()}
    folder.mkdir()
    config.save_pretrained(folder)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_host_memory_stays_within_one_block_of_the_model(tmp_path):
    """Loading an fp32 checkpoint as bf16 grows peak RSS by the model plus about one block.

    A bf16 load must read, cast and drop every fp32 tensor. A loader that builds a state
    dict first, or keeps the files mapped while it reads them, peaks at model + whole
    checkpoint (3x the model here); this one stays at model + one fp32 block or so.
    """
    folder = _random_llama_checkpoint(tmp_path / "m", hidden=512, layers=8)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(folder)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    allowed = m["model_mb"] + 2 * m["largest_checkpoint_block_mb"] + 16
    assert m["model_mb"] + m["checkpoint_mb"] > allowed + 20  # the failure modes would be caught
    assert m["grew_mb"] <= allowed, f"RSS grew {m['grew_mb']:.0f} MB, allowed {allowed:.0f} MB ({m})"
