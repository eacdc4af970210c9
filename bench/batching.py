"""Benchmark: many concurrent OpenAI streams on one model — rbee's batching worker vs the peer.

Contenders, all started and warmed up before any clock, all on the same checkpoint and CPU:

* ``rbee N=k``: a ``jupyter server`` with the extension, one worker (``max_batch_size`` 16,
  queue 32), k concurrent streams;
* ``rbee mbs=1``: a second server whose worker decodes one sequence at a time (the FIFO
  worker of before), at the largest N;
* ``peer``: ``transformers serve --continuous-batching`` at the largest N and at N=1.

Every stream is the official ``openai`` client streaming a chat completion (greedy, ``--tokens``
tokens, a different user message per stream so no cache can share them) from its own thread,
all released together. Per configuration: aggregate tok/s = all completion tokens / (last
stream end − first request), per-stream tok/s (median), time to first token p50 / p95.
Rounds alternate the order of the configurations; the median over rounds is reported.

The model is SmolLM2-135M's shape with random weights (bench/inference.py makes it; its EOS is
outside the vocabulary, so every stream runs the full length); ``--tiny`` uses the tests' tiny
Llama instead (fast, for a smoke run).

Usage: python bench/batching.py [--rounds 2] [--tokens 32] [--n 1,4,8,16] [--tiny] [--model-dir DIR]
                                [--nice -10] [--quiet-wait 60]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from inference import align_worker_priority
from machine import MachineLoad, add_machine_options, apply_machine_options, wait_for_quiet

TOPICS = ["the sea", "a notebook", "the moon", "a small robot", "bread", "a library", "the wind", "a river",
          "mountains", "a cat", "the city at night", "a garden", "trains", "winter", "an old map", "music"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def one_stream(client: Any, model: str, topic: str, tokens: int, go: threading.Event, out: list, i: int,
               extra: dict[str, Any] | None = None) -> None:
    go.wait()
    t0 = time.perf_counter()
    first, pieces, usage = None, 0, None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Tell me a story about {topic}."}],
        max_tokens=tokens, temperature=0, stream=True, stream_options={"include_usage": True}, **(extra or {}))
    for chunk in stream:
        usage = chunk.usage or usage
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces += 1
    end = time.perf_counter()
    n = usage.completion_tokens if usage is not None else pieces
    out[i] = {"t0": t0, "first": first or end, "end": end, "tokens": n}


def run_config(url: str, token: str, model: str, n: int, tokens: int,
               extra: dict[str, Any] | None = None) -> dict[str, float]:
    """``n`` streams released together; ``extra``: more arguments of each request (e.g. ``response_format``)."""
    import openai

    clients = [openai.OpenAI(base_url=url, api_key=token, max_retries=0, timeout=600) for _ in range(n)]
    out: list[Any] = [None] * n
    go = threading.Event()
    threads = [threading.Thread(target=one_stream, args=(clients[i], model, TOPICS[i % len(TOPICS)], tokens, go,
                                                         out, i, extra)) for i in range(n)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    if any(o is None for o in out):
        raise RuntimeError("a stream failed (see above)")
    start, end = min(o["t0"] for o in out), max(o["end"] for o in out)
    ttft = [o["first"] - o["t0"] for o in out]
    return {"agg": sum(o["tokens"] for o in out) / (end - start),
            "per_stream": statistics.median(o["tokens"] / (o["end"] - o["t0"]) for o in out),
            "ttft_p50": percentile(ttft, 0.5), "ttft_p95": percentile(ttft, 0.95),
            "tokens": statistics.median(o["tokens"] for o in out)}


def load_worker(server, folder: Path) -> tuple[str, int]:
    r = server.post("v1/workers", {"model_ref": f"file://{folder}", "device": "cpu"})
    r.raise_for_status()
    last = server.events(r.json()["progress_url"], timeout=900)[-1]
    if last.get("stage") != "ready":
        raise RuntimeError(f"worker did not load: {last}\n{server.log()[-3000:]}")
    wid = r.json()["worker_id"]
    return wid, server.get(f"v1/workers/{wid}").json()["pid"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--n", default="1,4,8,16", help="concurrent streams for rbee; the largest is used for the others")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny Llama instead of the 135M shape")
    ap.add_argument("--model-dir", type=Path, default=None, help="reuse (or create) the 135M checkpoint here")
    ap.add_argument("--no-peer", action="store_true")
    add_machine_options(ap)
    args = ap.parse_args()
    apply_machine_options(args)
    ns = [int(x) for x in args.n.split(",")]
    big = 8 if 8 in ns else max(ns)

    from rbee_jupyter.testing.engine import TransformersServe
    from rbee_jupyter.testing.server import ServerProcess

    with tempfile.TemporaryDirectory(prefix="rbee-bench-batch-") as tmp:
        tmp_path = Path(tmp)
        if args.tiny:
            from rbee_jupyter.testing.tiny_model import make_tiny_model

            folder = make_tiny_model(tmp_path / "tiny")
        else:
            from inference import make_model

            folder = make_model(args.model_dir or tmp_path / "model")
        model_name = str(folder)
        base = {"cache_dir": str(tmp_path / "cache"), "catalog_path": str(tmp_path / "catalog.sqlite"),
                "queue_depth": 32, "inference_stall_s": None}  # queued streams wait minutes on a busy CPU
        with ServerProcess(tmp_path / "batching", rbee={**base, "max_batch_size": 16}) as batching, \
                ServerProcess(tmp_path / "fifo", rbee={**base, "max_batch_size": 1,
                                                         "catalog_path": str(tmp_path / "catalog2.sqlite")}) as fifo:
            wid, pid = load_worker(batching, folder)
            wid1, pid1 = load_worker(fifo, folder)
            for p in (pid, pid1):  # workers start their own session: give them the bench's (and the peer's) priority
                print(f"worker {p}: {align_worker_priority(p)}", flush=True)
            pids = [batching.proc.pid, fifo.proc.pid, pid, pid1]
            peer = None
            if not args.no_peer:
                peer = TransformersServe(folder, tmp_path / "peer.log", extra_args=("--continuous-batching",)).start(900)
                pids.append(peer.pid)
            MachineLoad.pids = tuple(pids)
            configs: dict[str, tuple[str, str, str, int]] = {
                f"rbee N={n}": (batching.url + "rbee/openai/v1", batching.token, wid, n) for n in ns}
            configs[f"rbee mbs=1 N={big}"] = (fifo.url + "rbee/openai/v1", fifo.token, wid1, big)
            if peer is not None:
                configs[f"peer N={big}"] = (peer.url, "none", model_name, big)
                configs["peer N=1"] = (peer.url, "none", model_name, 1)
            for name, (url, token, model, n) in configs.items():  # warm-up, off the clock
                run_config(url, token, model, min(n, 2), 4)
                print(f"warmed up {name}", flush=True)
            results: dict[str, list[dict[str, float]]] = {k: [] for k in configs}
            order = list(configs)
            with MachineLoad() as load:
                for r in range(args.rounds):
                    for name in (order if r % 2 == 0 else order[::-1]):
                        if args.quiet_wait > 0:
                            wait_for_quiet()
                        url, token, model, n = configs[name]
                        results[name].append(run_config(url, token, model, n, args.tokens))
                        res = results[name][-1]
                        print(f"round {r + 1} {name}: {res['agg']:.1f} tok/s aggregate, "
                              f"TTFT p50 {res['ttft_p50']:.2f} s", flush=True)
            if peer is not None:
                peer.stop()
        report(args, results, big, load)


def report(args, results: dict[str, list[dict[str, float]]], big: int, load: MachineLoad) -> None:
    med = {name: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for name, rows in results.items()}
    print(f"\nmodel: {'tiny Llama (tests)' if args.tiny else 'SmolLM2-135M shape, random, fp32'}; "
          f"{args.tokens} greedy tokens per stream; {args.rounds} rounds, alternating; CPU")
    print("| configuration | aggregate tok/s | per-stream tok/s | TTFT p50 | TTFT p95 |")
    print("|---|---:|---:|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m['agg']:.1f} | {m['per_stream']:.1f} | {m['ttft_p50']:.2f} s | {m['ttft_p95']:.2f} s |")
    ours, one = med.get(f"rbee N={big}"), med.get("rbee N=1")
    peer = med.get(f"peer N={big}")
    if ours and one:
        print(f"\nrbee N={big} aggregate / rbee N=1: {ours['agg'] / one['agg']:.2f}× (goal ≥ 3.5×)")
    if ours and peer:
        print(f"rbee N={big} aggregate / peer N={big}: {ours['agg'] / peer['agg']:.2f}× (goal ≥ 1.1×)")
        print(f"TTFT p50 at N={big}: rbee {ours['ttft_p50']:.2f} s vs peer {peer['ttft_p50']:.2f} s (goal ≤)")
    print(load.note())


if __name__ == "__main__":
    main()
