"""Finding 8: the private Ray cluster the hive starts is closed to everyone else."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

pytest.importorskip("ray")

from rbee_jupyter.pools.ray import private_cluster_options


def test_the_private_cluster_needs_a_token_and_has_no_dashboard(monkeypatch, tmp_path):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "an operator's old token")

    # When the hive prepares the cluster it starts itself, twice
    options = private_cluster_options(token_dir=str(tmp_path))
    first = os.environ["RAY_AUTH_TOKEN_PATH"]
    private_cluster_options(token_dir=str(tmp_path))
    second = os.environ["RAY_AUTH_TOKEN_PATH"]

    # Then ray.init gets no dashboard, and Ray is told to demand a token
    assert options == {"include_dashboard": False}
    assert os.environ["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in os.environ
    # a fresh, long random token each time, readable by this user only, in a folder only it can enter
    tokens = {Path(p).read_text() for p in (first, second)}
    assert len(tokens) == 2 and all(len(t) == 64 for t in tokens)
    for path in (first, second):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700


@pytest.mark.ray
@pytest.mark.skipif(os.environ.get("RBEE_TEST_RAY") != "1", reason="starts a Ray instance (slow): RBEE_TEST_RAY=1")
def test_a_client_without_the_token_is_refused():
    """The real thing, in a child process (Ray is process-wide): the private cluster refuses a client
    that does not hold its token."""
    import shutil
    import subprocess
    import sys
    import tempfile
    import textwrap

    folder = tempfile.mkdtemp(prefix="rbee-ray-", dir="/tmp")  # short: Ray's socket paths must fit

    script = textwrap.dedent(f"""
        import os, subprocess, sys
        from rbee_jupyter.pools.ray import private_cluster_options
        import ray
        ray.init(log_to_driver=False, num_cpus=1, _temp_dir={folder!r}, **private_cluster_options())
        gcs = ray.get_runtime_context().gcs_address
        env = {{k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}}
        probe = "import ray; ray.init(address=%r); print('CONNECTED')" % gcs
        r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        print("REFUSED" if r.returncode != 0 and "CONNECTED" not in r.stdout else "OPEN")
        ray.shutdown()
    """)
    try:
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=400, check=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert "REFUSED" in r.stdout, r.stdout + r.stderr[-2000:]
