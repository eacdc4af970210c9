"""GPU check: a ~1B-parameter Llama loaded nf4 on cuda:0 by rbee (a real worker, and in-process)
against transformers ``from_pretrained`` + ``BitsAndBytesConfig``.

Run it through ``bash bench/gpu_check.sh`` (checks CUDA, installs the project if needed
without touching torch). Steps, each measured load in a fresh subprocess (so CUDA memory
and allocator state belong to that one load; imports and CUDA initialisation happen before
the clock):

1. Write a random Llama (hidden 2048, 20 layers, intermediate 5632, 32 heads, 4 KV heads,
   vocab 32000: ~1.0B parameters, ~2 GB of bf16 safetensors in 1 GB shards) to local disk;
   EOS is an id the model cannot emit, so generations have a fixed length.
2. rbee worker: ``Hive`` + ``LocalProcessPool`` (the server's own code path, without HTTP),
   ``load {device: cuda:0, quantization: nf4, dtype: bfloat16}``: request -> ``ready`` time,
   the ``vram_mb`` of its loading events, the worker's own timeline, then a greedy generation
   through the worker; then the same load again, handed to the spare worker the first load's
   end started (``spare_worker``): its request -> ``ready`` time, and the same text.
3. rbee in-process: ``loader.load_model(..., device_map="cuda:0")``: load time,
   ``torch.cuda.memory_allocated``, the loader's own byte count, logits of a fixed input,
   and a greedy generation with ``generate.Generator`` (the worker's code) to check the
   worker's text.
4. transformers: ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
   bnb_4bit_quant_type="nf4"), dtype=bfloat16, device_map="cuda:0")``, same numbers; its
   logits must equal rbee's (``torch.equal``).
5. With 2+ GPUs: rbee in-process split half/half over cuda:0 and cuda:1 (an explicit block
   plan); logits must equal the single-device ones.
6. Across devices on any machine: bf16 (unquantized) split half/half over cuda:0 and the CPU,
   rbee (the block plan) against ``from_pretrained`` with the same plan as ``device_map``
   (``loader.device_map_for``): hidden states really move between devices, and the logits and
   greedy text must be equal. (The two sides run the same kernels on the same devices, so
   this one is exact even where CPU and GPU kernels differ.)

7. Batching (issue 16), in one fresh process per weights type, nf4 and bf16 on ``device``:
   the worker's ``BatchDecoder`` (driven as ``worker/batcher.py`` drives it when N requests
   arrive together: one padded prefill, then one step per token) against transformers'
   ``model.generate`` over the same N prompts as one left-padded batch, same model object,
   N = 1, 8, 32 (``--batch-sizes``), greedy, a fixed number of new tokens, rounds alternating
   (which side goes first flips): aggregate and per-sequence tok/s, the ratio to N=1 and
   rbee/generate; whether each row's text at N=8 equals the same prompt decoded alone (for
   both sides). Then the worker-thread question: one sequence decoded in the main thread, in a
   long-lived thread fed jobs (like the worker's ``rbee-batch`` thread) and in a fresh thread
   per run (what step 3's "second thread" figure is), alternating, medians.

``--only load`` runs steps 1-6, ``--only batching`` steps 1 and 7: ~3-4 min on an H200,
estimated from the H100's rates (nf4 with float32 compute ~12 tok/s for one sequence, so
~2.7 s per 32-token run, whatever N, and ~36 such runs per weights type: ~100 s; bf16 a few
times faster; the model written in ~30 s); the whole script ~6-8 min.

The 4-bit compute dtype is transformers' default (float32) on both sides, because that is
what the worker API gives; ``--compute-dtype bfloat16`` sets it for the in-process pair
and the batching rows (the worker's text is then not compared).

``--cpu-dry-run`` runs every step on the CPU with a tiny model (hidden 64, 4 layers), so
the script is known to work on a machine without a GPU; step 5 then "splits" over cpu+cpu,
and step 7 makes 8 tokens per sequence in one round (bitsandbytes' CPU 4-bit kernels are slow).
Exit code 0 when every check passed, 1 when one failed, 2 when CUDA is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROMPT = "Once upon a time, in a notebook far away,"
FULL = {"hidden": 2048, "layers": 20, "intermediate": 5632, "heads": 32, "kv_heads": 4, "vocab": 32000}
XDEV = ("xrbee", "xhf")
TINY = {"hidden": 64, "layers": 4, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 512}


# --- children (each a fresh process) --------------------------------------------------------------

def child_make(folder: str, shape: dict, device: str) -> dict:
    """Random bf16 Llama + a tokenizer that covers every id (tiny BPE padded with added tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from rbee_jupyter.testing.tiny_model import make_tokenizer

    tok = make_tokenizer(512)
    vocab = max(shape["vocab"], len(tok))
    if len(tok) < vocab:
        tok.add_tokens([f"<w{i}>" for i in range(vocab - len(tok))])
    config = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], vocab_size=vocab, max_position_embeddings=2048,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=vocab)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=vocab, pad_token_id=vocab,
                                               do_sample=False)
    model.save_pretrained(folder, max_shard_size="1GB")
    tok.save_pretrained(folder)
    return {"params": sum(p.numel() for p in model.parameters()), "vocab": vocab}


def _logits_input(vocab: int):
    import torch

    return (torch.arange(32) * 7919 % min(vocab, 500) + 3).unsqueeze(0)


def _sync(devices: list[str]) -> None:
    import torch

    for d in devices:
        if d.startswith("cuda"):
            torch.cuda.synchronize(d)


def _warm_imports(folder: str) -> None:
    """What either loader imports lazily, imported before the clock (as bench/load.py does)."""
    import importlib

    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(folder).model_type
    for name in ("accelerate", "safetensors.torch", "transformers.core_model_loading", "transformers.conversion_mapping",
                 "transformers.initialization", "transformers.quantizers.auto", "transformers.integrations.bitsandbytes",
                 f"transformers.models.{model_type}.modeling_{model_type}"):
        try:
            importlib.import_module(name)
        except ImportError:  # a module some transformers version does not have
            pass


def child_load(impl: str, folder: str, device: str, out: str, compute_dtype: str | None, tokens: int) -> dict:
    """One in-process load: ``rbee`` (load_model), ``hf`` (from_pretrained), ``split`` (rbee nf4 over two
    devices), or ``xrbee`` / ``xhf`` (each loader, bf16 unquantized, split over ``device`` and the CPU)."""
    import bitsandbytes  # noqa: F401 - imported before the clock, like everything else
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from rbee_jupyter.engine.generate import GenerationRequest, Generator
    from rbee_jupyter.engine.loader import device_map_for, load_model, plan_blocks

    _warm_imports(folder)
    cuda = device.startswith("cuda")
    quant = None if impl in XDEV else "nf4"
    devices = {"split": ["cuda:0", "cuda:1"] if cuda else ["cpu", "cpu"],
               "xrbee": [device, "cpu"], "xhf": [device, "cpu"]}.get(impl, [device])
    gpus = [d for d in dict.fromkeys(devices) if d.startswith("cuda")]
    for d in gpus:
        torch.empty(1, device=d)  # CUDA context before the clock
        torch.cuda.reset_peak_memory_stats(d)
    base = {d: torch.cuda.memory_allocated(d) for d in gpus}
    compute = getattr(torch, compute_dtype) if compute_dtype and quant else None
    progress: list[Any] = []
    plan: Any = device
    if len(devices) > 1:  # the first half of the blocks on the first device, the rest on the second
        blocks = plan_blocks(folder, quantization=quant, dtype="bfloat16")
        plan = {b.name: devices[0] if i < len(blocks) // 2 else devices[1] for i, b in enumerate(blocks)}
        if impl == "xhf":
            plan = device_map_for(blocks, plan)
    if impl == "hf":
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 **({"bnb_4bit_compute_dtype": compute} if compute else {}))
    _sync(devices)
    t0 = time.perf_counter()
    if impl == "hf":
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=torch.bfloat16,
                                                     device_map=device)
    elif impl == "xhf":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=plan)
    else:
        model = load_model(folder, quantization=quant, dtype="bfloat16", compute_dtype=compute, device_map=plan,
                           on_progress=progress.append)
    _sync(devices)
    seconds = time.perf_counter() - t0
    result: dict[str, Any] = {"impl": impl, "seconds": seconds, "devices": devices}
    if gpus:
        result["allocated_mb"] = {d: (torch.cuda.memory_allocated(d) - base[d]) / 2**20 for d in base}
        result["peak_mb"] = {d: (torch.cuda.max_memory_allocated(d) - base[d]) / 2**20 for d in base}
    else:  # no allocator to ask: the tensors' own bytes
        from rbee_jupyter.engine.loader import _loaded_bytes

        total = sum(_loaded_bytes(t) for t in [*model.parameters(), *model.buffers()])
        result["allocated_mb"] = {"cpu": total / 2**20}
    if progress:
        last = progress[-1]
        result["events_mb"] = {d: b / 2**20 for d, b in last.bytes_on_device.items()}
        result["blocks"] = last.layers_total
    first = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(_logits_input(model.config.vocab_size).to(first)).logits.float().cpu()
    torch.save(logits, out)
    tok = AutoTokenizer.from_pretrained(folder)

    def greedy(n_tokens: int) -> tuple[str, int]:
        if impl in ("hf", "xhf"):
            ids = tok(PROMPT, return_tensors="pt").input_ids.to(first)
            with torch.inference_mode():
                gen = model.generate(ids, max_new_tokens=n_tokens, do_sample=False)
            return tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True), gen.shape[1] - ids.shape[1]
        stream = Generator(model, tok).stream(GenerationRequest(prompt=PROMPT, max_tokens=n_tokens, temperature=0.0))
        text = "".join(c.text for c in stream)
        return text, stream.stats.completion_tokens

    greedy(4)  # one-time costs (kernel selection, workspaces) off the clock, as for the worker
    _sync(devices)
    t1 = time.perf_counter()
    text, n = greedy(tokens)
    _sync(devices)
    result.update(text=text, tokens=n, tps=n / (time.perf_counter() - t1))
    if impl == "rbee":  # the worker generates in a thread of its own: does a thread alone cost speed?
        import threading

        box: dict[str, float] = {}

        def in_thread() -> None:
            t = time.perf_counter()
            _, m = greedy(tokens)
            _sync(devices)
            box["tps"] = m / (time.perf_counter() - t)

        worker_like = threading.Thread(target=in_thread)
        worker_like.start()
        worker_like.join()
        result["tps_thread"] = box.get("tps")
    return result


# --- batching rows (issue 16): the worker's BatchDecoder at N sequences vs a padded generate ---------

BATCH_SIZES = (1, 8, 32)
SAME_TEXT_N = 8  # the rows whose text at this N is compared with the same prompt decoded alone
_SUBJECTS = ["Once upon a time, in a notebook far away,", "The quick brown fox jumps over", "Jupyter notebooks run",
             "Layers load one by one onto the GPU and", "Hello world, said the kernel", "a b c d e f g",
             "Bonjour le monde, dit le modèle", "The lazy dog sleeps all day long while the"]
_TAILS = ["", " and then", " because the cells ran in order", " so", " while the server waited for more"]


def batch_prompts(n: int) -> list[str]:
    """``n`` distinct prompts of varied lengths, so a batch really has left padding."""
    return [_SUBJECTS[i % len(_SUBJECTS)] + _TAILS[(i // len(_SUBJECTS)) % len(_TAILS)]
            + (f" ({i})" if i >= len(_SUBJECTS) * len(_TAILS) else "") for i in range(n)]


def decode_rbee(gen: Any, prompt_ids: list[list[int]], tokens: int) -> tuple[list[str], int]:
    """Greedy ``tokens`` for every prompt through the worker's decoder, driven as
    ``worker/batcher.py``'s loop drives it when they all arrive at once: one ``add_all``
    (one padded prefill), then ``step`` until every row left. Returns texts and new tokens."""
    from rbee_jupyter.engine.batch import BatchDecoder, BatchSequence
    from rbee_jupyter.engine.generate import GenerationRequest

    texts: dict[str, list[str]] = {str(i): [] for i in range(len(prompt_ids))}
    made: list[int] = []
    dec = BatchDecoder(gen, on_chunk=lambda s, c: texts[s.id].append(c.text),
                       on_done=lambda s, st: made.append(st.completion_tokens))
    req = GenerationRequest(prompt="(encoded before the clock)", max_tokens=tokens, temperature=0.0)
    dec.cancel_flagged()
    dec.add_all([BatchSequence(str(i), req, ids) for i, ids in enumerate(prompt_ids)])
    while dec.rows:
        dec.step()
    return ["".join(texts[str(i)]) for i in range(len(prompt_ids))], sum(made)


def decode_hf(model: Any, tok: Any, prompt_ids: list[list[int]], tokens: int) -> tuple[list[str], int]:
    """The anchor: transformers' ``model.generate`` over the same prompts as one left-padded batch."""
    import torch

    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[p[0]] * (width - len(p)) + p for p in prompt_ids], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], dtype=torch.long)
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=tokens,
                             do_sample=False)  # EOS is an id the model cannot emit: always ``tokens`` new
    new = out[:, width:].cpu()
    return [tok.decode(row, skip_special_tokens=True) for row in new], int(new.numel())


def child_batch(folder: str, device: str, weights: str, compute_dtype: str | None, tokens: int,
                sizes: list[int], rounds: int) -> dict:
    """One process, one model (``nf4`` or ``bf16``): batching rows and the worker-thread rows."""
    import statistics
    import threading

    import torch
    from transformers import AutoTokenizer

    from rbee_jupyter.engine.generate import GenerationRequest, Generator
    from rbee_jupyter.engine.loader import load_model

    _warm_imports(folder)
    quant = "nf4" if weights == "nf4" else None
    compute = getattr(torch, compute_dtype) if compute_dtype and quant else None
    devices = [device]
    t0 = time.perf_counter()
    model = load_model(folder, quantization=quant, dtype="bfloat16", compute_dtype=compute, device_map=device)
    tok = AutoTokenizer.from_pretrained(folder)
    gen = Generator(model, tok)
    result: dict[str, Any] = {"weights": weights, "load_s": time.perf_counter() - t0}
    start = time.perf_counter()

    def progress(what: str) -> None:
        print(f"  batching {weights}: {what} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    progress(f"loaded in {result['load_s']:.1f} s")
    prompts = batch_prompts(max(sizes))
    ids = [gen.encode(GenerationRequest(prompt=p, max_tokens=tokens)) for p in prompts]  # before any clock

    def timed(fn: Any, *fn_args: Any) -> tuple[float, Any]:
        _sync(devices)
        t = time.perf_counter()
        out = fn(*fn_args)
        _sync(devices)
        return time.perf_counter() - t, out

    impls = {"rbee": lambda n, k: decode_rbee(gen, ids[:n], k), "hf": lambda n, k: decode_hf(model, tok, ids[:n], k)}
    for n in sizes:  # kernel selection and workspaces for every shape, off the clock
        for run in impls.values():
            run(n, 4)
    progress("warm-up done")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    seconds: dict[str, list[float]] = {f"{impl}/{n}": [] for impl in impls for n in sizes}
    made: dict[str, int] = {}
    texts: dict[str, list[str]] = {}
    for r in range(rounds):  # alternating: which side goes first flips every round and every size
        for j, n in enumerate(sizes):
            for impl in (("rbee", "hf") if (r + j) % 2 == 0 else ("hf", "rbee")):
                s, (txt, m) = timed(impls[impl], n, tokens)
                seconds[f"{impl}/{n}"].append(s)
                made[f"{impl}/{n}"], texts[f"{impl}/{n}"] = m, txt
        progress(f"round {r + 1}/{rounds}: " + ", ".join(
            f"N={n} rbee {made[f'rbee/{n}'] / seconds[f'rbee/{n}'][-1]:.1f} / generate "
            f"{made[f'hf/{n}'] / seconds[f'hf/{n}'][-1]:.1f} tok/s" for n in sizes))
    if device.startswith("cuda"):
        result["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    result["rows"] = {key: {"seconds": s, "median_s": statistics.median(s), "tokens": made[key]}
                      for key, s in seconds.items()}
    check = SAME_TEXT_N if SAME_TEXT_N in sizes else max(sizes)
    solo = [decode_rbee(gen, [p], tokens)[0][0] for p in ids[:check]]  # each prompt alone (= Generator)
    result["same_text"] = {"n": check, **{impl: sum(a == b for a, b in zip(texts[f"{impl}/{check}"], solo))
                                          for impl in impls}}
    progress("solo texts done")

    # The worker-thread question: one sequence, the worker's decoder, in the main thread, in a
    # long-lived thread fed jobs (the worker's "rbee-batch" thread), and in a fresh thread per run
    # (what child_load's "second thread" figure was). Each clock runs in the thread that decodes,
    # between torch.cuda.synchronize() calls made in that same thread; "wall" is the main thread's
    # clock around handing the job over and getting the result (main synchronizes first).
    def one() -> float:
        s, (_, m) = timed(decode_rbee, gen, ids[:1], tokens)
        return m / s

    jobs: list[Any] = []
    cond = threading.Condition()

    def do(job: dict[str, Any]) -> None:
        try:
            job["tps"] = one()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            job["error"] = exc
        finally:
            job["done"].set()

    def long_lived() -> None:
        while True:
            with cond:
                cond.wait_for(lambda: jobs)
                job = jobs.pop(0)
            if job is None:
                return
            do(job)

    worker = threading.Thread(target=long_lived, name="rbee-batch-like", daemon=True)
    worker.start()

    def in_thread(fresh: bool) -> tuple[float, float]:
        job: dict[str, Any] = {"done": threading.Event()}
        _sync(devices)
        t = time.perf_counter()
        if fresh:
            th = threading.Thread(target=do, args=(job,))
            th.start()
            th.join()
        else:
            with cond:
                jobs.append(job)
                cond.notify()
            job["done"].wait()
        if "error" in job:
            raise job["error"]
        return job["tps"], tokens / (time.perf_counter() - t)

    in_thread(False)  # the long-lived thread's first decode: its one-time costs, as a worker's first request
    thread_rows: dict[str, list[float]] = {"main": [], "thread": [], "thread_wall": [], "fresh": [], "fresh_wall": []}
    for r in range(rounds):
        for variant in ("main", "thread", "fresh")[r % 3:] + ("main", "thread", "fresh")[:r % 3]:
            if variant == "main":
                thread_rows["main"].append(one())
            else:
                tps, wall = in_thread(variant == "fresh")
                thread_rows[variant].append(tps)
                thread_rows[f"{variant}_wall"].append(wall)
    with cond:
        jobs.append(None)
        cond.notify()
    worker.join()
    result["thread"] = {k: {"tps": v, "median": statistics.median(v)} for k, v in thread_rows.items()}
    progress("worker-thread rows done")
    return result


def print_batching(results: list[dict], sizes: list[int], tokens: int, rounds: int,
                   compute: str) -> list[tuple[str, bool]]:
    """The batching table, the same-text lines and the worker-thread table; returns the checks."""
    def med(res: dict, key: str) -> tuple[float, float]:
        row = res["rows"][key]
        agg = row["tokens"] / row["median_s"]
        return agg, agg / int(key.split("/")[1])

    print(f"\nbatching: greedy, {tokens} new tokens per sequence, all N sequences start together; median of "
          f"{rounds} alternating rounds; nf4 compute dtype {compute}; aggregate = all new tokens / wall time (prefill included); "
          f"xN=1 = aggregate / the same side's N=1; rbee/gen = rbee aggregate / generate's")
    print("| weights | N | rbee tok/s | per seq | xN=1 | generate tok/s | per seq | xN=1 | rbee/gen |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    checks: list[tuple[str, bool]] = []
    for res in results:
        base = {impl: med(res, f"{impl}/{sizes[0]}")[0] for impl in ("rbee", "hf")}
        for n in sizes:
            (ra, rp), (ha, hp) = med(res, f"rbee/{n}"), med(res, f"hf/{n}")
            print(f"| {res['weights']} | {n} | {ra:.1f} | {rp:.1f} | {ra / base['rbee']:.2f} | {ha:.1f} | {hp:.1f} | "
                  f"{ha / base['hf']:.2f} | {ra / ha:.2f} |")
    for res in results:
        st = res["same_text"]
        n = st["n"]
        peak = f"; peak memory_allocated {res['peak_mb']:.0f} MB" if "peak_mb" in res else ""
        print(f"{res['weights']}: same text at N={n} as each prompt alone: rbee {'yes' if st['rbee'] == n else 'no'} "
              f"({st['rbee']}/{n}), generate {'yes' if st['hf'] == n else 'no'} ({st['hf']}/{n}){peak}")
        # Padding changes the last bits of bf16/nf4 logits, which can flip a near-tie of a random
        # model: rbee's batch must keep the solo text at least as often as transformers' own.
        checks.append((f"{res['weights']}: rbee batch of {n} keeps the solo text of as many rows as generate's "
                       f"padded batch ({st['rbee']} vs {st['hf']} of {n})", st["rbee"] >= st["hf"]))
    print(f"\nworker-thread question: one sequence through BatchDecoder, {tokens} tokens, median of {rounds} alternating "
          "rounds; clock and torch.cuda.synchronize() in the decoding thread (wall: main thread's clock around "
          "the hand-over, main synchronizes before)")
    print("| weights | main tok/s | long-lived thread | ratio | its wall | fresh thread each run | ratio | its wall |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for res in results:
        t = {k: v["median"] for k, v in res["thread"].items()}
        print(f"| {res['weights']} | {t['main']:.1f} | {t['thread']:.1f} | {t['thread'] / t['main']:.2f} | "
              f"{t['thread_wall']:.1f} | {t['fresh']:.1f} | {t['fresh'] / t['main']:.2f} | {t['fresh_wall']:.1f} |")
    return checks


# --- the worker, through the hive -------------------------------------------------------------------

async def worker_run(folder: Path, work: Path, device: str, tokens: int) -> dict:
    from rbee_jupyter.core.hive import Hive, HiveConfig

    logs = work / "worker-logs"
    hive = Hive(HiveConfig(cache_dir=work / "cache", catalog_path=work / "catalog.sqlite",
                           pool_options={"log_dir": logs, "spare_worker": True, "loading_timeout_s": 900.0}))
    body = {"model_ref": f"file://{folder}", "device": device, "quantization": "nf4", "dtype": "bfloat16"}

    async def load() -> tuple[str, dict[str, Any]]:
        t0 = time.monotonic()
        job = hive.load(body)
        events = [(r.created, r.event.to_dict()) async for r in job.subscribe(last_event_id=0)]
        last = events[-1][1]
        if last.get("stage") != "ready":
            raise RuntimeError(f"the worker did not load: {last}")
        loading = [(t, e) for t, e in events if e.get("stage") == "loading_to_vram"]
        wid = job.meta["worker_id"]
        # The worker's own account of its load (runtime.LoadTimeline): where the time before the
        # first block went.
        lines = (logs / f"{wid}.log").read_text(errors="replace").splitlines()
        return wid, {
            "seconds": events[-1][0] - t0, "first_block_s": loading[0][0] - t0,
            "blocks_s": events[-1][0] - loading[0][0], "blocks": loading[-1][1]["layers_total"],
            "events_mb": {loading[-1][1]["device"]: loading[-1][1]["vram_mb"]},
            "ready_memory_mb": last.get("memory_mb"),
            "monotonic": [e["layers_loaded"] for _, e in loading] == list(range(1, len(loading) + 1)),
            "timeline": next((line.split(": ", 1)[1] for line in lines if ": loaded in " in line), "?")}

    async def generate(wid: str) -> tuple[str, dict[str, Any]]:
        inf = hive.infer({"worker_id": wid, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0})
        text, end = [], {}
        async for r in inf.subscribe(last_event_id=0):
            e = r.event.to_dict()
            if e.get("type") == "token":
                text.append(e["t"])
            elif e.get("type") in ("end", "error"):
                end = e
        if end.get("type") != "end":
            raise RuntimeError(f"the worker's generation failed: {end}")
        return "".join(text), end

    try:
        # 1. A cold worker: no spare exists yet (nothing warmed the pool up).
        wid, result = await load()
        # Its end started a spare: let it finish its imports before anything is timed.
        spare = await hive.pool.primary.wait_spare(600)
        first_ttft = None
        for _ in range(2):  # the first pays one-time costs (kernel selection, workspaces): report the second
            text, end = await generate(wid)
            first_ttft = first_ttft if first_ttft is not None else end.get("time_to_first_token_ms")
        result.update(text=text, tokens=end["total_tokens"], tps=end.get("tokens_per_second"),
                      ttft_ms=end.get("time_to_first_token_ms"), first_ttft_ms=first_ttft)
        await hive.unload(wid)
        # 2. The same load handed to the warm spare: the imports were paid ahead.
        if spare is not None:
            wid, warm = await load()
            warm["text"], _ = await generate(wid)
            warm["pid_was_spare"] = hive.pool.get(wid).pid == spare.pid
            result["spare"] = warm
            await hive.unload(wid)
        return result
    finally:
        await hive.stop()


# --- parent ------------------------------------------------------------------------------------------

def run_child(*args: str, live: bool = False) -> dict:
    """Run one step in a fresh process; its last stdout line is its JSON result. ``live``: its
    stderr (progress lines, a traceback) goes straight to ours, so a run cut short still shows
    how far it got."""
    proc = subprocess.run([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE,
                          stderr=None if live else subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed (exit {proc.returncode})"
                           + ("; its stderr is above" if live else f":\n{proc.stderr[-4000:]}"))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt_mb(d: dict | None) -> str:
    if not d:
        return "-"
    return " + ".join(f"{v:.0f}" if v >= 10 else f"{v:.2f}" for v in d.values())


def load_steps(args: argparse.Namespace, folder: Path, work: Path, device: str, n_gpus: int, made: dict,
               size: int) -> list[tuple[str, bool]]:
    """Steps 2-6 (the loader: worker, in-process, from_pretrained, splits); prints their table."""
    import torch

    dry = args.cpu_dry_run
    checks: list[tuple[str, bool]] = []
    w = asyncio.run(worker_run(folder, work, device, args.tokens))
    print(f"worker: ready in {w['seconds']:.1f} s (first block at {w['first_block_s']:.1f} s); generation TTFT "
          f"{w['first_ttft_ms']:.0f} ms the first time, {w['ttft_ms']:.0f} ms the second\n"
          f"worker's timeline: {w['timeline']}", flush=True)
    if "spare" in w:
        print(f"worker from a warm spare: ready in {w['spare']['seconds']:.1f} s (first block at "
              f"{w['spare']['first_block_s']:.1f} s)\nits timeline: {w['spare']['timeline']}", flush=True)
    cd = args.compute_dtype or ""
    ours = run_child("rbee", str(folder), device, str(work / "rbee.pt"), cd, str(args.tokens))
    print(f"rbee in-process: {ours['seconds']:.2f} s; greedy {ours['tps']:.1f} tok/s, "
          f"{ours['tps_thread'] or 0:.1f} tok/s in a second thread", flush=True)
    theirs = run_child("hf", str(folder), device, str(work / "hf.pt"), cd, str(args.tokens))
    print(f"from_pretrained: {theirs['seconds']:.2f} s", flush=True)
    split = None
    if dry or n_gpus >= 2:
        split = run_child("split", str(folder), device, str(work / "split.pt"), cd, str(args.tokens))
    xdev = {impl: run_child(impl, str(folder), device, str(work / f"{impl}.pt"), "", str(args.tokens))
            for impl in XDEV}
    print(f"bf16 split {'+'.join(xdev['xrbee']['devices'])}: rbee {xdev['xrbee']['seconds']:.2f} s, "
          f"from_pretrained {xdev['xhf']['seconds']:.2f} s", flush=True)

    la, lb = torch.load(work / "rbee.pt"), torch.load(work / "hf.pt")
    equal = torch.equal(la, lb)
    diff = (la - lb).abs().max().item()
    checks.append(("logits rbee == from_pretrained (torch.equal)", equal))
    checks.append(("worker loading events: layers_loaded 1..N", w["monotonic"]))
    checks.append(("a second load ran in the warm spare, same greedy text",
                   "spare" in w and w["spare"]["pid_was_spare"] and w["spare"]["text"] == w["text"]))
    if not cd:
        checks.append(("greedy text: worker == rbee in-process (Generator)", w["text"] == ours["text"]))
    checks.append(("vram_mb of the worker's events == in-process loader's count",
                   abs(next(iter(w["events_mb"].values())) - next(iter(ours["events_mb"].values()))) <= 1))
    if split is not None:
        checks.append((f"logits split {'+'.join(split['devices'])} == single device",
                       torch.equal(torch.load(work / "split.pt"), la)))
    xa, xb = (torch.load(work / f"{impl}.pt") for impl in XDEV)
    xname = f"bf16 split {'+'.join(xdev['xrbee']['devices'])}: logits rbee == from_pretrained (torch.equal)"
    checks.append((xname, torch.equal(xa, xb)))

    gb = size / 1e9
    alloc = "memory_allocated MB" if not dry else "tensor bytes MB (cpu)"
    print(f"\nnf4 load of {made['params'] / 1e6:.1f}M params ({gb:.3f} GB bf16 checkpoint, page cache warm) "
          f"on {'cpu (dry run)' if dry else device}")
    print(f"| {'loader':38s} | {'load s':>7s} | {'GB/s':>5s} | {'vram_mb (events)':>16s} | {alloc:>21s} | "
          f"{'peak MB':>8s} | {'tok/s':>6s} |")
    print(f"|{'-' * 40}|{'-' * 9}|{'-' * 7}|{'-' * 18}|{'-' * 23}|{'-' * 10}|{'-' * 8}|")
    rows = [("rbee worker (hive, request -> ready)", w["seconds"], w["events_mb"], None, None, w["tps"]),
            (f"  of it: blocks 2..{w['blocks']} (after 1st event)", w["blocks_s"], None, None, None, None),
            *([("rbee worker from a warm spare", w["spare"]["seconds"], w["spare"]["events_mb"], None, None,
                None)] if "spare" in w else []),
            ("rbee load_model in-process", ours["seconds"], ours.get("events_mb"), ours["allocated_mb"],
             ours.get("peak_mb"), ours["tps"]),
            ("from_pretrained + BitsAndBytesConfig", theirs["seconds"], None, theirs["allocated_mb"],
             theirs.get("peak_mb"), theirs["tps"])]
    if split is not None:
        rows.append((f"rbee load_model split {'+'.join(split['devices'])}", split["seconds"],
                     split.get("events_mb"), split["allocated_mb"], split.get("peak_mb"), split["tps"]))
    for impl, who in zip(XDEV, ("rbee load_model", "from_pretrained")):
        x = xdev[impl]
        rows.append((f"{who} bf16 {'+'.join(x['devices'])}", x["seconds"], x.get("events_mb"),
                     x.get("allocated_mb"), x.get("peak_mb"), x["tps"]))
    for label, s, ev, al, pk, tps in rows:
        gbs = f"{gb / s:5.2f}" if not label.startswith("  ") else "    -"
        print(f"| {label:38s} | {s:7.2f} | {gbs} | {fmt_mb(ev):>16s} | {fmt_mb(al):>21s} | {fmt_mb(pk):>8s} | "
              f"{(f'{tps:6.1f}' if tps else '     -')} |")
    print(f"\nlogits max |rbee - from_pretrained| = {diff:g}; greedy text from_pretrained.generate == "
          f"rbee Generator: {'yes' if theirs['text'] == ours['text'] else 'no'} ({args.tokens} tokens); "
          f"bf16 split: |diff| = {(xa.float() - xb.float()).abs().max().item():g}, greedy text "
          f"{'equal' if xdev['xrbee']['text'] == xdev['xhf']['text'] else 'different'}")
    return checks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="the same steps on the CPU with a tiny model")
    ap.add_argument("--dir", type=Path, default=None, help="folder under which the model is written (default: the system temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated model")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 20: ~1.0B parameters)")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens generated by each side")
    ap.add_argument("--compute-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="bnb_4bit_compute_dtype of the in-process pair (default: transformers' default, float32)")
    ap.add_argument("--only", choices=["all", "load", "batching"], default="all",
                    help="load: the loader steps 1-6; batching: the batching and worker-thread rows (step 7)")
    ap.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)),
                    help="concurrent sequences of the batching rows, the first being the baseline (default 1,8,32)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="alternating rounds of the batching and worker-thread rows (median; default 3, 1 on --cpu-dry-run)")
    ap.add_argument("--batch-tokens", type=int, default=None,
                    help="greedy tokens per sequence in the batching rows (default --tokens, 8 on --cpu-dry-run)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        kind, rest = args.child[0], args.child[1:]
        if kind == "make":
            out = child_make(rest[0], json.loads(rest[1]), rest[2])
        elif kind == "batch":
            out = child_batch(rest[0], rest[1], rest[2], rest[3] or None, int(rest[4]),
                              [int(n) for n in rest[5].split(",")], int(rest[6]))
        else:
            out = child_load(kind, rest[0], rest[1], rest[2], rest[3] or None, int(rest[4]))
        print(json.dumps(out))
        return 0

    import torch

    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print(f"gpu_check: CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              "run it on a machine with an NVIDIA GPU and CUDA torch, or use --cpu-dry-run.", file=sys.stderr)
        return 2
    device = "cpu" if dry else "cuda:0"
    n_gpus = 0 if dry else torch.cuda.device_count()
    shape = dict(TINY if dry else FULL)
    if args.layers:
        shape["layers"] = args.layers
    gpu = "cpu dry run" if dry else f"{n_gpus} x {torch.cuda.get_device_name(0)}"
    print(f"gpu_check: {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda})", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="rbee-gpu-check-", dir=args.dir))
    folder, work = tmp / "model", tmp / "work"
    work.mkdir()
    checks: list[tuple[str, bool]] = []
    try:
        t = time.perf_counter()
        made = run_child("make", str(folder), json.dumps(shape), device)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"model: {made['params'] / 1e6:.1f}M parameters, {size / 1e9:.2f} GB bf16 safetensors "
              f"({len(list(folder.glob('*.safetensors')))} files), written in {time.perf_counter() - t:.1f} s",
              flush=True)

        if args.only in ("all", "load"):
            checks += load_steps(args, folder, work, device, n_gpus, made, size)
        if args.only in ("all", "batching"):
            # On the CPU, bitsandbytes' 4-bit kernels make even the tiny model slow: fewer tokens, one round.
            sizes = [int(n) for n in args.batch_sizes.split(",")]
            tokens = args.batch_tokens or (8 if dry else args.tokens)
            rounds = args.rounds or (1 if dry else 3)
            results = []
            for weights in ("nf4", "bf16"):
                t = time.perf_counter()
                results.append(run_child("batch", str(folder), device, weights, args.compute_dtype or "",
                                         str(tokens), args.batch_sizes, str(rounds), live=True))
                print(f"batching {weights}: done in {time.perf_counter() - t:.0f} s", flush=True)
            checks += print_batching(results, sizes, tokens, rounds, args.compute_dtype or "float32")
        for name, ok in checks:
            print(f"  [{'PASS' if ok else 'FAIL'}] {name}")
        return 0 if all(ok for _, ok in checks) else 1
    finally:
        if args.keep:
            print(f"(kept {tmp})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    from rbee_jupyter.quiet import transformers_bars_off

    with transformers_bars_off():  # the bench's lines only, no transformers bars among them
        sys.exit(main())
