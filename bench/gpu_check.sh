#!/usr/bin/env bash
# GPU check of the layer-by-layer loader (see bench/gpu_check.py): one command, a few minutes on an H100.
#
#   bash bench/gpu_check.sh                 # needs an NVIDIA GPU and torch built with CUDA
#   bash bench/gpu_check.sh --cpu-dry-run   # the same steps on the CPU with a tiny model
#   bash bench/gpu_check.sh --only batching # only the batching rows (issue 16): ~3-4 min on an H200
#
# Installs nothing but what pip can get, and only when something is missing: the project itself
# (`pip install -e .`), with the torch already installed pinned so that pip never replaces it.
# Environment: PYTHON (default: the first of python, python3 that imports torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [[ -z $PY ]]; then
  for c in python python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import torch' 2>/dev/null; then PY=$c; break; fi
  done
  PY=${PY:-python3}
fi

dry=0
for a in "$@"; do [[ $a == --cpu-dry-run ]] && dry=1; done

# 1. torch, and CUDA unless dry-running: fail fast, before installing or generating anything.
if ! torch_version=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
  echo "gpu_check: torch is not importable with $PY; install torch (with CUDA) first." >&2
  exit 2
fi
if [[ $dry == 0 ]]; then
  "$PY" - <<'PYEOF' || exit 2
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
             "run it on a machine with an NVIDIA GPU and CUDA torch, or pass --cpu-dry-run.")
print(f"gpu_check: {torch.cuda.device_count()} CUDA device(s): {torch.cuda.get_device_name(0)}")
PYEOF
fi

# 2. The project and its dependencies: install only if something is missing, never touching torch.
need='import transformers, accelerate, bitsandbytes, safetensors, tokenizers, rbee_jupyter.core.hive, rbee_jupyter.engine.loader, rbee_jupyter.worker.app'
if ! PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "$need" 2>/dev/null; then
  echo "gpu_check: installing the project (pip install -e .), keeping torch $torch_version" >&2
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  echo "torch==$torch_version" > "$constraints"
  if ! "$PY" -m pip install -q -e . -c "$constraints" tokenizers; then
    echo "gpu_check: pip could not install the project's dependencies (no network?). Missing:" >&2
    PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "$need" >&2 || true
    exit 2
  fi
fi

# 3. The check itself (PYTHONPATH: this tree's rbee_jupyter, also for the worker processes).
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" bench/gpu_check.py "$@"
