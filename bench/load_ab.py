"""Benchmark: this tree's ``load_model`` against another checkout's, same checkpoint, alternating.

bench/load.py compares us with ``from_pretrained``; on a shared machine its single nf4 loads
swing by 3× (page faults), so "did a change make loading slower?" is answered here instead:
each load in a fresh interpreter whose ``PYTHONPATH`` is one tree or the other, the same
imports warmed before the clock (bench/load.py's ``_warm_imports``), rounds alternating.

Usage: git worktree add --detach /tmp/old REV
       python bench/load_ab.py --old /tmp/old [--rounds 4] [--mode nf4] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, sys, time
tree, folder, mode = sys.argv[1:4]
sys.path.insert(0, tree + "/bench")
import load
load._warm_imports(folder, mode)
try:
    from rbee_jupyter.engine.loader import load_model
except ImportError:  # trees from before the engine/ layout
    from rbee_jupyter.loader import load_model
import rbee_jupyter
assert rbee_jupyter.__file__.startswith(tree), rbee_jupyter.__file__
start = time.perf_counter()
load_model(folder, quantization=None if mode == "fp32" else mode)
print(json.dumps(time.perf_counter() - start))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="the other checkout (a git worktree)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--mode", choices=("fp32", "nf4"), default="nf4")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/rbee-bench-models/load"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from load import make_model

    folder = make_model(args.model_dir)
    trees = {"old": args.old.resolve(), "this": ROOT}
    seconds: dict[str, list[float]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name in list(trees) if r % 2 == 0 else list(trees)[::-1]:
            env = dict(os.environ, PYTHONPATH=str(trees[name]), TRANSFORMERS_VERBOSITY="error",
                       PYTHONWARNINGS="ignore")
            done = subprocess.run([sys.executable, "-c", CHILD, str(trees[name]), str(folder), args.mode],
                                  env=env, capture_output=True, text=True, cwd=trees[name])
            if done.returncode:
                raise SystemExit(f"the {name} tree's load failed:\n{done.stderr[-3000:]}")
            seconds[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {name}: {seconds[name][-1]:.3f} s", flush=True)
    old, this = (statistics.median(seconds[n]) for n in trees)
    print(f"\n{args.mode} load_model, median of {args.rounds}: old ({args.old}) {old:.3f} s, this tree {this:.3f} s, "
          f"ratio this/old {this / old:.2f}")


if __name__ == "__main__":
    main()
