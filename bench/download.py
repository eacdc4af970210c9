"""Benchmark: downloads through rbee (real jupyter server + SSE) against plain snapshot_download,
on a loopback hub shaped like a network.

Two repositories of random bytes (incompressible): ``sharded``, 4 safetensors shards of 40 MB
(+ index and config), and ``single``, one 160 MB safetensors file (the shape of a GGUF repo).
Three network shapes, set on the local HubServer (in this process):

* (a) loopback, no cap;
* (b) each connection capped at 20 MB/s (a CDN's per-connection limit);
* (c) a 100 MB/s link shared by every connection (a token bucket).

For every (shape, repo), rounds alternate the order of the two contenders:

* rbee:  one ``jupyter server`` with the extension, started once *before* any clock; each run
  downloads a repository id it has never seen (the same bytes published under a fresh id),
  so its cache is fresh. Timed from ``POST v1/models/download`` until the stream's ``[DONE]``
  (planning, transfer, hash checks, catalog, the SSE hop). The server's CPU time per MB is
  read from /proc, so parallelism paid for with a busy server would show.
* plain: a fresh Python subprocess that has already imported huggingface_hub, timed from
  sending it a fresh cache dir until ``snapshot_download`` returned (8 file workers, its
  default; tqdm bars off). Its CPU per MB is read the same way.

Usage: python bench/download.py [--rounds 3] [--shapes abc] [--repos sharded,single] [--nice -10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import MachineLoad, add_machine_options, apply_machine_options, cpu_of, wait_for_quiet  # noqa: E402

REPO_ID = "bench/random-200mb"

_PLAIN_WORKER = r"""
import json, sys, time
from huggingface_hub import snapshot_download
endpoint, repo_id = sys.argv[1], sys.argv[2]
print("ready", flush=True)
cache_dir = sys.stdin.readline().strip()
t0 = time.perf_counter()
path = snapshot_download(repo_id, endpoint=endpoint, cache_dir=cache_dir)
print(json.dumps({"path": path, "inner_s": time.perf_counter() - t0}), flush=True)
"""


def make_repo(folder: Path, size_mb: int, shards: int) -> Path:
    """Shards of random uint8 tensors (incompressible) plus a config.json."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    per_shard = size_mb * 10**6 // shards
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        half = per_shard // 2
        tensors = {f"layer{i}.a": torch.randint(0, 256, (half,), dtype=torch.uint8, generator=gen),
                   f"layer{i}.b": torch.randint(0, 256, (per_shard - half,), dtype=torch.uint8, generator=gen)}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": size_mb * 10**6}, "weight_map": weight_map}, indent=1))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "note": "random bytes, not loadable"}))
    return folder


def repo_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


SHAPES = {  # name: (label, per-connection cap, link cap), bytes per second
    "a": ("loopback, no cap", None, None),
    "b": ("20 MB/s per connection", 20e6, None),
    "c": ("100 MB/s shared link", None, 100e6),
}
REPOS = {"sharded": 4, "single": 1}  # name: shards of 160 MB in all


def run_rbee(server, repo_id: str) -> dict:
    from rbee_jupyter.testing.sse import parse_frames

    os.sync()  # earlier runs' dirty pages are not flushed on this run's clock
    cpu0 = cpu_of(server.proc.pid)
    t0 = time.perf_counter()
    r = server.post("v1/models/download", {"model_ref": f"hf:{repo_id}"})
    r.raise_for_status()
    url = r.json()["progress_url"]
    events, buf, done, last = 0, "", False, {}
    with server.client.stream("GET", f"http://127.0.0.1:{server.port}{url}", timeout=300) as resp:
        resp.raise_for_status()
        for chunk in resp.iter_text():
            buf += chunk
            while "\n\n" in buf:
                block, buf = buf.split("\n\n", 1)
                for f in parse_frames(block + "\n\n"):
                    if f.data == "[DONE]":
                        done = True
                    elif f.comment is None:
                        events += 1
                        last = f.data
            if done:
                break
    elapsed = time.perf_counter() - t0
    cpu = cpu_of(server.proc.pid) - cpu0
    if not done or last.get("stage") != "complete":
        raise RuntimeError(f"rbee download did not complete: {last}\n{server.log()[-3000:]}")
    size = repo_bytes(Path(last["local_path"]))
    shutil.rmtree(Path(last["local_path"]).parents[1], ignore_errors=True)  # this repo's cache folder
    return {"s": elapsed, "events": events, "bytes": size, "cpu_s": cpu}


def run_plain(hub_url: str, repo_id: str, work: Path, i: int) -> dict:
    folder = work / f"plain-{i}"
    cache = folder / "cache"
    cache.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _PLAIN_WORKER, hub_url, repo_id], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"  # imports done before the clock
    os.sync()
    cpu0 = cpu_of(proc.pid)
    t0 = time.perf_counter()
    proc.stdin.write(f"{cache}\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - t0
    cpu = cpu_of(proc.pid) - cpu0
    proc.stdin.close()
    proc.wait(30)
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"snapshot_download failed (rc {proc.returncode})")
    out = json.loads(line)
    size = repo_bytes(Path(out["path"]))
    shutil.rmtree(folder, ignore_errors=True)
    return {"s": elapsed, "inner_s": out["inner_s"], "bytes": size, "cpu_s": cpu}


# --- profile -----------------------------------------------------------------------------

def profile_rbee(hub_url: str, work: Path) -> None:
    """cProfile the Downloader (what the server runs in its worker thread), plus a phase split."""
    import cProfile
    import io
    import pstats
    import threading

    import rbee_jupyter.hub.download as dl
    from rbee_jupyter.core.refs import parse_ref

    cache = work / "profile-cache"
    d = dl.Downloader(cache_dir=cache, endpoint=hub_url)
    ref = parse_ref(f"hf:{REPO_ID}")
    phases = {"transfer": 0.0, "digest": 0.0}
    orig_transfer, orig_digest = dl.Downloader._transfer, dl._digest

    def timed_transfer(self, *a, **k):
        t = time.perf_counter()
        try:
            return orig_transfer(self, *a, **k)
        finally:
            phases["transfer"] += time.perf_counter() - t

    def timed_digest(*a, **k):
        t = time.perf_counter()
        try:
            return orig_digest(*a, **k)
        finally:
            phases["digest"] += time.perf_counter() - t

    dl.Downloader._transfer, dl._digest = timed_transfer, timed_digest
    emitted = []
    try:
        t0 = time.perf_counter()
        plan = d.resolve(ref)
        t_resolve = time.perf_counter() - t0
        prof = cProfile.Profile()
        t1 = time.perf_counter()
        prof.enable()
        d.fetch(plan, emit=emitted.append, cancel=threading.Event())
        prof.disable()
        t_fetch = time.perf_counter() - t1
    finally:
        dl.Downloader._transfer, dl._digest = orig_transfer, orig_digest
        shutil.rmtree(cache, ignore_errors=True)
    other = t_fetch - phases["transfer"] - phases["digest"]
    print("\nProfile of Downloader in-process (hub in the same process, so absolute times differ):")
    print(f"  resolve {t_resolve:.3f} s | fetch {t_fetch:.3f} s = transfer {phases['transfer']:.3f} s "
          f"+ sha256 re-read {phases['digest']:.3f} s + other {other:.3f} s | {len(emitted)} progress events")
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
    print("\n".join(line for line in s.getvalue().splitlines()[6:] if line.strip()))


# --- main --------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size-mb", type=int, default=160)
    ap.add_argument("--shapes", default="abc", help="which network shapes to run (letters of a, b, c)")
    ap.add_argument("--repos", default="sharded,single")
    add_machine_options(ap)
    ap.add_argument("--profile", action="store_true", help="also cProfile rbee's Downloader in-process")
    args = ap.parse_args()
    apply_machine_options(args)

    from rbee_jupyter.testing.hub import HubServer
    from rbee_jupyter.testing.server import ServerProcess

    repos = args.repos.split(",")
    with tempfile.TemporaryDirectory(prefix="rbee-bench-dl-") as tmp:
        work = Path(tmp)
        contents: dict[str, dict[str, bytes]] = {}
        for name in repos:
            folder = make_repo(work / name, args.size_mb, REPOS[name])
            contents[name] = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
            shutil.rmtree(folder)  # the hub holds the bytes in memory
        with HubServer() as hub, ServerProcess(work / "rbee", rbee={
                "hub_endpoint": hub.url, "cache_dir": str(work / "rbee-cache")}) as server:
            server.get("v1/models").raise_for_status()  # warm the route and the client connection
            MachineLoad.pids = (server.proc.pid,)
            rows = []
            other_s = wall_s = 0.0
            n = 0
            for shape in args.shapes:
                label, per_connection, link = SHAPES[shape]
                hub.faults.connection_rate_bps, hub.faults.link_rate_bps = per_connection, link
                for name in repos:
                    total = sum(map(len, contents[name].values()))
                    results: dict[str, list[dict]] = {"rbee": [], "plain": []}
                    for i in range(args.rounds):
                        order = ("rbee", "plain") if i % 2 == 0 else ("plain", "rbee")
                        for who in order:
                            n += 1
                            repo_id = f"bench/{name}-{shape}-{who}-{i}"
                            hub.add_repo(repo_id, extra_files=contents[name])
                            if args.quiet_wait > 0:
                                wait_for_quiet()
                            with MachineLoad() as load:
                                r = run_rbee(server, repo_id) if who == "rbee" else run_plain(hub.url, repo_id, work, n)
                            other_s, wall_s = other_s + load.other_s, wall_s + load.wall_s
                            if r["bytes"] != total:
                                raise RuntimeError(f"{who} fetched {r['bytes']} bytes, expected {total}")
                            results[who].append(r)
                            print(f"({shape}) {name:7s} round {i + 1} {who:5s} {r['s']:.3f} s, "
                                  f"cpu {r['cpu_s']:.2f} s (other processes: {load.other_pct:.0f}% CPU)", flush=True)
                    rb = statistics.median(r["s"] for r in results["rbee"])
                    pl = statistics.median(r["s"] for r in results["plain"])
                    cpu_rb = statistics.median(r["cpu_s"] for r in results["rbee"]) / (total / 1e6)
                    cpu_pl = statistics.median(r["cpu_s"] for r in results["plain"]) / (total / 1e6)
                    rows.append((shape, label, name, total, pl, rb, cpu_pl, cpu_rb, link))
            load.other_pct = 100 * other_s / (wall_s * (os.cpu_count() or 1))
            if hub.errors:
                print("hub errors:", *hub.errors, sep="\n")

    goals = {("b", "sharded"): 0.9, ("b", "single"): 0.35}
    print(f"\nDownloads of 160 MB from a loopback hub shaped like a network, {args.rounds} rounds alternating "
          "(medians; MB = 10^6 bytes; CPU ms per MB: the jupyter server's for rbee, the process's for plain)")
    print("| shape | repo | snapshot_download s | rbee s | rbee / plain | goal | % of link | CPU ms/MB plain | CPU ms/MB rbee |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|")
    for shape, label, name, total, pl, rb, cpu_pl, cpu_rb, link in rows:
        ratio = rb / pl
        goal = goals.get((shape, name), 1.0 if shape == "a" else None)
        verdict = "" if goal is None else f"<= {goal} {'OK' if ratio <= goal else 'MISSED'}"
        of_link = ""
        if link:
            share = 100 * total / rb / link
            of_link = f"{share:.0f} % {'OK' if share >= 90 else 'MISSED'}"
        print(f"| ({shape}) {label} | {name} | {pl:.2f} | {rb:.2f} | {ratio:.2f} | {verdict} | {of_link} | "
              f"{1000 * cpu_pl:.2f} | {1000 * cpu_rb:.2f} |")
    print(load.note())
    if args.profile:
        with HubServer() as hub:
            hub.add_repo(REPO_ID, extra_files=contents[repos[0]])
            profile_rbee(hub.url, Path(tempfile.mkdtemp(prefix="rbee-bench-prof-")))


if __name__ == "__main__":
    main()
