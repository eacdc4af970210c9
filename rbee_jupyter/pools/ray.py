"""Workers as Ray actors: the hive places models on the nodes of an existing Ray cluster.

Why Ray, and not a home-made cluster manager: a team that outgrows one GPU box usually
has (or can start, e.g. with KubeRay) a Ray cluster that already knows its nodes, GPUs and
custom resources, schedules onto them and notices when a node goes away. :class:`RayPool`
only asks it for one actor per loaded model; inside the actor runs the same
:class:`~.worker.runtime.WorkerRuntime` as in a local worker process (layer-by-layer
loader, generation queue), so events, errors and cancellation mean the same everywhere.

How the pieces map:

* start: an actor (``max_restarts=0``: a restarted actor would have lost its model), placed
  by ``num_gpus`` (the CUDA devices of the plan), ``c.RbeeApp.ray_resources`` and the
  load's ``node`` option. Actors reserve no CPU (``num_cpus=0``): a CPU each would make
  the next load wait for ever on a small node; torch's threads do the work anyway.
* events: Ray streaming generators (``num_returns="streaming"``), one per load and one per
  generation. The actor is asynchronous, so a stream never blocks pings, cancels or
  other streams; events arrive in order.
* cancel: a call into the actor (the runtime stops between blocks / tokens), then
  ``ray.cancel`` on the stream and ``ray.kill`` if that was not enough. Dropping a stream
  would not stop anything in the actor.
* unload, idle unload (keep_alive), loading timeout: ``ray.kill``; the pool waits until Ray
  reports the actor dead before it says "stopped".
* a dead node: Ray reports ``ActorUnavailableError`` first (the node stopped answering),
  ``ActorDiedError`` later. Both end every stream the actor fed with ``WORKER_DIED``; a
  health ping every ``health_interval_s`` notices it even when no stream is open.

Node names. The ``node`` option of a load and the ``node`` field of workers and loading
events use one rule: a node is named by the custom resource it advertises (start it with
``ray start --resources '{"node-b": 1}'``; with several, the first in alphabetical order),
else by its IP address. A load may also name a node by its Ray node id. Anything else is
refused with 400 listing the nodes.

Every node needs this package (and torch, transformers...) installed, and the model
files at the same path as the server sees them (a shared cache volume, e.g. the
JupyterHub users' shared HF cache on a PersistentVolume).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

try:
    import ray
    from ray.exceptions import RayActorError, RayError, TaskCancelledError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("The Ray pool needs Ray: pip install 'rbee-jupyter[ray]'.") from exc

from ..errors import (Cancelled, ClusterUnavailable, Conflict, InferenceStalled, InvalidRequest, LoadingTimeout,
                     ModelNotLoaded, RbeeError, WorkerDied, WorkerNotFound)
from ..events import LoadingProgress, Ready
from ..core.jobs import Job
from .local import Pool, WorkerInfo, WorkerSpec, relay_inference
from ..worker.protocol import BLOCK_DELAY_ENV, TOKEN_DELAY_ENV, WorkerConfig, error_from_json

__all__ = ["RayPool", "WorkerActor", "node_name"]

log = logging.getLogger(__name__)

#: Resource names Ray defines itself; every other resource of a node is a custom one (a name).
_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "TPU", "NPU", "HPU", "memory", "object_store_memory"})
#: How much of a node's name resource one worker takes: effectively unlimited workers per node.
_NAME_SHARE = 0.001
_UNLIMITED_LAG = 1 << 30  # the actor relays every event; the hive's subscribers do their own skipping


# --- inside the actor ---------------------------------------------------------------------

class WorkerActor:
    """One model inside a Ray actor: a :class:`WorkerRuntime` without the HTTP server.

    Its methods are ``async`` so Ray runs them on the actor's event loop: a load or a
    generation streams from its own thread while pings and cancels are answered at once.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = WorkerConfig.from_json(config)
        self._runtime: Any = None

    async def where(self) -> dict[str, Any]:
        """Where Ray put us (answers as soon as the actor exists: the pool's placement check)."""
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    async def ping(self) -> bool:
        return True

    async def load(self):
        """Streaming: the loading events (dicts, as on the wire) up to ready or error."""
        from ..worker.runtime import WorkerRuntime

        if self._runtime is None:
            self._runtime = WorkerRuntime.from_env(self._config)
            self._runtime.start_loading()
        async for record in self._runtime.load_job.subscribe(last_event_id=0, max_lag=_UNLIMITED_LAG):
            yield record.event.to_dict()

    async def cancel_load(self) -> bool:
        return self._runtime is not None and self._runtime.cancel_load()

    async def generate(self, body: dict[str, Any]):
        """Streaming: ``{"type": "refused", "error"}`` alone, or started/token.../end|error."""
        runtime = self._runtime
        try:
            if runtime is None:
                raise ModelNotLoaded("The model is not loaded yet.")
            task = runtime.submit(body)
        except RbeeError as exc:
            yield {"type": "refused", "error": exc.to_dict()["error"]}
            return
        try:
            async for record in task.job.subscribe(last_event_id=0, max_lag=_UNLIMITED_LAG):
                yield record.event.to_dict()
        finally:  # ray.cancel() on the stream lands here: the generation must stop too
            runtime.cancel(task.request_id)

    async def cancel(self, request_id: str) -> bool:
        return self._runtime is not None and self._runtime.cancel(request_id)

    async def health(self) -> dict[str, Any]:
        if self._runtime is None:
            return {"worker_id": self._config.worker_id, "pid": os.getpid(), "state": "loading"}
        return self._runtime.health()


_remote_class: Any = None


def _actor_class() -> Any:
    global _remote_class
    if _remote_class is None:
        _remote_class = ray.remote(WorkerActor)
    return _remote_class


# --- nodes ---------------------------------------------------------------------------------

def node_name(node: dict[str, Any]) -> str:
    """A node's name (see the module docstring): its first custom resource, else its IP."""
    custom = sorted(k for k in node.get("Resources", {})
                    if k not in _BUILTIN_RESOURCES and ":" not in k and not k.startswith("TPU-"))
    return custom[0] if custom else str(node.get("NodeManagerAddress", node.get("NodeID", "?")))


def _alive_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive")]


# --- the pool ------------------------------------------------------------------------------

@dataclass(eq=False)
class _Actor:
    """The pool's bookkeeping for one actor."""

    info: WorkerInfo
    spec: WorkerSpec
    handle: Any
    load_job: Job
    node_id: str | None = None
    load_stream: Any = None
    streams: dict[Job, Any] = field(default_factory=dict)
    tasks: set[asyncio.Task] = field(default_factory=set)
    load_started: float = field(default_factory=time.monotonic)
    last_block: str | None = None
    placed: bool = False
    expected_exit: bool = False  # we are killing it: its end is not a death
    dead: bool = False
    cancelling: bool = False
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    stop_task: asyncio.Future | None = None
    idle_timer: asyncio.TimerHandle | None = None
    forget_timer: asyncio.TimerHandle | None = None


class RayPool(Pool):
    """One Ray actor per loaded model, on the nodes of a Ray cluster.

    Args:
        keep_alive_s, loading_timeout_s, inference_stall_s, failed_retention_s: as for
            :class:`~.pool.LocalProcessPool`.
        ray_address: the cluster (``"host:6379"``, ``"auto"``); None starts a private Ray
            instance in this process. Connecting starts at once, in the background.
        ray_resources: Ray resources every actor asks for besides its GPUs.
        namespace: Ray namespace of the actors (named by worker id, so ``ray.get_actor`` finds them).
        placement_timeout_s: how long an actor may wait for a node with room before the load
            fails with ``CLUSTER_UNAVAILABLE``.
        connect_timeout_s: how long a request waits for the connection to the cluster.
        health_interval_s, health_timeout_s: a ping every interval; no answer within the
            timeout (or Ray saying the actor is unavailable or dead) is a death.
        call_timeout_s: bound on every other call into an actor.
        forward_env: environment variables of this process that actors get too (the
            worker's test knobs by default; e.g. add ``HF_HUB_OFFLINE``).
    """

    app_traits = ("ray_address", "ray_resources")

    cancel_grace_s = 3.0
    kill_timeout_s = 10.0
    check_connect_timeout_s = 5.0

    def __init__(self, *, keep_alive_s: float | None = None, loading_timeout_s: float | None = None,
                 inference_stall_s: float | None = 120.0, failed_retention_s: float = 600.0,
                 ray_address: str | None = None, ray_resources: dict[str, float] | None = None,
                 namespace: str = "rbee", placement_timeout_s: float = 120.0, connect_timeout_s: float = 60.0,
                 health_interval_s: float = 1.0, health_timeout_s: float = 30.0, call_timeout_s: float = 30.0,
                 forward_env: tuple[str, ...] = (BLOCK_DELAY_ENV, TOKEN_DELAY_ENV)) -> None:
        super().__init__()
        self.keep_alive_s = keep_alive_s
        self.loading_timeout_s = loading_timeout_s
        self.inference_stall_s = inference_stall_s
        self.failed_retention_s = failed_retention_s
        self.ray_address = ray_address
        self.ray_resources = {str(k): float(v) for k, v in (ray_resources or {}).items()}
        self.namespace = namespace
        self.placement_timeout_s = placement_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.call_timeout_s = call_timeout_s
        self.forward_env = tuple(forward_env)
        self._workers: dict[str, _Actor] = {}
        self._owns_ray = False
        self._connect_error: BaseException | None = None
        self._connector = threading.Thread(target=self._connect, name="rbee-ray-connect", daemon=True)
        self._connector.start()

    # --- the cluster -------------------------------------------------------------------------

    def _connect(self) -> None:
        """Connect to the cluster (a thread: ray.init takes seconds, the server must not wait)."""
        try:
            if not ray.is_initialized():
                ray.init(address=self.ray_address, namespace=self.namespace, log_to_driver=False)
                self._owns_ray = True
        except BaseException as exc:  # noqa: BLE001 - reported to every request that needs the cluster
            log.error("rbee: cannot connect to the Ray cluster at %s: %s", self.ray_address or "(local)", exc)
            self._connect_error = exc

    def _ensure_connected(self, timeout: float | None = None) -> None:
        timeout = self.connect_timeout_s if timeout is None else timeout
        self._connector.join(timeout)
        where = self.ray_address or "a local Ray instance"
        if self._connector.is_alive():
            raise ClusterUnavailable(f"Still connecting to the Ray cluster at {where} after {timeout:g} s; "
                                     "retry in a moment, and check c.RbeeApp.ray_address if this persists.",
                                     details={"ray_address": self.ray_address})
        if self._connect_error is not None or not ray.is_initialized():
            raise ClusterUnavailable(f"Cannot connect to the Ray cluster at {where}: {self._connect_error}. "
                                     "Check c.RbeeApp.ray_address and that the cluster runs the same Ray version.",
                                     details={"ray_address": self.ray_address})

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's live nodes: ``{"name", "id", "ip", "resources"}`` (blocking: a cluster call)."""
        self._ensure_connected()
        return [{"name": node_name(n), "id": n["NodeID"], "ip": n.get("NodeManagerAddress"),
                 "resources": dict(n.get("Resources", {}))} for n in _alive_nodes()]

    def check_node(self, node: str) -> None:
        # Runs on the server's loop (before the 202): wait briefly for a connection still being made.
        self._ensure_connected(self.check_connect_timeout_s)
        self._placement(node)

    def _placement(self, node: str | None) -> dict[str, Any]:
        """Actor options that pin it to ``node`` (a name or a node id); 400 listing the nodes if unknown."""
        if node is None:
            return {}
        nodes = self.nodes()
        for n in nodes:
            if node == n["id"]:
                return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=n["id"], soft=False)}
        for n in nodes:
            if node == n["name"]:
                key = node if node in n["resources"] else f"node:{n['ip']}"
                return {"resources": {key: _NAME_SHARE}}
        names = sorted({n["name"] for n in nodes})
        raise InvalidRequest(f"No live Ray node is named {node!r}; the nodes are: {', '.join(names) or 'none'}. "
                             "A node's name is the custom resource it was started with (ray start --resources "
                             "'{\"name\": 1}'), else its IP; a Ray node id works too.",
                             details={"field": "node", "nodes": names})

    def _actor_options(self, spec: WorkerSpec, worker_id: str) -> dict[str, Any]:
        placement = self._placement(spec.node)
        gpus = len({d for d in _devices(spec.device_map) if d.startswith("cuda")})
        env = {k: os.environ[k] for k in self.forward_env if k in os.environ}
        options: dict[str, Any] = {
            "name": worker_id, "namespace": self.namespace, "max_restarts": 0, "num_cpus": 0, "num_gpus": gpus,
            "resources": {**self.ray_resources, **placement.get("resources", {})},
        }
        if "scheduling_strategy" in placement:
            options["scheduling_strategy"] = placement["scheduling_strategy"]
        if env:
            options["runtime_env"] = {"env_vars": env}
        return options

    # --- registry ------------------------------------------------------------------------------

    def _get(self, worker_id: str) -> _Actor:
        a = self._workers.get(worker_id)
        if a is None:
            raise WorkerNotFound(f"No worker with id {worker_id!r}: it was never started, or it was unloaded.",
                                 details={"worker_id": worker_id})
        return a

    def get(self, worker_id: str) -> WorkerInfo:
        return _copy(self._get(worker_id).info)

    def list(self) -> list[WorkerInfo]:
        return [_copy(a.info) for a in self._workers.values()]

    def _spawn(self, a: _Actor, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        a.tasks.add(task)
        task.add_done_callback(a.tasks.discard)
        return task

    def _forget(self, a: _Actor, state: str, reason: str | None, event: str = "stopped") -> None:
        self._cancel_idle_timer(a)
        if a.forget_timer is not None:
            a.forget_timer.cancel()
        a.gone.set()
        if self._workers.get(a.info.id) is not a:
            return
        del self._workers[a.info.id]
        if a.info.state != "failed" or not a.info.exit_reason:
            a.info.exit_reason = reason
        a.info.state = state
        self._notify(event, a.info)

    def _mark_failed(self, a: _Actor, reason: str, event: str) -> None:
        a.info.state, a.info.exit_reason = "failed", reason
        a.gone.set()
        self._cancel_idle_timer(a)
        self._notify(event, a.info)
        a.forget_timer = asyncio.get_running_loop().call_later(
            self.failed_retention_s, self._forget, a, "failed", None, "removed")

    # --- loading -------------------------------------------------------------------------------

    async def start(self, spec: WorkerSpec, job: Job) -> WorkerInfo:
        worker_id = spec.worker_id or f"w-{uuid.uuid4().hex[:10]}"
        config = WorkerConfig(model_path=spec.model_path, worker_id=worker_id, quantization=spec.quantization,
                              dtype=spec.dtype, device_map=_visible_cuda(spec.device_map),
                              double_quant=spec.double_quant, compute_dtype=spec.compute_dtype,
                              queue_depth=spec.queue_depth, max_tokens_limit=spec.max_tokens_limit,
                              max_batch_size=spec.max_batch_size, kv_budget_mb=spec.kv_budget_mb,
                              watch_stdin=False)
        try:
            await asyncio.to_thread(self._ensure_connected)
            options = await asyncio.to_thread(self._actor_options, spec, worker_id)
            handle = _actor_class().options(**options).remote(json.loads(config.to_json()))
        except RbeeError as exc:
            job.fail(exc)
            raise
        except (RayError, ValueError) as exc:  # e.g. a worker of that name still being torn down
            error = ClusterUnavailable(f"Ray refused to start worker {worker_id}: {exc}",
                                       details={"worker_id": worker_id})
            job.fail(error)
            raise error from None
        now = time.time()
        info = WorkerInfo(id=worker_id, model_ref=spec.model_ref, state="loading", devices=config.devices,
                          memory_mb={}, pid=None, quantization=spec.quantization, dtype=spec.dtype,
                          owner=spec.owner, created_at=now, last_used=now, node=spec.node)
        a = _Actor(info=info, spec=spec, handle=handle, load_job=job)
        self._workers[worker_id] = a
        job.meta.setdefault("worker_id", worker_id)
        relay = self._spawn(a, self._run_load(a))
        if job.task is None:
            job.task = relay
        job.on_cancel(lambda: self._spawn(a, self._cancel_load(a)))
        self._spawn(a, self._loading_watchdog(a))
        self._notify("loading", info)
        return _copy(info)

    async def _run_load(self, a: _Actor) -> None:
        """Wait for placement, then relay the actor's load stream into the load job."""
        job = a.load_job
        try:
            where = await asyncio.wait_for(a.handle.where.remote(), self.placement_timeout_s)
        except asyncio.TimeoutError:
            needs = self._actor_needs(a)
            await self._load_failed(a, ClusterUnavailable(
                f"No Ray node could take worker {a.info.id} within {self.placement_timeout_s:g} s: none has "
                f"{needs} free. Unload a model, add a node, or load with other options.",
                details={"worker_id": a.info.id, "needs": needs}))
            return
        except RayActorError as exc:
            await self._died(a, exc)
            return
        a.node_id, a.info.pid, a.placed = where["node_id"], where["pid"], True
        a.info.node = await asyncio.to_thread(self._name_of, a.node_id)
        self._spawn(a, self._watch_health(a))
        try:
            a.load_stream = a.handle.load.options(num_returns="streaming").remote()
            async for ref in a.load_stream:
                event = await asyncio.wait_for(ref, self.call_timeout_s)
                if job.state.finished:
                    return
                stage = event.get("stage")
                if stage == "loading_to_vram":
                    self._on_progress(a, event)
                elif stage == "ready":
                    self._on_ready(a, event)
                    return
                elif stage == "error":
                    await self._load_failed(a, error_from_json(event))
                    return
            raise RbeeError(f"The load stream of worker {a.info.id} ended without ready or error.")
        except TaskCancelledError:
            return  # we cancelled it; whoever did reports why
        except RayActorError as exc:
            await self._died(a, exc)
        except (RayError, RbeeError, asyncio.TimeoutError) as exc:
            if not job.state.finished and not a.expected_exit:
                await self._load_failed(a, exc if isinstance(exc, RbeeError) else RbeeError(
                    f"Worker {a.info.id} failed while loading: {exc}", details={"worker_id": a.info.id}))

    def _name_of(self, node_id: str | None) -> str | None:
        for n in _alive_nodes():
            if n["NodeID"] == node_id:
                return node_name(n)
        return node_id

    def _actor_needs(self, a: _Actor) -> str:
        """What the actor waits for, for messages: "GPU=1, llm-node=0.01, node node-b"."""
        gpus = len({d for d in _devices(a.spec.device_map) if d.startswith("cuda")})
        needs = [f"GPU={gpus}"] if gpus else []
        needs += [f"{k}={v:g}" for k, v in self.ray_resources.items()]
        if a.spec.node:
            needs.append(f"node {a.spec.node}")
        return ", ".join(needs) or "room"

    def _on_progress(self, a: _Actor, event: dict[str, Any]) -> None:
        info = a.info
        info.layers_loaded = int(event.get("layers_loaded", 0))
        info.layers_total = int(event.get("layers_total", 0))
        device, vram_mb = str(event.get("device", "")), int(event.get("vram_mb", 0))
        memory = event.get("memory_mb")
        info.memory_mb = dict(memory) if isinstance(memory, dict) else {**info.memory_mb, device: vram_mb}
        a.last_block = event.get("block")
        a.load_job.publish(LoadingProgress(layers_loaded=info.layers_loaded, layers_total=info.layers_total,
                                           vram_mb=vram_mb, device=device, block=a.last_block,
                                           memory_mb=dict(info.memory_mb), node=info.node,
                                           timestamp=event.get("timestamp")))
        self._notify("progress", info)

    def _on_ready(self, a: _Actor, event: dict[str, Any]) -> None:
        if a.load_job.cancel_event.is_set():  # cancelled at the last moment: the cancel path ends it
            return
        memory = event.get("memory_mb")
        if isinstance(memory, dict):
            a.info.memory_mb = dict(memory)
        a.info.state = "idle"
        a.load_job.finish(Ready(worker_id=a.info.id, memory_mb=dict(a.info.memory_mb), node=a.info.node))
        self._notify("ready", a.info)
        self._touch(a)

    async def _load_failed(self, a: _Actor, error: RbeeError) -> None:
        """The load failed: kill the actor, then report (so its memory is free when clients read it)."""
        await self._kill(a)
        if isinstance(error, Cancelled):
            self._forget(a, "stopped", "load cancelled")
        else:
            self._mark_failed(a, f"{error.code}: {error.message}", "failed")
        a.load_job.fail(error)

    async def _cancel_load(self, a: _Actor) -> None:
        """``job.cancel()`` while loading: ask the actor to stop between blocks; kill it if it cannot."""
        job = a.load_job
        if job.state.finished or a.cancelling:
            return
        a.cancelling = True
        if a.placed and not a.dead:
            with contextlib.suppress(RayError, asyncio.TimeoutError):
                await asyncio.wait_for(a.handle.cancel_load.remote(), self.cancel_grace_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await job.wait(self.cancel_grace_s)  # the relay reports CANCELLED once the actor is gone
            if job.state.finished:
                return
        await self._kill(a)  # not placed yet, or stuck inside one block
        self._forget(a, "stopped", "load cancelled")
        job.fail(Cancelled(f"Loading was cancelled ({self._where(a)}); the worker was stopped.",
                           details={"worker_id": a.info.id, "node": a.info.node,
                                    "layers_loaded": a.info.layers_loaded, "layers_total": a.info.layers_total}))

    async def _loading_watchdog(self, a: _Actor) -> None:
        job = a.load_job
        while not job.state.finished:
            timeout = self.loading_timeout_s
            if timeout is not None and time.monotonic() - a.load_started > timeout and not a.expected_exit:
                where = self._where(a)
                await self._kill(a)
                self._mark_failed(a, f"loading timeout: {where}", "failed")
                job.fail(LoadingTimeout(
                    f"Loading {a.info.model_ref} took longer than {timeout:g} s, {where}; the worker was stopped. "
                    "Raise the loading timeout, or check the node, the device and the model files.",
                    details={"worker_id": a.info.id, "node": a.info.node, "timeout_s": timeout,
                             "block": a.last_block, "layers_loaded": a.info.layers_loaded,
                             "layers_total": a.info.layers_total}))
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await job.wait(0.1)

    @staticmethod
    def _where(a: _Actor) -> str:
        n, total = a.info.layers_loaded, a.info.layers_total
        if a.last_block:
            return f"stuck after block {a.last_block} ({n}/{total})"
        if not a.placed:
            return "still waiting for a Ray node"
        return f"stuck before the first block (0/{total or '?'})"

    # --- deaths --------------------------------------------------------------------------------

    async def _watch_health(self, a: _Actor) -> None:
        """Ping the actor; Ray's "unavailable"/"died" (or silence) fails everything it fed."""
        while not a.gone.is_set():
            try:
                await asyncio.wait_for(a.handle.ping.remote(), self.health_timeout_s)
            except asyncio.TimeoutError:
                await self._died(a, None)
                return
            except RayActorError as exc:
                await self._died(a, exc)
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(a.gone.wait(), self.health_interval_s)

    async def _died(self, a: _Actor, exc: BaseException | None) -> None:
        """The actor is gone (or unreachable) and we did not stop it: fail every stream, at once."""
        if a.expected_exit or a.dead:
            return
        a.dead = True
        error = self._death_error(a, exc)
        with contextlib.suppress(Exception):  # unreachable may come back: make sure it does not linger
            ray.kill(a.handle, no_restart=True)
        for stream in [a.load_stream, *a.streams.values()]:
            if stream is not None:
                with contextlib.suppress(Exception):
                    ray.cancel(stream)
        self._mark_failed(a, error.details["reason"], "died")
        a.load_job.fail(error)
        for job in list(a.streams):
            job.fail(error)

    def _death_error(self, a: _Actor, exc: BaseException | None) -> WorkerDied:
        if exc is None:
            reason = f"it did not answer for {self.health_timeout_s:g} s"
        elif type(exc).__name__ == "ActorUnavailableError":
            reason = "its node stopped answering (Ray: actor unavailable)"
        else:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            reason = f"Ray reports the actor dead ({type(exc).__name__}: {first[:300]})"
        stage = a.info.state
        when = f" while {stage}" if stage in ("loading", "idle", "busy") else ""
        return WorkerDied(f"Worker {a.info.id} on node {a.info.node or '?'} died{when}: {reason}. Load the model "
                          "again (on another node if that one is gone).",
                          details={"worker_id": a.info.id, "node": a.info.node, "node_id": a.node_id,
                                   "reason": reason})

    # --- generation ----------------------------------------------------------------------------

    async def generate(self, worker_id: str, body: dict[str, Any], job: Job) -> None:
        a = self._get(worker_id)
        state = a.info.state
        if state == "loading":
            raise ModelNotLoaded(f"Worker {worker_id} is still loading ({a.info.layers_loaded}/"
                                 f"{a.info.layers_total} blocks); wait until it is ready.",
                                 details={"worker_id": worker_id, "state": state})
        if state not in ("idle", "busy"):
            raise Conflict(f"Worker {worker_id} is {state}"
                           f"{f' ({a.info.exit_reason})' if a.info.exit_reason else ''}; load the model again.",
                           details={"worker_id": worker_id, "state": state})
        self._cancel_idle_timer(a)
        job.on_cancel(lambda: self._spawn(a, self._cancel_generation(a, job)))
        stream = a.handle.generate.options(num_returns="streaming").remote({**body, "request_id": job.id})
        a.streams[job] = stream  # from here a death must reach this job
        self._update_busy(a)
        try:
            events = stream.__aiter__()
            while not job.state.finished:
                # Until "started" the actor answers at once; after it, silence is a stall.
                limit = self.inference_stall_s if job.records else self.call_timeout_s
                try:
                    ref = await asyncio.wait_for(events.__anext__(), limit)
                    event = await asyncio.wait_for(ref, self.call_timeout_s)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    await self._stalled(a, job, limit)
                    break
                if event.get("type") == "refused":
                    raise error_from_json(event["error"])
                if relay_inference(job, event):
                    break
            if not job.state.finished:
                raise RbeeError(f"The generation stream of worker {a.info.id} ended without end or error.")
        except TaskCancelledError:
            if not job.state.finished:
                job.fail(Cancelled("The generation was cancelled.", details={"request_id": job.id}))
        except RayActorError as exc:
            await self._died(a, exc)
            if not job.state.finished:
                job.fail(self._death_error(a, exc))
        finally:
            a.streams.pop(job, None)
            if a.info.state in ("idle", "busy"):
                self._update_busy(a)
                self._touch(a)

    async def _stalled(self, a: _Actor, job: Job, limit: float | None) -> None:
        with contextlib.suppress(RayError, asyncio.TimeoutError):
            await asyncio.wait_for(a.handle.cancel.remote(job.id), self.cancel_grace_s)
        stream = a.streams.get(job)
        if stream is not None:
            with contextlib.suppress(Exception):
                ray.cancel(stream)
        if not job.records:
            job.fail(ClusterUnavailable(f"Worker {a.info.id} on node {a.info.node} did not answer within "
                                        f"{limit:g} s.", details={"worker_id": a.info.id, "node": a.info.node}))
            return
        job.fail(InferenceStalled(
            f"Worker {a.info.id} produced nothing for {limit:g} s after {len(job.records) - 1} tokens; the "
            "generation was stopped. The node may be overloaded; raise c.RbeeApp.inference_stall_s if "
            "single tokens legitimately take this long.",
            details={"worker_id": a.info.id, "node": a.info.node, "stall_s": limit}))

    async def _cancel_generation(self, a: _Actor, job: Job) -> None:
        """``job.cancel()`` (e.g. the client went away): stop the actor's generation now."""
        if not a.dead:
            with contextlib.suppress(RayError, asyncio.TimeoutError):
                await asyncio.wait_for(a.handle.cancel.remote(job.id), self.cancel_grace_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await job.wait(self.cancel_grace_s)  # the actor's stream ends with CANCELLED
        if not job.state.finished:
            stream = a.streams.get(job)
            if stream is not None:
                with contextlib.suppress(Exception):
                    ray.cancel(stream)
            job.fail(Cancelled("The generation was cancelled.", details={"request_id": job.id}))

    def _update_busy(self, a: _Actor) -> None:
        state = "busy" if a.streams else "idle"
        if a.info.state != state:
            a.info.state = state
            self._notify(state, a.info)

    async def health(self, worker_id: str) -> dict[str, Any]:
        a = self._get(worker_id)
        if not a.placed or a.dead:
            return {**a.info.to_dict(), "reachable": False}
        try:
            live = await asyncio.wait_for(a.handle.health.remote(), self.call_timeout_s)
        except (RayError, asyncio.TimeoutError):
            return {**a.info.to_dict(), "reachable": False}
        return {**live, "node": a.info.node, "reachable": True}

    # --- keep-alive ----------------------------------------------------------------------------

    def _touch(self, a: _Actor) -> None:
        a.info.last_used = time.time()
        self._cancel_idle_timer(a)
        if self.keep_alive_s is not None and a.info.state == "idle" and not a.streams:
            a.idle_timer = asyncio.get_running_loop().call_later(self.keep_alive_s, self._idle_expired, a)

    def _idle_expired(self, a: _Actor) -> None:
        a.idle_timer = None
        if self._workers.get(a.info.id) is a and a.info.state == "idle" and not a.streams:
            self._spawn(a, self._stop(a, f"idle for {self.keep_alive_s:g} s (keep_alive)"))

    @staticmethod
    def _cancel_idle_timer(a: _Actor) -> None:
        if a.idle_timer is not None:
            a.idle_timer.cancel()
            a.idle_timer = None

    # --- stopping ------------------------------------------------------------------------------

    async def stop(self, worker_id: str) -> None:
        await self._stop(self._get(worker_id), "unloaded")

    async def _stop(self, a: _Actor, reason: str) -> None:
        if a.stop_task is None:  # concurrent stops share one
            a.stop_task = asyncio.ensure_future(self._do_stop(a, reason))
        await asyncio.shield(a.stop_task)

    async def _do_stop(self, a: _Actor, reason: str) -> None:
        job = a.load_job
        if not job.state.finished:
            job.cancel(f"Worker {a.info.id} was unloaded while loading.")
            with contextlib.suppress(asyncio.TimeoutError):
                await job.wait(2 * self.cancel_grace_s + self.kill_timeout_s)
        if a.info.state in ("idle", "busy"):
            a.info.state = "draining"
            self._notify("draining", a.info)
        a.expected_exit = True
        for stream_job in list(a.streams):
            stream_job.fail(Cancelled(f"Worker {a.info.id} was unloaded ({reason}).",
                                      details={"worker_id": a.info.id}))
        await self._kill(a)
        self._forget(a, "stopped", reason)

    async def _kill(self, a: _Actor) -> None:
        """``ray.kill`` the actor and wait (bounded) until Ray says it is dead: its memory is then free."""
        a.expected_exit = True
        if a.dead:
            return
        with contextlib.suppress(Exception):
            ray.kill(a.handle, no_restart=True)
        deadline = time.monotonic() + self.kill_timeout_s
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(a.handle.ping.remote(), max(0.1, deadline - time.monotonic()))
            except (RayError, asyncio.TimeoutError):
                break  # dead (or its node is): nothing of it runs any more
        a.dead = True
        a.gone.set()

    async def close(self) -> None:
        workers = list(self._workers.values())
        if workers:
            stops = [asyncio.ensure_future(self._stop(a, "server shutting down")) for a in workers]
            await asyncio.wait(stops, timeout=2 * self.cancel_grace_s + 2 * self.kill_timeout_s)
        for a in workers:
            with contextlib.suppress(Exception):
                ray.kill(a.handle, no_restart=True)
            self._forget(a, "stopped", "server shutting down")
            for task in list(a.tasks):
                task.cancel()
        if self._owns_ray:
            await asyncio.to_thread(ray.shutdown)


def _devices(device_map: dict[str, str] | str) -> list[str]:
    return [device_map] if isinstance(device_map, str) else list(dict.fromkeys(device_map.values()))


def _visible_cuda(device_map: dict[str, str] | str) -> dict[str, str] | str:
    """Renumber CUDA devices for the actor: Ray shows it only its own GPUs, as cuda:0, cuda:1..."""
    cuda = sorted({d for d in _devices(device_map) if d.startswith("cuda")},
                  key=lambda d: int(d.split(":")[1]) if ":" in d else 0)
    mapping = {d: f"cuda:{i}" for i, d in enumerate(cuda)}
    if isinstance(device_map, str):
        return mapping.get(device_map, device_map)
    return {block: mapping.get(d, d) for block, d in device_map.items()}


def _copy(info: WorkerInfo) -> WorkerInfo:
    return replace(info, devices=list(info.devices), memory_mb=dict(info.memory_mb))
