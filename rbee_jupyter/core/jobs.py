"""Jobs: long work with an ordered event log that any number of subscribers read.

A subscriber is a cursor into the job's log, not a queue: publishing costs the same
for one subscriber or a thousand, memory per subscriber is constant, and a slow
subscriber never blocks the job or anyone else. One that falls more than
``max_lag`` events behind jumps over *skippable* (progress) events, never over
tokens or the terminal event.

Everything here runs on one asyncio loop. Work running in threads publishes through
``publish_threadsafe``, which keeps the order of events.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .ids import new_id
from ..errors import Cancelled, JobNotFound, RbeeError
from ..events import ErrorEvent, Event, dumps, sse_event

log = logging.getLogger(__name__)


class JobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETE = "complete"
    ERROR = "error"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.COMPLETE, JobState.ERROR, JobState.CANCELLED)


@dataclass(frozen=True)
class Record:
    """One published event with its stream id, its JSON and its SSE frame, made once for all subscribers."""

    id: int
    event: Event
    data: str
    frame: bytes = b""
    created: float = field(default_factory=time.monotonic)

    @property
    def skippable(self) -> bool:
        return self.event.skippable


class Job:
    """A unit of work (download, load, inference) and its event log.

    The job is *finished* once ``finish()`` published its terminal event; after that
    subscribers drain the log and stop. ``cancel_event`` is a ``threading.Event`` so
    work in threads and worker relays can poll it between steps.
    """

    def __init__(self, kind: str, *, job_id: str | None = None, key: Any = None,
                 owner: str | None = None, error_style: str = "stage",
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.id = job_id or new_id()
        self.kind = kind
        self.key = key
        self.owner = owner
        self.error_style = error_style
        self.state = JobState.PENDING
        self.created_at = time.time()
        self.finished_at: float | None = None
        self.records: list[Record] = []
        self.cancel_event = threading.Event()
        self.meta: dict[str, Any] = {}
        #: What was asked for (a request body, as the hive received it): only for the server log when
        #: the job fails with an internal error; never sent to subscribers.
        self.request: dict[str, Any] | None = None
        self.task: asyncio.Task | None = None
        self.error: BaseException | None = None
        self._loop = loop or asyncio.get_running_loop()
        self._waiters: set[asyncio.Future] = set()
        self._on_cancel: list[Callable[[], None]] = []
        self._on_finish: list[Callable[[Job], None]] = []
        self._on_publish: list[Callable[[Job, Record], None]] = []
        self.subscriptions: set[Subscription] = set()

    # --- producing ----------------------------------------------------------------

    def publish(self, event: Event) -> Record | None:
        """Append an event (loop thread only). Ignored once the job is finished."""
        if self.state.finished:
            return None
        if self.state is JobState.PENDING:
            self.state = JobState.RUNNING
        return self._append(event)

    def publish_threadsafe(self, event: Event) -> None:
        """Publish from a worker thread; events keep their order."""
        self._loop.call_soon_threadsafe(self.publish, event)

    def finish(self, event: Event, state: JobState = JobState.COMPLETE) -> None:
        """Publish the terminal event and mark the job finished (idempotent)."""
        if self.state.finished:
            return
        self._append(event)
        self.state = state
        self.finished_at = time.time()
        for cb in self._on_finish:
            cb(self)

    def fail(self, error: BaseException) -> None:
        """Finish with an error event built from ``error`` (``Cancelled`` → state cancelled)."""
        if self.state.finished:
            return
        self.error = error
        if isinstance(error, RbeeError):
            code, message, details = error.code, error.message, error.details or None
        else:
            logged_as = _log_internal_error(self, error)
            code, details = "INTERNAL_ERROR", {"job_id": logged_as}
            message = (f"{type(error).__name__}: {error}. This is a bug in rbee-jupyter; the server log has the "
                       f"details (look for job {logged_as}).")
        state = JobState.CANCELLED if isinstance(error, Cancelled) else JobState.ERROR
        self.finish(ErrorEvent(message=message, code=code, details=details, style=self.error_style), state)

    def _append(self, event: Event) -> Record:
        event_id, data = len(self.records) + 1, dumps(event)
        record = Record(event_id, event, data, sse_event(event_id, data))
        self.records.append(record)
        self._wake()
        for cb in self._on_publish:
            cb(self, record)
        return record

    # --- cancelling ---------------------------------------------------------------

    def cancel(self, reason: str = "Cancelled by the user.") -> bool:
        """Ask the work to stop. Returns False when the job had already finished.

        The terminal ``CANCELLED`` event is published by the work itself once it
        stopped (so "cancelled" means the work really ended), or here at once when
        the job has no running task.
        """
        if self.state.finished:
            return False
        self.cancel_event.set()
        for cb in list(self._on_cancel):
            cb()
        if self.task is None or self.task.done():
            self.fail(Cancelled(reason))
        return True

    def _wake(self) -> None:
        """Resolve every waiting reader's future: one cheap callback each, no tasks, no timers."""
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _changed(self, timeout: float | None) -> None:
        """Wait until the next publish (or ``timeout`` seconds); returns either way.

        A plain future per wait, resolved by ``_wake`` or a ``call_later`` timer: with a
        thousand subscribers this is several times cheaper than ``asyncio.wait_for``,
        which creates a task and a timer for every single wait.
        """
        fut = self._loop.create_future()
        self._waiters.add(fut)
        timer = None if timeout is None else self._loop.call_later(
            max(timeout, 0), lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            self._waiters.discard(fut)
            if timer is not None:
                timer.cancel()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        self._on_cancel.append(callback)

    def on_finish(self, callback: Callable[[Job], None]) -> None:
        self._on_finish.append(callback)
        if self.state.finished:
            callback(self)

    def on_publish(self, callback: Callable[[Job, Record], None]) -> None:
        self._on_publish.append(callback)

    # --- consuming ----------------------------------------------------------------

    def subscribe(self, *, last_event_id: int | None = None, max_lag: int = 256) -> Subscription:
        """Read the log from ``last_event_id`` on, or from the current state when None."""
        if last_event_id is not None:
            start = max(0, min(last_event_id, len(self.records)))
        else:
            start = max(0, len(self.records) - 1)
        sub = Subscription(self, start, max_lag)
        self.subscriptions.add(sub)
        return sub

    @property
    def last(self) -> Record | None:
        return self.records[-1] if self.records else None

    def summary(self) -> dict[str, Any]:
        last = self.last
        return {
            "id": self.id, "kind": self.kind, "state": self.state.value, "owner": self.owner,
            "created_at": self.created_at, "finished_at": self.finished_at,
            "last_event": last.event.to_dict() if last else None, **self.meta,
        }

    async def wait(self, timeout: float | None = None) -> JobState:
        """Wait until the job finished (bounded by ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.state.finished:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise asyncio.TimeoutError(f"job {self.id} still {self.state.value} after {timeout} s")
            await self._changed(remaining)
        return self.state


def _log_internal_error(job: Job, error: BaseException) -> str:
    """Put an unexpected exception's traceback, the job and its request in the server log, once.

    An ``INTERNAL_ERROR`` is a bug, and the event a user sees carries one line; whoever fixes
    it needs where it happened. A load job relays its download's failure with the same
    exception object, so the exception remembers the job it was logged under, and the second
    job points there instead of logging it again. Returns that job's id.
    """
    logged_as = getattr(error, "_rbee_logged_as", None)
    if logged_as is not None:
        return logged_as
    try:
        error._rbee_logged_as = job.id  # type: ignore[attr-defined]
    except AttributeError:  # an exception type with __slots__: logging twice is better than not at all
        pass
    log.error("rbee: internal error in %s job %s (owner %s); request: %s", job.kind, job.id, job.owner,
              job.request if job.request is not None else job.meta, exc_info=error)
    return job.id


class Subscription:
    """A cursor into one job's log; iterate it, or ``get(timeout)`` for keep-alives."""

    def __init__(self, job: Job, start: int, max_lag: int) -> None:
        self.job = job
        self.cursor = start
        self.max_lag = max(1, max_lag)
        self.skipped = 0
        self.closed = False

    def ready(self) -> list[Record]:
        """Every record that can be read now without waiting (a writer sends them in one go)."""
        out = []
        while not self.closed and (record := self._next_ready()) is not None:
            out.append(record)
        return out

    def _next_ready(self) -> Record | None:
        records = self.job.records
        while (len(records) - self.cursor > self.max_lag and records[self.cursor].skippable
               and self.cursor < len(records) - 1):
            self.cursor += 1
            self.skipped += 1
        if self.cursor < len(records):
            record = records[self.cursor]
            self.cursor += 1
            return record
        return None

    @property
    def exhausted(self) -> bool:
        """True once every event, the terminal one included, has been read."""
        return self.closed or (self.job.state.finished and self.cursor >= len(self.job.records))

    async def get(self, timeout: float | None = None) -> Record | None:
        """The next record; None on timeout. Raises ``StopAsyncIteration`` when exhausted."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.closed:
                raise StopAsyncIteration
            record = self._next_ready()
            if record is not None:
                return record
            if self._source_ended():
                self._detach()
                raise StopAsyncIteration
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            await self.job._changed(remaining)

    def close(self) -> None:
        """Stop reading; a reader waiting in ``get`` wakes up and ends."""
        if self.closed:
            return
        self.closed = True
        self._detach()
        self.job._wake()

    def _source_ended(self) -> bool:
        """No record will come after those already read."""
        return self.job.state.finished

    def _detach(self) -> None:
        self.job.subscriptions.discard(self)

    def __aiter__(self) -> AsyncIterator[Record]:
        return self

    async def __anext__(self) -> Record:
        record = await self.get()
        assert record is not None
        return record


class JobRegistry:
    """All jobs of a hive by id; finished ones are dropped ``retention_s`` later."""

    def __init__(self, *, retention_s: float = 600.0, kept_per_owner: int = 0) -> None:
        self.retention_s = retention_s
        #: Finished jobs kept per owner (0: no cap): a user firing requests cannot fill the
        #: server's memory with event logs; their oldest finished jobs are forgotten first.
        self.kept_per_owner = kept_per_owner
        self._jobs: dict[str, Job] = {}
        self._active_keys: dict[Any, str] = {}
        self._listeners: list[Callable[[str, Job], None]] = []
        self._ids = itertools.count(1)

    def create(self, kind: str, *, key: Any = None, owner: str | None = None,
               error_style: str = "stage", job_id: str | None = None) -> Job:
        job = Job(kind, job_id=job_id, key=key, owner=owner, error_style=error_style)
        self._jobs[job.id] = job
        if key is not None:
            self._active_keys[key] = job.id
        job.on_finish(self._finished)
        self._notify("created", job)
        return job

    def start(self, job: Job, work: Callable[[Job], Awaitable[None]]) -> Job:
        """Run ``work(job)`` as a task; any exception it raises becomes the terminal error event."""
        async def run() -> None:
            try:
                await work(job)
            except asyncio.CancelledError:
                job.fail(Cancelled("The server is shutting down."))
                raise
            except BaseException as e:  # every failure must reach subscribers as an event
                job.fail(e)
            else:
                if not job.state.finished:
                    job.fail(RbeeError("The job ended without a result."))
        job.task = asyncio.get_running_loop().create_task(run(), name=f"rbee-{job.kind}-{job.id}")
        return job

    def find_active(self, key: Any) -> Job | None:
        job_id = self._active_keys.get(key)
        job = self._jobs.get(job_id) if job_id else None
        return job if job is not None and not job.state.finished else None

    def get(self, job_id: str, kind: str | None = None) -> Job:
        job = self._jobs.get(job_id)
        if job is None or (kind is not None and job.kind != kind):
            raise JobNotFound(f"No {kind or 'job'} with id {job_id!r}: it never existed or finished long ago.",
                              details={"id": job_id})
        return job

    def list(self, kind: str | None = None) -> list[Job]:
        return [j for j in self._jobs.values() if kind is None or j.kind == kind]

    def listen(self, callback: Callable[[str, Job], None]) -> None:
        """``callback(what, job)`` for "created" and "finished" (the server-wide feed)."""
        self._listeners.append(callback)

    def _notify(self, what: str, job: Job) -> None:
        for cb in self._listeners:
            cb(what, job)

    def _finished(self, job: Job) -> None:
        if job.key is not None and self._active_keys.get(job.key) == job.id:
            del self._active_keys[job.key]
        self._notify("finished", job)
        asyncio.get_running_loop().call_later(self.retention_s, self._jobs.pop, job.id, None)
        if self.kept_per_owner > 0 and job.owner is not None:
            kept = [j.id for j in self._jobs.values() if j.owner == job.owner and j.state.finished]
            for old in kept[:max(0, len(kept) - self.kept_per_owner)]:  # dicts keep creation order
                self._jobs.pop(old, None)

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel every running job and wait (bounded) for their tasks to end."""
        tasks = []
        for job in self._jobs.values():
            if not job.state.finished:
                job.cancel("The server is shutting down.")
            if job.task is not None and not job.task.done():
                tasks.append(job.task)
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
