"""Benchmark: a download through rbee (real jupyter server + SSE) against plain snapshot_download.

Generates a ~200 MB repository (4 safetensors shards of random bytes + config.json), serves
it from a local HubServer (loopback, in this process), then alternates, round by round:

* rbee:  a fresh ``jupyter server`` with the extension (fresh cache and catalog), started
  *before* the clock; timed from ``POST v1/models/download`` until the progress stream's
  ``[DONE]`` (so it includes planning, transfer, hash checks, the catalog and the SSE hop).
* plain: a fresh Python subprocess that has already imported huggingface_hub and waits on
  stdin; timed (here, by the parent) from sending it a fresh cache dir until it answers
  that ``snapshot_download(repo_id, endpoint=hub.url, cache_dir=...)`` returned. Its tqdm
  bars are off (they would only cost it time), so the comparison is strict.

Both fetch exactly the same files (rbee's file selection keeps every file of this repo),
from the same hub, into fresh caches on the same disk. The order alternates each round
and downloaded caches are deleted (and the disk synced) between runs.

Usage: python bench/download.py [--rounds 5] [--size-mb 200] [--shards 4] [--profile]
                                [--nice -10] [--quiet-wait 60]

``--profile`` adds a cProfile run of rbee's Downloader in this process (the code path the
server's worker thread runs) and prints where its time goes.
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

from machine import MachineLoad, add_machine_options, apply_machine_options, wait_for_quiet  # noqa: E402

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


def run_rbee(hub_url: str, work: Path, i: int) -> dict:
    from rbee_jupyter.testing.server import ServerProcess
    from rbee_jupyter.testing.sse import parse_frames

    folder = work / f"rbee-{i}"
    cache = folder / "cache"
    server = ServerProcess(folder, rbee={"hub_endpoint": hub_url, "cache_dir": str(cache)})
    with server:  # started (and answering) before the clock
        server.get("v1/models").raise_for_status()  # warm the route and the client connection
        os.sync()  # earlier runs' dirty pages are not flushed on this run's clock
        t0 = time.perf_counter()
        r = server.post("v1/models/download", {"model_ref": f"hf:{REPO_ID}"})
        r.raise_for_status()
        url = r.json()["progress_url"]
        events, buf, done, last = 0, "", False, {}
        with server.client.stream("GET", f"http://127.0.0.1:{server.port}{url}", timeout=120) as resp:
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
    if not done or last.get("stage") != "complete":
        raise RuntimeError(f"rbee download did not complete: {last}\n{server.log()[-3000:]}")
    size = repo_bytes(Path(last["local_path"]))
    shutil.rmtree(folder, ignore_errors=True)
    return {"s": elapsed, "events": events, "bytes": size}


def run_plain(hub_url: str, work: Path, i: int) -> dict:
    folder = work / f"plain-{i}"
    cache = folder / "cache"
    cache.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _PLAIN_WORKER, hub_url, REPO_ID], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"  # imports done before the clock
    os.sync()  # earlier runs' dirty pages are not flushed on this run's clock
    t0 = time.perf_counter()
    proc.stdin.write(f"{cache}\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - t0
    proc.wait(30)
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"snapshot_download failed (rc {proc.returncode})")
    out = json.loads(line)
    size = repo_bytes(Path(out["path"]))
    shutil.rmtree(folder, ignore_errors=True)
    return {"s": elapsed, "inner_s": out["inner_s"], "bytes": size}


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
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--shards", type=int, default=4)
    add_machine_options(ap)
    ap.add_argument("--profile", action="store_true", help="also cProfile rbee's Downloader in-process")
    args = ap.parse_args()
    apply_machine_options(args)

    from rbee_jupyter.testing.hub import HubServer

    with tempfile.TemporaryDirectory(prefix="rbee-bench-dl-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        repo = make_repo(work / "repo", args.size_mb, args.shards)
        total = repo_bytes(repo)
        print(f"repo: {total / 1e6:.1f} MB in {len(list(repo.iterdir()))} files "
              f"({args.shards} safetensors shards), made in {time.perf_counter() - t:.1f} s")
        with HubServer() as hub:
            hub.add_repo(REPO_ID, repo)
            shutil.rmtree(repo)  # the hub holds the bytes in memory
            results: dict[str, list[dict]] = {"rbee": [], "plain": []}
            other_s = wall_s = 0.0
            for i in range(args.rounds):
                order = ("rbee", "plain") if i % 2 == 0 else ("plain", "rbee")
                for name in order:
                    if args.quiet_wait > 0:
                        wait_for_quiet()
                    with MachineLoad() as load:
                        r = (run_rbee if name == "rbee" else run_plain)(hub.url, work, i)
                    other_s, wall_s = other_s + load.other_s, wall_s + load.wall_s
                    if r["bytes"] != total:
                        raise RuntimeError(f"{name} fetched {r['bytes']} bytes, expected {total}")
                    results[name].append(r)
                    extra = f", {r['events']} SSE events" if name == "rbee" else f", inner {r['inner_s']:.3f} s"
                    print(f"round {i + 1} {name:5s} {r['s']:.3f} s{extra} (other processes: {load.other_pct:.0f}% CPU)",
                          flush=True)
            load.other_pct = 100 * other_s / (wall_s * (os.cpu_count() or 1))
            if hub.errors:
                print("hub errors:", *hub.errors, sep="\n")

            rb = statistics.median(r["s"] for r in results["rbee"])
            pl = statistics.median(r["s"] for r in results["plain"])
            print(f"\nDownload of {total / 1e6:.1f} MB from a loopback hub, {args.rounds} rounds alternating "
                  f"(median; MB = 10^6 bytes)")
            print(f"| {'contender':28s} | {'median s':>8s} | {'min s':>6s} | {'max s':>6s} | {'MB/s':>6s} |")
            print(f"|{'-' * 30}|{'-' * 10}|{'-' * 8}|{'-' * 8}|{'-' * 8}|")
            for label, name, med in (("rbee (POST -> SSE [DONE])", "rbee", rb),
                                     ("plain snapshot_download", "plain", pl)):
                xs = [r["s"] for r in results[name]]
                print(f"| {label:28s} | {med:8.3f} | {min(xs):6.3f} | {max(xs):6.3f} | {total / 1e6 / med:6.1f} |")
            ratio = rb / pl
            print(f"\nratio rbee/plain = {ratio:.3f} (goal <= 1.05): {'OK' if ratio <= 1.05 else 'ABOVE GOAL'}")
            print(load.note())
            if args.profile:
                profile_rbee(hub.url, work)


if __name__ == "__main__":
    main()
