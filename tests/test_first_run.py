"""A fresh account: folders that do not exist yet, the first load, and what an internal error leaves.

A fresh account has no ``~/.cache/huggingface``, a new JupyterHub user an empty home: every
folder we write into (the hub cache, the catalog's folder) is two levels or more below the
nearest folder that exists. Each way in — a real ``jupyter server`` with a kernel using it,
``c.RbeeApp.cache_dir``, embedded mode in a real kernel, and ``rbee-jupyter demo`` — must
create them on first use. And an unexpected exception inside a job must leave its traceback,
the job id and the request in the server log, once.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from rbee_jupyter.testing.pytest_plugin import TINY_REPO
from rbee_jupyter.testing.server import ServerProcess
from rbee_jupyter.testing.sse import read_stream

TINY = f"hf:{TINY_REPO}"
# transformers' and tokenizers' own bars: none may reach our output
BARS = ("Writing model shards", "Loading weights", "Loading checkpoint shards", "it/s]", "s/it]")


def snapshot_of(cache: Path, repo: str = TINY_REPO) -> list[Path]:
    return sorted((cache / f"models--{repo.replace('/', '--')}" / "snapshots").iterdir())


def run_notebook(cells: list[str], folder: Path) -> list[list[dict]]:
    """Run ``cells`` in a real kernel (nbclient); returns each cell's outputs."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    return [cell.outputs for cell in nb.cells]


def printed(outputs: list[dict]) -> str:
    return "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")


@pytest.fixture
def kernel_env(monkeypatch, tmp_path):
    """Kernels started from here find no server but the one a test names (no runtime files, no parent)."""
    for name in ("RBEE_SERVER_URL", "RBEE_TOKEN", "JPY_PARENT_PID", "RBEE_SERVER_PID", "RBEE_SERVER_SOCK",
                 "RBEE_CACHE_DIR", "RBEE_CATALOG_PATH", "HF_HUB_CACHE", "RBEE_PROGRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "kernel-runtime"))
    return monkeypatch


def test_a_server_with_a_new_hf_home_loads_from_a_kernel(rbee_hub, tmp_path, kernel_env):
    """HF_HOME and the Jupyter data folder do not exist; `%rbee load` in a real kernel downloads and loads."""
    hf_home = tmp_path / "home" / "new-user" / "hf"  # two levels below tmp_path
    data_dir = tmp_path / "home" / "new-user" / "jupyter-data"
    env = {"HF_HOME": str(hf_home), "JUPYTER_DATA_DIR": str(data_dir)}
    with ServerProcess(tmp_path / "server", rbee={"hub_endpoint": rbee_hub.url}, env=env) as server:
        kernel_env.setenv("RBEE_SERVER_URL", server.url)
        kernel_env.setenv("RBEE_TOKEN", server.token)
        # When
        outputs = run_notebook(["%load_ext rbee_jupyter.kernel.magics",
                                f"w = %rbee load {TINY} --device cpu\nprint(w.state)",
                                f"%rbee unload {TINY}"], tmp_path)
        # Then
        assert printed(outputs[1]).strip().endswith("idle"), outputs[1]
        [snapshot] = snapshot_of(hf_home / "hub")
        assert (snapshot / "config.json").is_file()
        assert (data_dir / "rbee" / "catalog.sqlite").is_file()
        assert [m["local_path"] for m in server.get("v1/models").json()["models"]] == [str(snapshot)]
        log = server.log()
    assert "Traceback" not in log and "INTERNAL_ERROR" not in log, log[-4000:]


@pytest.fixture
def rbee_cache_dir(tmp_path):
    """This module's in-process servers: the cache two levels below a folder that exists."""
    return tmp_path / "a" / "b" / "cache"


@pytest.fixture
def jp_server_config(rbee_config, tmp_path):
    """... and the catalog too."""
    return {"ServerApp": {"jpserver_extensions": {"rbee_jupyter": True}},
            "RbeeApp": {**rbee_config, "catalog_path": str(tmp_path / "c" / "d" / "catalog.sqlite")}}


async def test_cache_dir_and_catalog_two_levels_down(jp_serverapp, rbee_http, tmp_path):
    app = next(iter(jp_serverapp.extension_manager.extension_apps["rbee_jupyter"]))
    cache = Path(app.hive.config.cache_dir)
    assert cache == tmp_path / "a" / "b" / "cache" and not cache.parent.exists()

    # When
    r = await rbee_http.post("v1/models/download", json={"model_ref": TINY})
    assert r.status_code == 202, r.text
    stream = await read_stream(rbee_http, "GET", f"v1/models/download/progress?id={r.json()['download_id']}",
                               headers={"Last-Event-ID": "0"}, timeout=120)

    # Then
    assert stream.done and stream.events[-1]["stage"] == "complete", stream.events[-1]
    assert [Path(stream.events[-1]["local_path"])] == snapshot_of(cache)
    assert (tmp_path / "c" / "d" / "catalog.sqlite").is_file()


def test_embedded_mode_in_a_kernel_with_a_new_hf_home(rbee_hub, tmp_path, kernel_env):
    hf_home = tmp_path / "home" / "new-user" / "hf"
    data_dir = tmp_path / "home" / "new-user" / "jupyter-data"
    kernel_env.setenv("HF_HOME", str(hf_home))
    kernel_env.setenv("JUPYTER_DATA_DIR", str(data_dir))
    kernel_env.setenv("HF_ENDPOINT", rbee_hub.url)

    outputs = run_notebook(["%load_ext rbee_jupyter.kernel.magics",
                            "s = %rbee status\nprint(s)",
                            f"w = %rbee load {TINY} --device cpu\nprint(w.state)",
                            f"%rbee unload {TINY}"], tmp_path)

    assert printed(outputs[1]).startswith("rbee: embedded mode"), outputs[1]
    assert printed(outputs[2]).strip().endswith("idle"), outputs[2]
    [snapshot] = snapshot_of(hf_home / "hub")
    assert (snapshot / "config.json").is_file()
    assert (data_dir / "rbee" / "catalog.sqlite").is_file()


def cli(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rbee_jupyter.cli", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_demo_on_a_fresh_account_prints_only_our_lines(tmp_path):
    hf_home = tmp_path / "home" / "new-user" / "hf"
    cache = tmp_path / "home" / "new-user" / "rbee-demo" / "cache"
    proc = cli("demo", "--tiny", "--max-tokens", "4", "--cache-dir", str(cache), env={"HF_HOME": str(hf_home)})
    out, _ = proc.communicate(timeout=300)

    assert proc.returncode == 0, out
    lines = out.splitlines()
    assert lines[0] == "rbee-jupyter demo: a local hub, a download, a layer-by-layer load, streamed tokens."
    assert any(line.startswith("downloaded hf:rbee-demo/tiny-llama → " + str(cache)) for line in lines), out
    assert any(line.startswith("ready w-") for line in lines) and "4 tokens in" in out, out
    assert [bar for bar in BARS if bar in out] == [], out
    assert [line for line in lines if not line.strip()] == ["", ""], out  # around the answer only


def test_the_local_hub_command_prints_only_our_lines():
    proc = cli("hub", env={})
    lines = []
    try:
        for line in proc.stdout:  # the model is made, then the hub says how to use it
            lines.append(line)
            if line.startswith("Ctrl-C stops it."):
                break
    finally:
        proc.terminate()
        proc.wait(60)
        proc.stdout.close()
    out = "".join(lines)
    assert lines[0] == "Local hub serving hf:rbee-test/tiny-llama.\n", out
    assert [bar for bar in BARS if bar in out] == [], out


async def test_an_internal_error_is_logged_once_with_its_traceback(jp_serverapp, rbee_http, caplog):
    app = next(iter(jp_serverapp.extension_manager.extension_apps["rbee_jupyter"]))

    def resolve(*args, **kwargs):  # a bug in our code, as the first download on a fresh account met
        raise FileNotFoundError(2, "No such file or directory", "/the/missing/folder")

    app.hive.downloader.resolve = resolve
    caplog.set_level(logging.ERROR, logger="rbee_jupyter")

    # When: a load, whose download job fails first and hands the same error to the load job
    r = await rbee_http.post("v1/workers", json={"model_ref": TINY, "device": "cpu"})
    assert r.status_code == 202, r.text
    worker_id = r.json()["worker_id"]
    stream = await read_stream(rbee_http, "GET", f"v1/loading/progress?id={worker_id}",
                               headers={"Last-Event-ID": "0"}, timeout=60)

    # Then: the user gets one line and where to look
    error = stream.events[-1]
    assert stream.done and error["stage"] == "error" and error["code"] == "INTERNAL_ERROR", error
    [download] = app.hive.jobs.list("download")
    assert error["message"] == ("FileNotFoundError: [Errno 2] No such file or directory: '/the/missing/folder'. "
                                "This is a bug in rbee-jupyter; the server log has the details "
                                f"(look for job {download.id}).")
    # ... and the log has the traceback, the job and the request, once for the two jobs
    [record] = [r for r in caplog.records if r.name.startswith("rbee_jupyter")]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == (f"rbee: internal error in download job {download.id} (owner {download.owner}); "
                                   f"request: {{'model_ref': '{TINY}'}}")
    assert record.exc_info[1] is download.error
    text = logging.Formatter().format(record)
    assert "Traceback (most recent call last)" in text and "in resolve" in text
