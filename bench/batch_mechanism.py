"""Which batching mechanism for the worker: our BatchDecoder vs transformers' ``generate_batch``.

In this process, same model, same prompts, greedy, ``--tokens`` new tokens for each of
``--batch`` sequences that all start together (the case both handle). Alternating rounds:

* ``single``: :class:`Generator` one sequence after another (today's worker), the anchor;
* ``rbee``: :class:`BatchDecoder` (engine/batch.py), every sequence prefilled then stepped together;
* ``hf-cb``: ``model.generate_batch`` (transformers' continuous batching, paged attention),
  with its warm-up before the clock.

Reports aggregate tok/s (all new tokens / wall time) per mechanism and the ratio to ``single``.
Models: ``tiny`` (the tests' Llama, hidden 64) and ``135m`` (SmolLM2-135M's shape, random
weights, as bench/inference.py makes it); weights ``none`` (fp32), ``bf16``, ``nf4``, ``int8``
(bitsandbytes, quantized at load as the worker does).

Usage: python bench/batch_mechanism.py [--models tiny,135m] [--quant none,bf16,nf4,int8] [--batch 8]
                                       [--tokens 16] [--rounds 2] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PROMPTS = ["Once upon a time", "The quick brown fox jumps over", "Jupyter notebooks run Python code",
           "Layers load one by one onto the GPU", "Hello world", "a b c d e f g", "Bonjour le monde",
           "The lazy dog sleeps all day long"]


def model_dir(name: str, work: Path, reuse: Path | None = None) -> Path:
    if name == "tiny":
        from rbee_jupyter.testing.tiny_model import make_tiny_model

        return make_tiny_model(work / "tiny")
    from inference import make_model

    return make_model(reuse or work / "smollm2-135m-shape")


def run_single(gen, prompts, tokens) -> int:
    from rbee_jupyter.engine.generate import GenerationRequest

    n = 0
    for p in prompts:
        stream = gen.stream(GenerationRequest(prompt=p, max_tokens=tokens))
        for _ in stream:
            pass
        n += stream.stats.completion_tokens
    return n


def run_rbee(gen, prompts, tokens) -> int:
    from rbee_jupyter.engine.batch import BatchDecoder, BatchSequence
    from rbee_jupyter.engine.generate import GenerationRequest

    made = []
    dec = BatchDecoder(gen, on_chunk=lambda s, c: None, on_done=lambda s, st: made.append(st.completion_tokens))
    for i, p in enumerate(prompts):
        req = GenerationRequest(prompt=p, max_tokens=tokens)
        dec.add(BatchSequence(str(i), req, gen.encode(req)))
    while dec.rows:
        dec.step()
    return sum(made)


def run_hf(model, ids, tokens) -> int:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    out = model.generate_batch(inputs=ids, generation_config=config, warmup=False)
    return sum(len(o.generated_tokens) for o in out.values())


def bench(name: str, quant: str, args, work: Path) -> dict[str, float]:
    import torch
    from transformers import AutoTokenizer

    from rbee_jupyter.engine.generate import Generator
    from rbee_jupyter.engine.loader import load_model

    torch.manual_seed(0)
    folder = model_dir(name, work, args.model_dir)
    model = load_model(folder, quantization=quant if quant in ("nf4", "fp4", "int8") else None,
                       dtype="bfloat16" if quant == "bf16" else None)
    tok = AutoTokenizer.from_pretrained(folder)
    gen = Generator(model, tok)
    gen.eos_token_ids = frozenset()  # random weights: run the full length everywhere
    prompts = (PROMPTS * (args.batch // len(PROMPTS) + 1))[:args.batch]
    ids = [tok(p)["input_ids"] for p in prompts]
    runs = {"single": lambda: run_single(gen, prompts, args.tokens),
            "rbee": lambda: run_rbee(gen, prompts, args.tokens),
            "hf-cb": lambda: run_hf(model, ids, args.tokens)}
    try:
        run_hf(model, ids[:1], 2)  # its warm-up and kernel choices, off the clock
    except Exception as exc:  # noqa: BLE001 - report and bench the rest
        print(f"  hf-cb unavailable for {name}/{quant}: {type(exc).__name__}: {exc}")
        del runs["hf-cb"]
    rates: dict[str, list[float]] = {k: [] for k in runs}
    order = list(runs)
    for r in range(args.rounds):
        for key in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            n = runs[key]()
            rates[key].append(n / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,135m")
    ap.add_argument("--quant", default="none,nf4")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model-dir", type=Path, default=None, help="reuse (or create) the 135M checkpoint here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name in args.models.split(","):
            for quant in args.quant.split(","):
                rates = bench(name, quant, args, Path(tmp))
                rows.append((name, quant, rates))
                print(name, quant, {k: round(v, 1) for k, v in rates.items()}, flush=True)
    print(f"\n| model | weights | single tok/s | rbee BatchDecoder ×{args.batch} | hf generate_batch ×{args.batch} |")
    print("|---|---|---:|---:|---:|")
    for name, quant, r in rows:
        single = r["single"]
        cells = [f"{r[k]:.1f} ({r[k] / single:.2f}×)" if k in r else "n/a" for k in ("rbee", "hf-cb")]
        print(f"| {name} | {'fp32' if quant == 'none' else quant} | {single:.1f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
