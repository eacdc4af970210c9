"""The JupyterLab sidebar in a real browser (Debian's Chromium + playwright-core) against `jupyter lab`.

The scenarios live in ``labextension/test/``: ``browser.mjs`` (single user) and ``share.mjs``
(a shared hive). Each test starts the lab server with the extension and the local hub, runs
its script and answers the lines it prints (``RESTART``: stop the server, ``START``: start it
again; ``BUSY``: run four streams...), and prints where the screenshots are.
``labextension/ci.sh`` installs Chromium and the node packages.
"""

import os
import secrets
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
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

    def on_line(line: str) -> str | None:
        if line == "RESTART":  # stop, let the panel see it, then start again on START
            server.stop()
            return "STOPPED"
        if line == "START":
            server.start()
            return "RESTARTED"
        return None

    with server:
        code, log = run_script("browser.mjs", {
            "RBEE_LAB_URL": server.url, "RBEE_TOKEN": server.token, "RBEE_SHOTS": str(shots), "CHROMIUM": CHROMIUM,
            "RBEE_TINY_REF": f"hf:{TINY_REPO}", "RBEE_OTHER_REF": f"hf:{SHARDED_REPO}"}, on_line)
    assert code == 0 and log.strip().splitlines()[-1] == "OK", \
        f"browser scenario failed:\n{log}\n--- server log (tail) ---\n{server.log()[-4000:]}"


def run_script(script: str, env: dict[str, str], on_line) -> tuple[int, str]:
    """Run ``labextension/test/{script}``; ``on_line(line)`` may answer a command line (returned text goes to stdin)."""
    proc = subprocess.Popen(["node", str(LABEXT / "test" / script)], cwd=LABEXT, text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **env})
    killer = threading.Timer(540, proc.kill)
    killer.start()
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            sys.stdout.write(line)
            answer = on_line(line.strip())
            if answer is not None:
                proc.stdin.write(answer + "\n")
                proc.stdin.flush()
        proc.wait()
    finally:
        killer.cancel()
    return proc.returncode, "".join(out)


def test_share_button_and_load_line_in_a_shared_hive(rbee_hub, tmp_path):
    """Service mode: alice's row shows its kind and, while four streams run, its load; Share and Unshare
    change what bob sees; a load refused at POST (her cap) shows its reason in place at once."""
    assert (LABEXT / "node_modules" / "playwright-core").exists(), "node packages missing: run labextension/ci.sh"
    pytest.importorskip("jupyterlab", reason="jupyterlab is a test extra")
    shots = Path(os.environ.get("RBEE_SHOTS") or tmp_path / "screenshots")
    settings = {"cache_dir": str(tmp_path / "cache"), "catalog_path": str(tmp_path / "catalog.sqlite"),
                "hub_endpoint": rbee_hub.url, "sse_keepalive_s": 2.0, "service_mode": True, "max_batch_size": 8,
                "max_user_workers": 1}  # her one worker is her cap: the scenario's last load is refused
    server = ServerProcess(tmp_path / "lab", rbee=settings, module="jupyterlab", startup_timeout=120,
                           env={"RBEE_WORKER_TOKEN_DELAY_S": "0.03"},
                           server={"jpserver_extensions": {"rbee_jupyter": True, "jupyterlab": True},
                                   "identity_provider_class": "rbee_jupyter.testing.identity.TokenUsersIdentityProvider"})
    # the lab page hands its own (the server's) token to the frontend: here that token is alice's
    tokens = {"alice": server.token, "bob": secrets.token_hex(16)}
    server.config["TokenUsersIdentityProvider"] = {"users": {t: {"name": n} for n, t in tokens.items()}}
    with server:
        def user(name: str) -> httpx.Client:
            return httpx.Client(base_url=server.url + "rbee/", headers={"Authorization": f"token {tokens[name]}"},
                                timeout=60)
        alice, bob = user("alice"), user("bob")
        r = alice.post("v1/workers", json={"model_ref": f"hf:{TINY_REPO}", "device": "cpu"})
        assert r.status_code == 202, r.text
        worker_id = r.json()["worker_id"]
        with alice.stream("GET", f"v1/loading/progress?id={worker_id}", timeout=300) as stream:
            assert '"stage":"ready"' in "".join(stream.iter_text()).replace(" ", "")
        streams: list[threading.Thread] = []

        def generate() -> None:
            with user("alice") as own, own.stream("POST", "v1/inference", timeout=300, json={
                    "worker_id": worker_id, "prompt": "Once upon a time", "max_tokens": 200}) as answer:
                for _ in answer.iter_text():
                    pass

        def seen_by_bob() -> bool:
            return any(w["id"] == worker_id for w in bob.get("v1/workers").json()["workers"])

        def on_line(line: str) -> str | None:
            if line == "BUSY":
                streams.extend(threading.Thread(target=generate, daemon=True) for _ in range(4))
                for t in streams:
                    t.start()
                return "STARTED"
            if line == "SHARED":
                return "SEEN" if seen_by_bob() else "NOT SEEN"
            if line == "UNSHARED":
                return "GONE" if not seen_by_bob() else "STILL SEEN"
            return None

        try:
            code, log = run_script("share.mjs", {"RBEE_LAB_URL": server.url, "RBEE_TOKEN": tokens["alice"],
                                                  "RBEE_SHOTS": str(shots), "CHROMIUM": CHROMIUM}, on_line)
            for t in streams:
                t.join(300)
        finally:
            alice.delete(f"v1/workers/{worker_id}")
            alice.close()
            bob.close()
    assert code == 0 and log.strip().splitlines()[-1] == "OK", \
        f"browser scenario failed:\n{log}\n--- server log (tail) ---\n{server.log()[-4000:]}"
