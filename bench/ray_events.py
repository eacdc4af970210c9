"""Benchmark: delay of per-layer loading events from a Ray actor to an SSE client.

A Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and one node that
advertises the custom resource ``node-a``) and two real ``jupyter server`` processes: one
with ``c.RbeeApp.pool_class = RayPool`` (workers are actors on ``node-a``), one with the
default local process pool, for comparison. Each round loads a tiny Llama with many
layers (``--layers``, one event per block) on each server, in alternating order, and
reads ``GET v1/loading/progress`` with httpx.

Each loading event carries ``timestamp``: when the worker's event loop published the
block (ms, wall clock; the actor, the worker and this client share the machine's clock).
The delay of an event is its arrival at the client minus that timestamp: actor → Ray
streaming generator → pool → job → SSE handler → client. Blocks are spaced by
``--block-delay`` seconds (the worker's RBEE_WORKER_BLOCK_DELAY_S knob), as real layers
are, so the numbers are per event, not a burst's queueing.

Usage: python bench/ray_events.py [--rounds 5] [--layers 32] [--block-delay 0.02] [--nice -10]
(needs ``pip install 'rbee-jupyter[ray]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from machine import MachineLoad, add_machine_options, apply_machine_options, wait_for_quiet


def read_delays(server, model_ref: str, node: str | None, timeout: float = 300.0) -> tuple[list[float], str]:
    """Load once; returns the per-layer delays in ms and the node the events named."""
    body = {"model_ref": model_ref, "device": "cpu", **({"node": node} if node else {})}
    r = server.post("v1/workers", body)
    r.raise_for_status()
    worker_id, url = r.json()["worker_id"], f"http://127.0.0.1:{server.port}{r.json()['progress_url']}"
    delays, named = [], ""
    with server.client.stream("GET", url, timeout=timeout) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            arrived = time.time() * 1000
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event.get("stage") == "loading_to_vram" and event.get("timestamp"):
                delays.append(arrived - event["timestamp"])
                named = event.get("node") or "(this machine)"
            elif event.get("stage") == "error":
                raise RuntimeError(f"load failed: {event}")
    server.delete(f"v1/workers/{worker_id}").raise_for_status()
    return delays, named


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--block-delay", type=float, default=0.02, help="seconds after each block (worker knob)")
    add_machine_options(ap)
    args = ap.parse_args()
    apply_machine_options(args)

    import ray
    from ray.cluster_utils import Cluster

    from rbee_jupyter.testing.server import ServerProcess
    from rbee_jupyter.testing.tiny_model import make_tiny_model
    from rbee_jupyter.worker.protocol import BLOCK_DELAY_ENV

    work = Path(tempfile.mkdtemp(prefix="rbee-rb-", dir="/tmp"))  # short: Ray's socket paths must fit
    (work / "ray").mkdir()
    os.environ["RAY_TMPDIR"] = str(work)
    model = make_tiny_model(work / "model", layers=args.layers)
    ref = f"file://{model}"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    servers = {}
    try:
        cluster.add_node(num_cpus=1, resources={"node-a": 1})
        cluster.wait_for_nodes(timeout=120)
        env = {BLOCK_DELAY_ENV: str(args.block_delay)}
        common = {"sse_keepalive_s": 10.0}
        for name, extra in (("ray", {"pool_class": "rbee_jupyter.pools.ray.RayPool",
                                     "ray_address": cluster.address}), ("local", {})):
            folder = work / name
            settings = {"cache_dir": str(folder / "cache"), "catalog_path": str(folder / "catalog.sqlite"),
                        **common, **extra}
            servers[name] = ServerProcess(folder, rbee=settings, env=env, startup_timeout=120).start()
        for name, server in servers.items():  # warm-up: first actor / process start, imports, the catalog entry
            read_delays(server, ref, "node-a" if name == "ray" else None)
        delays: dict[str, list[float]] = {"ray": [], "local": []}
        nodes: dict[str, str] = {}
        with MachineLoad() as load:
            for i in range(args.rounds):
                order = ("ray", "local") if i % 2 == 0 else ("local", "ray")
                for name in order:
                    wait_for_quiet()
                    got, nodes[name] = read_delays(servers[name], ref, "node-a" if name == "ray" else None)
                    delays[name].extend(got)
    finally:
        for s in servers.values():
            s.client.close()
            s.stop()
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        del ray

    blocks = args.layers + 3
    print(f"\nPer-layer loading event delay, worker event → SSE client ({args.rounds} loads of {blocks} blocks "
          f"per pool, {args.block_delay * 1000:g} ms between blocks, {os.cpu_count()} CPUs)\n")
    print("| pool | events from | events | median ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|")
    for name in ("ray", "local"):
        d = delays[name]
        label = "RayPool (actor on node-a)" if name == "ray" else "LocalProcessPool (process)"
        print(f"| {label} | {nodes.get(name, '?')} | {len(d)} | {statistics.median(d):.1f} | "
              f"{percentile(d, 99):.1f} | {max(d):.1f} |")
    print(f"\n{load.note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
