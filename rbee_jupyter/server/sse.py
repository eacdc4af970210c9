"""Writing a job's event log to an HTTP response as Server-Sent Events."""

from __future__ import annotations

import asyncio

from tornado.iostream import StreamClosedError

from ..errors import RbeeError
from ..events import sse_comment, sse_done
from ..core.jobs import Job, Record, Subscription


def last_event_id(handler) -> int | None:
    """``Last-Event-ID`` (header, or ``last_event_id`` query for fetch-less clients); junk is ignored."""
    raw = handler.request.headers.get("Last-Event-ID") or handler.get_query_argument("last_event_id", None)
    try:
        value = int(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and value >= 0 else None


def start_stream(handler) -> None:
    handler.set_status(200)
    handler.set_header("Content-Type", "text/event-stream; charset=utf-8")
    handler.set_header("Cache-Control", "no-cache, no-transform")
    handler.set_header("X-Accel-Buffering", "no")  # nginx / proxies: do not buffer


async def stream_job(handler, job: Job, *, keepalive_s: float, refuse_early_errors: bool = False,
                     cancel_on_close: bool = False) -> None:
    """Send ``job``'s events from the client's ``Last-Event-ID`` on, then ``[DONE]``.

    Returns when the job's terminal event was sent or the client went away; the
    subscription is closed either way (``handler.on_connection_close`` closes it
    too, so a vanished client stops being a subscriber at once).

    Args:
        refuse_early_errors: when the job fails before its first event (a full queue, a
            prompt too long), answer a plain HTTP error with that status instead of a
            stream, so clients see 503/400 as they expect.
        cancel_on_close: the client owns the job (an inference request): cancel it
            when the client goes away, so the work stops and frees its slot.
    """
    first = None
    if refuse_early_errors:
        sub, first = await open_owned(handler, job, cancel_on_close=cancel_on_close)
    else:
        sub = job.subscribe(last_event_id=last_event_id(handler))
        handler._rbee_subscription = sub
        if cancel_on_close:
            handler._rbee_owned_job = job
    start_stream(handler)
    try:
        if first is not None:
            handler.write(first.frame)
            await handler.flush()
        while True:
            try:
                record = await sub.get(timeout=keepalive_s)
            except StopAsyncIteration:
                break
            if record is None:
                handler.write(sse_comment())
            else:  # whatever else is ready goes out in the same write: a slow reader catches up at once
                handler.write(record.frame + b"".join(r.frame for r in sub.ready()))
            await handler.flush()
        if not sub.closed:
            handler.write(sse_done())
            await handler.flush()
    except (StreamClosedError, asyncio.CancelledError):
        pass
    finally:
        release(sub, cancel=cancel_on_close)


async def open_owned(handler, job: Job, *, cancel_on_close: bool = True) -> tuple[Subscription, Record]:
    """Subscribe ``handler`` to a job from its start and wait for the first event.

    A job that fails before its first event (a full queue, a prompt too long) is raised as
    its error, so the client gets a plain HTTP 503/400 rather than a stream. With
    ``cancel_on_close`` the client owns the job: it is cancelled when the client goes away.
    Used by ``stream_job`` and by the OpenAI routes, which write their own frames.
    """
    sub = job.subscribe(last_event_id=0)
    handler._rbee_subscription = sub
    if cancel_on_close:
        handler._rbee_owned_job = job
    first = await sub.get()
    if job.state.finished and len(job.records) == 1 and isinstance(job.error, RbeeError):
        sub.close()
        raise job.error
    return sub, first


def release(sub: Subscription, *, cancel: bool) -> None:
    """End a subscription; ``cancel``: the client owned the job, so unfinished work stops too."""
    sub.close()
    if cancel and not sub.job.state.finished:
        sub.job.cancel("The client went away.")
