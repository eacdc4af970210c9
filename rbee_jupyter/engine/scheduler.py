"""Which sequences share the next forward step: an iteration-level scheduler, no I/O.

The worker's batched decoder asks this object, before every step, which waiting
requests may join the running batch; it tells it when a sequence leaves (finished,
stopped, cancelled). Everything here is plain bookkeeping over ids and token counts, so
it is tested with made-up requests, without a model (``tests/test_scheduler.py``).

KV memory is accounted in *token slots*: the batched cache is one rectangular tensor per
layer, ``rows × width``, left-padded so that all rows end at the same column. Its width
never exceeds the longest row, and a row never grows past ``prompt + max_tokens``, so
``rows × max(prompt + max_tokens)`` over the running set bounds what the cache can ever
hold. Admitting only while that bound fits the budget means a batch can never run out of
KV memory half-way, which is why we reserve for the worst case rather than the current
length (a sequence that stops early simply frees its reservation sooner).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["QueueFull", "Scheduler", "SchedulerLimits", "SequenceSpec"]


class QueueFull(Exception):
    """No room to wait: the caller answers 503 ``WORKER_BUSY``."""


@dataclass(frozen=True)
class SequenceSpec:
    """What the scheduler needs to know of one request."""

    id: str
    prompt_tokens: int
    max_tokens: int

    @property
    def reserve(self) -> int:
        """Most KV slots this sequence can need: its prompt plus every token it may make."""
        return self.prompt_tokens + self.max_tokens


@dataclass(frozen=True)
class SchedulerLimits:
    """``max_batch_size``: sequences per step. ``kv_budget_tokens``: KV slots the batched cache
    may reserve (0: no limit). ``queue_depth``: requests that may wait for a place."""

    max_batch_size: int = 8
    kv_budget_tokens: int = 0
    queue_depth: int = 8

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.kv_budget_tokens < 0 or self.queue_depth < 0:
            raise ValueError("kv_budget_tokens and queue_depth must be >= 0")


class Scheduler:
    """FIFO admission into a bounded batch.

    A request waits while the batch is full or admitting it would exceed the KV budget;
    the head of the queue blocks those behind it (a long request is never starved by short
    ones slipping past). A request whose own reservation exceeds the budget is admitted
    when it would run alone: that is what a worker without batching did, and refusing it
    would make the budget an error rather than a bound on sharing.
    """

    def __init__(self, limits: SchedulerLimits) -> None:
        self.limits = limits
        self._running: OrderedDict[str, SequenceSpec] = OrderedDict()
        self._waiting: OrderedDict[str, SequenceSpec] = OrderedDict()

    # --- state -------------------------------------------------------------------------

    @property
    def running(self) -> list[str]:
        """Admitted ids, oldest first (they are in the batch or join it at the next step)."""
        return list(self._running)

    @property
    def waiting(self) -> list[str]:
        return list(self._waiting)

    def kv_reserved(self, specs: list[SequenceSpec] | None = None) -> int:
        """The KV slots a batch of ``specs`` (default: the running set) may come to hold."""
        specs = list(self._running.values()) if specs is None else specs
        return len(specs) * max((s.reserve for s in specs), default=0)

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._running or seq_id in self._waiting

    # --- decisions ---------------------------------------------------------------------

    def add(self, spec: SequenceSpec) -> list[str]:
        """Queue ``spec`` and admit what fits; returns the ids admitted (``spec.id`` among them
        when it runs at once).

        Raises:
            QueueFull: it could not be admitted and ``queue_depth`` requests already wait.
            ValueError: the id is already known.
        """
        if spec.id in self:
            raise ValueError(f"sequence {spec.id!r} is already scheduled")
        must_wait = bool(self._waiting) or not self._fits(spec)
        if must_wait and len(self._waiting) >= self.limits.queue_depth:
            raise QueueFull(spec.id)
        self._waiting[spec.id] = spec
        return self.admit()

    def remove(self, seq_id: str) -> str | None:
        """A sequence left (finished, stopped, cancelled): free its place and its KV reservation.

        Returns ``"running"`` or ``"waiting"`` (where it was) or None if unknown. Does not admit:
        call :meth:`admit` when the caller is ready for newcomers (before the next step).
        """
        if self._running.pop(seq_id, None) is not None:
            return "running"
        if self._waiting.pop(seq_id, None) is not None:
            return "waiting"
        return None

    def admit(self) -> list[str]:
        """Move waiting requests into the batch, in order, while they fit; returns their ids."""
        admitted = []
        while self._waiting:
            spec = next(iter(self._waiting.values()))
            if not self._fits(spec):
                break
            del self._waiting[spec.id]
            self._running[spec.id] = spec
            admitted.append(spec.id)
        return admitted

    def _fits(self, spec: SequenceSpec) -> bool:
        if not self._running:
            return True
        if len(self._running) >= self.limits.max_batch_size:
            return False
        budget = self.limits.kv_budget_tokens
        return not budget or self.kv_reserved([*self._running.values(), spec]) <= budget
