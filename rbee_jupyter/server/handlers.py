"""Thin Tornado handlers: authenticate, parse, call the hive, serialise or stream.

Every error leaves as ``{"error": {"code", "message", "details"}}`` with the status of
docs/errors.md; nothing here decides anything the hive could.
"""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from tornado import web

from ..errors import HTTP_ERROR_CODES, InvalidRequest, RbeeError
from ..core.hive import Hive
from ..core.owners import TOKEN_HEADER, Principal, parse_user_token, principal_of
from .sse import stream_job

if TYPE_CHECKING:
    from .app import RbeeApp

AUTH_RESOURCE = "rbee"

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


@web.stream_request_body
class RbeeHandler(APIHandler):
    """Base: the hive and settings come in through ``initialize``; errors become JSON.

    Bodies are streamed in, not buffered by Tornado first: ``prepare`` runs after the headers,
    so a declared ``Content-Length`` over ``max_body_bytes`` gets 413 before one byte of the body
    is read, and a chunked one is cut off by the connection at the same limit (Tornado's own
    limit is the server's 512 MiB, meant for file uploads, and applies to every route).
    """

    auth_resource = AUTH_RESOURCE

    def initialize(self, app: RbeeApp) -> None:
        self.app = app
        self.hive: Hive = app.hive
        self._rbee_subscription = None
        self._rbee_owned_job = None
        self._rbee_body: bytearray | None = None

    def prepare(self):  # type: ignore[override]
        limit = self.app.max_body_bytes
        declared = self.request.headers.get("Content-Length", "0")
        if not declared.isdigit() or int(declared) > limit:
            raise web.HTTPError(413, f"The request body is larger than {limit} bytes.")
        self.request.connection.set_max_body_size(limit)  # chunked bodies: the connection stops at it
        self._rbee_body = bytearray()
        return super().prepare()

    def data_received(self, chunk: bytes) -> None:
        """One piece of the body; the whole is ``request.body`` once the verb runs."""
        if getattr(self, "_rbee_body", None) is not None:  # None: refused in prepare, nothing to keep
            self._rbee_body += chunk
            self.request.body = bytes(self._rbee_body)

    def json_body(self) -> dict[str, Any]:
        """The body as a JSON object, or 400 saying what is wrong with it."""
        raw = self.request.body or b"null"
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidRequest(f"The request body is not valid JSON: {e}.") from e
        except RecursionError as e:
            raise InvalidRequest("The request body is nested too deeply.") from e
        if not isinstance(body, dict):
            raise InvalidRequest("The request body must be a JSON object.")
        if _SURROGATE_ESCAPE.search(raw):  # pairs were joined by json.loads; a lone one cannot be encoded later
            try:
                json.dumps(body, ensure_ascii=False).encode()
            except UnicodeEncodeError as e:
                raise InvalidRequest("The request body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff); "
                                     "send valid Unicode text.") from e
        return body

    def required_query(self, name: str) -> str:
        value = self.get_query_argument(name, None)
        if not value:
            raise InvalidRequest(f"The query argument {name!r} is required.", details={"field": name})
        return value

    def url(self, path: str) -> str:
        return f"{self.base_url.rstrip('/')}/rbee/{path}"

    @property
    def owner(self) -> str | None:
        user = self.current_user
        return getattr(user, "username", None) if user is not None else None

    @property
    def principal(self) -> Principal | None:
        """The caller, for the hive's ownership checks (service mode)."""
        return principal_of(self.current_user, self.hive.config.admin_users)

    def user_token(self, body: dict[str, Any]) -> str | None:
        """The caller's own hub token (header ``X-HF-Token`` or body ``hf_token``), taken out of ``body``."""
        return parse_user_token(self.request.headers.get(TOKEN_HEADER), body)

    def reply(self, status: int, body: Any = None) -> None:
        self.set_status(status)
        if body is None:
            self.finish()
        else:
            self.finish(json.dumps(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, RbeeError):
            self.set_status(exc.status, HTTPStatus(exc.status).phrase if exc.status in HTTPStatus._value2member_map_
                            else "Client Closed Request")
            body = exc.to_dict()
        else:
            message = getattr(exc, "log_message", None) or HTTPStatus(status_code).phrase
            if status_code >= 500 and not isinstance(exc, web.HTTPError):
                message = f"Internal error: {type(exc).__name__}: {exc}"
            body = {"error": {"code": HTTP_ERROR_CODES.get(status_code, "INTERNAL_ERROR" if status_code >= 500
                                                       else f"HTTP_{status_code}"),
                              "message": message, "details": {}}}
        body_read = getattr(self.request, "_body_future", None)
        if body_read is not None and not body_read.done():  # refused before its body: Tornado drops the connection
            self.set_header("Connection", "close")
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, RbeeError) and value.status < 500:
            self.log.info("rbee: %s %s -> %s %s", self.request.method, self.request.path, value.status, value.code)
            return
        super().log_exception(typ, value, tb)

    def on_connection_close(self) -> None:
        if self._rbee_subscription is not None:
            self._rbee_subscription.close()
        if self._rbee_owned_job is not None and not self._rbee_owned_job.state.finished:
            self._rbee_owned_job.cancel("The client went away.")
        super().on_connection_close()


class DownloadHandler(RbeeHandler):
    """``POST v1/models/download``.

    The caller may send their own hub token for a gated or private repo, as the header
    ``X-HF-Token`` or the body field ``hf_token``: it serves this download alone and is
    kept in no job, event, catalog row, response or log line.
    """

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.json_body()
        token = self.user_token(body)
        job = self.hive.download(body.get("model_ref"), principal=self.principal, hf_token=token)
        self.reply(202, {"download_id": job.id, "model_ref": job.meta["model_ref"],
                         "progress_url": self.url(f"v1/models/download/progress?id={job.id}")})


class DownloadProgressHandler(RbeeHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        job = self.hive.job(self.required_query("id"), "download")
        await stream_job(self, job, keepalive_s=self.app.sse_keepalive_s)


class DownloadCancelHandler(RbeeHandler):
    @web.authenticated
    @authorized
    async def delete(self, job_id: str) -> None:
        self.hive.cancel(job_id, "download", principal=self.principal)
        self.reply(204)


class ModelsHandler(RbeeHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        incomplete = self.hive.incomplete_downloads() if self.hive.may_see_all(self.principal) else []
        self.reply(200, {"models": self.hive.models(principal=self.principal), "incomplete": incomplete})

    @web.authenticated
    @authorized
    async def delete(self) -> None:
        self.hive.delete_model(self.required_query("ref"), principal=self.principal)
        self.reply(204)


class WorkersHandler(RbeeHandler):
    """``GET``/``POST v1/workers``; a load takes the caller's hub token as a download does."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply(200, {"workers": self.hive.workers()})

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.json_body()
        token = self.user_token(body)
        job = await self.hive.load_async(body, principal=self.principal, hf_token=token)
        self.reply(202, {"worker_id": job.id, "state": "loading", "model_ref": job.meta["model_ref"],
                         "progress_url": self.url(f"v1/loading/progress?id={job.id}")})


class WorkerHandler(RbeeHandler):
    @web.authenticated
    @authorized
    async def get(self, worker_id: str) -> None:
        self.reply(200, await self.hive.worker_detail(worker_id))

    @web.authenticated
    @authorized
    async def delete(self, worker_id: str) -> None:
        await self.hive.unload(worker_id, principal=self.principal)
        self.reply(204)


class WorkerReadyHandler(RbeeHandler):
    @web.authenticated
    @authorized
    async def get(self, worker_id: str) -> None:
        worker = self.hive.worker(worker_id)
        if worker.ready:
            self.reply(200, {"ready": True, "state": worker.state, "model_loaded": True})
        else:
            self.reply(200, {"ready": False, "state": worker.state,
                             "progress_url": self.url(f"v1/loading/progress?id={worker_id}")})


class LoadingProgressHandler(RbeeHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        job = self.hive.load_job(self.required_query("id"))
        await stream_job(self, job, keepalive_s=self.app.sse_keepalive_s)


class DevicesHandler(RbeeHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply(200, {"devices": self.hive.devices()})


class EventsHandler(RbeeHandler):
    """The server-wide feed: a ``snapshot`` first (without ``Last-Event-ID``), then every change."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        from ..core.feed import ensure_feed

        await stream_job(self, ensure_feed(self.hive), keepalive_s=self.app.sse_keepalive_s)


class InferenceHandler(RbeeHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        job = self.hive.infer(self.json_body(), principal=self.principal)
        self.set_header("X-Request-Id", job.id)
        await stream_job(self, job, keepalive_s=self.app.sse_keepalive_s, refuse_early_errors=True,
                         cancel_on_close=True)


class InferenceCancelHandler(RbeeHandler):
    @web.authenticated
    @authorized
    async def delete(self, request_id: str) -> None:
        self.hive.cancel(request_id, "inference", principal=self.principal)
        self.reply(204)


class NotFoundHandler(RbeeHandler):
    """Any other path under ``rbee/`` (an id holding ``/``, a typo): a JSON 404, not Jupyter's HTML page."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        raise web.HTTPError(404, f"No rbee route {self.request.method} {self.request.path}.")

    post = put = patch = delete = get


def handlers(app: RbeeApp) -> list[tuple[str, type, dict[str, Any]]]:
    """The route table; ``base_url`` is prepended by ``ExtensionApp``."""
    kw = {"app": app}
    return [
        (r"/rbee/v1/models/download", DownloadHandler, kw),
        (r"/rbee/v1/models/download/progress", DownloadProgressHandler, kw),
        (r"/rbee/v1/models/download/([^/]+)", DownloadCancelHandler, kw),
        (r"/rbee/v1/models", ModelsHandler, kw),
        (r"/rbee/v1/workers", WorkersHandler, kw),
        (r"/rbee/v1/workers/([^/]+)", WorkerHandler, kw),
        (r"/rbee/v1/workers/([^/]+)/ready", WorkerReadyHandler, kw),
        (r"/rbee/v1/loading/progress", LoadingProgressHandler, kw),
        (r"/rbee/v1/devices", DevicesHandler, kw),
        (r"/rbee/v1/events", EventsHandler, kw),
        (r"/rbee/v1/inference", InferenceHandler, kw),
        (r"/rbee/v1/inference/([^/]+)", InferenceCancelHandler, kw),
    ]
