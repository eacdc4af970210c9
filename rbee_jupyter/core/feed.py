"""The server-wide event feed: one stream that keeps a UI current (``GET v1/events``).

The feed is a long-lived ``Job`` of kind ``"feed"`` that never finishes. It publishes
``FeedEvent``s (``{"topic": ..., ...}``):

- ``job``: ``action`` ``created`` / ``progress`` / ``finished`` with the job's summary
  (``id``, ``kind``, ``state``, ``model_ref``, ``worker_id``, ``last_event``); progress is
  throttled to ``progress_interval_s`` per job, the newest always arriving in the end;
- ``worker``: ``action`` is the pool's event (``loading``, ``progress``, ``ready``, ``busy``,
  ``idle``, ``draining``, ``stopped``, ``failed``...), ``shared`` / ``unshared``, or ``stats``
  (its load counters changed while it works: at most one a second per worker, none while idle;
  see core/live.py), with the worker as ``GET v1/workers`` shows it (``shared``, ``load``,
  ``active_sequences``, ``queue_length``, ``batch_size``, ``max_batch_size``, ``tokens_per_second``);
- ``catalog``: ``action`` ``added`` / ``removed`` with the model (from ``Hive._feed``);
- ``devices``: every device with total and free memory, every ``devices_interval_s``
  while at least one subscriber is connected.

Its log is bounded: only the last ``keep`` records are kept. A subscriber that comes
without ``Last-Event-ID`` (or whose id fell out of the window) first gets one
``snapshot`` event with the whole current state (devices, models, workers, active
jobs, and who the reader is: ``service_mode`` and ``user`` ``{"name", "admin"}``, so a UI knows
which workers it may share), whose id is the newest record's, so resuming from it loses nothing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, Any

from ..errors import RbeeError
from ..events import FeedEvent, dumps, sse_event
from .jobs import Job, JobState, Record, Subscription
from .owners import ANYONE, Principal, may_control, public_worker

if TYPE_CHECKING:
    from .hive import Hive
    from ..pools.local import WorkerInfo

__all__ = ["FeedJob", "ensure_feed"]

log = logging.getLogger(__name__)

_WORKER_PROGRESS = frozenset({"progress"})


class FeedJob(Job):
    """The feed's log: a window of recent records plus a snapshot for newcomers."""

    def __init__(self, hive: Hive, *, keep: int = 512, progress_interval_s: float = 0.25,
                 devices_interval_s: float = 3.0, stats_interval_s: float = 1.0) -> None:
        super().__init__("feed", job_id="feed")
        self.hive = hive
        self.keep = max(16, keep)
        self.progress_interval_s = progress_interval_s
        self.devices_interval_s = devices_interval_s
        self.stats_interval_s = stats_interval_s
        self.window: collections.deque[Record] = collections.deque(maxlen=self.keep)
        # ids start from the clock: an id kept from before a server restart is below this
        # feed's window, so that client gets a fresh snapshot instead of a wrong resume
        self.last_id = int(time.time()) * 100_000
        self.state = JobState.RUNNING
        self._closed = False
        self._last_sent: dict[Any, float] = {}
        self._pending: dict[Any, asyncio.TimerHandle] = {}
        self._unannounced: set[str] = set()
        self._devices_task: asyncio.Task | None = None
        self._unlisten = [hive.pool.listen(self._on_worker), hive.live.listen(self._on_load)]
        hive.jobs.listen(self._on_job)
        for job in hive.jobs.list():
            if not job.state.finished:
                job.on_publish(self._job_published)

    # --- producing ----------------------------------------------------------------

    def _append(self, event: Any) -> Record:
        self.last_id += 1
        data = dumps(event)
        record = Record(self.last_id, event, data, sse_event(self.last_id, data))
        self.window.append(record)
        self._wake()
        return record

    def publish(self, event: Any) -> Record | None:
        if self._closed:
            return None
        return self._append(event)

    def emit(self, topic: str, **data: Any) -> None:
        self.publish(FeedEvent(topic=topic, data=data))

    def _on_job(self, what: str, job: Job) -> None:
        if what == "created":  # announced once the creator filled in its meta (model_ref...)
            job.on_publish(self._job_published)
            self._unannounced.add(job.id)
            self._loop.call_soon(self._announce, job)
            return
        self._announce(job)
        self._cancel_pending(("job", job.id))
        self._last_sent.pop(("job", job.id), None)
        self.emit("job", action=what, job=_summary(job))

    def _announce(self, job: Job) -> None:
        if job.id in self._unannounced:
            self._unannounced.discard(job.id)
            self.emit("job", action="created", job=_summary(job))

    def _job_published(self, job: Job, record: Record) -> None:
        if job.state.finished:  # the terminal event: "finished" from the registry says it
            return
        self._announce(job)
        self._throttled(("job", job.id), lambda: self.emit("job", action="progress", job=_summary(job)),
                        alive=lambda: not job.state.finished)

    def _on_worker(self, event: str, info: WorkerInfo) -> None:
        key = ("worker", info.id)
        payload = self.hive.worker_view(info, None)  # in full: each reader's copy is cut down in _as_seen
        if event in _WORKER_PROGRESS:
            self._throttled(key, lambda: self.emit("worker", action=event, worker=payload))
            return
        self._cancel_pending(key)
        if event in ("stopped", "removed"):
            self._last_sent.pop(key, None)
            self._cancel_pending(("stats", info.id))
            self._last_sent.pop(("stats", info.id), None)
        self.emit("worker", action=event, worker=payload)

    def _on_load(self, worker_id: str, counters: dict[str, Any]) -> None:
        """A worker's load counters changed (core/live.py reads them at most once a second, only while it works)."""
        def send() -> None:
            try:
                info = self.hive.pool.get(worker_id)
            except RbeeError:  # unloaded meanwhile: its "stopped" says so
                return
            self.emit("worker", action="stats", worker=self.hive.worker_view(info, None))
        self._throttled(("stats", worker_id), send, interval=self.stats_interval_s)

    def _throttled(self, key: Any, send: Any, alive: Any = None, interval: float | None = None) -> None:
        """Send now if the key was quiet for ``interval`` (``progress_interval_s``); else once, at the end of it."""
        now = time.monotonic()
        wait = self._last_sent.get(key, 0.0) + (self.progress_interval_s if interval is None else interval) - now
        self._cancel_pending(key)
        if wait <= 0:
            self._last_sent[key] = now
            send()
            return

        def later() -> None:
            self._pending.pop(key, None)
            if alive is None or alive():
                self._last_sent[key] = time.monotonic()
                send()
        self._pending[key] = self._loop.call_later(wait, later)

    def _cancel_pending(self, key: Any) -> None:
        handle = self._pending.pop(key, None)
        if handle is not None:
            handle.cancel()

    # --- devices ------------------------------------------------------------------

    async def _devices_loop(self) -> None:
        while self.subscriptions and not self._closed:
            try:
                from ..engine.devices import inventory

                self.emit("devices", devices=self.hive.devices(await asyncio.to_thread(inventory)))
            except Exception:  # a failing probe must not end the feed
                log.exception("rbee feed: device inventory failed")
            await asyncio.sleep(self.devices_interval_s)

    def _subscribers_changed(self) -> None:
        running = self._devices_task is not None and not self._devices_task.done()
        if self.subscriptions and not running and not self._closed:
            self._devices_task = self._loop.create_task(self._devices_loop(), name="rbee-feed-devices")
        elif not self.subscriptions and running:
            self._devices_task.cancel()

    # --- consuming ----------------------------------------------------------------

    def snapshot(self, principal: Principal | None = None) -> dict[str, Any]:
        """The whole current state, as one ``snapshot`` event's fields (as ``principal`` may see it)."""
        hive = self.hive
        user = {"name": principal.name, "admin": principal.admin} if principal is not None else None
        return {"service_mode": hive.config.service_mode, "user": user,
                "devices": hive.devices(), "models": hive.models(principal=ANYONE),
                "workers": hive.workers(principal),
                "jobs": [_summary(j) for j in hive.jobs.list()
                         if not j.state.finished and j is not self and hive.sees_job(principal, j)]}

    def view(self, principal: Principal | None) -> FeedView:
        """The feed as ``principal`` may see it (what ``GET v1/events`` streams)."""
        return FeedView(self, principal)

    def subscribe(self, *, last_event_id: int | None = None, max_lag: int = 256,  # type: ignore[override]
                  principal: Principal | None = None) -> FeedSubscription:
        oldest = self.window[0].id if self.window else self.last_id + 1
        seen = None if not self.hive.config.service_mode or principal is None or principal.admin else principal
        if last_event_id is not None and oldest - 1 <= last_event_id <= self.last_id:
            sub = FeedSubscription(self, cursor=last_event_id, first=None, principal=seen)
        else:  # a newcomer, or one whose place fell out of the window
            data = dumps(FeedEvent(topic="snapshot", data=self.snapshot(principal)))
            first = Record(self.last_id, None, data, sse_event(self.last_id, data))  # type: ignore[arg-type]
            sub = FeedSubscription(self, cursor=self.last_id, first=first, principal=seen)
        self.subscriptions.add(sub)
        self._subscribers_changed()
        return sub

    @property
    def last(self) -> Record | None:
        return self.window[-1] if self.window else None

    def summary(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "state": self.state.value, "last_id": self.last_id,
                "subscribers": len(self.subscriptions)}

    def cancel(self, reason: str = "") -> bool:  # the feed is not cancellable by users
        return False

    async def close(self) -> None:
        """End every subscription (their streams end with ``[DONE]``) and stop the timers."""
        self._closed = True
        for unlisten in self._unlisten:
            unlisten()
        for handle in self._pending.values():
            handle.cancel()
        self._pending.clear()
        for sub in list(self.subscriptions):
            sub.ended = True
        self._wake()
        if self._devices_task is not None:
            self._devices_task.cancel()
            await asyncio.gather(self._devices_task, return_exceptions=True)


class FeedView:
    """The feed seen by one user: what ``stream_job`` subscribes to (everything else is the feed's)."""

    def __init__(self, feed: FeedJob, principal: Principal | None) -> None:
        self.feed, self.principal = feed, principal

    def subscribe(self, *, last_event_id: int | None = None, max_lag: int = 256) -> FeedSubscription:
        return self.feed.subscribe(last_event_id=last_event_id, max_lag=max_lag, principal=self.principal)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.feed, name)


class FeedSubscription(Subscription):
    """A cursor (the last id sent) into the feed's window, read like any ``Subscription``.

    With a ``principal`` (a user who is not an admin, in service mode) it reads only what that
    user may see: their own jobs (others' carry prompts, generated text, gated repo names),
    their own workers, and other users' shared workers without URLs or owners.
    """

    def __init__(self, feed: FeedJob, *, cursor: int, first: Record | None,
                 principal: Principal | None = None) -> None:
        super().__init__(feed, cursor, max_lag=1)
        self.first = first
        self.ended = False
        self.principal = principal

    def _next_ready(self) -> Record | None:
        if self.first is not None:
            record, self.first = self.first, None
            return record
        while (record := self._next_record()) is not None:
            if self.principal is None:
                return record
            if (seen := _as_seen(self.job.hive, self.principal, record)) is not None:  # type: ignore[attr-defined]
                return seen
        return None

    def _next_record(self) -> Record | None:
        feed: FeedJob = self.job  # type: ignore[assignment]
        window = feed.window
        if not window or self.cursor >= feed.last_id:
            return None
        oldest = window[0].id
        if self.cursor + 1 < oldest:  # fell behind the window: the reader jumps ahead
            self.skipped += oldest - self.cursor - 1
            self.cursor = oldest - 1
        record = window[self.cursor + 1 - oldest]
        self.cursor = record.id
        return record

    def _source_ended(self) -> bool:
        return self.ended

    def _detach(self) -> None:
        self.job.subscriptions.discard(self)
        self.job._subscribers_changed()  # type: ignore[attr-defined]


def _as_seen(hive: Hive, principal: Principal, record: Record) -> Record | None:
    """``record`` as ``principal`` may see it: itself, a copy with a shared worker's public view, or None."""
    event = record.event
    if not isinstance(event, FeedEvent):
        return record
    if event.topic == "job":
        return record if hive.sees_job(principal, event.data.get("job") or {}) else None
    if event.topic != "worker":
        return record
    info = event.data.get("worker") or {}
    if may_control(principal, info.get("owner")):
        return record
    if event.data.get("action") == "unshared":  # it leaves the lists of those who saw it shared
        seen = FeedEvent(topic="worker", data={"action": "removed", "worker": {"id": info.get("id")}})
    elif not hive.is_shared(info.get("id")):
        return None
    else:
        seen = FeedEvent(topic="worker", data={**event.data, "worker": public_worker(info)})
    data = dumps(seen)
    return Record(record.id, seen, data, sse_event(record.id, data))


def _summary(job: Job) -> dict[str, Any]:
    return job.summary()


def ensure_feed(hive: Hive, **options: Any) -> FeedJob:
    """The hive's feed, made (and wired) on first use; needs the running event loop."""
    if not isinstance(hive.feed, FeedJob):
        hive.feed = FeedJob(hive, **options)
    return hive.feed
