"""Benchmark: SSE event delay on a real server under mixed load (issue 7's reliability suite).

One real ``jupyter server`` with the extension and a loaded tiny-Llama worker; a local
``HubServer`` serving ``--downloads`` distinct repos. The downloads start (crawling),
``--subscribers`` raw asyncio SSE clients (HTTP/1.1, in this process) connect to their
progress streams (spread evenly, ``Last-Event-ID: 0``), ``--generations`` streamed
generations start, and the transfers run at full speed. Every subscriber must get the
terminal event and ``[DONE]``.

Delay: the server does not stamp its events, so a delivery's delay is its arrival minus
the *first* arrival of the same (stream, event id) at any subscriber: what fanning one
event out to all subscribers costs. The driver is ``tests/reliability/load.py``, shared
with ``tests/reliability/test_load.py`` (which asserts completeness, not timing).

Usage: python bench/reliability_load.py [--subscribers 1000] [--downloads 10] [--generations 2]
                                        [--rounds 1] [--nice -10] [--quiet-wait 60]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import MachineLoad, add_machine_options, apply_machine_options, wait_for_quiet  # noqa: E402

from rbee_jupyter.testing.hub import HubServer  # noqa: E402
from rbee_jupyter.testing.server import ServerProcess  # noqa: E402
from rbee_jupyter.testing.tiny_model import make_tiny_model  # noqa: E402
from tests.reliability.load import add_load_repos, load_worker, percentile, run_load  # noqa: E402


def _cpu_s(root: int) -> float:
    """CPU seconds of ``root`` and its live descendants (the server and its worker)."""
    tick, pids = os.sysconf("SC_CLK_TCK"), {root}
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    while True:  # parents before children, whatever the order /proc lists them in
        more = {pid for pid, (ppid, _) in stats.items() if ppid in pids} - pids
        if not more:
            break
        pids |= more
    return sum(stats[p][1] for p in pids if p in stats)


def one_round(folder: Path, hub: HubServer, model: Path, args) -> dict:
    refs = add_load_repos(hub, model, args.downloads)
    settings = {"cache_dir": str(folder / "cache"), "catalog_path": str(folder / "catalog.sqlite"),
                "hub_endpoint": hub.url, "max_concurrent_downloads": args.downloads, "sse_keepalive_s": 5.0}
    with ServerProcess(folder, rbee=settings) as server:
        worker_id = load_worker(server, model)
        if args.quiet_wait > 0:
            wait_for_quiet()
        cpu0 = _cpu_s(server.proc.pid)
        with MachineLoad() as load:
            result = asyncio.run(run_load(server, hub, refs, worker_id, subscribers=args.subscribers,
                                          generations=args.generations, chunk_delay_s=args.chunk_delay))
        server_cpu = _cpu_s(server.proc.pid) - cpu0
    delays = result.delays()
    terminal = [sub.frames[-1][2] - sub.frames[-2][2] for sub in result.subscribers if len(sub.frames) >= 2]
    gens_ok = sum(1 for g in result.generations if g and g[-1] == "[DONE]" and g[-2].get("type") == "end")
    return {"deliveries": len(delays), "median_ms": statistics.median(delays) * 1e3,
            "p99_ms": percentile(delays, 99) * 1e3, "max_ms": max(delays) * 1e3,
            "done_gap_p99_ms": percentile(terminal, 99) * 1e3, "incomplete": len(result.incomplete()),
            "generations_ok": gens_ok, "connect_s": result.connect_s, "run_s": result.run_s,
            "server_cpu_pct": 100 * server_cpu / load.wall_s,
            # MachineLoad counts children that are still running as "other": take the server out
            "other_pct": max(0.0, 100 * (load.other_s - server_cpu) / (load.wall_s * (os.cpu_count() or 1)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--downloads", type=int, default=10)
    ap.add_argument("--generations", type=int, default=2)
    ap.add_argument("--chunk-delay", type=float, default=0.05,
                    help="seconds the hub sleeps between 64 KiB chunks while the load runs (a ~1.3 MB/s link)")
    ap.add_argument("--rounds", type=int, default=1)
    add_machine_options(ap)
    args = ap.parse_args()
    apply_machine_options(args)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    print(f"{os.cpu_count()} CPUs; {args.subscribers} SSE subscribers over {args.downloads} download streams, "
          f"{args.generations} generations, one real jupyter server + worker", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, HubServer() as hub:
        model = make_tiny_model(Path(tmp) / "tiny-llama")
        for i in range(args.rounds):
            rows.append(one_round(Path(tmp) / f"round{i}", hub, model, args))
            print(f"  round {i + 1}: {rows[-1]['deliveries']} deliveries measured", flush=True)

    print("\nDelay = arrival at a subscriber - first arrival of the same event at any subscriber of its stream")
    print("| round | deliveries | median ms | p99 ms | max ms | [DONE] gap p99 ms | incomplete streams "
          "| generations ok | connect s | run s | server+worker CPU | other procs |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(rows, 1):
        print(f"| {i} | {r['deliveries']} | {r['median_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} "
              f"| {r['done_gap_p99_ms']:.1f} | {r['incomplete']} | {r['generations_ok']}/{args.generations} "
              f"| {r['connect_s']:.1f} | {r['run_s']:.1f} | {r['server_cpu_pct']:.0f}% | {r['other_pct']:.0f}% |")
    if any(r["incomplete"] or r["generations_ok"] != args.generations for r in rows):
        print("!! some streams did not end with their terminal event and [DONE]")
        sys.exit(1)
    print("server+worker CPU: % of one core over connect + run; other procs: % of the whole machine used by "
          "processes outside this bench and its server"
          + ("  !! timings skewed" if any(r["other_pct"] > 10 for r in rows) else ""))


if __name__ == "__main__":
    main()
