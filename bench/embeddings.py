"""Benchmark: embeddings through rbee (openai SDK -> server -> embedding worker) against in-process ``encode``.

A random sentence-transformers model shaped like all-MiniLM-L6-v2 (BERT, hidden 384, 6
layers, 12 heads, intermediate 1536, mean pooling, normalised; a WordPiece vocabulary
trained on the spot), served by a local ``HubServer`` and loaded by a real ``jupyter
server`` into an embedding worker (``POST v1/workers``, detected from its files). This
process holds the same model through ``SentenceTransformer(path)``, with the worker's
torch thread count.

Per round, order alternating: a batch of ``--batch`` short texts (5-12 words) through
``client.embeddings.create`` (``encoding_format="float"``, the SDK's default decoding
included) and through ``model.encode(texts)``. Median texts/s and the ratio rbee/in-process
(goal >= 0.9). The vectors are checked equal (allclose 1e-5) once.

A third path, "rbee concurrent", sends the same batch as ``--split`` requests of equal size at
once (one thread each), as several notebook cells or a RAG pipeline's workers would: the
worker merges concurrent requests into shared ``encode`` batches, so this should approach the
one-request rate rather than fall to ``--split`` small batches in a row.

Usage: python bench/embeddings.py [--rounds 7] [--batch 64] [--split 8] [--nice -10] [--quiet-wait 60]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from inference import align_worker_priority, worker_threads  # noqa: E402
from machine import MachineLoad, add_machine_options, apply_machine_options, wait_for_quiet  # noqa: E402

REPO = "bench/minilm-shaped"
WORDS = ("the quick brown fox jumps over lazy dog notebook model layer stream token cell python jupyter "
         "tiny world hello once upon time there was").split()


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) for _ in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--split", type=int, default=8, help="requests the concurrent path splits the batch into")
    add_machine_options(ap)
    args = ap.parse_args()
    apply_machine_options(args)

    import numpy as np
    import openai
    import torch
    from sentence_transformers import SentenceTransformer

    from rbee_jupyter.testing.hub import HubServer
    from rbee_jupyter.testing.server import ServerProcess
    from rbee_jupyter.testing.tiny_embedder import make_tiny_embedder

    with tempfile.TemporaryDirectory() as tmp, HubServer() as hub:
        folder = make_tiny_embedder(Path(tmp) / "model", hidden=384, layers=6, heads=12, intermediate=1536,
                                    vocab_size=2000, max_seq_length=128)
        hub.add_repo(REPO, folder)
        settings = {"cache_dir": f"{tmp}/cache", "catalog_path": f"{tmp}/catalog.sqlite", "hub_endpoint": hub.url}
        with ServerProcess(Path(tmp) / "server", rbee=settings) as server:
            r = server.post("v1/workers", {"model_ref": f"hf:{REPO}", "device": "cpu"})
            r.raise_for_status()
            assert server.events(r.json()["progress_url"], timeout=300)[-1]["stage"] == "ready"
            worker = next(w for w in server.get("v1/workers").json()["workers"])
            pid = worker["pid"]

            def encode_calls() -> int | None:  # the worker's count (None before the worker merged requests)
                return server.get(f"v1/workers/{worker['id']}").json().get("encode_calls")
            priority = align_worker_priority(pid)
            threads = worker_threads(pid)
            torch.set_num_threads(threads)
            local = SentenceTransformer(str(folder), device="cpu")
            client = openai.OpenAI(base_url=server.url + "rbee/openai/v1", api_key=server.token, max_retries=0)

            def via_rbee(batch: list[str]) -> np.ndarray:
                data = client.embeddings.create(model=REPO, input=batch).data
                return np.array([d.embedding for d in data], dtype=np.float32)

            def in_process(batch: list[str]) -> np.ndarray:
                return local.encode(batch)

            pool = ThreadPoolExecutor(args.split)

            def via_rbee_concurrent(batch: list[str]) -> np.ndarray:
                size = -(-len(batch) // args.split)
                parts = [batch[i:i + size] for i in range(0, len(batch), size)]
                return np.concatenate(list(pool.map(via_rbee, parts)))

            check = texts(args.batch, 0)
            np.testing.assert_allclose(via_rbee(check), in_process(check), atol=1e-5, rtol=0)
            np.testing.assert_allclose(via_rbee_concurrent(check), in_process(check), atol=1e-5, rtol=0)
            via_rbee(check), in_process(check)  # warm both
            times: dict[str, list[float]] = {"rbee": [], "rbee concurrent": [], "in-process": []}
            wait_for_quiet()
            calls_before = encode_calls()
            with MachineLoad() as load:
                for i in range(args.rounds):
                    batch = texts(args.batch, i + 1)
                    order = [("rbee", via_rbee), ("rbee concurrent", via_rbee_concurrent), ("in-process", in_process)]
                    for name, fn in order if i % 2 == 0 else order[::-1]:
                        start = time.perf_counter()
                        fn(batch)
                        times[name].append(time.perf_counter() - start)
            calls_after = encode_calls()
            pool.shutdown()
            client.close()
    rate = {name: args.batch / statistics.median(t) for name, t in times.items()}
    print(f"\nEmbeddings, batch of {args.batch} short texts, MiniLM-shaped random model, CPU, {threads} torch "
          f"threads (worker {priority}), {args.rounds} rounds alternating; vectors allclose 1e-5: yes\n")
    print("| path | median s | texts/s |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.4f} | {rate[name]:.1f} |")
    if calls_before is not None and calls_after is not None:  # one call per single request, the rest concurrent
        merged = (calls_after - calls_before - args.rounds) / args.rounds
        print(f"\nworker encode calls per round of {args.split} concurrent requests: {merged:.1f}")
    print(f"\nratio rbee / in-process: **{rate['rbee'] / rate['in-process']:.3f}** (goal >= 0.9); "
          f"{args.split} concurrent requests / in-process: **{rate['rbee concurrent'] / rate['in-process']:.3f}**. "
          f"{load.note()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
