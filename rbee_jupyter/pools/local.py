"""Worker pools: start, watch, stop workers and relay their streams into the hive's jobs.

:class:`Pool` is the interface the hive programs against; :class:`LocalProcessPool`
runs each model in its own ``python -m rbee_jupyter.worker`` process on this machine
(a Ray-actor pool or an external OpenAI-compatible engine would be other subclasses).

Why separate processes: unloading must free every byte (the process exits), and a crash,
an OOM kill or a wedged kernel must cost one model, never the Jupyter server. The price is
that the pool must notice deaths itself: it awaits every process's exit, so a worker killed
with SIGKILL fails each stream it fed with ``WORKER_DIED`` at once instead of leaving
clients waiting on a dead socket.

Everything here runs on the server's asyncio loop. Listeners (``pool.listen``) get
``(event, info)`` for: ``loading``, ``progress``, ``ready``, ``busy``, ``idle``,
``draining`` (being stopped), ``failed`` (load error or timeout), ``died`` (unexpected exit), ``stopped`` (unloaded,
cancelled, or keep-alive expired) and ``removed`` (a failed entry expired).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from ..errors import (Cancelled, Conflict, InferenceStalled, InvalidRequest, LoadingTimeout, ModelNotLoaded, RbeeError,
                     WorkerDied, WorkerNotFound)
from ..events import InferenceEnd, InferenceStarted, LoadingProgress, Ready, Token
from ..core.jobs import Job
from ..worker.client import GenerationStream, WorkerClient
from ..worker.process import WorkerProcess
from ..worker.protocol import WorkerConfig, describe_exit, error_from_json

__all__ = ["Pool", "LocalProcessPool", "WorkerSpec", "WorkerInfo", "Listener", "relay_inference"]

log = logging.getLogger(__name__)


# --- data -------------------------------------------------------------------------------

@dataclass
class WorkerSpec:
    """What to load and how; ``device_map`` is one device or a ``{block: device}`` plan."""

    model_ref: str
    model_path: str
    device_map: dict[str, str] | str = "cpu"
    quantization: str | None = None
    dtype: str | None = None
    double_quant: bool = False
    compute_dtype: str | None = None
    owner: str | None = None
    queue_depth: int = 8
    max_tokens_limit: int = 4096
    worker_id: str | None = None  # the hive names workers before they start (their load job's id)
    node: str | None = None  # a cluster node asked for by name or id (pools that have nodes; validated first)
    kind: str = "generate"  # "embedding": a sentence-transformers model served by worker/embedding.py


@dataclass
class WorkerInfo:
    """A worker as the registry sees it (a snapshot: the pool hands out copies)."""

    id: str
    model_ref: str
    state: str  # loading | idle | busy | draining | failed | stopped
    devices: list[str]
    memory_mb: dict[str, int]
    pid: int | None
    quantization: str | None
    dtype: str | None
    owner: str | None
    created_at: float
    last_used: float
    exit_reason: str | None = None
    layers_loaded: int = 0
    layers_total: int = 0
    node: str | None = None  # the cluster node it runs on; None: this machine
    kind: str = "generate"  # what its model does: "generate" text or "embedding" vectors

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def pending(cls, worker_id: str, model_ref: str, *, owner: str | None, state: str) -> WorkerInfo:
        """A worker the hive announced whose process does not exist yet (its model is downloading)."""
        now = time.time()
        return cls(id=worker_id, model_ref=model_ref, state=state, devices=[], memory_mb={}, pid=None,
                   quantization=None, dtype=None, owner=owner, created_at=now, last_used=now)


Listener = Callable[[str, WorkerInfo], None]


# --- interface --------------------------------------------------------------------------

class Pool(abc.ABC):
    """Where models run. Implementations relay their progress and tokens into hive jobs."""

    #: ``RbeeApp`` traits the server passes to this class's constructor as keyword arguments
    #: (besides keep_alive_s, loading_timeout_s and inference_stall_s, which every pool takes).
    app_traits: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def check_node(self, node: str) -> None:
        """Refuse a load's ``node`` option that this pool cannot honour (``InvalidRequest``, a 400).

        Called before anything starts. This machine's pools have no nodes to choose from.
        """
        raise InvalidRequest(f"This server runs workers on its own machine; it cannot place one on node {node!r}. "
                             "Drop 'node', or run the hive with c.RbeeApp.pool_class = "
                             "'rbee_jupyter.pools.ray.RayPool'.", details={"field": "node"})

    @abc.abstractmethod
    async def start(self, spec: WorkerSpec, job: Job) -> WorkerInfo:
        """Start loading; returns at once (state ``loading``) and reports into ``job``.

        ``job`` gets a ``LoadingProgress`` per block, then ``Ready`` (finished) or an error;
        ``job.cancel()`` stops the load between blocks (``CANCELLED``) and the worker exits.
        Do not run it as ``JobRegistry.start``'s work (that would end the job when ``start``
        returns); the pool sets ``job.task`` itself when it is unset. Raises (and fails ``job``)
        only if no process could be started.
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
    async def generate(self, worker_id: str, body: dict[str, Any], job: Job) -> None:
        """Run one generation, relaying started/token/end into ``job`` (which it finishes).

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
        snapshot = _snapshot(info)
        for callback in list(self._listeners):
            try:
                callback(event, snapshot)
            except Exception:  # noqa: BLE001 - a broken listener must not break the pool
                log.exception("worker listener %r failed on %s", callback, event)


def _snapshot(info: WorkerInfo) -> WorkerInfo:
    return replace(info, devices=list(info.devices), memory_mb=dict(info.memory_mb))


def relay_inference(job: Job, event: dict[str, Any]) -> bool:
    """Publish one worker event (its JSON) into ``job``; True when it was the terminal one.

    Shared by the pools whose workers run :class:`~.worker.runtime.WorkerRuntime` (processes, Ray actors).
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


# --- local processes ----------------------------------------------------------------------

@dataclass(eq=False)
class _Worker:
    """The pool's bookkeeping for one process."""

    info: WorkerInfo
    spec: WorkerSpec
    process: WorkerProcess
    load_job: Job
    client: WorkerClient | None = None
    streams: dict[Job, GenerationStream | None] = field(default_factory=dict)
    tasks: set[asyncio.Task] = field(default_factory=set)
    load_started: float = field(default_factory=time.monotonic)
    last_block: str | None = None
    expected_exit: bool = False  # we are stopping it: its exit is not a death
    exit_handled: bool = False
    stop_task: asyncio.Future | None = None
    idle_timer: asyncio.TimerHandle | None = None
    forget_timer: asyncio.TimerHandle | None = None


class LocalProcessPool(Pool):
    """One worker process per loaded model, on this machine.

    Args:
        keep_alive_s: unload a worker idle for this long (like Ollama's ``keep_alive``); None: never.
        loading_timeout_s: fail a load (``LOADING_TIMEOUT``, naming the block it was stuck
            after) and kill the worker when loading takes longer; None: no limit. Read at every
            check, so a change applies to loads in progress.
        python: interpreter for workers (an environment with torch).
        env: extra environment for workers (e.g. ``CUDA_VISIBLE_DEVICES``, ``HF_HOME``).
        startup_timeout_s: how long a new process may take to announce its port.
        stop_grace_s: how long a worker asked to exit may take before it is killed.
        log_dir: where each worker's stderr is also written (``{worker_id}.log``); None: memory only.
        failed_retention_s: how long failed workers stay listed (with their ``exit_reason``).
        inference_stall_s: a started generation that sends nothing for this long is stopped
            and ends with ``INFERENCE_STALLED``; None: wait for ever. Waiting in the queue
            does not count.
        spare_worker: keep one worker process started ahead of need, with torch, transformers
            and the loader already imported (~400 MB of host memory, no GPU memory), and hand it
            the next load, which then skips those seconds of imports. See :meth:`warm_up`.
    """

    #: The server passes ``c.RbeeApp.spare_worker`` (pools without worker processes never see it).
    app_traits = ("spare_worker",)
    cancel_grace_s = 3.0  # a cancelled load/generation must end this long after we asked
    death_grace_s = 1.5  # after a broken connection, how long to wait for the process to exit

    def __init__(self, *, keep_alive_s: float | None = None, loading_timeout_s: float | None = None,
                 python: str = sys.executable, env: dict[str, str] | None = None,
                 startup_timeout_s: float = 60.0, stop_grace_s: float = 5.0, log_dir: str | Path | None = None,
                 failed_retention_s: float = 600.0, inference_stall_s: float | None = 120.0,
                 spare_worker: bool = False) -> None:
        super().__init__()
        self.inference_stall_s = inference_stall_s
        self.keep_alive_s = keep_alive_s
        self.loading_timeout_s = loading_timeout_s
        self.python = python
        self.env = dict(env or {})
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.failed_retention_s = failed_retention_s
        self._workers: dict[str, _Worker] = {}
        self.spare_worker = spare_worker
        self._spare: WorkerProcess | None = None
        self._spare_starting: asyncio.Task | None = None
        self._closed = False

    # --- registry ------------------------------------------------------------------------

    def _get(self, worker_id: str) -> _Worker:
        w = self._workers.get(worker_id)
        if w is None:
            raise WorkerNotFound(f"No worker with id {worker_id!r}: it was never started, or it was unloaded.",
                                 details={"worker_id": worker_id})
        return w

    def get(self, worker_id: str) -> WorkerInfo:
        return _snapshot(self._get(worker_id).info)

    def list(self) -> list[WorkerInfo]:
        return [_snapshot(w.info) for w in self._workers.values()]

    def _spawn(self, w: _Worker, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """A task tied to a worker (kept referenced; cancelled on close)."""
        task = asyncio.get_running_loop().create_task(coro)
        w.tasks.add(task)
        task.add_done_callback(w.tasks.discard)
        return task

    def _forget(self, w: _Worker, state: str, reason: str | None, event: str = "stopped") -> None:
        """Drop a worker from the registry (once) and tell listeners."""
        self._cancel_idle_timer(w)
        if w.forget_timer is not None:
            w.forget_timer.cancel()
        if self._workers.get(w.info.id) is not w:
            return
        del self._workers[w.info.id]
        if w.info.state != "failed" or not w.info.exit_reason:  # keep why it failed
            w.info.exit_reason = reason
        w.info.state = state
        self._notify(event, w.info)

    def _mark_failed(self, w: _Worker, reason: str, event: str) -> None:
        """Keep a failed worker listed (with why) for ``failed_retention_s``, then drop it."""
        w.info.state, w.info.exit_reason = "failed", reason
        self._cancel_idle_timer(w)
        self._notify(event, w.info)
        loop = asyncio.get_running_loop()
        w.forget_timer = loop.call_later(self.failed_retention_s, self._forget, w, "failed", None, "removed")

    # --- loading ---------------------------------------------------------------------------

    async def start(self, spec: WorkerSpec, job: Job) -> WorkerInfo:
        worker_id = spec.worker_id or f"w-{uuid.uuid4().hex[:10]}"
        config = WorkerConfig(model_path=spec.model_path, worker_id=worker_id, quantization=spec.quantization,
                              dtype=spec.dtype, device_map=spec.device_map, double_quant=spec.double_quant,
                              compute_dtype=spec.compute_dtype, queue_depth=spec.queue_depth,
                              max_tokens_limit=spec.max_tokens_limit, kind=spec.kind)
        log_path = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{worker_id}.log"
        try:
            process = await self._process_for(config, log_path)
        except RbeeError as exc:  # no process at all: subscribers learn it from the job too
            job.fail(exc)
            raise
        now = time.time()
        info = WorkerInfo(id=worker_id, model_ref=spec.model_ref, state="loading", devices=config.devices,
                          memory_mb={}, pid=process.pid, quantization=spec.quantization, dtype=spec.dtype,
                          owner=spec.owner, created_at=now, last_used=now, kind=spec.kind)
        w = _Worker(info, spec, process, job)
        self._workers[worker_id] = w
        job.meta.setdefault("worker_id", worker_id)
        relay = self._spawn(w, self._run_load(w))
        if job.task is None:  # so job.cancel() waits for the work to really end (see Job.cancel)
            job.task = relay
        job.on_cancel(lambda: self._spawn(w, self._cancel_load(w)))
        job.on_finish(lambda _: self._start_spare())  # ready or failed: the machine is free for imports again
        if not process.spare:  # a spare's exit is watched once it announced (see _handshake)
            self._spawn(w, self._watch_exit(w))
        self._spawn(w, self._loading_watchdog(w))
        self._notify("loading", info)
        return _snapshot(info)

    async def _run_load(self, w: _Worker) -> None:
        """Handshake, then relay ``GET /load`` into the load job."""
        job = w.load_job
        try:
            port = await self._handshake(w)
        except WorkerDied:
            await self._relay_broke(w, job, None)
            return
        except RbeeError as exc:  # silent or garbled start: stop it, report why
            await self._load_failed(w, exc)
            return
        w.client = WorkerClient(port, w.process.secret)
        try:
            async for _, event in w.client.load_events():
                if job.state.finished:
                    return
                stage = event.get("stage")
                if stage == "loading_to_vram":
                    self._on_progress(w, event)
                elif stage == "ready":
                    self._on_ready(w, event)
                    return
                elif stage == "error":
                    await self._load_failed(w, error_from_json(event))
                    return
            raise httpx.RemoteProtocolError("the load stream ended without ready or error")
        except (httpx.HTTPError, RbeeError) as exc:
            await self._relay_broke(w, job, exc)

    async def _handshake(self, w: _Worker) -> int:
        """The worker's port; a handed-over spare that died before announcing it is replaced.

        A spare can die unnoticed just before it is handed a load (killed, OOM-killed): that
        must cost the load a fresh process, never an error. Its exit is only watched from its
        announcement on, so that such a death is not reported as the worker's.
        """
        process = w.process
        if not process.spare:
            return await process.handshake(self.startup_timeout_s)
        try:
            port = await process.handshake(self.startup_timeout_s)
        except WorkerDied:
            if w.expected_exit or w.load_job.state.finished:  # cancelled or timed out: those paths report
                raise
            log.warning("rbee: spare worker process %d died before it took worker %s (%s); starting a fresh one",
                        process.pid, w.info.id, describe_exit(process.returncode))
        else:
            self._spawn(w, self._watch_exit(w))
            return port
        process.close()
        assert process.config is not None
        fresh = await WorkerProcess.spawn(process.config, python=self.python, env=self.env,
                                          log_path=process.log_path)
        if w.expected_exit:  # cancelled or timed out while it started: stop it, the canceller reports
            await fresh.terminate(0.0)
            fresh.close()
            raise process.death_error("before it started")
        w.process, w.info.pid = fresh, fresh.pid
        self._spawn(w, self._watch_exit(w))
        return await fresh.handshake(self.startup_timeout_s)

    def _on_progress(self, w: _Worker, event: dict[str, Any]) -> None:
        info = w.info
        info.layers_loaded = int(event.get("layers_loaded", 0))
        info.layers_total = int(event.get("layers_total", 0))
        device = str(event.get("device", ""))
        vram_mb = int(event.get("vram_mb", 0))
        memory = event.get("memory_mb")
        info.memory_mb = dict(memory) if isinstance(memory, dict) else {**info.memory_mb, device: vram_mb}
        w.last_block = event.get("block")
        w.load_job.publish(LoadingProgress(layers_loaded=info.layers_loaded, layers_total=info.layers_total,
                                           vram_mb=vram_mb, device=device, block=w.last_block,
                                           memory_mb=dict(info.memory_mb), timestamp=event.get("timestamp")))
        self._notify("progress", info)

    def _on_ready(self, w: _Worker, event: dict[str, Any]) -> None:
        if w.load_job.cancel_event.is_set():  # cancelled at the last moment: the cancel path ends it
            return
        memory = event.get("memory_mb")
        if isinstance(memory, dict):
            w.info.memory_mb = dict(memory)
        w.info.state = "idle"
        w.load_job.finish(Ready(worker_id=w.info.id, memory_mb=dict(w.info.memory_mb)))
        self._notify("ready", w.info)
        self._touch(w)

    async def _load_failed(self, w: _Worker, error: RbeeError) -> None:
        """The worker reported a load error (or never started): stop it, then report.

        Reporting after the exit means that when a client reads ``OUT_OF_MEMORY`` or
        ``CANCELLED``, the memory is already free.
        """
        w.expected_exit = True
        await self._shutdown(w)
        if isinstance(error, Cancelled):
            self._forget(w, "stopped", "load cancelled")
        else:
            self._mark_failed(w, f"{error.code}: {error.message}", "failed")
        w.load_job.fail(error)

    async def _cancel_load(self, w: _Worker) -> None:
        """``job.cancel()`` while loading: ask the worker to stop between blocks; kill if it cannot."""
        job = w.load_job
        if job.state.finished:
            return
        if w.client is not None and w.process.alive:
            with contextlib.suppress(httpx.HTTPError, RbeeError, asyncio.TimeoutError):
                await asyncio.wait_for(w.client.cancel_load(), self.cancel_grace_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await job.wait(self.cancel_grace_s)  # the relay reports CANCELLED once the process is gone
            if job.state.finished:
                return
        # Not started yet (importing torch) or stuck inside one block: the process must go anyway.
        w.expected_exit = True
        await w.process.terminate(0.0)
        await self._release(w)
        self._forget(w, "stopped", "load cancelled")
        n, total = w.info.layers_loaded, w.info.layers_total
        job.fail(Cancelled(f"Loading was cancelled ({self._where(w)}); the worker was stopped.",
                           details={"worker_id": w.info.id, "layers_loaded": n, "layers_total": total}))

    async def _loading_watchdog(self, w: _Worker) -> None:
        """Fail the load with ``LOADING_TIMEOUT`` once it exceeds ``loading_timeout_s``."""
        job = w.load_job
        while not job.state.finished:
            timeout = self.loading_timeout_s
            if timeout is not None and time.monotonic() - w.load_started > timeout and not w.expected_exit:
                await self._loading_timed_out(w, timeout)
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await job.wait(0.1)

    async def _loading_timed_out(self, w: _Worker, timeout: float) -> None:
        where = self._where(w)
        w.expected_exit = True
        await w.process.terminate(0.0)  # a stuck load cannot be asked politely
        await self._release(w)
        self._mark_failed(w, f"loading timeout: {where}", "failed")
        w.load_job.fail(LoadingTimeout(
            f"Loading {w.info.model_ref} took longer than {timeout:g} s, {where}; the worker was stopped. "
            "Raise the loading timeout, or check the device and the model files.",
            details={"worker_id": w.info.id, "timeout_s": timeout, "block": w.last_block,
                     "layers_loaded": w.info.layers_loaded, "layers_total": w.info.layers_total}))

    @staticmethod
    def _where(w: _Worker) -> str:
        """Where a load stands, for messages: "stuck after block layers.2 (3/6)"."""
        n, total = w.info.layers_loaded, w.info.layers_total
        if w.last_block:
            return f"stuck after block {w.last_block} ({n}/{total})"
        if w.client is None:
            return "stuck while the worker process was starting"
        return f"stuck before the first block (0/{total or '?'})"

    # --- deaths ------------------------------------------------------------------------------

    async def _watch_exit(self, w: _Worker) -> None:
        await asyncio.shield(w.process.exited)
        self._on_exit(w)

    def _on_exit(self, w: _Worker) -> None:
        """The process is gone. Unless we stopped it, that is a death: fail all it fed, at once."""
        if w.exit_handled:
            return
        w.exit_handled = True
        self._spawn(w, self._release(w))
        if w.expected_exit:
            return
        stage = w.info.state
        error = w.process.death_error(f"while {stage}" if stage in ("loading", "idle", "busy") else "")
        self._mark_failed(w, describe_exit(w.process.returncode), "died")
        w.load_job.fail(error)
        for job in list(w.streams):
            job.fail(error)

    async def _relay_broke(self, w: _Worker, job: Job, exc: BaseException | None) -> None:
        """A relay lost its worker connection: a death if the process is gone, else a failure.

        Whatever happened, ``job`` is finished when this returns (a load job we are stopping
        ourselves is left to the code that stops it, which reports why).
        """
        if job.state.finished:
            return
        is_load = job is w.load_job
        if w.expected_exit:
            if not is_load:
                job.fail(Cancelled(f"Worker {w.info.id} was stopped.", details={"worker_id": w.info.id}))
            return
        if await w.process.wait_exit(self.death_grace_s):
            self._on_exit(w)
            if not job.state.finished:  # e.g. a request the worker had not accepted yet
                job.fail(w.process.death_error())
            return
        if job.state.finished or (w.expected_exit and is_load):
            return
        error = exc if isinstance(exc, RbeeError) else RbeeError(
            f"Lost the connection to worker {w.info.id} ({exc}); it was stopped.",
            code="WORKER_UNREACHABLE", status=502, details={"worker_id": w.info.id})
        if is_load:
            await self._load_failed(w, error)
        else:
            job.fail(Cancelled("The generation was cancelled.") if job.cancel_event.is_set() else error)

    # --- the spare worker -----------------------------------------------------------------------

    def warm_up(self) -> None:
        """Start the spare now, if ``spare_worker`` is on: the server calls this once it runs.

        Why at server start and not at the first load: a spare started by a load would be
        that load's own process, so the first load, the one a user waits on right after
        opening a notebook, would pay the imports anyway, and the spare's imports would
        compete with it for the CPU. Started with the server, the imports run while the user
        opens a notebook or downloads a model. A process that never gets a load costs only
        its memory, which is why the server turns this off under JupyterHub.
        """
        self._start_spare()

    @property
    def spare(self) -> WorkerProcess | None:
        """The spare process waiting for a load (or still importing), if any; never a listed worker."""
        return self._spare

    async def wait_spare(self, timeout: float) -> WorkerProcess | None:
        """The spare once its imports are done (None: there is none, or it died); for benches and tests.

        Raises ``asyncio.TimeoutError`` if its imports take longer than ``timeout``.
        """
        if self._spare_starting is not None:
            await asyncio.shield(self._spare_starting)
        spare = self._spare
        if spare is None:
            return None
        await asyncio.wait_for(asyncio.wait([spare.warm, spare.exited], return_when=asyncio.FIRST_COMPLETED),
                               timeout)
        return spare if spare.warm.done() and spare.alive else None

    def _start_spare(self) -> None:
        """Start one spare, unless unwanted, present, closed, or a load is running.

        Not while a load runs: the spare's seconds of imports would take CPU and disk from
        it. The load's end (ready or failed) calls this again.
        """
        if not self.spare_worker or self._closed or self._spare is not None or self._spare_starting is not None:
            return
        if any(not w.load_job.state.finished for w in self._workers.values()):
            return
        self._spare_starting = asyncio.get_running_loop().create_task(self._spawn_spare(), name="rbee-spare-start")

    async def _spawn_spare(self) -> None:
        try:
            process = await WorkerProcess.spawn(spare=True, python=self.python, env=self.env)
        except RbeeError as exc:  # the next load starts its own process, and reports this error if it recurs
            log.warning("rbee: no spare worker: %s", exc.message)
            return
        finally:
            self._spare_starting = None
        if self._closed:  # closed while it started
            await process.terminate(0.0)
            process.close()
            return
        self._spare = process
        process.exited.add_done_callback(lambda _: self._spare_exited(process))

    def _spare_exited(self, process: WorkerProcess) -> None:
        """A spare died while waiting (killed, crashed): drop it; the next load starts a fresh process.

        It is not replaced at once: a spare that cannot start (a broken environment) would
        otherwise be restarted in a loop. The next load's end starts a new one.
        """
        if self._spare is not process:  # handed over meanwhile: the worker's own watch takes it from here
            return
        self._spare = None
        process.close()
        tail = "; ".join(list(process.stderr_tail)[-3:])
        log.warning("rbee: spare worker process %d exited (%s)%s", process.pid, describe_exit(process.returncode),
                    f": {tail}" if tail else "")

    async def _process_for(self, config: WorkerConfig, log_path: Path | None) -> WorkerProcess:
        """The spare, handed this load's spec, if one is alive; else a fresh process."""
        if self._spare_starting is not None:  # one is being started this very moment
            await asyncio.shield(self._spare_starting)
        spare, self._spare = self._spare, None
        if spare is not None and spare.alive:
            await spare.assign(config, log_path=log_path)
            return spare
        if spare is not None:
            spare.close()
        return await WorkerProcess.spawn(config, python=self.python, env=self.env, log_path=log_path)

    async def _stop_spare(self) -> None:
        """End the spare (SIGTERM: it may be in the middle of its imports) and wait until it is gone."""
        if self._spare_starting is not None:
            await asyncio.shield(self._spare_starting)  # it sees _closed and ends what it started
        spare, self._spare = self._spare, None
        if spare is not None:
            await spare.terminate(grace_s=2.0)
            spare.close()

    # --- generation ----------------------------------------------------------------------------

    def _ready(self, worker_id: str) -> _Worker:
        """A worker that takes requests now; otherwise why not (loading, failed, stopped)."""
        w = self._get(worker_id)
        state = w.info.state
        if state == "loading":
            raise ModelNotLoaded(f"Worker {worker_id} is still loading ({w.info.layers_loaded}/"
                                 f"{w.info.layers_total} blocks); wait until it is ready.",
                                 details={"worker_id": worker_id, "state": state})
        if state not in ("idle", "busy") or w.client is None:
            raise Conflict(f"Worker {worker_id} is {state}"
                           f"{f' ({w.info.exit_reason})' if w.info.exit_reason else ''}; load the model again.",
                           details={"worker_id": worker_id, "state": state})
        return w

    async def generate(self, worker_id: str, body: dict[str, Any], job: Job) -> None:
        w = self._ready(worker_id)
        self._cancel_idle_timer(w)
        job.on_cancel(lambda: self._spawn(w, self._cancel_generation(w, job)))
        try:
            async with w.client.generate({**body, "request_id": job.id}) as stream:
                w.streams[job] = stream  # accepted: from here a death must reach this job
                self._update_busy(w)
                events = stream.__aiter__()
                while True:
                    limit = self.inference_stall_s if job.records else None  # from "started" on
                    try:
                        _, event = await asyncio.wait_for(events.__anext__(), limit)
                    except StopAsyncIteration:
                        break
                    except asyncio.TimeoutError:
                        await self._stalled(w, job, limit)
                        break
                    if job.state.finished or relay_inference(job, event):
                        break
            if not job.state.finished:
                raise httpx.RemoteProtocolError("the generation stream ended without end or error")
        except httpx.HTTPError as exc:
            await self._relay_broke(w, job, exc)
        finally:
            w.streams.pop(job, None)
            if w.info.state in ("idle", "busy"):
                self._update_busy(w)
                self._touch(w)

    async def embed(self, worker_id: str, body: dict[str, Any]) -> dict[str, Any]:
        w = self._ready(worker_id)
        self._cancel_idle_timer(w)
        try:
            return await w.client.embed(body)  # type: ignore[union-attr] - _ready checked it
        except httpx.TransportError:
            if await w.process.wait_exit(self.death_grace_s):
                raise WorkerDied(f"Worker {worker_id} died while embeddings were computed "
                                 f"({describe_exit(w.process.returncode)}).", details={"worker_id": worker_id}) from None
            raise
        finally:
            if w.info.state in ("idle", "busy"):
                self._touch(w)

    async def _stalled(self, w: _Worker, job: Job, limit: float | None) -> None:
        """Nothing came for ``limit`` seconds: stop the generation and say so."""
        if w.client is not None and w.process.alive:
            with contextlib.suppress(httpx.HTTPError, RbeeError, asyncio.TimeoutError):
                await asyncio.wait_for(w.client.cancel_generation(job.id), self.cancel_grace_s)
        job.fail(InferenceStalled(
            f"Worker {w.info.id} produced nothing for {limit:g} s after {len(job.records) - 1} tokens; the "
            "generation was stopped. The device may be overloaded; raise c.RbeeApp.inference_stall_s if "
            "single tokens legitimately take this long.",
            details={"worker_id": w.info.id, "stall_s": limit}))

    async def _cancel_generation(self, w: _Worker, job: Job) -> None:
        """``job.cancel()`` (e.g. the client went away): stop the worker's generation now."""
        if w.client is not None and w.process.alive:
            with contextlib.suppress(httpx.HTTPError, RbeeError, asyncio.TimeoutError):
                await asyncio.wait_for(w.client.cancel_generation(job.id), self.cancel_grace_s)
        with contextlib.suppress(asyncio.TimeoutError):
            await job.wait(self.cancel_grace_s)  # the worker's stream ends with CANCELLED
        if not job.state.finished:
            stream = w.streams.get(job)
            if stream is not None:
                await stream.aclose()  # dropping the connection cancels on the worker too
            job.fail(Cancelled("The generation was cancelled.", details={"request_id": job.id}))

    def _update_busy(self, w: _Worker) -> None:
        state = "busy" if w.streams else "idle"
        if w.info.state != state:
            w.info.state = state
            self._notify(state, w.info)

    async def health(self, worker_id: str) -> dict[str, Any]:
        """``GET /health`` of the worker: state, memory, ``tokens_computed``, queue, request ids."""
        w = self._get(worker_id)
        if w.client is None or not w.process.alive:
            return {**w.info.to_dict(), "reachable": False}
        try:
            return {**await w.client.health(), "reachable": True}
        except httpx.TransportError:  # it died a moment ago; the watcher is about to say so
            return {**w.info.to_dict(), "reachable": False}

    # --- keep-alive ------------------------------------------------------------------------------

    def _touch(self, w: _Worker) -> None:
        """Mark use; an idle worker is unloaded ``keep_alive_s`` after its last use."""
        w.info.last_used = time.time()
        self._cancel_idle_timer(w)
        if self.keep_alive_s is not None and w.info.state == "idle" and not w.streams:
            w.idle_timer = asyncio.get_running_loop().call_later(self.keep_alive_s, self._idle_expired, w)

    def _idle_expired(self, w: _Worker) -> None:
        w.idle_timer = None
        if self._workers.get(w.info.id) is w and w.info.state == "idle" and not w.streams:
            self._spawn(w, self._stop(w, f"idle for {self.keep_alive_s:g} s (keep_alive)"))

    @staticmethod
    def _cancel_idle_timer(w: _Worker) -> None:
        if w.idle_timer is not None:
            w.idle_timer.cancel()
            w.idle_timer = None

    # --- stopping --------------------------------------------------------------------------------

    async def stop(self, worker_id: str) -> None:
        await self._stop(self._get(worker_id), "unloaded")

    async def _stop(self, w: _Worker, reason: str) -> None:
        if w.stop_task is None:  # concurrent stops share one
            w.stop_task = asyncio.ensure_future(self._do_stop(w, reason))
        await asyncio.shield(w.stop_task)

    async def _do_stop(self, w: _Worker, reason: str) -> None:
        job = w.load_job
        if not job.state.finished:
            job.cancel(f"Worker {w.info.id} was unloaded while loading.")
            with contextlib.suppress(asyncio.TimeoutError):
                await job.wait(2 * self.cancel_grace_s + 1)
        w.expected_exit = True
        if w.info.state in ("idle", "busy"):
            w.info.state = "draining"
            self._notify("draining", w.info)
        for stream_job in list(w.streams):
            stream_job.fail(Cancelled(f"Worker {w.info.id} was unloaded ({reason}).",
                                      details={"worker_id": w.info.id}))
        await self._shutdown(w)
        self._forget(w, "stopped", reason)

    async def _shutdown(self, w: _Worker) -> None:
        """Ask the process to exit, kill it if it does not within ``stop_grace_s``; wait until gone."""
        w.expected_exit = True
        if w.process.alive and w.client is not None:
            with contextlib.suppress(httpx.HTTPError, RbeeError, asyncio.TimeoutError):
                await asyncio.wait_for(w.client.shutdown(), 2.0)
            await w.process.wait_exit(self.stop_grace_s)
        await w.process.terminate(grace_s=2.0)
        await self._release(w)

    @staticmethod
    async def _release(w: _Worker) -> None:
        """Close the HTTP client and pipes once the process is gone."""
        client, w.client = w.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
        if not w.process.alive:
            w.process.close()

    async def close(self) -> None:
        self._closed = True
        await self._stop_spare()
        workers = list(self._workers.values())
        if workers:
            stops = [asyncio.ensure_future(self._stop(w, "server shutting down")) for w in workers]
            await asyncio.wait(stops, timeout=self.stop_grace_s + 2 * self.cancel_grace_s + 5)
        for w in workers:  # whatever did not stop in time
            w.expected_exit = True
            w.process.kill()
        for w in workers:
            await w.process.wait_exit(5.0)
            await self._release(w)
            self._forget(w, "stopped", "server shutting down")
            for task in list(w.tasks):
                task.cancel()
