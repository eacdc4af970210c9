"""The JupyterLab sidebar in a real browser (Debian's Chromium + playwright-core) against `jupyter lab`.

The scenario lives in ``labextension/test/browser.mjs``; this test starts the lab server
with the extension and the local hub, runs the script, stops the server when the script
says ``RESTART`` and starts it again on ``START``, and prints where the screenshots are. ``labextension/ci.sh`` installs
Chromium and the node packages.
"""

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rbee_jupyter.testing.pytest_plugin import SHARDED_REPO, TINY_REPO
from rbee_jupyter.testing.server import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
LABEXT = ROOT / "labextension"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (apt-get install -y chromium; "
                                                           "labextension/ci.sh does it)"),
    pytest.mark.timeout(600),
]


def test_sidebar_in_chromium(rbee_hub, tmp_path):
    assert (LABEXT / "node_modules" / "playwright-core").exists(), \
        "node packages missing: run `npm ci` in labextension/ (labextension/ci.sh)"
    pytest.importorskip("jupyterlab", reason="jupyterlab is a test extra")
    shots = Path(os.environ.get("RBEE_SHOTS") or tmp_path / "screenshots")
    print(f"\nscreenshots: {shots}")
    rbee_hub.faults.chunk_delay_s = 0.25  # a few seconds per download: progress to see, time to cancel
    settings = {"cache_dir": str(tmp_path / "cache"), "catalog_path": str(tmp_path / "catalog.sqlite"),
                "hub_endpoint": rbee_hub.url, "sse_keepalive_s": 2.0}
    env = {"RBEE_WORKER_BLOCK_DELAY_S": "0.5", "RBEE_WORKER_TOKEN_DELAY_S": "0.03"}
    server = ServerProcess(tmp_path / "lab", rbee=settings, module="jupyterlab", env=env, startup_timeout=120,
                           server={"jpserver_extensions": {"rbee_jupyter": True, "jupyterlab": True}})
    with server:
        proc = subprocess.Popen(
            ["node", str(LABEXT / "test" / "browser.mjs")], cwd=LABEXT, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "RBEE_LAB_URL": server.url, "RBEE_TOKEN": server.token, "RBEE_SHOTS": str(shots),
                 "CHROMIUM": CHROMIUM, "RBEE_TINY_REF": f"hf:{TINY_REPO}", "RBEE_OTHER_REF": f"hf:{SHARDED_REPO}"})
        killer = threading.Timer(540, proc.kill)
        killer.start()
        out = []
        try:
            for line in proc.stdout:
                out.append(line)
                sys.stdout.write(line)
                command = line.strip()
                if command in ("RESTART", "START"):  # stop, let the panel see it, then start again
                    server.stop() if command == "RESTART" else server.start()
                    proc.stdin.write("STOPPED\n" if command == "RESTART" else "RESTARTED\n")
                    proc.stdin.flush()
            proc.wait()
        finally:
            killer.cancel()
    log = "".join(out)
    assert proc.returncode == 0 and out and out[-1].strip() == "OK", \
        f"browser scenario failed:\n{log}\n--- server log (tail) ---\n{server.log()[-4000:]}"
