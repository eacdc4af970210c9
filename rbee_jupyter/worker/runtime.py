"""The worker's core: its state, the loading thread and the batched generation thread.

Nothing here knows about HTTP; ``app.py`` maps routes onto these methods. All state
changes happen on the worker's asyncio loop; the two threads (the loading thread, then
the generation thread of ``batcher.py`` that decodes every running request together)
only report back through ``call_soon_threadsafe`` / ``Job.publish_threadsafe``, which
keeps events in order.

Why threads: torch releases the GIL in its kernels, so the loop keeps answering
``/health``, cancels and new requests while a block loads or a token is computed.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import Cancelled, Conflict, InvalidRequest, ModelNotLoaded, OutOfMemory, RbeeError, WorkerBusy
from ..events import InferenceEnd, InferenceStarted, Heartbeat, LoadingProgress, Ready, Token
from ..core.jobs import Job
from ..protocol import GenerationRequest, WorkerState
from .protocol import BLOCK_DELAY_ENV, TOKEN_DELAY_ENV, MiB, WorkerConfig, mb

__all__ = ["WorkerRuntime", "WorkerState", "GenerationTask"]


@dataclass
class GenerationTask:
    """One accepted request: its event log (``job``) and its place in the batch (``seq``)."""

    request_id: str
    request: GenerationRequest
    job: Job
    seq: Any = None  # batch.BatchSequence, whose cancel flag the generation thread polls


class WorkerRuntime:
    """A single model in a single process: load it once, then serve generations in batches.

    ``block_delay_s`` / ``token_delay_s`` are test hooks (env ``RBEE_WORKER_BLOCK_DELAY_S``,
    ``RBEE_WORKER_TOKEN_DELAY_S``): a pause after each block / decode step that a cancel cuts short,
    so tests can act "between layers" or "mid-generation" deterministically.
    """

    def __init__(self, config: WorkerConfig, *, block_delay_s: float = 0.0, token_delay_s: float = 0.0) -> None:
        self.config = config
        self.block_delay_s = block_delay_s
        self.token_delay_s = token_delay_s
        self.loop = asyncio.get_running_loop()
        self.state = WorkerState.LOADING
        self.load_job = Job("load", job_id=config.worker_id)
        self.load_cancel = threading.Event()
        self.layers_loaded = 0
        self.layers_total = 0
        self.last_block: str | None = None
        self.memory_bytes: dict[str, int] = {}
        self.failure: RbeeError | None = None
        self.started_at = time.time()
        self.load_timeline = LoadTimeline()
        self.exit_requested = asyncio.Event()
        self.exit_reason: str | None = None
        self.spare: dict[str, Any] | None = None  # what this process did as a spare (server.wait_as_spare), if one
        self._generator: Any = None  # generate.Generator, set once loaded
        self._validator: Any = None  # a Generator on its own tokenizer (fast tokenizers are not thread-safe)
        self._runner: Any = None  # batcher.BatchRunner, set once loaded
        self._tasks: dict[str, GenerationTask] = {}

    @classmethod
    def from_env(cls, config: WorkerConfig) -> WorkerRuntime:
        """A runtime with the test delays of this process's environment (a worker process or a Ray actor)."""
        return cls(config, block_delay_s=_seconds_env(BLOCK_DELAY_ENV), token_delay_s=_seconds_env(TOKEN_DELAY_ENV))

    # --- loading -------------------------------------------------------------------------

    def start_loading(self) -> None:
        threading.Thread(target=self._load_unmoved, name="rbee-load", daemon=True).start()

    def _load_unmoved(self) -> None:
        """Loading thread: :meth:`_load`, once a path the hive pinned is known to lead where it did."""
        from ..core.confine import check_unmoved

        try:
            if self.config.pinned:
                check_unmoved(self.config.model_path)
        except BaseException as exc:  # noqa: BLE001 - every failure must become an error event
            self._load_crashed(exc)
            return
        self._load()

    def _load(self) -> None:
        """Loading thread: heavy imports, the layer-by-layer load, the tokenizer."""
        timeline = self.load_timeline
        try:
            from ..engine.generate import Generator
            from ..engine.loader import load_model, load_tokenizer

            timeline.mark("imports")
            c = self.config
            _create_cuda_contexts(c.devices)
            timeline.mark("cuda_init")
            model = load_model(c.model_path, quantization=c.quantization, dtype=c.dtype,
                               double_quant=c.double_quant, compute_dtype=c.compute_dtype,
                               device_map=c.device_map, on_progress=self._on_progress, cancel=self.load_cancel,
                               confined=c.confined)
            generator = Generator(model, load_tokenizer(c.model_path, confined=c.confined))
            validator = Generator(model, load_tokenizer(c.model_path, confined=c.confined))
            timeline.mark("finish")
        except BaseException as exc:  # noqa: BLE001 - every failure must become an error event
            self._load_crashed(exc)
        else:
            print(f"rbee worker {self.config.worker_id}: {timeline.describe()}", file=sys.stderr, flush=True)
            self.loop.call_soon_threadsafe(self._loaded, generator, validator)

    def _load_crashed(self, exc: BaseException) -> None:
        """Loading thread: a failure becomes the load stream's error event (with a traceback when unexpected)."""
        if not isinstance(exc, RbeeError):
            traceback.print_exc(file=sys.stderr)
        self.loop.call_soon_threadsafe(self._load_failed, _as_rbee_error(exc))

    def _on_progress(self, progress: Any) -> None:
        """Loader callback (loading thread): publish, then honour the test delay."""
        self.load_timeline.mark("first_block" if progress.layers_loaded == 1 else "blocks")
        self.loop.call_soon_threadsafe(self._progress, progress)
        if self.block_delay_s and progress.layers_loaded < progress.layers_total:
            self.load_cancel.wait(self.block_delay_s)

    def _progress(self, p: Any) -> None:
        self.layers_loaded, self.layers_total, self.last_block = p.layers_loaded, p.layers_total, p.block
        self.memory_bytes = dict(p.bytes_on_device)
        self.load_job.publish(LoadingProgress(
            layers_loaded=p.layers_loaded, layers_total=p.layers_total,
            vram_mb=mb(p.bytes_on_device.get(p.device, 0)), device=p.device, block=p.block,
            memory_mb=self.memory_mb, timestamp=int(time.time() * 1000)))

    def _loaded(self, generator: Any, validator: Any) -> None:
        if self.state is not WorkerState.LOADING:  # shut down meanwhile
            return
        from .batcher import BatchRunner

        self._generator, self._validator = generator, validator
        self._runner = BatchRunner(generator, batch_limits(self.config, generator.model),
                                   on_chunk=self._on_chunk, on_done=self._on_done, on_heartbeat=self._on_heartbeat,
                                   step_delay_s=self.token_delay_s)
        self.state = WorkerState.IDLE
        self.load_job.finish(Ready(worker_id=self.config.worker_id, memory_mb=self.memory_mb))

    def _load_failed(self, error: RbeeError) -> None:
        self.failure = error
        if self.state is not WorkerState.DRAINING:
            self.state = WorkerState.FAILED
        self.load_job.fail(error)

    def cancel_load(self) -> bool:
        """Stop loading at the next block boundary; the load stream ends with ``CANCELLED``."""
        if self.state is not WorkerState.LOADING:
            return False
        self.load_cancel.set()
        return True

    @property
    def memory_mb(self) -> dict[str, int]:
        return {device: mb(n) for device, n in self.memory_bytes.items()}

    # --- generation ----------------------------------------------------------------------

    def submit(self, body: Any) -> GenerationTask:
        """Validate and queue a request; raises (→ a JSON error answer) before any event.

        ``body["request_id"]`` (optional) names the request so the pool can cancel it by
        the id its own clients know.
        """
        if self.state is WorkerState.LOADING:
            raise ModelNotLoaded("The model is still loading; wait for the load stream's 'ready' event.",
                                 details={"state": self.state.value})
        if self.state in (WorkerState.FAILED, WorkerState.DRAINING) or self._generator is None:
            raise Conflict(f"This worker is {self.state.value} and takes no requests.",
                           details={"state": self.state.value})
        request = GenerationRequest.from_json(body, max_tokens_limit=self.config.max_tokens_limit)
        prompt_ids = self._validator.encode(request)  # CONTEXT_TOO_LONG etc. as a 400, not as a late error event
        request_id = body.get("request_id") or uuid.uuid4().hex[:12]
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 128:
            raise InvalidRequest("'request_id' must be a non-empty string of at most 128 characters.",
                                 details={"field": "request_id"})
        if request_id in self._tasks:
            raise Conflict(f"A request with id {request_id!r} is already running or queued.",
                           details={"request_id": request_id})
        from ..engine.batch import BatchSequence
        from ..engine.scheduler import QueueFull

        task = GenerationTask(request_id, request, Job("inference", job_id=request_id, error_style="type"))
        task.seq = BatchSequence(request_id, request, prompt_ids)
        self._tasks[request_id] = task  # before the generation thread can see it: its first chunk needs it
        try:
            self._runner.submit(task.seq)
        except QueueFull:
            del self._tasks[request_id]
            stats = self._runner.stats()
            queued, depth = len(stats["queued"]), self.config.queue_depth
            raise WorkerBusy(f"The worker is busy: {len(stats['active'])} requests running (max_batch_size "
                             f"{stats['max_batch_size']}) and {queued} queued (queue_depth {depth}). Retry "
                             "later or load a second worker.",
                             details={"queue_length": queued, "queue_depth": depth}) from None
        task.job.publish(InferenceStarted(job_id=request_id))  # chunks come through the loop: after this
        self.state = WorkerState.BUSY
        return task

    def _on_chunk(self, seq: Any, chunk: Any) -> None:
        """Generation thread: a piece of one request's text."""
        task = self._tasks.get(seq.id)
        if task is not None:
            task.job.publish_threadsafe(Token(t=chunk.text, i=chunk.index))

    def _on_heartbeat(self, seq: Any, queued: int) -> None:
        """Generation thread: ``seq`` is alive but silent (in line, or no text yet); tell the pool's watchdog."""
        task = self._tasks.get(seq.id)
        if task is not None:
            task.job.publish_threadsafe(Heartbeat(queued=queued))

    def _on_done(self, seq: Any, outcome: Any) -> None:
        """Generation thread: one request left the batch (stats, or the error that ended it)."""
        if isinstance(outcome, BaseException):
            outcome = _as_rbee_error(outcome)
        self.loop.call_soon_threadsafe(self._generation_done, seq.id, outcome)

    def _generation_done(self, request_id: str, outcome: Any) -> None:
        task = self._tasks.pop(request_id, None)
        if task is not None:
            _end(task, outcome)
        if not self._tasks and self.state is WorkerState.BUSY:
            self.state = WorkerState.IDLE

    def cancel(self, request_id: str) -> bool:
        """Cancel a running or queued request; unknown or finished ids are fine (idempotent DELETE).

        A running one leaves the batch before the next forward step (the generation thread
        checks the flag before each step); a queued one is dropped at once.
        """
        task = self._tasks.get(request_id)
        if task is None:
            return False
        if self._runner.cancel(request_id) == "waiting":
            self._generation_done(request_id, Cancelled("The request was cancelled while queued.",
                                                        details={"request_id": request_id}))
        return True

    # --- lifecycle -------------------------------------------------------------------------

    def request_exit(self, reason: str) -> None:
        """Stop everything and let the process exit (memory is freed with the process)."""
        if self.exit_requested.is_set():
            return
        self.exit_reason = reason
        self.state = WorkerState.DRAINING
        self.load_cancel.set()
        for request_id in list(self._tasks):
            self.cancel(request_id)
        if self._runner is not None:
            self._runner.close()
        self.exit_requested.set()

    def health(self) -> dict[str, Any]:
        tokens = self._generator.tokens_computed if self._generator is not None else 0
        batch = self._runner.stats() if self._runner is not None else {"active": [], "queued": []}
        return {**self._batch_health(batch),
            "worker_id": self.config.worker_id, "pid": os.getpid(), "state": self.state.value,
            "model_path": self.config.model_path, "devices": self.config.devices,
            "memory_mb": self.memory_mb, "rss_mb": _rss_mb(),
            "layers_loaded": self.layers_loaded, "layers_total": self.layers_total,
            "tokens_computed": tokens, "queue_depth": self.config.queue_depth,
            "requests": list(self._tasks),
            "error": self.failure.to_dict()["error"] if self.failure is not None else None,
            "uptime_s": round(time.time() - self.started_at, 3),
            "load_seconds": self.load_timeline.seconds(),
            "spare": self.spare,
        }


    @staticmethod
    def _batch_health(batch: dict[str, Any]) -> dict[str, Any]:
        """The batching half of ``/health``: what the hive routes by and the sidebar shows."""
        active, queued = batch.pop("active"), batch.pop("queued")
        return {**batch, "running": active[0] if active else None, "active": active,
                "active_sequences": len(active), "queue_length": len(queued)}


def _end(task: GenerationTask, outcome: Any) -> None:
    """The last event of a request's stream: its error, CANCELLED, or ``end`` with its stats."""
    job = task.job
    if isinstance(outcome, BaseException):
        job.fail(outcome)
    elif outcome is None or outcome.stop_reason == "cancelled":
        job.fail(Cancelled("The generation was cancelled.", details={"request_id": task.request_id}))
    else:
        job.finish(InferenceEnd(
            job_id=task.request_id, total_tokens=outcome.completion_tokens,
            duration_ms=int(round(outcome.duration_ms)), stop_reason=outcome.stop_reason,
            prompt_tokens=outcome.prompt_tokens,
            time_to_first_token_ms=None if outcome.time_to_first_token_ms is None
            else round(outcome.time_to_first_token_ms, 3),
            tokens_per_second=round(outcome.tokens_per_second, 3)))


#: Defaults of max_batch_size: a CPU gains little past 8 rows, a GPU keeps gaining to dozens.
CPU_BATCH, GPU_BATCH = 8, 32
#: Share of the memory left after loading that the KV cache may reserve when no budget is set
#: (the rest is for activations and the host), and the most a CPU worker takes by default.
KV_SHARE, CPU_KV_CAP_MB = 0.5, 4096


def batch_limits(config: WorkerConfig, model: Any) -> Any:
    """The scheduler's limits from the spec, filling in defaults that suit the device."""
    from ..engine.batch import kv_bytes_per_token
    from ..engine.scheduler import SchedulerLimits

    gpus = [d for d in config.devices if d.startswith("cuda")]
    size = config.max_batch_size or (GPU_BATCH if gpus else CPU_BATCH)
    budget_mb = config.kv_budget_mb if config.kv_budget_mb is not None else _default_kv_mb(gpus)
    tokens = int(budget_mb * MiB // kv_bytes_per_token(model)) if budget_mb else 0
    return SchedulerLimits(max_batch_size=size, kv_budget_tokens=tokens, queue_depth=config.queue_depth)


def _default_kv_mb(gpus: list[str]) -> float:
    if gpus:
        import torch

        return KV_SHARE * sum(torch.cuda.mem_get_info(torch.device(d))[0] for d in gpus) / MiB
    try:
        with open("/proc/meminfo") as fh:
            available = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:")) / 1024
    except (OSError, StopIteration, ValueError):
        return CPU_KV_CAP_MB
    return min(CPU_KV_CAP_MB, KV_SHARE * available)


class LoadTimeline:
    """Where a load's time went, phase by phase: a slow "ready" is otherwise a black box.

    A worker's first block can come tens of seconds after the request although the weights
    take a few (Python imports, the CUDA context): the phases say which, in the worker's log
    and in ``/health``. ``start`` is the process's own age when loading began (interpreter
    start, the server's imports), so the phases add up to the time since the process started;
    or, for a spare, the time since its spec arrived (``since``, ``time.monotonic``), since
    its imports were paid before anyone asked.
    """

    def __init__(self, since: float | None = None) -> None:
        self._last = time.monotonic()
        self._seconds: dict[str, float] = {}
        start = self._last - since if since is not None else _process_age_s()
        if start is not None:
            self._seconds["start"] = max(0.0, start)

    def mark(self, phase: str) -> None:
        """The phase that just ended (a repeated phase accumulates: ``blocks`` is marked per block)."""
        now = time.monotonic()
        self._seconds[phase] = self._seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def seconds(self) -> dict[str, float]:
        """The phases so far (``/health`` asks from the loop while the loading thread marks)."""
        return {phase: round(s, 3) for phase, s in list(self._seconds.items())}  # list(): one atomic copy

    def describe(self) -> str:
        seconds = self.seconds()
        parts = ", ".join(f"{phase.replace('_', ' ')} {s:.2f} s" for phase, s in seconds.items())
        return f"loaded in {sum(seconds.values()):.2f} s ({parts})"


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), or None."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _create_cuda_contexts(devices: list[str]) -> None:
    """Create the CUDA context of each GPU in the plan before the first block.

    The load would create it anyway; doing it here makes it its own phase of the timeline
    instead of hiding in the first block. ``mem_get_info`` needs a context but allocates no
    tensor, so the memory accounting of the blocks is unchanged.
    """
    cuda = [d for d in devices if d.startswith("cuda")]
    if not cuda:
        return
    import torch

    for device in cuda:
        try:
            torch.cuda.mem_get_info(torch.device(device))
        except (RuntimeError, AssertionError, ValueError):  # absent or broken: the loader says so, clearly
            return


def _seconds_env(name: str) -> float:
    try:
        return max(0.0, float(os.environ.get(name, "") or 0.0))
    except ValueError:
        return 0.0


def _as_rbee_error(exc: BaseException) -> RbeeError:
    if isinstance(exc, RbeeError):
        return exc
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return OutOfMemory(f"Out of memory: {exc}")
    return RbeeError(f"{type(exc).__name__}: {exc}")


def _rss_mb() -> int | None:
    """Resident memory of this process (Linux), for /health; None where /proc is missing."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return mb(pages * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return None
