"""RayPool on a real two-node Ray cluster started on this machine, with a tiny real model.

The cluster (``ray.cluster_utils.Cluster``: a head plus nodes advertising the custom
resources ``node-a`` and ``node-b``) lives for the module; health checks are short so a
removed node is noticed in about a second. Most tests go through a real ``jupyter server``
process configured with ``c.RbeeApp.pool_class = RayPool``; cancelling and idle unload
drive a RayPool object directly, because they need the worker's slow-load knob, which the
pool forwards to its actors from its own environment.

Slow and heavy (a cluster, a server, several actors importing torch): marked ``ray`` and
skipped unless ``RBEE_TEST_RAY=1`` (the README's test command and ``.ci/run`` set it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster

from rbee_jupyter.events import LoadingProgress, Ready
from rbee_jupyter.core.jobs import Job, JobState
from rbee_jupyter.pools.local import WorkerSpec
from rbee_jupyter.testing.pytest_plugin import TINY_REPO
from rbee_jupyter.testing.server import ServerProcess
from rbee_jupyter.testing.sse import Frame, read_stream
from rbee_jupyter.worker.protocol import BLOCK_DELAY_ENV, TOKEN_DELAY_ENV

pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(os.environ.get("RBEE_TEST_RAY") != "1",
                       reason="Ray cluster tests are slow: set RBEE_TEST_RAY=1 (as .ci/run does)"),
    pytest.mark.timeout(600),
]

PROMPT = "Once upon a time"
LOAD_S = 120.0  # bound on one load: placing an actor, importing torch in it, loading
WAIT_S = 60.0  # bound on waiting for what will happen (a job ends, a worker goes) on a busy machine
FAST_HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 300,
               "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head and two nodes (``node-a``, ``node-b``) in a private temp dir; this process is a driver too."""
    tmp = Path(tempfile.mkdtemp(prefix="rbee-ray-", dir="/tmp"))  # short: Ray's socket paths must fit
    (tmp / "ray").mkdir()
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(tmp)  # also where Ray writes "the current cluster": never /tmp/ray
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "_system_config": FAST_HEALTH})
    try:
        c.nodes_by_name = {name: c.add_node(num_cpus=1, resources={name: 1}) for name in ("node-a", "node-b")}
        c.wait_for_nodes(timeout=120)
        ray.init(address=c.address, namespace="rbee", log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def server(cluster: Cluster, rbee_tiny_model: Path, rbee_hub_session, tmp_path_factory) -> Iterator[ServerProcess]:
    """A jupyter server whose workers are actors on ``cluster`` (tokens slowed so a node can die mid-stream)."""
    folder = tmp_path_factory.mktemp("ray-server")
    settings = {"pool_class": "rbee_jupyter.pools.ray.RayPool", "ray_address": cluster.address,
                "cache_dir": str(folder / "cache"), "catalog_path": str(folder / "catalog.sqlite"),
                "sse_keepalive_s": 0.5, "inference_stall_s": 60, "hub_endpoint": rbee_hub_session.url}
    with ServerProcess(folder, rbee=settings, env={TOKEN_DELAY_ENV: "0.05"}, startup_timeout=120) as s:
        yield s


@pytest.fixture(scope="module")
def model_ref(rbee_tiny_model: Path) -> str:
    return f"file://{rbee_tiny_model}"


# --- helpers ---------------------------------------------------------------------------------

def client(server: ServerProcess) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url + "rbee/", headers=server.auth_header, timeout=60)


async def load(server: ServerProcess, model_ref: str, node: str) -> tuple[str, list[dict]]:
    """Load on ``node`` and read its whole progress stream; returns (worker id, events)."""
    async with client(server) as c:
        r = await c.post("v1/workers", json={"model_ref": model_ref, "device": "cpu", "node": node})
        assert r.status_code == 202, r.text
        stream = await read_stream(c, "GET", f"http://127.0.0.1:{server.port}{r.json()['progress_url']}",
                                   timeout=LOAD_S)
    assert stream.done
    return r.json()["worker_id"], stream.events


def local_greedy(model_path: Path, body: dict[str, Any]) -> str:
    """The same generation in this process, with the production loader and generator."""
    import torch
    from transformers import AutoTokenizer

    from rbee_jupyter.engine.generate import GenerationRequest, Generator
    from rbee_jupyter.engine.loader import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actor (Ray gives num_cpus=0 actors one OpenMP thread)
    try:
        generator = Generator(load_model(model_path, device_map="cpu"), AutoTokenizer.from_pretrained(model_path))
        return "".join(chunk.text for chunk in generator.stream(GenerationRequest.from_json(body)))
    finally:
        torch.set_num_threads(threads)


def actor_gone(worker_id: str, pid: int | None, timeout: float = 120.0) -> bool:
    """Ray no longer knows the named actor and its process has exited (bounded poll: no event to wait on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get_actor(worker_id, namespace="rbee")
        except ValueError:
            if pid is None or not Path(f"/proc/{pid}").exists() or _zombie(pid):
                return True
        time.sleep(0.1)
    return False


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return True


# --- through the server ------------------------------------------------------------------------

def test_a_load_on_each_node_streams_its_layers_in_order_with_the_node_name(server, model_ref):
    # When: one load placed on each node, both at once
    async def both():
        return await asyncio.gather(load(server, model_ref, "node-a"), load(server, model_ref, "node-b"))

    results = asyncio.run(both())

    # Then: per-layer events 1..N in order, each naming the node, then ready (with the node)
    for node, (worker_id, events) in zip(("node-a", "node-b"), results):
        last = events[-1]
        assert last["stage"] == "ready" and last["node"] == node, last
        assert {e["stage"] for e in events[:-1]} <= {"complete", "loading_to_vram"}  # file:// refs "download" first
        progress = [e for e in events if e["stage"] == "loading_to_vram"]
        total = progress[0]["layers_total"]
        assert [e["layers_loaded"] for e in progress] == list(range(1, total + 1))
        assert {e["node"] for e in progress} == {node}
        info = server.get(f"v1/workers/{worker_id}").json()
        assert (info["state"], info["node"]) == ("idle", node)
    for worker_id, _ in results:
        assert server.delete(f"v1/workers/{worker_id}").status_code == 204


@pytest.mark.parametrize("ref", ["local", "hub"])
def test_an_unknown_node_is_refused_naming_the_nodes(server, model_ref, rbee_hub, ref):
    """Also for a hub model never downloaded: refused at POST, before the hub is asked anything."""
    model = model_ref if ref == "local" else f"hf:{TINY_REPO}"
    r = server.post("v1/workers", {"model_ref": model, "device": "cpu", "node": "node-z"})

    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "INVALID_REQUEST" and "node-z" in error["message"]
    assert {"node-a", "node-b"} <= set(error["details"]["nodes"])
    assert "node-a" in error["message"] and "node-b" in error["message"]
    assert [r.path for r in rbee_hub.requests if TINY_REPO in r.path] == []


def test_greedy_tokens_from_an_actor_equal_a_local_load(server, model_ref, rbee_tiny_model):
    worker_id, events = asyncio.run(load(server, model_ref, "node-b"))
    assert events[-1]["stage"] == "ready"
    body = {"worker_id": worker_id, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}

    # When
    async def generate():
        async with client(server) as c:
            return await read_stream(c, "POST", "v1/inference", json=body, timeout=60)

    stream = asyncio.run(generate())

    # Then: the same text, token for token, as the loader + generator run here
    kinds = [e["type"] for e in stream.events]
    assert kinds[0] == "started" and kinds[-1] == "end" and stream.done, stream.events[-1]
    remote = "".join(e["t"] for e in stream.events if e["type"] == "token")
    assert remote == local_greedy(rbee_tiny_model, body)
    assert stream.events[-1]["total_tokens"] == kinds.count("token")

    # And unloading kills the actor: Ray forgets it and its process is gone
    pid = server.get(f"v1/workers/{worker_id}").json()["pid"]
    assert server.delete(f"v1/workers/{worker_id}").status_code == 204
    assert actor_gone(worker_id, pid)
    assert server.get(f"v1/workers/{worker_id}").json()["state"] != "idle"


def test_a_removed_node_ends_its_streams_with_worker_died_and_the_other_node_still_serves(
        cluster, server, model_ref):
    doomed = cluster.add_node(num_cpus=1, resources={"node-c": 1})
    cluster.wait_for_nodes(timeout=120)
    (survivor, _), (victim, events) = asyncio.run(_gather_loads(server, model_ref, ("node-a", "node-c")))
    assert events[-1]["stage"] == "ready" and events[-1]["node"] == "node-c"
    removed_at: list[float] = []

    async def kill_node_at_first_token(frame: Frame) -> None:
        if isinstance(frame.data, dict) and frame.data.get("type") == "token" and not removed_at:
            removed_at.append(time.monotonic())
            await asyncio.to_thread(cluster.remove_node, doomed, False)

    async def scenario():
        async with client(server) as c:
            body = {"worker_id": victim, "prompt": PROMPT, "max_tokens": 400, "temperature": 0}
            return await read_stream(c, "POST", "v1/inference", json=body, timeout=60,
                                     on_frame=kill_node_at_first_token)

    # When: the node dies while its worker streams tokens
    stream = asyncio.run(scenario())

    # Then: the stream ends with WORKER_DIED naming the node, then [DONE]
    last = stream.events[-1]
    assert stream.done and last["type"] == "error" and last["code"] == "WORKER_DIED", last
    assert "node-c" in last["message"]
    error_frame = next(f for f in stream.frames if isinstance(f.data, dict) and f.data.get("type") == "error")
    print(f"WORKER_DIED {error_frame.arrived - removed_at[0]:.2f} s after the node was removed")
    info = server.get(f"v1/workers/{victim}").json()
    assert info["state"] == "failed" and info["node"] == "node-c"
    r = server.post("v1/inference", {"worker_id": victim, "prompt": PROMPT})
    assert r.status_code == 409, r.text

    # And the worker on the other node still generates
    async def survivor_generates():
        async with client(server) as c:
            body = {"worker_id": survivor, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
            return await read_stream(c, "POST", "v1/inference", json=body, timeout=60)

    ok = asyncio.run(survivor_generates())
    assert ok.events[-1]["type"] == "end" and ok.events[-1]["total_tokens"] >= 1, ok.events[-1]
    assert server.delete(f"v1/workers/{survivor}").status_code == 204


async def _gather_loads(server, model_ref, nodes):
    return await asyncio.gather(*(load(server, model_ref, n) for n in nodes))


# --- the pool object directly ---------------------------------------------------------------------

@pytest.fixture
def slow_loads(monkeypatch):
    """Actors started from now on sit 300 s after each block (a cancel cuts it short): longer than
    WAIT_S, so a wait that ends proves the pause was cut short, by order rather than a tight clock."""
    monkeypatch.setenv(BLOCK_DELAY_ENV, "300")


async def _first(job: Job, kind: type, timeout: float):
    async def find():
        async for record in job.subscribe(last_event_id=0):
            if isinstance(record.event, kind):
                return record.event
        return None
    return await asyncio.wait_for(find(), timeout)


def test_cancel_mid_load_ends_the_stream_cancelled_and_the_actor_is_gone(cluster, rbee_tiny_model, slow_loads):
    from rbee_jupyter.pools.ray import RayPool

    async def scenario():
        pool = RayPool(ray_address=cluster.address)
        try:
            job = Job("load", job_id="w-cancelme")
            info = await pool.start(WorkerSpec(model_ref="tiny", model_path=str(rbee_tiny_model),
                                               worker_id=job.id, node="node-a"), job)
            assert info.state == "loading"
            first = await _first(job, LoadingProgress, LOAD_S)
            pid = pool.get(job.id).pid

            # When: cancelled after the first block (the actor sits in its 300 s pause)
            job.cancel("Loading was cancelled by the user.")
            await asyncio.wait_for(job.wait(), WAIT_S)
            return job, first, pid, pool.list()
        finally:
            await pool.close()

    job, first, pid, left = asyncio.run(scenario())

    # Then: progress from node-a, then one CANCELLED event; the pool and Ray forget the actor
    assert first.layers_loaded == 1 and first.node == "node-a"
    assert job.state is JobState.CANCELLED
    events = [r.event.to_dict() for r in job.records]
    assert events[-1]["stage"] == "error" and events[-1]["code"] == "CANCELLED", events[-1]
    assert not any(e["stage"] == "ready" for e in events)
    assert left == []
    assert actor_gone("w-cancelme", pid)


def test_an_idle_worker_is_unloaded_after_keep_alive(cluster, rbee_tiny_model):
    from rbee_jupyter.pools.ray import RayPool

    async def scenario():
        pool = RayPool(ray_address=cluster.address, keep_alive_s=0.5)
        seen: list[tuple[str, str]] = []
        pool.listen(lambda event, info: seen.append((event, info.state)))
        try:
            job = Job("load", job_id="w-keepalive")
            await pool.start(WorkerSpec(model_ref="tiny", model_path=str(rbee_tiny_model), worker_id=job.id), job)
            ready = await _first(job, Ready, LOAD_S)
            pid = pool.get(job.id).pid

            # When: nothing uses it for keep_alive_s
            async def unloaded():
                while pool.list():
                    await asyncio.sleep(0.05)  # polling the registry: the listener has no awaitable
            await asyncio.wait_for(unloaded(), WAIT_S)
            return ready, pid, seen, {n["name"] for n in pool.nodes()}
        finally:
            await pool.close()

    ready, pid, seen, names = asyncio.run(scenario())

    # Then: placed on some node (named by the rule: custom resource, else IP), ready, then stopped; actor gone
    assert ready.node in names and {"node-a", "node-b"} <= names
    assert seen[-1] == ("stopped", "stopped") and ("ready", "idle") in seen
    assert actor_gone("w-keepalive", pid)


def test_a_load_asking_for_a_resource_no_node_has_fails_clearly(cluster, rbee_tiny_model):
    from rbee_jupyter.pools.ray import RayPool

    async def scenario():
        pool = RayPool(ray_address=cluster.address, ray_resources={"no-such-hardware": 1}, placement_timeout_s=2)
        try:
            job = Job("load", job_id="w-nowhere")
            await pool.start(WorkerSpec(model_ref="tiny", model_path=str(rbee_tiny_model), worker_id=job.id), job)
            await asyncio.wait_for(job.wait(), WAIT_S)
            return job, pool.list()
        finally:
            await pool.close()

    job, listed = asyncio.run(scenario())

    assert job.state is JobState.ERROR
    event = job.records[-1].event.to_dict()
    assert event["code"] == "CLUSTER_UNAVAILABLE" and "no-such-hardware" in event["message"], event
    assert [w.state for w in listed] == ["failed"]
    assert actor_gone("w-nowhere", None)


def test_a_load_past_its_timeout_fails_naming_the_block_and_the_actor_is_gone(cluster, rbee_tiny_model, slow_loads):
    from rbee_jupyter.pools.ray import RayPool

    async def scenario():
        pool = RayPool(ray_address=cluster.address)
        try:
            job = Job("load", job_id="w-timeout")
            await pool.start(WorkerSpec(model_ref="tiny", model_path=str(rbee_tiny_model), worker_id=job.id,
                                        node="node-b"), job)
            await _first(job, LoadingProgress, LOAD_S)
            pid = pool.get(job.id).pid

            # When: the limit passes while the actor sits after its first block (read at every check)
            pool.loading_timeout_s = 0.5
            await asyncio.wait_for(job.wait(), WAIT_S)
            return job, pid, pool.get(job.id)
        finally:
            await pool.close()

    job, pid, info = asyncio.run(scenario())

    # Then: LOADING_TIMEOUT naming where it was stuck; the worker is listed as failed; the actor is gone
    event = job.records[-1].event.to_dict()
    assert job.state is JobState.ERROR and event["code"] == "LOADING_TIMEOUT", event
    assert "stuck after block embeddings (1/" in event["message"]
    assert event["details"]["block"] == "embeddings" and event["details"]["node"] == "node-b"
    assert info.state == "failed" and info.exit_reason.startswith("loading timeout")
    assert actor_gone("w-timeout", pid)
