"""The pool core: the interface the hive programs against, the registry, and a worker's lifecycle.

Why one base: local processes, Ray actors and external engines differ only in how they
start, kill and stream. Keep-alive, failure, progress, readiness, busy/idle and stopping
are the same rules everywhere, so they live here once (as vLLM's executor base keeps the
bookkeeping and each executor only moves work). A transport subclass supplies:

* :class:`RegistryPool`: entries in ``self._workers`` (engines, which have no load stream);
* :class:`WorkerPool`: ``_launch`` and ``_run_load`` (start a worker, relay its load
  stream), ``_terminate`` (polite, waits until gone), ``_kill_now`` (a stuck load), ``_call``
  (one request to the worker: cancels, health), ``_stream_generation`` and ``close``'s ``_abandon``.

Everything here runs on the server's asyncio loop. Listeners (``pool.listen``) get
``(event, info)`` for: ``loading``, ``progress``, ``ready``, ``busy``, ``idle``,
``draining`` (being stopped), ``failed`` (load error or timeout), ``died`` (unexpected exit),
``stopped`` (unloaded, cancelled, or keep-alive expired) and ``removed`` (a failed entry expired).

Pools are traitlets ``LoggingConfigurable``\\s built with ``parent=`` (the server app), so
``c.Pool.keep_alive_s`` applies to every pool and ``c.LocalProcessPool.spare_worker``,
``c.RayPool.address`` to one.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from traitlets import Float, MetaHasTraits
from traitlets.config import LoggingConfigurable

from ..core.ids import new_id
from ..core.jobs import Job
from ..errors import (Cancelled, Conflict, InferenceStalled, InvalidRequest, LoadingTimeout, ModelNotLoaded, RbeeError,
                      WorkerNotFound, error_from_json)
from ..events import InferenceEnd, InferenceStarted, LoadingProgress, Ready, Token
from ..protocol import (FAILED_RETENTION_S, INFERENCE_STALL_S, LOADING_TIMEOUT_S, GenerationRequest, WorkerConfig,
                        WorkerInfo, WorkerSpec, WorkerState)

__all__ = ["Pool", "RegistryPool", "WorkerPool", "Entry", "ManagedEntry", "Listener", "relay_inference",
           "under_jupyterhub"]

log = logging.getLogger(__name__)

Listener = Callable[[str, WorkerInfo], None]


def under_jupyterhub() -> bool:
    """Whether this server was spawned by JupyterHub (it sets these for every single-user server)."""
    return bool(os.environ.get("JUPYTERHUB_API_TOKEN") or os.environ.get("JUPYTERHUB_SERVICE_PREFIX"))


class _PoolMeta(MetaHasTraits, abc.ABCMeta):
    """Traits and abstract methods on one class."""


# --- interface --------------------------------------------------------------------------

class Pool(LoggingConfigurable, metaclass=_PoolMeta):
    """Where models run. Implementations relay their progress and tokens into hive jobs."""

    keep_alive_s = Float(
        None, allow_none=True, config=True,
        help="Seconds an idle worker stays loaded before it is unloaded (like Ollama's keep_alive). None: until "
             "unloaded by hand. Default None (the server passes c.RbeeApp.keep_alive_s, 1800 under JupyterHub).",
    )
    loading_timeout_s = Float(
        LOADING_TIMEOUT_S, allow_none=True, config=True,
        help="Seconds a load may take before it fails with LOADING_TIMEOUT (naming the block it was stuck after) "
             "and its worker is stopped. Read at every check, so a change applies to loads in progress. None: no "
             "limit. Default 1800.",
    )
    inference_stall_s = Float(
        INFERENCE_STALL_S, allow_none=True, config=True,
        help="Seconds a started generation may send nothing before it is stopped with INFERENCE_STALLED; "
             "waiting in the queue does not count. None: no limit. Default 120.",
    )
    failed_retention_s = Float(
        FAILED_RETENTION_S, config=True,
        help="Seconds a failed worker stays listed, with its exit_reason, before it is dropped. Default 600.",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._listeners: list[Listener] = []

    def check_node(self, node: str) -> None:
        """Refuse a load's ``node`` option that this pool cannot honour (``InvalidRequest``, a 400).

        Called before anything starts. This machine's pools have no nodes to choose from.
        """
        raise InvalidRequest(f"This server runs workers on its own machine; it cannot place one on node {node!r}. "
                             "Drop 'node', or run the hive with c.RbeeApp.pool_class = "
                             "'rbee_jupyter.pools.ray.RayPool'.", details={"field": "node"})

    @abc.abstractmethod
    async def start(self, spec: Any, job: Job) -> WorkerInfo:
        """Start loading; returns at once (state ``loading``) and reports into ``job``.

        ``job`` gets a ``LoadingProgress`` per block, then ``Ready`` (finished) or an error;
        ``job.cancel()`` stops the load between blocks (``CANCELLED``) and the worker exits.
        Do not run it as ``JobRegistry.start``'s work (that would end the job when ``start``
        returns); the pool sets ``job.task`` itself when it is unset. Raises (and fails ``job``)
        only if no worker could be started.
        """

    @abc.abstractmethod
    async def stop(self, worker_id: str) -> None:
        """Cancel a load or unload; returns once the worker is gone. Unknown id: ``WorkerNotFound``."""

    @abc.abstractmethod
    def get(self, worker_id: str) -> WorkerInfo:
        """A snapshot of one worker; ``WorkerNotFound`` if unknown."""

    @abc.abstractmethod
    def list(self) -> list[WorkerInfo]:
        """Snapshots of every worker the pool knows (failed ones too, until stopped or expired)."""

    @abc.abstractmethod
    async def generate(self, worker_id: str, req: GenerationRequest, job: Job) -> None:
        """Run one generation, relaying started/token/end into ``job`` (which it finishes).

        ``req`` was parsed once, at the edge (the hive): pools take the typed request only.
        Refusals come as exceptions before any event (``WorkerBusy``, ``InvalidRequest``,
        ``ModelNotLoaded``...); ``job.cancel()`` stops the generation within one token.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop every worker (bounded); for server shutdown."""

    async def embed(self, worker_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Embed ``body["input"]`` on an embedding worker: ``{"embeddings": [base64 float32], "dimension",
        "prompt_tokens"}``. Default: this pool runs no embedding workers."""
        raise InvalidRequest(f"Worker {worker_id} cannot embed: {type(self).__name__} runs no embedding workers.",
                             details={"worker_id": worker_id})

    async def health(self, worker_id: str) -> dict[str, Any]:
        """Live numbers from the worker itself (``tokens_computed``, queue); default: the registry's view."""
        return self.get(worker_id).to_dict()

    def warm_up(self) -> None:
        """Prepare for loads once the server runs (on its loop); default: nothing to prepare."""

    def listen(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(event, info)`` on every worker state change; returns an unsubscribe."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    def _notify(self, event: str, info: WorkerInfo) -> None:
        snapshot = info.copy()
        for callback in list(self._listeners):
            try:
                callback(event, snapshot)
            except Exception:  # noqa: BLE001 - a broken listener must not break the pool
                log.exception("worker listener %r failed on %s", callback, event)


def relay_inference(job: Job, event: dict[str, Any]) -> bool:
    """Publish one worker event (its JSON) into ``job``; True when it was the terminal one.

    Shared by the pools whose workers run :class:`~rbee_jupyter.worker.runtime.WorkerRuntime`
    (processes, Ray actors).
    """
    kind = event.get("type")
    if kind == "token":
        job.publish(Token(t=str(event.get("t", "")), i=int(event.get("i", 0))))
    elif kind == "started":
        job.publish(InferenceStarted(job_id=job.id, timestamp=int(event.get("timestamp") or time.time() * 1000)))
    elif kind == "end":
        job.finish(InferenceEnd(
            job_id=job.id, total_tokens=int(event.get("total_tokens", 0)),
            duration_ms=int(event.get("duration_ms", 0)), stop_reason=str(event.get("stop_reason", "")),
            prompt_tokens=event.get("prompt_tokens"), time_to_first_token_ms=event.get("time_to_first_token_ms"),
            tokens_per_second=event.get("tokens_per_second")))
        return True
    elif kind == "error":
        job.fail(error_from_json(event))
        return True
    return False


# --- the registry -------------------------------------------------------------------------

@dataclass(eq=False, kw_only=True)
class Entry:
    """A pool's bookkeeping for one worker: its info, its load job, its open streams, its tasks."""

    info: WorkerInfo
    load_job: Job
    streams: dict[Job, Any] = field(default_factory=dict)
    tasks: set[asyncio.Task] = field(default_factory=set)


class RegistryPool(Pool):
    """A pool that keeps its workers in ``self._workers``: lookup, snapshots, tasks, busy/idle."""

    #: The message of ``WorkerNotFound``; ``{id}`` is the id asked for.
    not_found_message = "No worker with id {id!r}: it was never started, or it was unloaded."

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._workers: dict[str, Any] = {}

    def _get(self, worker_id: str) -> Any:
        w = self._workers.get(worker_id)
        if w is None:
            raise WorkerNotFound(self.not_found_message.format(id=worker_id), details={"worker_id": worker_id})
        return w

    def get(self, worker_id: str) -> WorkerInfo:
        return self._get(worker_id).info.copy()

    def list(self) -> list[WorkerInfo]:
        return [w.info.copy() for w in self._workers.values()]

    def _listed(self, w: Entry) -> bool:
        return self._workers.get(w.info.id) is w

    def _register(self, w: Entry, work: Coroutine[Any, Any, Any], on_cancel: Callable[[], Any]) -> WorkerInfo:
        """List a new worker, run ``work`` (its load or registration) as its load job's task, announce it."""
        job = w.load_job
        self._workers[w.info.id] = w
        job.meta.setdefault("worker_id", w.info.id)
        task = self._spawn(w, work)
        if job.task is None:  # so job.cancel() waits for the work to really end (see Job.cancel)
            job.task = task
        job.on_cancel(on_cancel)
        self._notify("loading", w.info)
        return w.info.copy()

    @staticmethod
    def _spawn(w: Entry, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """A task tied to a worker (kept referenced; cancelled on close)."""
        task = asyncio.get_running_loop().create_task(coro)
        w.tasks.add(task)
        task.add_done_callback(w.tasks.discard)
        return task

    def _update_busy(self, w: Entry) -> None:
        """Busy while a stream is open, idle otherwise (only for a worker that serves)."""
        if not w.info.ready:
            return
        state = WorkerState.BUSY if w.streams else WorkerState.IDLE
        if w.info.state != state:
            w.info.state = state
            self._notify(state, w.info)

    def _refuse_unless_ready(self, w: Entry, *, connected: bool = True) -> None:
        """``ModelNotLoaded`` while loading, ``Conflict`` when failed or stopping; before any event."""
        info = w.info
        if info.state == WorkerState.LOADING:
            raise ModelNotLoaded(f"Worker {info.id} is still loading ({info.layers_loaded}/"
                                 f"{info.layers_total} blocks); wait until it is ready.",
                                 details={"worker_id": info.id, "state": info.state})
        if not info.ready or not connected:
            raise Conflict(f"Worker {info.id} is {info.state}"
                           f"{f' ({info.exit_reason})' if info.exit_reason else ''}; load the model again.",
                           details={"worker_id": info.id, "state": info.state})


# --- the lifecycle -----------------------------------------------------------------------------

@dataclass(eq=False, kw_only=True)
class ManagedEntry(Entry):
    """A worker whose pool loads it block by block and may stop it, time it out or unload it when idle."""

    spec: WorkerSpec
    load_started: float = field(default_factory=time.monotonic)
    last_block: str | None = None
    expected_exit: bool = False  # we are stopping it: its end is not a death
    cancelling: bool = False
    stop_task: asyncio.Future | None = None
    idle_timer: asyncio.TimerHandle | None = None
    forget_timer: asyncio.TimerHandle | None = None


class WorkerPool(RegistryPool):
    """The lifecycle of workers that load a model block by block and run ``WorkerRuntime``.

    Subclasses move work; this class decides what it means (see the module docstring).
    """

    cancel_grace_s = 3.0  # a cancelled load/generation must end this long after we asked
    kill_timeout_s = 1.0  # how long a kill may take to be confirmed, beyond the grace
    #: What a loading timeout's message tells the user to check.
    check_hint = "the device and the model files"
    #: What a stall's message blames.
    stall_suspect = "The device"

    #: What means "the worker cannot be reached" to ``_call`` (a health check then says so).
    unreachable_errors: tuple[type[BaseException], ...] = (OSError,)

    # --- what a transport supplies ---------------------------------------------------------

    @abc.abstractmethod
    async def _launch(self, spec: WorkerSpec, worker_id: str, job: Job) -> ManagedEntry:
        """Start the worker (a process, an actor) and return its entry; an ``RbeeError`` if none could start."""

    @abc.abstractmethod
    async def _run_load(self, w: ManagedEntry) -> None:
        """Reach the started worker, then relay its load stream (:meth:`_relay_load`) into ``w.load_job``."""

    @abc.abstractmethod
    async def _terminate(self, w: ManagedEntry) -> None:
        """End the worker (politely where it can) and return once it is gone."""

    async def _kill_now(self, w: ManagedEntry) -> None:
        """End a worker that cannot be asked (stuck in a block, not started yet); return once it is gone."""
        await self._terminate(w)

    @abc.abstractmethod
    def _reachable(self, w: ManagedEntry) -> bool:
        """Whether the worker can be asked something now."""

    @abc.abstractmethod
    async def _call(self, w: ManagedEntry, method: str, *args: Any) -> Any:
        """Call the runtime's ``method`` (``cancel_load``, ``cancel_generation``, ``health``) in the worker."""

    @abc.abstractmethod
    async def _stream_generation(self, w: ManagedEntry, req: GenerationRequest, job: Job) -> None:
        """Send ``req``, put its stream in ``w.streams[job]`` once accepted, relay it into ``job``."""

    async def _drop_stream(self, w: ManagedEntry, job: Job) -> None:
        """Close ``job``'s stream after a cancel the worker did not honour in time."""

    async def _abandon(self, workers: list[ManagedEntry]) -> None:
        """At close: end whatever did not stop in time."""

    def _can_serve(self, w: ManagedEntry) -> bool:
        """Whether a ready worker can be sent a generation (e.g. its connection is still open)."""
        return True

    def _starting_where(self, w: ManagedEntry) -> str | None:
        """Where a load stands before the worker could report a block, if it is still starting."""
        return None

    def _details(self, w: ManagedEntry) -> dict[str, Any]:
        """What errors about ``w`` carry in ``details``."""
        return {"worker_id": w.info.id}

    def _on_gone(self, w: ManagedEntry) -> None:
        """The worker left the running set (stopped or failed): wake what waits on it."""

    async def _ask(self, w: ManagedEntry, method: str, *args: Any) -> None:
        """A polite request (cancel this) bounded by ``cancel_grace_s``; failing quietly, since the
        caller escalates next (waits, then kills or drops the stream)."""
        if self._reachable(w):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._call(w, method, *args), self.cancel_grace_s)

    async def health(self, worker_id: str) -> dict[str, Any]:
        """The worker's own ``health`` (state, memory, ``tokens_computed``, queue, request ids) and ``reachable``."""
        w = self._get(worker_id)
        if self._reachable(w):
            with contextlib.suppress(asyncio.TimeoutError, *self.unreachable_errors):  # died a moment ago:
                return {**await self._call(w, "health"), "reachable": True}  # the death watch is about to say so
        return {**w.info.to_dict(), "reachable": False}

    # --- registry -------------------------------------------------------------------------

    async def start(self, spec: WorkerSpec, job: Job) -> WorkerInfo:
        try:
            w = await self._launch(spec, spec.worker_id or new_id("w-"), job)
        except RbeeError as exc:  # no worker at all: subscribers learn it from the job too
            job.fail(exc)
            raise
        info = self._register(w, self._run_load(w), lambda: self._spawn(w, self._cancel_load(w)))
        self._spawn(w, self._loading_watchdog(w))
        return info

    @staticmethod
    def _new_info(spec: WorkerSpec, config: WorkerConfig, **where: Any) -> WorkerInfo:
        """The first snapshot of a worker that starts loading ``spec`` (``where``: its ``pid`` or ``node``)."""
        now = time.time()
        return WorkerInfo(id=config.worker_id, model_ref=spec.model_ref, state=WorkerState.LOADING,
                          devices=config.devices, memory_mb={}, quantization=spec.quantization, dtype=spec.dtype,
                          owner=spec.owner, created_at=now, last_used=now, kind=spec.kind, **where)

    def _forget(self, w: ManagedEntry, state: WorkerState, reason: str | None, event: str = "stopped") -> None:
        """Drop a worker from the registry (once) and tell listeners."""
        self._cancel_idle_timer(w)
        if w.forget_timer is not None:
            w.forget_timer.cancel()
        self._on_gone(w)
        if not self._listed(w):
            return
        del self._workers[w.info.id]
        if w.info.state != WorkerState.FAILED or not w.info.exit_reason:  # keep why it failed
            w.info.exit_reason = reason
        w.info.state = state
        self._notify(event, w.info)

    def _mark_failed(self, w: ManagedEntry, reason: str, event: str) -> None:
        """Keep a failed worker listed (with why) for ``failed_retention_s``, then drop it."""
        w.info.state, w.info.exit_reason = WorkerState.FAILED, reason
        self._on_gone(w)
        self._cancel_idle_timer(w)
        self._notify(event, w.info)
        w.forget_timer = asyncio.get_running_loop().call_later(
            self.failed_retention_s, self._forget, w, WorkerState.FAILED, None, "removed")

    def _fail_all(self, w: ManagedEntry, error: RbeeError, reason: str) -> None:
        """The worker died: it is failed, and so is everything it fed, at once."""
        self._mark_failed(w, reason, "died")
        w.load_job.fail(error)
        for job in list(w.streams):
            job.fail(error)

    # --- loading ---------------------------------------------------------------------------

    async def _relay_load(self, w: ManagedEntry, events: AsyncIterator[dict[str, Any]]) -> bool:
        """Relay loading events into the load job; False if the stream ended without ready or error."""
        job = w.load_job
        async for event in events:
            if job.state.finished:
                return True
            stage = event.get("stage")
            if stage == "loading_to_vram":
                self._on_progress(w, event)
            elif stage == "ready":
                self._on_ready(w, event)
                return True
            elif stage == "error":
                await self._load_failed(w, error_from_json(event))
                return True
        return False

    def _on_progress(self, w: ManagedEntry, event: dict[str, Any]) -> None:
        info = w.info
        info.layers_loaded = int(event.get("layers_loaded", 0))
        info.layers_total = int(event.get("layers_total", 0))
        device, vram_mb = str(event.get("device", "")), int(event.get("vram_mb", 0))
        memory = event.get("memory_mb")
        info.memory_mb = dict(memory) if isinstance(memory, dict) else {**info.memory_mb, device: vram_mb}
        w.last_block = event.get("block")
        w.load_job.publish(LoadingProgress(layers_loaded=info.layers_loaded, layers_total=info.layers_total,
                                           vram_mb=vram_mb, device=device, block=w.last_block,
                                           memory_mb=dict(info.memory_mb), node=info.node,
                                           timestamp=event.get("timestamp")))
        self._notify("progress", info)

    def _on_ready(self, w: ManagedEntry, event: dict[str, Any]) -> None:
        if w.load_job.cancel_event.is_set():  # cancelled at the last moment: the cancel path ends it
            return
        memory = event.get("memory_mb")
        if isinstance(memory, dict):
            w.info.memory_mb = dict(memory)
        w.info.state = WorkerState.IDLE
        w.load_job.finish(Ready(worker_id=w.info.id, memory_mb=dict(w.info.memory_mb), node=w.info.node))
        self._notify("ready", w.info)
        self._touch(w)

    async def _load_failed(self, w: ManagedEntry, error: RbeeError) -> None:
        """The load failed (or never started): end the worker, then report.

        Reporting after the end means that when a client reads ``OUT_OF_MEMORY`` or
        ``CANCELLED``, the memory is already free.
        """
        w.expected_exit = True
        await self._terminate(w)
        if isinstance(error, Cancelled):
            self._forget(w, WorkerState.STOPPED, "load cancelled")
        else:
            self._mark_failed(w, f"{error.code}: {error.message}", "failed")
        w.load_job.fail(error)

    async def _cancel_load(self, w: ManagedEntry) -> None:
        """``job.cancel()`` while loading: ask the worker to stop between blocks; kill it if it cannot."""
        job = w.load_job
        if job.state.finished or w.cancelling:
            return
        w.cancelling = True
        if self._reachable(w):
            await self._ask(w, "cancel_load")
            with contextlib.suppress(asyncio.TimeoutError):
                await job.wait(self.cancel_grace_s)  # the relay reports CANCELLED once the worker is gone
            if job.state.finished:
                return
        # Not started yet (importing torch, waiting for a node) or stuck inside one block: it must go anyway.
        w.expected_exit = True
        await self._kill_now(w)
        self._forget(w, WorkerState.STOPPED, "load cancelled")
        job.fail(Cancelled(f"Loading was cancelled ({self._where(w)}); the worker was stopped.",
                           details={**self._details(w), "layers_loaded": w.info.layers_loaded,
                                    "layers_total": w.info.layers_total}))

    async def _loading_watchdog(self, w: ManagedEntry) -> None:
        """Fail the load with ``LOADING_TIMEOUT`` once it exceeds ``loading_timeout_s``."""
        job = w.load_job
        while not job.state.finished:
            timeout = self.loading_timeout_s
            if timeout is not None and time.monotonic() - w.load_started > timeout and not w.expected_exit:
                where = self._where(w)
                w.expected_exit = True
                await self._kill_now(w)  # a stuck load cannot be asked politely
                self._mark_failed(w, f"loading timeout: {where}", "failed")
                job.fail(LoadingTimeout(
                    f"Loading {w.info.model_ref} took longer than {timeout:g} s, {where}; the worker was stopped. "
                    f"Raise the loading timeout, or check {self.check_hint}.",
                    details={**self._details(w), "timeout_s": timeout, "block": w.last_block,
                             "layers_loaded": w.info.layers_loaded, "layers_total": w.info.layers_total}))
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await job.wait(0.1)

    def _where(self, w: ManagedEntry) -> str:
        """Where a load stands, for messages: "stuck after block layers.2 (3/6)"."""
        n, total = w.info.layers_loaded, w.info.layers_total
        if w.last_block:
            return f"stuck after block {w.last_block} ({n}/{total})"
        return self._starting_where(w) or f"stuck before the first block (0/{total or '?'})"

    # --- generation ----------------------------------------------------------------------------

    async def generate(self, worker_id: str, req: GenerationRequest, job: Job) -> None:
        w = self._get(worker_id)
        self._refuse_unless_ready(w, connected=self._can_serve(w))
        self._cancel_idle_timer(w)
        job.on_cancel(lambda: self._spawn(w, self._cancel_generation(w, job)))
        try:
            await self._stream_generation(w, req, job)
        finally:
            w.streams.pop(job, None)
            if w.info.ready:
                self._update_busy(w)
                self._touch(w)

    async def _relay_generation(self, w: ManagedEntry, job: Job, events: AsyncIterator[dict[str, Any]],
                                first_limit: float | None = None) -> None:
        """Relay a generation's events into ``job`` until its end or error, or until the stream ends.

        Silence for ``inference_stall_s`` after ``started`` is a stall (``_stalled``). Workers send a
        request that waits in their queue, or computes tokens that make no text yet, a heartbeat
        (events.Heartbeat), which ends the silence but is not relayed. Before ``started`` only the
        transport's ``first_limit`` applies.
        """
        events = aiter(events)
        while not job.state.finished:
            limit = self.inference_stall_s if job.records else first_limit
            try:
                event = await asyncio.wait_for(anext(events), limit)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                await self._stalled(w, job, limit)
                return
            if relay_inference(job, event):
                return

    async def _stalled(self, w: ManagedEntry, job: Job, limit: float | None) -> None:
        """Nothing came for ``limit`` seconds after ``started``: stop the generation and say so."""
        await self._ask(w, "cancel_generation", job.id)
        job.fail(InferenceStalled(
            f"Worker {w.info.id} produced nothing for {limit:g} s after {len(job.records) - 1} tokens; the "
            f"generation was stopped. {self.stall_suspect} may be overloaded; raise c.RbeeApp.inference_stall_s "
            "if single tokens legitimately take this long.",
            details={**self._details(w), "stall_s": limit}))

    async def _cancel_generation(self, w: ManagedEntry, job: Job) -> None:
        """``job.cancel()`` (e.g. the client went away): stop the worker's generation now."""
        await self._ask(w, "cancel_generation", job.id)
        with contextlib.suppress(asyncio.TimeoutError):
            await job.wait(self.cancel_grace_s)  # the worker's stream ends with CANCELLED
        if not job.state.finished:
            await self._drop_stream(w, job)
            job.fail(Cancelled("The generation was cancelled.", details={"request_id": job.id}))

    # --- keep-alive ------------------------------------------------------------------------------

    def _touch(self, w: ManagedEntry) -> None:
        """Mark use; an idle worker is unloaded ``keep_alive_s`` after its last use."""
        w.info.last_used = time.time()
        self._cancel_idle_timer(w)
        if self.keep_alive_s is not None and w.info.state == WorkerState.IDLE and not w.streams:
            w.idle_timer = asyncio.get_running_loop().call_later(self.keep_alive_s, self._idle_expired, w)

    def _idle_expired(self, w: ManagedEntry) -> None:
        w.idle_timer = None
        if self._listed(w) and w.info.state == WorkerState.IDLE and not w.streams:
            self._spawn(w, self._stop(w, f"idle for {self.keep_alive_s:g} s (keep_alive)"))

    @staticmethod
    def _cancel_idle_timer(w: ManagedEntry) -> None:
        if w.idle_timer is not None:
            w.idle_timer.cancel()
            w.idle_timer = None

    # --- stopping --------------------------------------------------------------------------------

    async def stop(self, worker_id: str) -> None:
        await self._stop(self._get(worker_id), "unloaded")

    async def _stop(self, w: ManagedEntry, reason: str) -> None:
        if w.stop_task is None:  # concurrent stops share one
            w.stop_task = asyncio.ensure_future(self._do_stop(w, reason))
        await asyncio.shield(w.stop_task)

    async def _do_stop(self, w: ManagedEntry, reason: str) -> None:
        job = w.load_job
        if not job.state.finished:
            job.cancel(f"Worker {w.info.id} was unloaded while loading.")
            with contextlib.suppress(asyncio.TimeoutError):
                await job.wait(2 * self.cancel_grace_s + self.kill_timeout_s)
        w.expected_exit = True
        if w.info.ready:
            w.info.state = WorkerState.DRAINING
            self._notify("draining", w.info)
        for stream_job in list(w.streams):
            stream_job.fail(Cancelled(f"Worker {w.info.id} was unloaded ({reason}).",
                                      details={"worker_id": w.info.id}))
        await self._terminate(w)
        self._forget(w, WorkerState.STOPPED, reason)

    def _close_timeout_s(self) -> float:
        """How long ``close`` waits for polite stops before it ends the rest."""
        return 2 * self.cancel_grace_s + 2 * self.kill_timeout_s

    async def close(self) -> None:
        workers = list(self._workers.values())
        if workers:
            stops = [asyncio.ensure_future(self._stop(w, "server shutting down")) for w in workers]
            await asyncio.wait(stops, timeout=self._close_timeout_s())
        for w in workers:
            w.expected_exit = True
        await self._abandon(workers)
        for w in workers:
            self._forget(w, WorkerState.STOPPED, "server shutting down")
            for task in list(w.tasks):
                task.cancel()
