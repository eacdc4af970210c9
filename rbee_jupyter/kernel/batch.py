"""Many prompts from a notebook: run them concurrently so the worker batches them.

``Client.generate_batch`` and ``%rbee batch`` both come here. The hive does the batching
(``worker/batcher.py``); this side only keeps enough requests in flight to fill the
workers' batches, collects each answer into its input position, and never lets one bad
item sink the others. An interrupt (the kernel's stop button) cancels what has not finished
and keeps what has.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from .. import errors as _errors
from ..errors import InvalidRequest, RbeeError, WorkerBusy

__all__ = ["BatchItem", "BatchResult", "run_batch", "batch_concurrency"]

#: Concurrency when the workers' capacity cannot be read (e.g. an engine): one worker's CPU default.
DEFAULT_CONCURRENCY = 8
#: A WORKER_BUSY answer (other users fill the queue) is retried with this backoff, this often.
BUSY_RETRY_S, BUSY_RETRIES = 0.5, 40


@dataclass
class BatchItem:
    """One input's outcome: ``text``, ``stop_reason`` and ``stats`` (the ``end`` event), or ``error``."""

    index: int
    input: Any
    text: str = ""
    stop_reason: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    error: RbeeError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.stop_reason is not None


class BatchResult(list):
    """``BatchItem`` per input, in input order; ``texts`` is the answers (``None`` where an item failed)."""

    interrupted: bool = False

    @property
    def texts(self) -> list[str | None]:
        return [item.text if item.ok else None for item in self]

    @property
    def errors(self) -> dict[int, RbeeError]:
        return {item.index: item.error for item in self if item.error is not None}

    def __repr__(self) -> str:
        failed = len(self.errors)
        return (f"<BatchResult {len(self)} items, {len(self) - failed} ok, {failed} failed"
                f"{', interrupted' if self.interrupted else ''}>")


def batch_concurrency(workers: Sequence[Mapping[str, Any]], model: Any) -> int:
    """Requests to keep in flight: the sum of ``max_batch_size`` over the ready workers that
    would serve ``model`` (its id or ref; None: all), so every batch fills and nobody queues."""
    name = getattr(model, "id", model)
    def serves(w: Mapping[str, Any]) -> bool:
        ref = str(w.get("model_ref", ""))
        return name is None or name in (w.get("id"), ref, ref.removeprefix("hf:"))

    ready = [w for w in workers if w.get("state") in ("idle", "busy") and serves(w)]
    sizes = [w.get("max_batch_size") for w in ready]
    total = sum(s for s in sizes if isinstance(s, int) and s > 0)
    return total or DEFAULT_CONCURRENCY


def _body(item: Any) -> dict[str, Any]:
    """A prompt (str) or a chat (list of {"role", "content"}) → the request's text part."""
    if isinstance(item, str):
        return {"prompt": item}
    if isinstance(item, Sequence) and item and all(isinstance(m, Mapping) for m in item):
        return {"messages": [dict(m) for m in item]}
    raise InvalidRequest(f"a batch item must be a prompt (str) or a list of chat messages, got {type(item).__name__}",
                         details={"field": "prompt"})


class _Run:
    """One batch in flight: its threads' shared state and the cancel switch."""

    def __init__(self, start: Callable[[dict[str, Any]], Any], items: Sequence[Any], options: dict[str, Any],
                 on_done: Callable[[BatchItem], None]) -> None:
        self.start, self.options, self.on_done = start, options, on_done
        self.result = BatchResult(BatchItem(i, item) for i, item in enumerate(items))
        self.stopping = threading.Event()
        self._live: dict[int, Any] = {}
        self._lock = threading.Lock()

    def run_one(self, index: int) -> None:
        item = self.result[index]
        try:
            generation = self._start(item)
            if generation is not None:
                try:
                    generation.wait()
                finally:
                    with self._lock:
                        self._live.pop(index, None)
                item.text, item.stats = generation.text, dict(generation.end or {})
                item.stop_reason = item.stats.get("stop_reason")
        except RbeeError as exc:
            item.error = exc
        except Exception as exc:  # noqa: BLE001 - one item's failure is that item's result
            item.error = RbeeError(f"{type(exc).__name__}: {exc}")
        self.on_done(item)

    def _start(self, item: BatchItem) -> Any:
        body = {**self.options, **_body(item.input)}
        for attempt in range(BUSY_RETRIES + 1):
            if self.stopping.is_set():
                raise _errors.Cancelled("The batch was interrupted before this item started.",
                                        details={"index": item.index})
            try:
                generation = self.start(body)
            except WorkerBusy:
                if attempt == BUSY_RETRIES:
                    raise
                self.stopping.wait(BUSY_RETRY_S * min(2 ** attempt, 8))
                continue
            with self._lock:
                self._live[item.index] = generation
            if self.stopping.is_set():  # interrupted while it was being accepted
                generation.cancel()
            return generation
        return None

    def cancel_all(self) -> None:
        self.stopping.set()
        with self._lock:
            live = list(self._live.values())
        for generation in live:
            with contextlib.suppress(RbeeError):
                generation.cancel()


def run_batch(start: Callable[[dict[str, Any]], Any], items: Sequence[Any], *, options: dict[str, Any],
              concurrency: int, view: Any = None) -> BatchResult:
    """Run every item through ``start(body) -> Generation`` with ``concurrency`` in flight.

    Returns the items in input order; on KeyboardInterrupt, cancels the unfinished ones (their
    ``error`` is ``Cancelled``), keeps the finished ones, and returns with ``interrupted`` set.
    """
    def done(item: BatchItem) -> None:
        if view is not None:
            view.item_done(int(item.stats.get("total_tokens") or 0), failed=item.error is not None)

    run = _Run(start, items, options, done)
    if view is not None:
        view.show()
    pool = ThreadPoolExecutor(max(1, min(concurrency, len(items) or 1)), thread_name_prefix="rbee-batch")
    futures: set[Future] = {pool.submit(run.run_one, i) for i in range(len(items))}
    try:
        while futures:
            _, futures = wait(futures, return_when=FIRST_COMPLETED)
    except KeyboardInterrupt:
        run.result.interrupted = True
        run.cancel_all()
        deadline = time.monotonic() + 30
        while futures and time.monotonic() < deadline:  # the cancelled ones end within a step or two
            with contextlib.suppress(KeyboardInterrupt):
                _, futures = wait(futures, timeout=max(0.0, deadline - time.monotonic()))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if view is not None:
            view.close(interrupted=run.result.interrupted)
    for item in run.result:
        if item.error is None and item.stop_reason is None:
            item.error = _errors.Cancelled("The batch was interrupted before this item finished.",
                                           details={"index": item.index})
    return run.result
