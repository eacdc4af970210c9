"""Finding 9: workers parse untrusted files with no secret in reach; kernels get no server token."""

from __future__ import annotations

import time
from pathlib import Path

from rbee_jupyter.worker.environment import worker_env
from rbee_jupyter.worker.process import child_worker_pids

from .conftest import PUBLIC, SERVER_SECRETS, load_events


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


async def test_a_worker_gets_no_secret_of_the_server(team):
    async with team.clients() as c:
        # Given the server holds hub, JupyterHub and cloud credentials in its environment
        server_env = environ(team.server.proc.pid)
        assert all(server_env.get(k) == v for k, v in SERVER_SECRETS.items())

        # When bob loads a model
        r, stream = await load_events(c["bob"], f"hf:{PUBLIC}")
        assert stream.events[-1]["stage"] == "ready", stream.events[-1]
        try:
            (pid,) = child_worker_pids(team.server.proc.pid)
            env = environ(pid)
        finally:
            assert (await c["bob"].delete(f"v1/workers/{r.json()['worker_id']}")).status_code == 204

    # Then its process has none of them, and is told to stay offline
    leaked = {k for k, v in env.items() if k in SERVER_SECRETS or v in SERVER_SECRETS.values()}
    assert leaked == set()
    assert env["HF_HUB_OFFLINE"] == "1" and "PATH" in env


def test_worker_env_keeps_what_running_needs_and_drops_credentials():
    base = {"PATH": "/bin", "HOME": "/h", "CUDA_VISIBLE_DEVICES": "1", "OMP_NUM_THREADS": "2", "LANG": "C.UTF-8",
            "TOKENIZERS_PARALLELISM": "false", "HF_HOME": "/hf", "HF_TOKEN": "x", "HUGGING_FACE_HUB_TOKEN": "x",
            "JUPYTERHUB_API_TOKEN": "x", "JPY_API_TOKEN": "x", "JUPYTER_TOKEN": "x", "RBEE_TOKEN": "x",
            "CUDA_API_KEY": "x", "AWS_SECRET_ACCESS_KEY": "x", "GITHUB_TOKEN": "x", "SOMETHING_ELSE": "x",
            "RBEE_WORKER_TOKEN_DELAY_S": "0.05"}
    env = worker_env({"RBEE_WORKER_BLOCK_DELAY_S": "0.1"}, base=base)
    assert env == {"PATH": "/bin", "HOME": "/h", "CUDA_VISIBLE_DEVICES": "1", "OMP_NUM_THREADS": "2",
                   "LANG": "C.UTF-8", "TOKENIZERS_PARALLELISM": "false", "HF_HOME": "/hf",
                   "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                   "RBEE_WORKER_TOKEN_DELAY_S": "0.05", "RBEE_WORKER_BLOCK_DELAY_S": "0.1"}


def test_a_kernel_of_a_shared_hive_gets_no_server_token(team):
    # When a kernel is started on the service-mode server
    with team.http("admin", root=True) as http:
        r = http.post("api/kernels", json={"name": "python3"})
        assert r.status_code == 201, r.text
        kernel_id = r.json()["id"]
        try:
            deadline = time.monotonic() + 60
            while not (pids := child_worker_pids(team.server.proc.pid, marker=b"ipykernel")) and time.monotonic() < deadline:
                time.sleep(0.1)  # the kernel process appears: no event to wait on from outside
            (pid,) = pids
            env = environ(pid)
        finally:
            http.delete(f"api/kernels/{kernel_id}")

    # Then it finds the hive's URL but not the server's token (its user authenticates as themself)
    assert env["RBEE_SERVER_URL"].startswith("http://127.0.0.1:")
    assert "RBEE_TOKEN" not in env and team.server.token not in env.values()
