"""Benchmark: rbee_jupyter.engine.loader.load_model against transformers' from_pretrained, on CPU.

Generates a ~520 MB Llama-shaped checkpoint (hidden 1024, 7 layers, vocab 32000, fp32,
sharded) and loads it with both loaders, fp32 and nf4, alternating the order every
round. Each measurement runs in a fresh subprocess, so import caches and allocator state
do not leak between runs and the peak RSS (``ru_maxrss``) belongs to that one load.
Imports (including transformers' lazy ones: the model's modeling module, bitsandbytes)
happen before the clock starts, for both loaders; time is the load call alone.

Peak RSS is reported twice: right after loading (safetensors maps files lazily, so fp32
weights that were never touched may not be resident yet) and after one forward pass,
which touches every weight.

Usage: python bench/load.py [--rounds 3] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPLS = ("rbee", "from_pretrained")
MODES = ("fp32", "nf4")


def make_model(folder: Path) -> Path:
    """A random Llama checkpoint of ~520 MB, written once (the vocab is too large for the tiny tokenizer maker)."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=7, num_attention_heads=16,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=512,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, max_shard_size="200MB")
    return folder


def child(impl: str, mode: str, folder: str) -> None:
    """One measurement; prints a JSON line."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from rbee_jupyter.engine.loader import load_model

    _warm_imports(folder, mode)

    def peak_mb() -> float:
        """VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would inherit the parent's peak."""
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024

    baseline = peak_mb()
    start = time.perf_counter()
    if impl == "rbee":
        model = load_model(folder, quantization="nf4" if mode == "nf4" else None)
    else:
        kwargs = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")} \
            if mode == "nf4" else {}
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", **kwargs)
    seconds = time.perf_counter() - start
    after_load = peak_mb()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]))
    print(json.dumps({"impl": impl, "mode": mode, "seconds": seconds, "baseline_mb": baseline,
                      "peak_load_mb": after_load, "peak_forward_mb": peak_mb()}))


def _warm_imports(folder: str, mode: str) -> None:
    """Import what either loader uses, so the clock times loading, not transformers' lazy imports."""
    import importlib

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    names = ["accelerate", "safetensors.torch", "transformers.core_model_loading", "transformers.conversion_mapping",
             "transformers.initialization", "transformers.quantizers.auto",
             f"transformers.models.{config.model_type}.modeling_{config.model_type}"]
    if mode == "nf4":
        names += ["bitsandbytes", "transformers.integrations.bitsandbytes"]
    for name in names:
        importlib.import_module(name)
    # transformers builds its table of checkpoint renamings for every architecture on first use
    # (~0.1 s of regex compiling); both loaders consult it, so it is warmed like an import.
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    get_checkpoint_conversion_mapping(config.model_type)


def measure(impl: str, mode: str, folder: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, __file__, "--child", impl, mode, str(folder)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    lines = [f"{'mode':<5} {'loader':<16} {'load s':>7} {'peak RSS load MB':>17} {'peak RSS +fwd MB':>17}"]
    summary = {}
    for mode in MODES:
        for impl in IMPLS:
            runs = [r for r in results if r["mode"] == mode and r["impl"] == impl]
            med = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "peak_load_mb", "peak_forward_mb")}
            summary[mode, impl] = med
            lines.append(f"{mode:<5} {impl:<16} {med['seconds']:>7.2f} {med['peak_load_mb']:>17.0f} "
                         f"{med['peak_forward_mb']:>17.0f}")
    lines.append("")
    lines.append(f"{'mode':<5} {'time ratio':>10} {'peak RSS ratio (load)':>22} {'peak RSS ratio (+fwd)':>22}"
                 "   (rbee / from_pretrained, median)")
    for mode in MODES:
        ours, theirs = summary[mode, "rbee"], summary[mode, "from_pretrained"]
        lines.append(f"{mode:<5} {ours['seconds'] / theirs['seconds']:>10.2f} "
                     f"{ours['peak_load_mb'] / theirs['peak_load_mb']:>22.2f} "
                     f"{ours['peak_forward_mb'] / theirs['peak_forward_mb']:>22.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse (or create) the checkpoint here")
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "MODE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="rbee-bench-") as tmp:
        folder = make_model(args.model_dir or Path(tmp) / "model")
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
        print(f"checkpoint: {folder} ({size:.0f} MB fp32), {args.rounds} rounds, CPU threads {os.cpu_count()}")
        results = []
        for round_ in range(args.rounds):
            for mode in MODES:
                order = IMPLS if round_ % 2 == 0 else tuple(reversed(IMPLS))
                for impl in order:
                    results.append(measure(impl, mode, folder))
                    r = results[-1]
                    print(f"  round {round_ + 1} {mode} {impl}: {r['seconds']:.2f} s, "
                          f"peak {r['peak_load_mb']:.0f} MB (+fwd {r['peak_forward_mb']:.0f} MB)", flush=True)
        print()
        print(table(results))


if __name__ == "__main__":
    from rbee_jupyter.quiet import transformers_bars_off

    with transformers_bars_off():  # the bench's lines only, no transformers bars among them
        main()
