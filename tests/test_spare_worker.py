"""The spare worker: a process that imported torch & co. before any load, handed the next one.

Real processes and a real tiny model, as in test_pool.py. Every spare imports torch (~8 s
of CPU here), so each test is one scenario that reuses its spares. Whether a spare makes a
load faster is measured in bench/spare.py; here its behaviour is asserted: the load runs in
the spare's process, the spare had finished its imports (and left CUDA alone) when the spec
came, and a replacement is started only once the load is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rbee_jupyter.events import InferenceEnd, LoadingProgress, Token
from rbee_jupyter.core.jobs import Job, JobState
from rbee_jupyter.pools.local import LocalProcessPool, WorkerInfo, WorkerSpec
from rbee_jupyter.protocol import GenerationRequest
from rbee_jupyter.core.procs import pid_alive, wait_exited
from rbee_jupyter.server.app import RbeeApp
from rbee_jupyter.testing.server import ServerProcess
from rbee_jupyter.worker.process import WorkerProcess, child_worker_pids
from rbee_jupyter.worker.protocol import BLOCK_DELAY_ENV

PROMPT = "Once upon a time"
LOAD_S = 90.0  # bound on a load or a spare's imports (a torch import on a busy 2-core machine)
SLOW_BLOCKS = {BLOCK_DELAY_ENV: "0.2"}  # a load that still runs for over a second after its first block

# Every pool is closed inside its test: then no process, spare or worker, may be left (conftest.py).
# ``reference`` (conftest.py) is the greedy text that test_pool.py's spare-less loads are checked against.
pytestmark = pytest.mark.usefixtures("no_worker_left_behind")
HEAVY = {"torch", "transformers", "transformers.modeling_utils", "safetensors.torch", "accelerate", "bitsandbytes",
         "rbee_jupyter.engine.loader", "rbee_jupyter.engine.generate", "tornado.httpserver"}


# --- helpers -------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def spare_pool(**kwargs) -> AsyncIterator[tuple[LocalProcessPool, list[str]]]:
    """A pool with a spare (started as the server starts it), and the events its listeners saw."""
    pool = LocalProcessPool(spare_worker=True, **kwargs)
    seen: list[str] = []
    pool.listen(lambda event, info: seen.append(event))
    pool.warm_up()
    try:
        yield pool, seen
    finally:
        await pool.close()
    assert pool.list() == [] and pool.spare is None


async def warm_spare(pool: LocalProcessPool) -> WorkerProcess:
    """The pool's spare once its imports are done (it must have one)."""
    spare = await pool.wait_spare(LOAD_S)
    assert spare is not None and spare.warm.done(), "the pool has no spare"
    return spare


async def load(pool: LocalProcessPool, path: Path) -> tuple[WorkerInfo, Job]:
    job = Job("load")
    info = await pool.start(WorkerSpec(model_ref="local:tiny-llama", model_path=str(path)), job)
    return info, job


async def greedy_text(pool: LocalProcessPool, worker_id: str) -> tuple[list[tuple[str, int]], InferenceEnd]:
    job = Job("inference", error_style="type")
    await asyncio.wait_for(pool.generate(worker_id, GenerationRequest(prompt=PROMPT, max_tokens=12), job), LOAD_S)
    assert job.state is JobState.COMPLETE, job.last.data
    events = [r.event for r in job.records]
    return [(e.t, e.i) for e in events if isinstance(e, Token)], events[-1]


# --- the pool ------------------------------------------------------------------------------------

async def test_loads_take_the_warm_spare_and_a_new_one_is_started_only_after_each_load(rbee_tiny_model, reference):
    async with spare_pool(env=SLOW_BLOCKS) as (pool, seen):
        spare = await warm_spare(pool)
        facts = spare.warm.result()
        assert HEAVY <= set(facts["imported"]) and facts["failed"] == {}
        assert facts["cuda_initialized"] is False
        assert pool.list() == [] and seen == []  # a spare is no worker: not listed, not announced

        for round_ in range(2):
            info, job = await load(pool, rbee_tiny_model)
            assert info.pid == spare.pid  # the load runs in the spare's process
            assert spare.name == info.id and spare.death_error().details["worker_id"] == info.id
            assert pool.spare is None  # taken; no replacement while the load runs...
            first = await job.subscribe(last_event_id=0).get(LOAD_S)
            assert first is not None and isinstance(first.event, LoadingProgress) and not job.state.finished
            assert pool.spare is None  # ...not even once its blocks are arriving (SLOW_BLOCKS: 6 more to go)
            assert await job.wait(LOAD_S) is JobState.COMPLETE, job.last.data

            health = await pool.health(info.id)
            assert health["pid"] == spare.pid and health["worker_id"] == info.id
            # when the spec came, the imports were done (spec not waiting), and CUDA was never touched
            assert HEAVY <= set(health["spare"]["imported"]) and health["spare"]["spec_waiting"] is False
            assert health["spare"]["cuda_initialized"] is False
            # its load's timeline starts at the spec: the imports it paid ahead are not in it
            assert health["load_seconds"]["start"] < health["spare"]["import_s"]
            assert health["load_seconds"]["imports"] < health["spare"]["import_s"]
            tokens, end = await greedy_text(pool, info.id)
            assert tokens == reference[0] and end.total_tokens == reference[1].completion_tokens

            following = await warm_spare(pool)  # started after the load was ready
            assert following.pid != spare.pid and following.config is None
            assert [w.id for w in pool.list()][-1] == info.id and len(pool.list()) == round_ + 1
            spare = following

        # A worker that was a spare dies like any other: WORKER_DIED within 2 s on an idle machine (measured
        # by bench/worker_died.py); the bound here holds on a busy one, far below a stall or a loading timeout.
        died = asyncio.Event()
        pool.listen(lambda event, _: event == "died" and died.set())
        os.kill(info.pid, signal.SIGKILL)
        await asyncio.wait_for(died.wait(), 10.0)
        assert "signal 9" in pool.get(info.id).exit_reason
        assert [e for e in seen if e != "progress"] == ["loading", "ready", "busy", "idle"] * 2 + ["died"]
        last_spare = spare.pid
    assert not pid_alive(last_spare)  # closing the pool ended the spare too


async def test_a_dead_spare_costs_the_load_a_fresh_process_not_an_error(rbee_tiny_model, reference):
    async with spare_pool() as (pool, seen):
        # Killed and noticed before the load: the pool dropped it and starts a fresh process.
        spare = await warm_spare(pool)
        os.kill(spare.pid, signal.SIGKILL)
        assert await spare.wait_exit(60)  # at once after SIGKILL; the bound is for a busy machine
        assert pool.spare is None  # dropped (its exit callback ran before this wait's)
        info, job = await load(pool, rbee_tiny_model)
        assert info.pid != spare.pid
        assert await job.wait(LOAD_S) is JobState.COMPLETE, job.last.data

        # Killed just before the load, before the pool could notice: handed the spec, it never
        # announces; the load goes on in a fresh process.
        spare = await warm_spare(pool)
        os.kill(spare.pid, signal.SIGKILL)
        second, job = await load(pool, rbee_tiny_model)
        assert await job.wait(LOAD_S) is JobState.COMPLETE, job.last.data
        now = pool.get(second.id)
        assert now.state == "idle" and now.pid not in (spare.pid, None) and pid_alive(now.pid)
        assert "died" not in seen and "failed" not in seen
        assert (await greedy_text(pool, second.id))[0] == reference[0]
        assert await warm_spare(pool) is not None  # and a spare again after the load


async def test_a_spare_exits_quietly_when_its_stdin_closes():
    """The server is gone (its end of the pipe closed) before any load: exit 0, nothing left."""
    spare = await WorkerProcess.spawn(spare=True)
    try:
        assert spare.name == f"spare-{spare.pid}"
        await asyncio.wait_for(asyncio.shield(spare.warm), LOAD_S)
        spare.proc.stdin.close()
        assert await spare.wait_exit(60), "the spare did not exit after stdin closed"
        assert spare.returncode == 0
        assert any("stdin closed before a spec" in line for line in spare.stderr_tail)
    finally:
        await spare.terminate(0.0)
        spare.close()


# --- the server ----------------------------------------------------------------------------------

@pytest.fixture
def no_hub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    monkeypatch.delenv("JUPYTERHUB_SERVICE_PREFIX", raising=False)


def test_a_plain_server_keeps_a_spare_a_server_under_jupyterhub_does_not(monkeypatch, no_hub_env):
    assert RbeeApp().spare_worker is True
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "x")
    assert RbeeApp().spare_worker is False
    assert RbeeApp(spare_worker=True).spare_worker is True  # an administrator's setting wins


@pytest.mark.rbee_config(spare_worker=True)
def test_the_setting_reaches_the_local_pool(jp_serverapp):
    app = next(iter(jp_serverapp.extension_manager.extension_apps["rbee_jupyter"]))
    assert app.hive.pool.primary.spare_worker is True


def test_a_server_starts_a_spare_lists_only_loaded_workers_and_ends_both(rbee_tiny_model, tmp_path):
    settings = {"cache_dir": str(tmp_path / "cache"), "catalog_path": str(tmp_path / "catalog.sqlite"),
                "spare_worker": True}
    with ServerProcess(tmp_path / "server", rbee=settings) as server:
        def children() -> set[int]:
            return child_worker_pids(server.proc.pid)

        deadline = time.monotonic() + LOAD_S
        while not children():  # started when the server started, before any request
            assert time.monotonic() < deadline, "the server started no spare"
            time.sleep(0.05)  # polling another process's children: nothing to wait on instead
        (spare,) = children()
        assert server.get("v1/workers").json()["workers"] == []

        r = server.post("v1/workers", {"model_ref": f"file://{rbee_tiny_model}", "device": "cpu"})
        assert r.status_code == 202, r.text
        assert server.events(r.json()["progress_url"], timeout=LOAD_S)[-1]["stage"] == "ready"
        (worker,) = server.get("v1/workers").json()["workers"]
        assert worker["pid"] == spare

        deadline = time.monotonic() + LOAD_S
        while len(children()) < 2:  # the next spare, once the load is ready
            assert time.monotonic() < deadline, "no new spare after the load"
            time.sleep(0.05)  # polling another process's children: nothing to wait on instead
        everyone = children()
        assert [w["id"] for w in server.get("v1/workers").json()["workers"]] == [worker["id"]]
    left = wait_exited(everyone, 120)  # ends when they exit; the bound holds on a busy machine
    assert left == set(), f"left behind by the stopped server: {left}"
