"""The layering is a contract, checked here rather than remembered.

``lint-imports`` runs the import-linter contracts of pyproject.toml (nothing imports upward;
the server, core, kernel and pool layers never import torch and friends themselves),
``ruff check`` the lint rules, and a fresh interpreter proves that importing the server,
the hive, the pools and the kernel client loads no torch: a Jupyter server that is not
asked to load a model, and every kernel that only talks to it, never pays torch's import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' brings it")
    return path


def test_import_contracts_hold():
    result = _run([_tool("lint-imports"), "--no-cache"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_ruff_passes():
    result = _run([_tool("ruff"), "check", "--no-cache", "."])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("modules", [
    "rbee_jupyter.server.app, rbee_jupyter.core.hive, rbee_jupyter.kernel.client",
    "rbee_jupyter.protocol, rbee_jupyter.pools.local, rbee_jupyter.pools.engines, rbee_jupyter.core.feed",
    "rbee_jupyter.kernel.magics, rbee_jupyter.kernel.embedded, rbee_jupyter.worker.protocol",
])
def test_the_light_layers_import_no_torch(modules):
    heavy = ("torch", "transformers", "bitsandbytes", "accelerate")
    code = f"import sys, {modules}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    result = _run([sys.executable, "-c", code], timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importing {modules} loaded {result.stdout.strip()}"
