"""The worker's own small HTTP + SSE app, reachable on 127.0.0.1 only, by its pool only.

Routes (every one needs ``Authorization: Bearer <secret>``, else 403):

=========================  =====================================================================
``GET /health``            state, memory per device (MB), tokens_computed, queue, request ids
``GET /load``              SSE: loading events then ready/error, then ``[DONE]`` (Last-Event-ID)
``DELETE /load``           cancel loading at the next block boundary (204; stream ends CANCELLED)
``POST /generate``         JSON body → SSE started/token.../end|error, ``[DONE]``; 400/409/503 JSON
``POST /embed``            JSON ``{"input"...}`` → JSON vectors (embedding workers; others 409)
``DELETE /generate/{id}``  cancel a running or queued request (204, idempotent)
``POST /shutdown``         202, then the process exits (cancelling whatever runs)
=========================  =====================================================================

Handlers are thin: authenticate, parse, call :class:`WorkerRuntime`, write what it publishes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any

from tornado.iostream import StreamClosedError
from tornado.web import Application, RequestHandler

from ..errors import AccessDenied, Conflict, InvalidRequest, RbeeError
from ..events import sse_comment, sse_done, sse_event
from ..core.jobs import Job, Subscription
from .runtime import WorkerRuntime

__all__ = ["make_app"]


class _Handler(RequestHandler):
    """Shared: bearer-secret check, JSON errors, and writing a job's log as SSE."""

    runtime: WorkerRuntime
    secret: str

    def initialize(self, runtime: WorkerRuntime, secret: str) -> None:
        self.runtime, self.secret = runtime, secret
        self._subscription: Subscription | None = None

    def prepare(self) -> None:
        header = self.request.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.secret.encode()):
            self.send_json_error(AccessDenied("Missing or wrong worker secret."))

    def send_json_error(self, error: RbeeError) -> None:
        self.set_status(error.status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(error.to_dict()))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        error = exc if isinstance(exc, RbeeError) else RbeeError(self._reason, status=status_code)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(error.to_dict()))

    def json_body(self) -> Any:
        """The request's JSON; ``InvalidRequest`` when it is not JSON."""
        try:
            return json.loads(self.request.body or b"null")
        except ValueError as exc:
            raise InvalidRequest(f"The body is not valid JSON: {exc}", details={"field": "body"}) from None

    def write_json(self, data: dict[str, Any]) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))

    def last_event_id(self) -> int | None:
        raw = self.request.headers.get("Last-Event-ID")
        try:
            value = int(raw) if raw is not None else None
        except ValueError:
            return None
        return value if value is not None and value >= 0 else None

    async def stream(self, job: Job, last_event_id: int | None) -> None:
        """Write ``job``'s events from ``last_event_id`` on, then ``[DONE]``; stop if the client left."""
        sub = self._subscription = job.subscribe(last_event_id=last_event_id)
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        try:
            while True:
                try:
                    record = await sub.get(timeout=self.runtime.config.keepalive_s)
                except StopAsyncIteration:
                    break
                self.write(sse_comment() if record is None else sse_event(record.id, record.data))
                await self.flush()
            if not sub.closed:
                self.write(sse_done())
                await self.flush()
        except (StreamClosedError, asyncio.CancelledError):
            pass
        finally:
            sub.close()

    def on_connection_close(self) -> None:
        if self._subscription is not None:
            self._subscription.close()


class HealthHandler(_Handler):
    def get(self) -> None:
        self.write_json(self.runtime.health())


class LoadHandler(_Handler):
    async def get(self) -> None:
        await self.stream(self.runtime.load_job, self.last_event_id())

    def delete(self) -> None:
        self.runtime.cancel_load()
        self.set_status(204)
        self.finish()


class GenerateHandler(_Handler):
    """One generation per request; a client that goes away cancels it (the slot frees at once)."""

    _request_id: str | None = None

    async def post(self) -> None:
        try:
            task = self.runtime.submit(self.json_body())
        except RbeeError as error:
            self.send_json_error(error)
            return
        self._request_id = task.request_id
        await self.stream(task.job, last_event_id=0)

    def on_connection_close(self) -> None:
        if self._request_id is not None:
            self.runtime.cancel(self._request_id)
        super().on_connection_close()


class EmbedHandler(_Handler):
    """One embedding request of an embedding worker (``worker/embedding.py``): JSON in, JSON out."""

    async def post(self) -> None:
        embed = getattr(self.runtime, "embed", None)
        try:
            if embed is None:
                raise Conflict("This worker generates text and does not embed; load a sentence-transformers "
                               "model for embeddings.", details={"kind": "generate"})
            self.write_json(await embed(self.json_body()))
        except RbeeError as error:
            self.send_json_error(error)


class CancelHandler(_Handler):
    def delete(self, request_id: str) -> None:
        self.runtime.cancel(request_id)
        self.set_status(204)
        self.finish()


class ShutdownHandler(_Handler):
    async def post(self) -> None:
        self.set_status(202)
        self.write_json({"state": "draining"})
        # Answer first, exit right after: the pool watches the process, not this reply.
        asyncio.get_running_loop().call_later(0.01, self.runtime.request_exit, "shutdown requested")


def make_app(runtime: WorkerRuntime, secret: str) -> Application:
    if not secret:
        raise ValueError("a worker needs a non-empty secret")
    kwargs = {"runtime": runtime, "secret": secret}
    return Application([
        (r"/health", HealthHandler, kwargs),
        (r"/load", LoadHandler, kwargs),
        (r"/generate", GenerateHandler, kwargs),
        (r"/generate/([^/]+)", CancelHandler, kwargs),
        (r"/embed", EmbedHandler, kwargs),
        (r"/shutdown", ShutdownHandler, kwargs),
    ], xsrf_cookies=False)
