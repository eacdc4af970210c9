"""Progress views: states, the widget parts, the stable text/plain, tables and the text fallbacks.

The views are fed the events a real hive publishes (rbee_jupyter.events formats); their widgets are
real ipywidgets (without a kernel their comms are inert, the traits are what a frontend
would be sent). The terminal fallback is also checked in a real terminal IPython process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rbee_jupyter.testing.pytest_plugin import TINY_REPO
from rbee_jupyter.kernel.widgets import (DownloadView, GenerationView, LoadingView, Table, devices_table, models_table,
                                  progress_mode, workers_table)

REF = f"hf:{TINY_REPO}"
DOWNLOADING = {"stage": "downloading", "bytes_downloaded": 262_144, "bytes_total": 837_384, "speed_mbps": 16.0,
               "files_done": 3, "files_total": 6, "file": "model.safetensors"}
COMPLETE = {"stage": "complete", "local_path": "/cache/snap", "model_ref": REF, "size_bytes": 837_384}


def loading(n: int, total: int = 6, mb: int = 1) -> dict:
    return {"stage": "loading_to_vram", "layers_loaded": n, "layers_total": total, "vram_mb": mb * n,
            "device": "cpu", "block": f"layers.{n}", "memory_mb": {"cpu": mb * n}}


def test_download_view_running_then_done():
    view = DownloadView(REF, mode="widget", throttle_s=0)
    view.update(DOWNLOADING)
    assert view.state == "running"
    assert view.bar.bar_style == "" and view.bar.value == pytest.approx(262_144 / 837_384)
    assert view.label.value == f"downloading {REF}"
    for part in ("262.1 KB / 837.4 KB", "2.0 MB/s", "ETA 0 s", "3/6 files"):
        assert part in view.info.value
    view.update(COMPLETE)
    assert view.state == "done"
    assert view.bar.value == 1.0 and view.bar.bar_style == "success"
    assert view.label.value == f"✔ downloaded {REF}"
    assert "837.4 KB · 6 files" in view.info.value


def test_error_shows_the_message_and_a_red_bar():
    view = DownloadView(REF, mode="widget", throttle_s=0)
    view.update(DOWNLOADING)
    view.update({"stage": "error", "code": "MODEL_NOT_FOUND", "message": "no such repo <x>"})
    assert view.state == "error" and view.bar.bar_style == "danger"
    assert view.label.value == f"✘ download failed: {REF}"
    assert "MODEL_NOT_FOUND: no such repo &lt;x&gt;" in view.info.value and "error-color" in view.info.value
    view.update(COMPLETE)  # a finished view stays finished
    assert view.state == "error" and "MODEL_NOT_FOUND" in view.details


def test_cancelled_is_its_own_state():
    view = DownloadView(REF, mode="widget", throttle_s=0)
    view.update({"stage": "error", "code": "CANCELLED", "message": "Cancelled by the user."})
    assert view.state == "cancelled" and view.bar.bar_style == "warning"
    assert view.label.value == f"⊘ download cancelled: {REF}"
    assert "Cancelled by the user." in view.info.value


def test_loading_view_has_a_memory_bar_per_device():
    view = LoadingView(REF, mode="widget", device_totals_mb={"cpu": 16000, "cuda:0": 8000},
                       throttle_s=0)
    view.update({**DOWNLOADING, "bytes_downloaded": 837_384})  # a load job relays its download first
    assert view.label.value == f"downloading {REF}"
    view.update({"stage": "importing", "step": "dequantizing", "fraction": 0.5})  # a GGUF ref
    assert view.label.value == f"importing {REF}" and view.info.value == "<span>importing: dequantizing</span>"
    view.update(loading(3))
    assert view.label.value == f"loading {REF}" and view.bar.value == pytest.approx(0.5)
    view.update({**loading(4), "device": "cuda:0", "vram_mb": 7, "memory_mb": {"cpu": 3, "cuda:0": 7}})
    rows = {row.children[0].value.replace("&nbsp;", ""): row for row in view.memory_box.children}
    assert set(rows) == {"cpu", "cuda:0"}
    gpu_bar, gpu_text = rows["cuda:0"].children[1:]
    assert gpu_bar.max == 8000 and gpu_bar.value == 7 and gpu_text.value == "7 MB / 8000 MB"
    view.update({"stage": "ready", "worker_id": "w-1", "memory_mb": {"cpu": 3, "cuda:0": 9}})
    assert view.state == "done" and view.bar.bar_style == "success" and view.bar.value == 1.0
    assert view.label.value == f"✔ loaded {REF}"
    assert "6/6 blocks" in view.info.value and "cuda:0 9 MB" in view.info.value and " s" in view.info.value
    assert rows["cuda:0"].children[1].value == 9


def test_generation_view_streams_text_and_reports_tokens_per_second(capsys):
    view = GenerationView(REF, mode="widget", max_tokens=4, throttle_s=0)
    view.update({"type": "started", "job_id": "j1", "timestamp": 1})
    for i, piece in enumerate(["Once", " upon", " a"]):
        view.update({"type": "token", "t": piece, "i": i})
    assert capsys.readouterr().out == "Once upon a"
    assert view.bar.value == pytest.approx(0.75) and "3 tokens" in view.info.value
    view.update({"type": "end", "job_id": "j1", "total_tokens": 3, "duration_ms": 30, "stop_reason": "eos",
                 "tokens_per_second": 100.0})
    assert view.state == "done" and view.bar.bar_style == "success"
    assert view.info.value.endswith("3 tokens · 100.0 tok/s · stop: eos</span>")


def test_background_generation_writes_into_the_widget(capsys):
    view = GenerationView(REF, mode="widget", text_to_stdout=False, throttle_s=0)
    view.update({"type": "token", "t": "a < b", "i": 0})
    assert capsys.readouterr().out == ""
    assert "a &lt; b" in view.text_area.value


def test_text_plain_is_constant_for_nbval():
    view = DownloadView(REF, mode="widget", throttle_s=0)
    before = view._repr_mimebundle_()
    view.update(DOWNLOADING)
    view.update(COMPLETE)
    after = view._repr_mimebundle_()
    assert before["text/plain"] == after["text/plain"] == f"download {REF}"
    assert after["application/vnd.jupyter.widget-view+json"]["model_id"] == view.box.model_id


def test_progress_mode_outside_a_kernel_is_terminal(monkeypatch):
    monkeypatch.delenv("RBEE_PROGRESS", raising=False)
    assert progress_mode() == "terminal"
    monkeypatch.setenv("RBEE_PROGRESS", "text")
    assert progress_mode() == "text"


def test_terminal_fallback_is_one_updating_line(capsys):
    view = DownloadView(REF, mode="terminal", throttle_s=0).show()
    view.update(DOWNLOADING)
    view.update(COMPLETE)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.endswith("\n"), out  # one line, rewritten with \r
    frames = out.rstrip("\n").split("\r")[1:]
    assert frames[0] == f"downloading {REF}"
    assert frames[1].startswith("downloading ██") and "837.4 KB" in frames[1]
    assert frames[-1].rstrip() == f"✔ downloaded {REF} — 837.4 KB · 6 files"


def test_tables_render_html_and_text():
    rows = [{"id": "w-1", "model_ref": REF, "state": "idle", "devices": ["cpu"], "memory_mb": {"cpu": 3},
             "quantization": None}]
    table = workers_table(rows)
    assert len(table) == 1 and table[0]["id"] == "w-1"
    html = table._repr_html_()
    assert "<table" in html and "<th style='text-align:left'>STATE</th>" in html and "cpu 3 MB" in html
    lines = repr(table).splitlines()
    assert lines[0].split() == ["ID", "MODEL", "STATE", "DEVICES", "MEMORY", "QUANT"]
    assert lines[1].split()[:3] == ["w-1", REF, "idle"]
    assert repr(models_table([])) == "models: no models downloaded (download one with %rbee download REF)"
    devices = devices_table([{"name": "cpu", "label": "CPU", "total_bytes": 2_000_000_000, "free_bytes": 10**9}])
    assert "2.0 GB" in repr(devices) and "1.0 GB" in devices._repr_html_()
    assert isinstance(table, Table)


def test_terminal_ipython_shows_a_text_line(rbee_hub, tmp_path):
    """A real terminal IPython (embedded mode): the download magic prints one updating line."""
    env = {**os.environ, "RBEE_CACHE_DIR": str(tmp_path / "cache"), "RBEE_CATALOG_PATH": str(tmp_path / "c.sqlite"),
           "HF_ENDPOINT": rbee_hub.url, "IPYTHONDIR": str(tmp_path / "ipython")}
    for name in ("RBEE_SERVER_URL", "JPY_PARENT_PID", "RBEE_PROGRESS", "RBEE_SERVER_PID"):
        env.pop(name, None)
    code = f"%load_ext rbee_jupyter.kernel.magics\n%rbee download {REF}\n%rbee status"
    proc = subprocess.run([sys.executable, "-m", "IPython", "--no-banner", "--colors=NoColor", "-c", code],
                          env=env, capture_output=True, timeout=120)
    out = proc.stdout.decode()  # bytes: text mode would turn each \r into \n
    assert proc.returncode == 0, proc.stderr.decode() + out
    line = next(chunk for chunk in out.split("\n") if "downloaded" in chunk)
    assert line.startswith(f"\rdownloading {REF}")
    assert line.split("\r")[-1].rstrip().startswith(f"✔ downloaded {REF} — 837.4 KB")
    assert "rbee: embedded mode" in out and "workers: 0 (0 ready) · models: 1" in out
