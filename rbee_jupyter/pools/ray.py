"""Workers as Ray actors: the hive places models on the nodes of an existing Ray cluster.

Why Ray, and not a home-made cluster manager: a team that outgrows one GPU box usually
has (or can start, e.g. with KubeRay) a Ray cluster that already knows its nodes, GPUs and
custom resources, schedules onto them and notices when a node goes away. :class:`RayPool`
only asks it for one actor per loaded model; inside the actor runs the same
:class:`~.worker.runtime.WorkerRuntime` as in a local worker process (layer-by-layer
loader, generation queue), so events, errors and cancellation mean the same everywhere.

How the pieces map:

* start: an actor (``max_restarts=0``: a restarted actor would have lost its model), placed
  by ``num_gpus`` (the CUDA devices of the plan), ``c.RayPool.resources`` and the
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
import functools
import json
import logging
import os
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

try:
    import ray
    from ray.exceptions import RayActorError, RayError, TaskCancelledError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("The Ray pool needs Ray: pip install 'rbee-jupyter[ray]'.") from exc

from traitlets import Dict, Float, List, Unicode

from ..core.jobs import Job
from ..errors import (Cancelled, ClusterUnavailable, InvalidRequest, ModelNotLoaded, RbeeError, WorkerDied,
                      error_from_json)
from ..protocol import ACTIVE_STATES, GenerationRequest, WorkerConfig, WorkerSpec
from ..worker.environment import blanked_secrets, scrub_environ
from ..worker.protocol import BLOCK_DELAY_ENV, TOKEN_DELAY_ENV
from .base import ManagedEntry, WorkerPool

__all__ = ["RayPool", "WorkerActor", "node_name"]

log = logging.getLogger(__name__)

#: Resource names Ray defines itself; every other resource of a node is a custom one (a name).
_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "TPU", "NPU", "HPU", "memory", "object_store_memory"})
#: How much of a node's name resource one worker takes: effectively unlimited workers per node.
_NAME_SHARE = 0.001
_UNLIMITED_LAG = 1 << 30  # the actor relays every event; the hive's subscribers do their own skipping


# --- the private cluster -------------------------------------------------------------------

def private_cluster_options(token_dir: str | None = None) -> dict[str, Any]:
    """``ray.init`` options for the cluster the hive starts itself (no ``ray_address``); sets up its token.

    Anyone who can reach a Ray cluster's ports can run code on it as the server's user. So
    the private one starts no dashboard (an HTTP API that submits jobs) and requires Ray's
    token authentication (``RAY_AUTH_MODE=token``, Ray >= 2.40) with a fresh token in a file
    only this user can read, whose path (``RAY_AUTH_TOKEN_PATH``) the raylet and actors
    inherit; a client without it is refused. Loopback only is not something Ray 2.60 offers:
    its gRPC servers listen on every interface whatever ``_node_ip_address`` says (and with
    127.0.0.1 there its node did not start here), so the token is what closes them; a firewall
    in front of the host's ephemeral ports is the second line (docs/cluster.md). Workers
    started by the local pool never get the token (see :mod:`~rbee_jupyter.worker.environment`).
    A cluster named by ``c.RayPool.address`` is someone else's to secure: docs/cluster.md
    says what it needs.
    """
    folder = tempfile.mkdtemp(prefix="rbee-ray-auth-", dir=token_dir)  # mode 0700
    path = os.path.join(folder, "auth_token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = path
    os.environ.pop("RAY_AUTH_TOKEN", None)  # would win over the file
    with contextlib.suppress(ImportError, AttributeError):  # Ray caches its config when imported; refresh
        from ray._raylet import Config  # it, as ray.init does itself when it turns token mode on

        Config.initialize("")
    return {"include_dashboard": False}


# --- inside the actor ---------------------------------------------------------------------

class WorkerActor:
    """One model inside a Ray actor: a :class:`WorkerRuntime` without the HTTP server.

    Its methods are ``async`` so Ray runs them on the actor's event loop: a load or a
    generation streams from its own thread while pings and cancels are answered at once.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = WorkerConfig.from_json(config)
        scrub_environ(keep=self._config.extra.get("forwarded_env", ()))  # no server secret (worker/environment.py)
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

    async def cancel_generation(self, request_id: str) -> bool:
        return self._runtime is not None and self._runtime.cancel(request_id)

    async def health(self) -> dict[str, Any]:
        if self._runtime is None:
            return {"worker_id": self._config.worker_id, "pid": os.getpid(), "state": "loading"}
        return self._runtime.health()


@functools.cache
def _actor_class() -> Any:
    return ray.remote(WorkerActor)


# --- nodes ---------------------------------------------------------------------------------

def node_name(node: dict[str, Any]) -> str:
    """A node's name (see the module docstring): its first custom resource, else its IP."""
    custom = sorted(k for k in node.get("Resources", {})
                    if k not in _BUILTIN_RESOURCES and ":" not in k and not k.startswith("TPU-"))
    return custom[0] if custom else str(node.get("NodeManagerAddress", node.get("NodeID", "?")))


# --- the pool ------------------------------------------------------------------------------

@dataclass(eq=False, kw_only=True)
class _Actor(ManagedEntry):
    """The pool's bookkeeping for one actor."""

    handle: Any
    node_id: str | None = None
    load_stream: Any = None
    placed: bool = False
    dead: bool = False
    gone: asyncio.Event = field(default_factory=asyncio.Event)


class RayPool(WorkerPool):
    """One Ray actor per loaded model, on the nodes of a Ray cluster (``c.RayPool.*``).

    ``RayPool(ray_address=..., ray_resources=...)``, the constructor's old keywords, still work.
    """

    address = Unicode(
        None, allow_none=True, config=True,
        help="Ray cluster the workers run on: a GCS address 'host:6379', or 'auto' for the cluster this machine "
             "belongs to (RAY_ADDRESS, else the one `ray start` made here). Connecting starts at once, in the "
             "background. Default None: a private Ray instance in this process. (Was c.RbeeApp.ray_address.)",
    )
    resources = Dict(
        config=True,
        help="Ray resources every worker actor asks for besides its GPUs, e.g. {\"llm-node\": 0.01} to keep "
             "workers on nodes started with --resources '{\"llm-node\": 1}'. Default {}: any node. "
             "(Was c.RbeeApp.ray_resources.)",
    )
    namespace = Unicode(
        "rbee", config=True,
        help="Ray namespace of the actors (named by worker id, so ray.get_actor finds them). Default 'rbee'.",
    )
    placement_timeout_s = Float(
        120.0, config=True,
        help="Seconds an actor may wait for a node with room before its load fails with CLUSTER_UNAVAILABLE. "
             "Default 120.",
    )
    connect_timeout_s = Float(
        60.0, config=True, help="Seconds a request waits for the connection to the cluster. Default 60.",
    )
    health_interval_s = Float(
        1.0, config=True, help="Seconds between health pings of every actor. Default 1.",
    )
    health_timeout_s = Float(
        30.0, config=True,
        help="Seconds a ping may go unanswered before the actor counts as dead (as does Ray saying it is "
             "unavailable or dead). Default 30.",
    )
    call_timeout_s = Float(
        30.0, config=True, help="Bound, in seconds, on every other call into an actor. Default 30.",
    )
    forward_env = List(
        Unicode(), default_value=[BLOCK_DELAY_ENV, TOKEN_DELAY_ENV], config=True,
        help="Environment variables of the server that actors get too (the worker's test knobs by default; "
             "e.g. add HF_HUB_OFFLINE).",
    )

    kill_timeout_s = 10.0
    unreachable_errors = (RayError,)
    check_connect_timeout_s = 5.0
    check_hint = "the node, the device and the model files"
    stall_suspect = "The node"

    def __init__(self, *, ray_address: str | None = None, ray_resources: dict[str, float] | None = None,
                 **kwargs: Any) -> None:
        if ray_address is not None:
            kwargs.setdefault("address", ray_address)
        if ray_resources is not None:
            kwargs.setdefault("resources", ray_resources)
        super().__init__(**kwargs)
        self.ray_resources = {str(k): float(v) for k, v in self.resources.items()}
        self._owns_ray = False
        self._connect_error: BaseException | None = None
        self._connected, self._released = threading.Event(), threading.Event()
        self._connector = threading.Thread(target=self._connect, name="rbee-ray-connect", daemon=True)
        self._connector.start()

    # --- the cluster -------------------------------------------------------------------------

    def _connect(self) -> None:
        """Connect to the cluster (a thread: ray.init takes seconds, the server must not wait)."""
        try:
            if not ray.is_initialized():
                private = {} if self.address else private_cluster_options()
                ray.init(address=self.address, namespace=self.namespace, log_to_driver=False, **private)
                self._owns_ray = True
        except BaseException as exc:  # noqa: BLE001 - reported to every request that needs the cluster
            log.error("rbee: cannot connect to the Ray cluster at %s: %s", self.address or "(local)", exc)
            self._connect_error = exc
        self._connected.set()
        if self._owns_ray and not self.address:  # Ray's processes die with the thread that started them
            self._released.wait()  # (PR_SET_PDEATHSIG, Linux): this one lives until close()

    def _ensure_connected(self, timeout: float | None = None) -> None:
        timeout = self.connect_timeout_s if timeout is None else timeout
        self._connected.wait(timeout)
        where = self.address or "a local Ray instance"
        if not self._connected.is_set():
            raise ClusterUnavailable(f"Still connecting to the Ray cluster at {where} after {timeout:g} s; "
                                     "retry in a moment, and check c.RayPool.address if this persists.",
                                     details={"ray_address": self.address})
        if self._connect_error is not None or not ray.is_initialized():
            raise ClusterUnavailable(f"Cannot connect to the Ray cluster at {where}: {self._connect_error}. "
                                     "Check c.RayPool.address and that the cluster runs the same Ray version.",
                                     details={"ray_address": self.address})

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's live nodes: ``{"name", "id", "ip", "resources"}`` (blocking: a cluster call)."""
        self._ensure_connected()
        return [{"name": node_name(n), "id": n["NodeID"], "ip": n.get("NodeManagerAddress"),
                 "resources": dict(n.get("Resources", {}))} for n in ray.nodes() if n.get("Alive")]

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
        gpus = len(_cuda(spec.device_map))
        env = {**blanked_secrets(), **{k: os.environ[k] for k in self.forward_env if k in os.environ}}
        options: dict[str, Any] = {
            "name": worker_id, "namespace": self.namespace, "max_restarts": 0, "num_cpus": 0, "num_gpus": gpus,
            "resources": {**self.ray_resources, **placement.get("resources", {})},
        }
        if "scheduling_strategy" in placement:
            options["scheduling_strategy"] = placement["scheduling_strategy"]
        if env:
            options["runtime_env"] = {"env_vars": env}
        return options

    # --- loading -------------------------------------------------------------------------------

    async def _launch(self, spec: WorkerSpec, worker_id: str, job: Job) -> _Actor:
        config = spec.worker_config(worker_id, device_map=_visible_cuda(spec.device_map), watch_stdin=False,
                                    extra={"forwarded_env": list(self.forward_env)})
        try:
            await asyncio.to_thread(self._ensure_connected)
            options = await asyncio.to_thread(self._actor_options, spec, worker_id)
            handle = _actor_class().options(**options).remote(json.loads(config.to_json()))
        except (RayError, ValueError) as exc:  # e.g. a worker of that name still being torn down
            raise ClusterUnavailable(f"Ray refused to start worker {worker_id}: {exc}",
                                     details={"worker_id": worker_id}) from None
        return _Actor(info=self._new_info(spec, config, pid=None, node=spec.node), spec=spec, handle=handle,
                      load_job=job)

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
        a.info.node = next((n["name"] for n in await asyncio.to_thread(self.nodes) if n["id"] == a.node_id),
                           a.node_id)
        self._spawn(a, self._watch_health(a))
        try:
            a.load_stream = a.handle.load.options(num_returns="streaming").remote()
            if not await self._relay_load(a, self._events(a.load_stream)):
                raise RbeeError(f"The load stream of worker {a.info.id} ended without ready or error.")
        except TaskCancelledError:
            return  # we cancelled it; whoever did reports why
        except RayActorError as exc:
            await self._died(a, exc)
        except (RayError, RbeeError, asyncio.TimeoutError) as exc:
            if not job.state.finished and not a.expected_exit:
                await self._load_failed(a, exc if isinstance(exc, RbeeError) else RbeeError(
                    f"Worker {a.info.id} failed while loading: {exc}", details={"worker_id": a.info.id}))

    async def _events(self, stream: Any):
        """The dicts of a Ray streaming generator, each bounded by ``call_timeout_s``; a refusal is raised."""
        async for ref in stream:
            event = await asyncio.wait_for(ref, self.call_timeout_s)
            if event.get("type") == "refused":
                raise error_from_json(event["error"])
            yield event

    def _actor_needs(self, a: _Actor) -> str:
        """What the actor waits for, for messages: "GPU=1, llm-node=0.01, node node-b"."""
        gpus = len(_cuda(a.spec.device_map))
        needs = [f"GPU={gpus}"] if gpus else []
        needs += [f"{k}={v:g}" for k, v in self.ray_resources.items()]
        if a.spec.node:
            needs.append(f"node {a.spec.node}")
        return ", ".join(needs) or "room"

    # --- the transport of the lifecycle ---------------------------------------------------------

    def _reachable(self, a: _Actor) -> bool:
        return a.placed and not a.dead

    def _starting_where(self, a: _Actor) -> str | None:
        return "still waiting for a Ray node" if not a.placed else None

    def _details(self, a: _Actor) -> dict[str, Any]:
        return {"worker_id": a.info.id, "node": a.info.node}

    def _on_gone(self, a: _Actor) -> None:
        a.gone.set()

    async def _call(self, a: _Actor, method: str, *args: Any) -> Any:
        return await asyncio.wait_for(getattr(a.handle, method).remote(*args), self.call_timeout_s)

    async def _drop_stream(self, a: _Actor, job: Job) -> None:
        stream = a.streams.get(job)
        if stream is not None:
            with contextlib.suppress(Exception):
                ray.cancel(stream)

    async def _terminate(self, a: _Actor) -> None:
        """``ray.kill`` the actor and wait (bounded) until Ray says it is dead: its memory is then free."""
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
        self._fail_all(a, error, error.details["reason"])

    def _death_error(self, a: _Actor, exc: BaseException | None) -> WorkerDied:
        if exc is None:
            reason = f"it did not answer for {self.health_timeout_s:g} s"
        elif type(exc).__name__ == "ActorUnavailableError":
            reason = "its node stopped answering (Ray: actor unavailable)"
        else:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            reason = f"Ray reports the actor dead ({type(exc).__name__}: {first[:300]})"
        stage = a.info.state
        when = f" while {stage}" if stage in ACTIVE_STATES else ""
        return WorkerDied(f"Worker {a.info.id} on node {a.info.node or '?'} died{when}: {reason}. Load the model "
                          "again (on another node if that one is gone).",
                          details={"worker_id": a.info.id, "node": a.info.node, "node_id": a.node_id,
                                   "reason": reason})

    # --- generation ----------------------------------------------------------------------------

    async def _stream_generation(self, a: _Actor, req: GenerationRequest, job: Job) -> None:
        stream = a.handle.generate.options(num_returns="streaming").remote({**req.to_json(), "request_id": job.id})
        a.streams[job] = stream  # from here a death must reach this job
        self._update_busy(a)
        try:  # until "started" the actor answers at once (it queues itself): silence then is no stall
            await self._relay_generation(a, job, self._events(stream), first_limit=self.call_timeout_s)
            if not job.state.finished:
                raise RbeeError(f"The generation stream of worker {a.info.id} ended without end or error.")
        except TaskCancelledError:
            if not job.state.finished:
                job.fail(Cancelled("The generation was cancelled.", details={"request_id": job.id}))
        except RayActorError as exc:
            await self._died(a, exc)
            if not job.state.finished:
                job.fail(self._death_error(a, exc))

    async def _stalled(self, a: _Actor, job: Job, limit: float | None) -> None:
        if job.records:
            await super()._stalled(a, job, limit)
        else:  # not even "started": the actor does not answer
            await self._ask(a, "cancel_generation", job.id)
            job.fail(ClusterUnavailable(f"Worker {a.info.id} on node {a.info.node} did not answer within "
                                        f"{limit:g} s.", details={"worker_id": a.info.id, "node": a.info.node}))
        await self._drop_stream(a, job)

    async def health(self, worker_id: str) -> dict[str, Any]:
        return {**await super().health(worker_id), "node": self._get(worker_id).info.node}

    # --- closing -------------------------------------------------------------------------------

    async def _abandon(self, workers: list[_Actor]) -> None:
        for a in workers:
            with contextlib.suppress(Exception):
                ray.kill(a.handle, no_restart=True)

    async def close(self) -> None:
        await super().close()
        try:
            if self._owns_ray:
                await asyncio.to_thread(ray.shutdown)
        finally:
            self._released.set()


def _cuda(device_map: dict[str, str] | str) -> list[str]:
    """The CUDA devices of a plan, in index order: the GPUs its actor asks Ray for."""
    devices = {device_map} if isinstance(device_map, str) else set(device_map.values())
    return sorted((d for d in devices if d.startswith("cuda")), key=lambda d: int(d.split(":")[1]) if ":" in d else 0)


def _visible_cuda(device_map: dict[str, str] | str) -> dict[str, str] | str:
    """Renumber CUDA devices for the actor: Ray shows it only its own GPUs, as cuda:0, cuda:1..."""
    mapping = {d: f"cuda:{i}" for i, d in enumerate(_cuda(device_map))}
    if isinstance(device_map, str):
        return mapping.get(device_map, device_map)
    return {block: mapping.get(d, d) for block, d in device_map.items()}
