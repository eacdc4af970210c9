"""The worker's generation thread: admit, prefill, step, report — many requests, one model.

:class:`~rbee_jupyter.engine.scheduler.Scheduler` decides who runs, and
:class:`~rbee_jupyter.engine.batch.BatchDecoder` does the forward steps; this module is
the one thread that drives both, and the lock that lets the worker's event loop submit
and cancel while a step runs. Callbacks (``on_chunk``, ``on_done``) are called from the
generation thread; the runtime hands them to its loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from ..engine.batch import BatchDecoder, BatchSequence
from ..engine.generate import GenerationStats, Generator, TokenChunk
from ..engine.scheduler import Scheduler, SchedulerLimits, SequenceSpec

__all__ = ["BatchRunner"]

#: Seconds of recent steps that the aggregate tokens-per-second figure covers.
RATE_WINDOW_S = 5.0
#: Seconds a request may go without an event before the generation thread sends it a heartbeat
#: (see events.Heartbeat): queued requests, and rows whose tokens make no text yet.
HEARTBEAT_S = 0.5


class BatchRunner:
    """Runs every accepted request of one worker through one batched decode loop.

    ``step_delay_s`` is the test hook behind ``RBEE_WORKER_TOKEN_DELAY_S``: a pause after
    each step that a cancel cuts short, so tests can act mid-generation.
    """

    def __init__(self, generator: Generator, limits: SchedulerLimits, *,
                 on_chunk: Callable[[BatchSequence, TokenChunk], None],
                 on_done: Callable[[BatchSequence, GenerationStats | BaseException], None],
                 on_heartbeat: Callable[[BatchSequence, int], None] | None = None,
                 step_delay_s: float = 0.0) -> None:
        self._on_chunk, self._on_done, self._on_heartbeat = on_chunk, on_done, on_heartbeat
        self._last_sent: dict[str, float] = {}  # seq id -> when it last got an event (generation thread)
        self._decoder = BatchDecoder(generator, on_chunk=self._chunk, on_done=self._finished)
        if not self._decoder.batching:
            limits = SchedulerLimits(max_batch_size=1, kv_budget_tokens=limits.kv_budget_tokens,
                                     queue_depth=limits.queue_depth)
        self.scheduler = Scheduler(limits)
        self.step_delay_s = step_delay_s
        self._lock = threading.Condition()
        self._seqs: dict[str, BatchSequence] = {}
        self._admitted: deque[BatchSequence] = deque()  # admitted, not yet prefilled
        self._kick = threading.Event()  # cuts the step delay short
        self._closed = False
        self._batch_size = 0
        self._recent: deque[tuple[float, int]] = deque()  # (when, tokens) of recent steps
        self._thread = threading.Thread(target=self._loop, name="rbee-batch", daemon=True)
        self._thread.start()

    # --- the event loop's side ---------------------------------------------------------------

    def submit(self, seq: BatchSequence) -> None:
        """Accept ``seq``: it runs at the next step, or waits for room.

        Raises:
            QueueFull: no room in the batch and ``queue_depth`` requests already wait.
        """
        spec = SequenceSpec(seq.id, len(seq.prompt_ids), seq.request.max_tokens)
        with self._lock:
            admitted = self.scheduler.add(spec)  # raises QueueFull before anything is recorded
            self._seqs[seq.id] = seq
            self._hand_over(admitted)

    def cancel(self, seq_id: str) -> str | None:
        """Flag ``seq_id`` to stop; returns "waiting" when it was only queued (it is dropped now,
        and no callback follows), "running" when it stops before the next step, None if unknown."""
        with self._lock:
            seq = self._seqs.get(seq_id)
            if seq is None:
                return None
            seq.cancel.set()
            if seq_id in self.scheduler.waiting:
                self.scheduler.remove(seq_id)
                del self._seqs[seq_id]
                self._hand_over(self.scheduler.admit())
                return "waiting"
        self._kick.set()
        return "running"

    def close(self) -> None:
        """Cancel everything and end the thread after the step under way."""
        with self._lock:
            self._closed = True
            for seq in self._seqs.values():
                seq.cancel.set()
            self._lock.notify()
        self._kick.set()

    def stats(self) -> dict[str, Any]:
        """What ``/health`` reports about batching (a snapshot; any thread)."""
        with self._lock:
            now = time.monotonic()
            recent = [(t, n) for t, n in self._recent if now - t <= RATE_WINDOW_S]
            limits = self.scheduler.limits
            return {
                "active": self.scheduler.running, "queued": self.scheduler.waiting,
                "batch_size": self._batch_size, "max_batch_size": limits.max_batch_size,
                "kv_budget_tokens": limits.kv_budget_tokens, "kv_reserved_tokens": self.scheduler.kv_reserved(),
                "tokens_per_second": round(sum(n for _, n in recent) / RATE_WINDOW_S, 3),
            }

    # --- the generation thread -------------------------------------------------------------

    def _hand_over(self, admitted: list[str]) -> None:
        """(Lock held.) Queue for prefill what the scheduler admitted; wake the thread."""
        self._admitted.extend(self._seqs[seq_id] for seq_id in admitted)
        if admitted:
            self._lock.notify()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._admitted and not self._decoder.rows:
                    self._lock.wait()
                newcomers = list(self._admitted)
                self._admitted.clear()
                closed = self._closed
            try:
                self._iterate(newcomers)  # after close() every flag is set: all leave, nothing is computed
            except BaseException as exc:  # noqa: BLE001 - every request in the batch gets the error
                traceback.print_exc(file=sys.stderr)
                self._fail_all(newcomers, exc)
            if closed:
                return
            self._heartbeat()
            if self.step_delay_s and self._decoder.rows:
                self._kick.wait(self.step_delay_s)
            self._kick.clear()

    def _iterate(self, newcomers: list[BatchSequence]) -> None:
        self._decoder.cancel_flagged()
        self._decoder.add_all(newcomers)
        self._count(len(newcomers))
        rows = len(self._decoder.rows)
        self._decoder.step()
        self._count(rows)
        with self._lock:
            self._batch_size = len(self._decoder.rows)

    def _chunk(self, seq: BatchSequence, chunk: TokenChunk) -> None:
        self._last_sent[seq.id] = time.monotonic()
        self._on_chunk(seq, chunk)

    def _heartbeat(self) -> None:
        """After a step (the batch moves): a sign of life to each request silent for HEARTBEAT_S."""
        if self._on_heartbeat is None:
            return
        now = time.monotonic()
        with self._lock:
            waiting = [self._seqs[i] for i in self.scheduler.waiting if i in self._seqs]
        lines = [(seq, 0) for seq in self._decoder.rows] + [(seq, n) for n, seq in enumerate(waiting, 1)]
        last, self._last_sent = self._last_sent, {}  # rebuilt: ids that left the line are dropped
        for seq, queued in lines:
            self._last_sent[seq.id] = last.get(seq.id, now)
            if now - self._last_sent[seq.id] >= HEARTBEAT_S:
                self._last_sent[seq.id] = now
                self._on_heartbeat(seq, queued)

    def _count(self, tokens: int) -> None:
        if tokens:
            now = time.monotonic()
            with self._lock:
                self._recent.append((now, tokens))
                while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
                    self._recent.popleft()

    def _finished(self, seq: BatchSequence, stats: GenerationStats) -> None:
        """Decoder callback: the sequence left; free its place, admit who waits, report."""
        self._last_sent.pop(seq.id, None)
        with self._lock:
            self.scheduler.remove(seq.id)
            self._seqs.pop(seq.id, None)
            self._hand_over(self.scheduler.admit())
        self._on_done(seq, stats)

    def _fail_all(self, newcomers: list[BatchSequence], exc: BaseException) -> None:
        for seq in [*self._decoder.abandon(), *newcomers]:
            if not seq.done:
                seq.reason = "cancelled"
                with self._lock:
                    self.scheduler.remove(seq.id)
                    self._seqs.pop(seq.id, None)
                    self._hand_over(self.scheduler.admit())
                self._on_done(seq, exc)
