"""Benchmark: a load with a warm spare worker against a load that starts its own process.

A tiny Llama (``testing.tiny_model``) loaded on the CPU through the hive (``Hive.load`` of
a ``file://`` ref: validation, plan, ``LocalProcessPool``), without HTTP. Each measurement
gets a fresh hive; the model is registered in its catalog before the clock starts. With a
spare, the clock starts once the spare reported its imports done (``spare_worker=True``,
``warm_up()``, then its ``warm`` future): the state a server is in a few seconds after it
started or after its last load. Measured: request → first ``loading_to_vram`` event and
request → ``ready``. Rounds alternate the order; medians.

Usage: python bench/spare.py [--rounds 5] [--nice -10]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import MachineLoad, bench_args, wait_for_quiet

MODES = ("no spare", "warm spare")


async def measure(model: Path, work: Path, spare: bool) -> dict:
    """One load in a fresh hive: seconds to the first block and to ready."""
    from rbee_jupyter.core.hive import Hive, HiveConfig

    hive = Hive(HiveConfig(cache_dir=work / "cache", catalog_path=work / "catalog.sqlite",
                           pool_options={"spare_worker": spare}))
    try:
        ref = f"file://{model}"
        await hive.download(ref).wait(60)  # registered in the catalog: not part of the load
        if spare:
            hive.pool.warm_up()
            process = await hive.pool.primary.wait_spare(120)
            if process is None:
                raise RuntimeError("no spare was started")
        t0 = time.monotonic()
        job = hive.load({"model_ref": ref, "device": "cpu"})
        first = ready = None
        async for record in job.subscribe(last_event_id=0):
            stage = record.event.to_dict().get("stage")
            if stage == "loading_to_vram" and first is None:
                first = time.monotonic() - t0
            elif stage == "ready":
                ready = time.monotonic() - t0
            elif stage == "error":
                raise RuntimeError(f"the load failed: {record.data}")
        worker_id = job.meta["worker_id"]
        pid = hive.pool.get(worker_id).pid
        took_spare = spare and pid == process.pid
        await hive.unload(worker_id)
        return {"first_s": first, "ready_s": ready, "took_spare": took_spare}
    finally:
        await hive.stop()


def main() -> None:
    args = bench_args(__doc__, rounds=5)

    from rbee_jupyter.testing.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="rbee-bench-spare-") as tmp:
        model = make_tiny_model(Path(tmp) / "tiny-llama")
        results: dict[str, list[dict]] = {mode: [] for mode in MODES}
        with MachineLoad() as load:
            for round_ in range(args.rounds):
                order = MODES if round_ % 2 == 0 else tuple(reversed(MODES))
                for mode in order:
                    wait_for_quiet()
                    r = asyncio.run(measure(model, Path(tmp) / f"work-{round_}-{mode[0]}", mode == "warm spare"))
                    if mode == "warm spare" and not r["took_spare"]:
                        raise RuntimeError("the load did not run in the spare's process")
                    results[mode].append(r)
                    print(f"  round {round_ + 1} {mode}: first block {r['first_s']:.2f} s, "
                          f"ready {r['ready_s']:.2f} s", flush=True)
        print()
        print("| load | request → first block, median s | request → ready, median s | min–max ready s |")
        print("|---|---:|---:|---:|")
        for mode in MODES:
            runs = results[mode]
            ready = [r["ready_s"] for r in runs]
            print(f"| {mode} | {statistics.median(r['first_s'] for r in runs):.2f} | "
                  f"{statistics.median(ready):.2f} | {min(ready):.2f}–{max(ready):.2f} |")
        print()
        print(f"{args.rounds} rounds, order alternating; {load.note()}")


if __name__ == "__main__":
    main()
