"""``kill -9`` of a worker process while it loads, while it generates and while it is idle,
through a real ``jupyter server`` process.

The README's promise: every open stream gets ``WORKER_DIED`` and ``[DONE]`` within 2 s, the registry
says ``failed`` with the reason, and no process is left. Test-only delays in the workers
(``RBEE_WORKER_BLOCK_DELAY_S`` after each block, ``RBEE_WORKER_TOKEN_DELAY_S`` after each
token) keep a load and a generation running long enough to be killed in the middle.
"""

from __future__ import annotations

import os
import signal
import time

from rbee_jupyter.core.procs import pid_alive
from rbee_jupyter.testing.server import ServerProcess
from rbee_jupyter.worker.protocol import BLOCK_DELAY_ENV, TOKEN_DELAY_ENV

from .conftest import StreamReader, children_of, settings_for, wait_for

PROMPT = "Once upon a time"
LOAD_S = 120.0  # a torch import and a slowed load, on a busy 2-core machine
WAIT_S = 60.0  # bound on waiting for what will happen (a stream ends, the registry changes) on a busy machine
DIED_S = 10.0  # WORKER_DIED within 2 s on an idle machine (the error table; bench/worker_died.py): this holds on a busy one


def start_load(server: ServerProcess, model) -> dict:
    r = server.post("v1/workers", {"model_ref": f"file://{model}", "device": "cpu"})
    assert r.status_code == 202, r.text
    return r.json()


def state(server: ServerProcess, worker_id: str) -> dict:
    return server.get(f"v1/workers/{worker_id}").json()


def kill_and_check(server: ServerProcess, worker_id: str, streams: list[StreamReader], stage_key: str) -> None:
    """SIGKILL the worker; every stream ends with WORKER_DIED then [DONE] within DIED_S; registry: failed.

    The bound is a clock because nothing else ends these streams sooner (500 tokens of 0.1 s, a load
    of 7 s): it tells the promptness apart from a stall or a read timeout without being the promise.
    """
    pid = state(server, worker_id)["pid"]
    assert pid and pid_alive(pid)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    for stream in streams:
        assert stream.ended.wait(WAIT_S), "the stream did not end"
        assert stream.ended_at - killed < DIED_S, f"the stream ended {stream.ended_at - killed:.2f} s after the kill"
        assert stream.done, stream.text[-500:]
        error = stream.events[-1]
        assert error[stage_key] == "error" and error["code"] == "WORKER_DIED", error
        assert "killed by signal 9" in error["message"]
    info = wait_for(lambda: (s := state(server, worker_id))["state"] == "failed" and s, WAIT_S, "the registry")
    assert "signal 9" in info["exit_reason"]
    assert not pid_alive(pid)


def test_sigkill_while_loading_generating_or_idle_is_worker_died(rbee_hub, rbee_tiny_model, tmp_path):
    env = {BLOCK_DELAY_ENV: "1.0", TOKEN_DELAY_ENV: "0.1"}
    with ServerProcess(tmp_path, rbee=settings_for(tmp_path, rbee_hub), env=env) as server:
        idle, busy = start_load(server, rbee_tiny_model), start_load(server, rbee_tiny_model)
        for w in (idle, busy):
            assert server.events(w["progress_url"] + "&last_event_id=0", timeout=LOAD_S)[-1]["stage"] == "ready"

        # --- while generating: the running request and the one queued behind it
        body = {"worker_id": busy["worker_id"], "prompt": PROMPT, "max_tokens": 500, "temperature": 0}
        running = StreamReader(server, "POST", "v1/inference", body=body)
        assert running.wait_until(lambda s: sum(e.get("type") == "token" for e in s.events) >= 2, WAIT_S), running.text
        queued = StreamReader(server, "POST", "v1/inference", body=body)
        assert queued.wait_until(lambda s: s.status == 200, WAIT_S)
        kill_and_check(server, busy["worker_id"], [running, queued], "type")
        assert [e["type"] for e in running.events][:2] == ["started", "token"]

        # --- while loading: two watchers of its progress
        loading = start_load(server, rbee_tiny_model)
        watchers = [StreamReader(server, "GET", loading["progress_url"] + "&last_event_id=0") for _ in range(2)]
        assert watchers[0].wait_until(lambda s: any(e.get("stage") == "loading_to_vram" for e in s.events), LOAD_S)
        assert state(server, loading["worker_id"])["state"] == "loading"
        kill_and_check(server, loading["worker_id"], watchers, "stage")
        assert server.get(f"v1/workers/{loading['worker_id']}/ready").json()["ready"] is False

        # --- while idle: nothing was streaming; the registry still says why it failed
        kill_and_check(server, idle["worker_id"], [], "stage")

        # Then: no worker process is left, the dead ones refuse work, the server keeps serving
        assert children_of(server.proc.pid) == []
        r = server.post("v1/inference", {"worker_id": idle["worker_id"], "prompt": PROMPT})
        assert r.status_code == 409 and r.json()["error"]["code"] == "CONFLICT"
        assert {w["state"] for w in server.get("v1/workers").json()["workers"]} == {"failed"}
        again = start_load(server, rbee_tiny_model)
        assert server.events(again["progress_url"], timeout=LOAD_S)[-1]["stage"] == "ready"
        assert server.delete(f"v1/workers/{again['worker_id']}").status_code == 204
        wait_for(lambda: children_of(server.proc.pid) == [], WAIT_S, "the unloaded worker to exit")
