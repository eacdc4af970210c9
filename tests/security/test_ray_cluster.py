"""Finding 8: the private Ray cluster the hive starts is closed to everyone else."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

pytest.importorskip("ray")

from rbee_jupyter.pools.ray import private_cluster_options

#: Starts a Ray instance (slow): only with RBEE_TEST_RAY=1, as the other Ray tests.
needs_ray = pytest.mark.skipif(os.environ.get("RBEE_TEST_RAY") != "1", reason="starts a Ray instance (slow): RBEE_TEST_RAY=1")


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
@needs_ray
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


_ACTOR_ENV_PROBE = """
import asyncio, json, os, sys
import ray
from rbee_jupyter.core.jobs import Job
from rbee_jupyter.pools.ray import RayPool
from rbee_jupyter.protocol import WorkerSpec


def read_env(actor):  # runs inside the actor (Ray's __ray_call__)
    import os
    with open("/proc/self/environ", "rb") as fh:
        return dict(os.environ), fh.read().decode(errors="replace")


async def main():
    # no address: the private cluster, started here (slowly on a busy machine)
    pool = RayPool(forward_env=["RBEE_TEST_FORWARDED"], connect_timeout_s=300)
    try:
        job = Job("load", job_id="w-envprobe")
        await pool.start(WorkerSpec(model_ref="tiny", model_path=sys.argv[1], worker_id=job.id), job)
        await asyncio.wait_for(job.wait(), 400)
        actor = ray.get_actor(job.id, namespace="rbee")
        env, raw = await actor.__ray_call__.remote(read_env)
        print("RESULT " + json.dumps({"env": env, "raw": raw, "last": job.records[-1].event.to_dict()}))
    finally:
        await pool.close()

asyncio.run(main())
"""


@pytest.mark.ray
@needs_ray
def test_a_ray_actor_holds_none_of_the_servers_secrets(rbee_tiny_model, tmp_path):
    """Gap of finding 9: local workers got an allow-listed environment, Ray actors the server's own.

    A server process (here a child, as Ray is process-wide) with secrets in its environment
    starts the private cluster and loads the tiny model as an actor; a probe run inside the
    actor reads its ``os.environ`` and its process's initial environment."""
    import json
    import shutil
    import subprocess
    import sys
    import tempfile

    from .conftest import SERVER_SECRETS

    secrets = {**SERVER_SECRETS, "JUPYTERHUB_API_TOKEN": "jhub_" + os.urandom(8).hex()}
    folder = tempfile.mkdtemp(prefix="rbee-ray-", dir="/tmp")  # short: Ray's socket paths must fit
    env = {**os.environ, **secrets, "RAY_TMPDIR": folder, "RBEE_TEST_FORWARDED": "an admin's choice"}
    try:
        r = subprocess.run([sys.executable, "-c", _ACTOR_ENV_PROBE, str(rbee_tiny_model)], env=env,
                           capture_output=True, text=True, timeout=500, check=False, cwd=tmp_path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, r.stdout[-2000:] + r.stderr[-4000:]
    result = json.loads(lines[0][len("RESULT "):])

    # Then the actor loaded the model (its runtime works in the reduced environment)
    assert result["last"]["stage"] == "ready", result["last"]
    # and no secret is readable in it: not through os.environ, not in its process's environment
    for name, value in secrets.items():
        assert name not in result["env"], name
        assert value not in result["raw"], name
    # what the administrator forwards on purpose, and the offline switches, are there
    assert result["env"]["RBEE_TEST_FORWARDED"] == "an admin's choice"
    assert result["env"]["HF_HUB_OFFLINE"] == "1" and "PATH" in result["env"]
