"""Each worker's last-known load (active sequences, queue, batch, tokens/s), kept by the hive.

Why a copy, not a question per listing: ``GET v1/workers`` and the feed's snapshot must
answer at once whatever the workers do. Asking every worker on every listing would make the
list as slow as its slowest worker (a worker busy on a 2-core machine may take a second to
answer ``/health``), and a dead one would fail it. So the hive asks a worker only while it
works: once a second (``interval_s``), each question bounded by ``timeout_s`` (a late answer
keeps the last copy). It asks once more when the worker becomes ready, to learn what does not
change (``max_batch_size``). An idle worker's counters are zero by definition, since no stream
is open on it, so going idle sets them to zero without asking.

Listeners (``live.listen``) get ``(worker_id, counters)`` on every change: the feed turns them
into ``worker`` events with ``action`` ``"stats"``, so at most one per worker per
``interval_s``, and none while it is idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from ..protocol import WorkerInfo

if TYPE_CHECKING:
    from ..pools.base import Pool

__all__ = ["COUNTERS", "LiveLoad"]

log = logging.getLogger(__name__)

COUNTERS = ("active_sequences", "queue_length", "batch_size", "max_batch_size", "tokens_per_second")
"""What a worker's ``/health`` says about its load that ``v1/workers``, the feed and the sidebar show."""

_ZERO_WHEN_IDLE = {"active_sequences": 0, "queue_length": 0, "batch_size": 0, "tokens_per_second": 0.0}
_GONE = frozenset({"draining", "stopped", "removed", "failed", "died"})

Counters = dict[str, Any]
LoadListener = Callable[[str, Counters], None]


class LiveLoad:
    """The last-known :data:`COUNTERS` of every ready worker of ``pool`` (engines excepted: their
    load is their server's, and the hive's own ``load`` count already says what it sent them)."""

    def __init__(self, pool: Pool, *, interval_s: float = 1.0, timeout_s: float = 2.0) -> None:
        self.pool = pool
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._counters: dict[str, Counters] = {}
        self._polls: dict[str, asyncio.Task] = {}
        self._probes: set[asyncio.Task] = set()
        self._working: dict[str, int] = {}  # embedding calls in flight per worker (the pool has no busy state for them)
        self._listeners: list[LoadListener] = []
        self._unlisten = pool.listen(self._on_worker)

    # --- reading ----------------------------------------------------------------------------

    def get(self, worker_id: str) -> Counters:
        """The worker's counters, each None until known (an engine's stay None)."""
        known = self._counters.get(worker_id, {})
        return {k: known.get(k) for k in COUNTERS}

    def listen(self, callback: LoadListener) -> Callable[[], None]:
        """Call ``callback(worker_id, counters)`` whenever a worker's counters change; returns an unsubscribe."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback) if callback in self._listeners else None

    @contextlib.asynccontextmanager
    async def working(self, worker_id: str) -> AsyncIterator[None]:
        """Count a call the pool does not mark busy (an embedding) as work, so its queue is watched."""
        self._working[worker_id] = self._working.get(worker_id, 0) + 1
        if self._working[worker_id] == 1:
            self._start_polling(worker_id)
        try:
            yield
        finally:
            self._working[worker_id] -= 1
            if not self._working[worker_id]:
                del self._working[worker_id]
                self._went_idle(worker_id)

    async def close(self) -> None:
        self._unlisten()
        tasks = [*self._polls.values(), *self._probes]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._polls.clear()

    # --- keeping it current -----------------------------------------------------------------

    def _on_worker(self, event: str, info: WorkerInfo) -> None:
        if getattr(info, "backend", None) == "openai":
            return
        if event == "ready":
            self._spawn_probe(info.id)
        elif event == "busy":
            self._start_polling(info.id)
        elif event == "idle" and info.id not in self._working:
            self._went_idle(info.id)
        elif event in _GONE:
            self._stop_polling(info.id)
            self._counters.pop(info.id, None)

    def _start_polling(self, worker_id: str) -> None:
        if worker_id not in self._polls:
            self._polls[worker_id] = asyncio.get_running_loop().create_task(
                self._poll(worker_id), name=f"rbee-live-{worker_id}")

    def _stop_polling(self, worker_id: str) -> None:
        task = self._polls.pop(worker_id, None)
        if task is not None:
            task.cancel()

    def _went_idle(self, worker_id: str) -> None:
        """Nothing runs on it any more: its counters are zero now (only those it reports at all)."""
        self._stop_polling(worker_id)
        known = self._counters.get(worker_id)
        if known is not None:
            self._update(worker_id, {k: v for k, v in _ZERO_WHEN_IDLE.items() if k in known})

    def _spawn_probe(self, worker_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._probe(worker_id))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _poll(self, worker_id: str) -> None:
        while True:
            await self._probe(worker_id)
            await asyncio.sleep(self.interval_s)

    async def _probe(self, worker_id: str) -> None:
        """Ask the worker once; a slow, dead or unknown worker leaves the last copy as it is."""
        try:
            live = await asyncio.wait_for(self.pool.health(worker_id), self.timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a probe that fails must not end the polling or reach a listing
            log.debug("rbee: load of worker %s not read: %r", worker_id, exc)
            return
        if live.get("reachable") is False or not self._ready(worker_id):  # gone while we asked
            return
        counters = {k: live[k] for k in COUNTERS if k in live}
        if worker_id not in self._polls:  # the "ready" probe of a worker not working yet: nothing runs
            counters.update({k: v for k, v in _ZERO_WHEN_IDLE.items() if k in counters})
        self._update(worker_id, counters)

    def _ready(self, worker_id: str) -> bool:
        try:
            return self.pool.get(worker_id).ready
        except Exception:  # noqa: BLE001 - unknown to the pool: unloaded meanwhile
            return False

    def _update(self, worker_id: str, counters: Counters) -> None:
        known = self._counters.setdefault(worker_id, {})
        if all(known.get(k) == v for k, v in counters.items()) and counters.keys() <= known.keys():
            return
        known.update(counters)
        for callback in list(self._listeners):
            try:
                callback(worker_id, self.get(worker_id))
            except Exception:  # noqa: BLE001 - a broken listener must not stop the others
                log.exception("rbee: load listener %r failed", callback)
