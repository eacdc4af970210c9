"""The hive's API for kernels and scripts: over HTTP to a Jupyter server, or embedded in-process.

``Client()`` finds the hive the way a notebook user expects, without configuration:

1. an explicit ``Client(url, token=...)``;
2. the variables the server extension puts into the environment of the kernels it
   starts (``RBEE_SERVER_URL``, ``RBEE_TOKEN``: see :mod:`rbee_jupyter.kernel.kernel_env`);
3. ``JPY_PARENT_PID`` (set by jupyter_client in every kernel it launches) matched against
   ``jupyter_server.serverapp.list_running_servers()``;
4. otherwise **embedded mode**: an in-process hive on a background thread, with real
   worker processes and no HTTP (plain IPython, VS Code, notebooks run by nbclient).

Both transports hand back the same objects: a :class:`Download` and a :class:`Worker`
(whose ``loading`` job goes from download to ready) are job handles with ``events()``,
``wait()``, ``cancel()`` and ``state``; :meth:`Client.generate` and :meth:`Client.chat`
return a :class:`Generation`, an iterator of text pieces as the model makes them. Failures
raise the :mod:`rbee_jupyter.errors` class of their code (an HTTP error's JSON and an
error event are mapped back), so callers catch ``ModelNotFound`` whatever the transport.

This module stays import-light (no torch, no hive) so that ``import rbee_jupyter.kernel.client``
costs little in every kernel.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from .. import errors as _errors
from ..errors import Cancelled, RbeeError, error_from_json
from ..protocol import READY_STATES, CatalogEntry, DeviceInfo, WorkerState, WorkerView
from .kernel_env import ENV_TOKEN, ENV_URL, Connection, discover

__all__ = ["Client", "Download", "Worker", "JobHandle", "Generation", "Connection", "discover",
           "default_client", "set_default_client", "error_from_json", "ENV_URL", "ENV_TOKEN"]

TERMINAL_STATES = ("complete", "error", "cancelled")


# --- errors -------------------------------------------------------------------------------

def _state_of(event: dict[str, Any]) -> str:
    """Job state after ``event``: complete (download done, ready, end), error, cancelled or running."""
    stage = event.get("stage") or event.get("type")
    if stage in ("complete", "ready", "end"):
        return "complete"
    if stage == "error":
        return "cancelled" if event.get("code") == "CANCELLED" else "error"
    return "running"


# --- transports ---------------------------------------------------------------------------

class Transport(Protocol):
    """What a :class:`Client` needs from where the hive lives (HTTP here, in-process in embedded.py).

    ``kind`` is ``"download"``, ``"load"`` or ``"inference"``. ``stream`` yields
    ``(event_id, event)`` from ``last_event_id`` on (None: from the current state) and
    ends after the terminal event; ``deadline`` (``time.monotonic()``) bounds it with
    ``TimeoutError``.
    """

    mode: str
    url: str | None

    def download(self, ref: str) -> dict[str, Any]: ...
    def load(self, body: dict[str, Any]) -> dict[str, Any]: ...
    def stream(self, kind: str, job_id: str, *, last_event_id: int | None = 0,
               deadline: float | None = None) -> Iterator[tuple[int | None, dict[str, Any]]]: ...
    def infer(self, body: dict[str, Any]) -> InferenceStream: ...
    def embed(self, body: dict[str, Any]) -> dict[str, Any]: ...
    def cancel(self, kind: str, job_id: str) -> None: ...
    def models(self) -> list[dict[str, Any]]: ...
    def delete_model(self, ref: str) -> None: ...
    def workers(self) -> list[dict[str, Any]]: ...
    def worker(self, worker_id: str) -> dict[str, Any]: ...
    def unload(self, worker_id: str) -> None: ...
    def share(self, worker_id: str, shared: bool) -> dict[str, Any]: ...
    def devices(self) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


class InferenceStream(Protocol):
    """One running generation: its request id, its events, and how to let go of it."""

    id: str

    def __iter__(self) -> Iterator[dict[str, Any]]: ...
    def close(self) -> None: ...


def _deadline_left(deadline: float | None, default: float) -> float:
    if deadline is None:
        return default
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("Timed out waiting for the job's next event.")
    return min(left, default)


class HttpTransport:
    """The server's HTTP API (see the README) with httpx; SSE with httpx-sse, resumed by ``Last-Event-ID``."""

    mode = "server"

    def __init__(self, url: str, *, token: str | None = None, timeout: float = 30.0, verify: bool = True,
                 sock: str | None = None, stream_read_timeout: float = 60.0, hf_token: str | None = None) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self.token = token or None
        # Sent only with what fetches from the hub, never kept by the server (service mode).
        self._hub_headers = {"X-HF-Token": hf_token} if hf_token else {}
        self.stream_read_timeout = stream_read_timeout
        headers = {"Authorization": f"token {token}"} if token else {}
        transport = httpx.HTTPTransport(uds=sock, verify=verify) if sock else None
        self.http = httpx.Client(base_url=self.url + "rbee/", headers=headers, timeout=timeout, verify=verify,
                                 transport=transport, follow_redirects=False)

    # --- plumbing -------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise RbeeError(f"Cannot reach the rbee server at {self.url}: {exc}. Is it still running? "
                            "`%rbee connect URL` points the kernel elsewhere.",
                            code="SERVER_UNREACHABLE", status=503) from None
        if r.status_code >= 400:
            raise self._error(r)
        return r

    @staticmethod
    def _error(r: httpx.Response) -> RbeeError:
        try:
            payload = json.loads(r.read() or b"null")
        except ValueError:
            payload = None
        if not isinstance(payload, dict) or "error" not in payload:
            hint = " (is the rbee extension enabled on that server?)" if r.status_code == 404 else ""
            payload = {"error": {"code": "", "message": f"HTTP {r.status_code} from {r.request.url}{hint}"}}
        return error_from_json(payload, r.status_code)

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = self._request(method, path, **kw)
        return r.json() if r.content else None

    # --- jobs -----------------------------------------------------------------------------

    def download(self, ref: str) -> dict[str, Any]:
        return self._json("POST", "v1/models/download", json={"model_ref": ref}, headers=self._hub_headers)

    def load(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", "v1/workers", json=body, headers=self._hub_headers)

    _PROGRESS = {"download": "v1/models/download/progress", "load": "v1/loading/progress"}

    def stream(self, kind: str, job_id: str, *, last_event_id: int | None = 0,
               deadline: float | None = None) -> Iterator[tuple[int | None, dict[str, Any]]]:
        """Follow a progress stream; a dropped connection is resumed where it stopped (3 tries)."""
        from httpx_sse import EventSource

        last, retries = last_event_id, 3
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            timeout = httpx.Timeout(self.http.timeout.connect or 30.0,
                                    read=_deadline_left(deadline, self.stream_read_timeout))
            try:
                with self.http.stream("GET", self._PROGRESS[kind], params={"id": job_id}, headers=headers,
                                      timeout=timeout) as r:
                    if r.status_code >= 400:
                        raise self._error(r)
                    for sse in EventSource(r).iter_sse():
                        if sse.data == "[DONE]":
                            return
                        if not sse.data:
                            continue
                        last = int(sse.id) if sse.id and sse.id.isdigit() else last
                        yield last, json.loads(sse.data)
                return  # closed without [DONE]: the server is shutting down
            except httpx.ReadTimeout:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"No {kind} event for job {job_id} before the deadline.") from None
                retries -= 1
            except httpx.TransportError as exc:
                retries -= 1
                if retries < 0:
                    raise RbeeError(f"Lost the {kind} stream of {job_id}: {exc}", code="SERVER_UNREACHABLE",
                                    status=503) from None
            if retries < 0:
                raise TimeoutError(f"The {kind} stream of {job_id} stayed silent.")

    def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        """Through the OpenAI route (it takes a worker id or a ref as ``model``), as base64 float32."""
        model = body.get("worker_id") or body.get("model_ref")
        payload = {k: v for k, v in body.items() if k not in ("worker_id", "model_ref")}
        answer = self._json("POST", "openai/v1/embeddings", json={**payload, "model": model,
                                                                  "encoding_format": "base64"})
        return {"embeddings": [d["embedding"] for d in answer["data"]],
                "prompt_tokens": answer["usage"]["prompt_tokens"]}

    def infer(self, body: dict[str, Any]) -> _HttpInference:
        request = self.http.build_request("POST", "v1/inference", json=body,
                                          headers={"Accept": "text/event-stream"},
                                          timeout=httpx.Timeout(self.http.timeout.connect or 30.0,
                                                                read=self.stream_read_timeout))
        try:
            r = self.http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise RbeeError(f"Cannot reach the rbee server at {self.url}: {exc}", code="SERVER_UNREACHABLE",
                            status=503) from None
        if r.status_code >= 400:
            try:
                raise self._error(r)
            finally:
                r.close()
        return _HttpInference(r)

    def cancel(self, kind: str, job_id: str) -> None:
        path = {"download": f"v1/models/download/{job_id}", "load": f"v1/workers/{job_id}",
                "inference": f"v1/inference/{job_id}"}[kind]
        self._request("DELETE", path)

    # --- state ----------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        return self._json("GET", "v1/models")["models"]

    def delete_model(self, ref: str) -> None:
        self._request("DELETE", "v1/models", params={"ref": ref})

    def workers(self) -> list[dict[str, Any]]:
        return self._json("GET", "v1/workers")["workers"]

    def worker(self, worker_id: str) -> dict[str, Any]:
        return self._json("GET", f"v1/workers/{worker_id}")

    def unload(self, worker_id: str) -> None:
        self._request("DELETE", f"v1/workers/{worker_id}")

    def share(self, worker_id: str, shared: bool) -> dict[str, Any]:
        return self._json("PATCH", f"v1/workers/{worker_id}", json={"shared": shared})

    def devices(self) -> list[dict[str, Any]]:
        return self._json("GET", "v1/devices")["devices"]

    def close(self) -> None:
        self.http.close()


class _HttpInference:
    """An open ``POST v1/inference`` stream; closing it makes the server stop the generation."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.id = response.headers.get("X-Request-Id", "")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from httpx_sse import EventSource

        try:
            for sse in EventSource(self.response).iter_sse():
                if sse.data == "[DONE]":
                    return
                if sse.data:
                    yield json.loads(sse.data)
        except httpx.TransportError as exc:
            raise RbeeError(f"Lost the inference stream {self.id}: {exc}", code="SERVER_UNREACHABLE",
                            status=503) from None
        finally:
            self.close()

    def close(self) -> None:
        self.response.close()


# --- handles ------------------------------------------------------------------------------

class _ShownOnce:
    """A handle a magic has already drawn a live view for: the next automatic display is skipped."""

    _display_suppressed = False

    def suppress_next_display(self) -> None:
        """The view is on screen already: the handle returned to ``Out``/``_`` must not draw a second one."""
        self._display_suppressed = True

    def consume_display_suppression(self) -> bool:
        """True once after :meth:`suppress_next_display` (the display that is skipped), then False."""
        suppressed, self._display_suppressed = self._display_suppressed, False
        return suppressed


class JobHandle(_ShownOnce):
    """A download or load running in the hive: follow it, wait for it, cancel it.

    Handles are cheap views; several can follow one job, and each ``events()`` call is a
    fresh subscription (from the first event by default, so nothing is missed).
    """

    kind = "job"

    def __init__(self, client: Client, job_id: str, *, model_ref: str | None = None, state: str = "running") -> None:
        self.client = client
        self.id = job_id
        self.model_ref = model_ref
        self.last_event: dict[str, Any] | None = None
        self._state = state

    @property
    def state(self) -> str:
        """``running``, ``complete``, ``error`` or ``cancelled`` (asks the hive while running)."""
        if self._state == "running":  # a job with no event yet (queued) is running too: ask briefly
            with contextlib.suppress(RbeeError, TimeoutError):
                for _, event in self.client._transport.stream(self.kind, self.id, last_event_id=None,
                                                              deadline=time.monotonic() + 1.0):
                    self._seen(event)
                    break
        return self._state

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def last_state(self) -> str:
        """The state as last seen, without asking the hive (what ``repr`` shows)."""
        return self._state

    def _seen(self, event: dict[str, Any]) -> None:
        self.last_event = event
        self._state = _state_of(event)

    def events(self, *, last_event_id: int | None = 0, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """The job's events as dicts (rbee_jupyter.events formats), ending with its terminal event.

        Args:
            last_event_id: resume after this event id; 0 replays everything, None starts
                from the job's current state.
            timeout: seconds for the whole iteration (``TimeoutError`` after).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        for _, event in self.client._transport.stream(self.kind, self.id, last_event_id=last_event_id,
                                                      deadline=deadline):
            self._seen(event)
            yield event
            if deadline is not None and self._state == "running" and time.monotonic() > deadline:
                raise TimeoutError(f"The {self.kind} {self.id} did not finish within {timeout} s.")

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the job ends; returns its terminal event.

        Raises:
            RbeeError: the job's error, as its class (``Cancelled`` when cancelled).
            TimeoutError: ``timeout`` seconds passed first.
        """
        last: dict[str, Any] | None = None
        for event in self.events(last_event_id=None, timeout=timeout):
            last = event
        if last is None:
            raise RbeeError(f"The {self.kind} {self.id} ended without a result.")
        if _state_of(last) in ("error", "cancelled"):
            raise error_from_json(last)
        return last

    def cancel(self) -> None:
        """Ask the hive to stop the job (idempotent; a finished job is left as it is)."""
        with contextlib.suppress(_errors.NotFound):
            self.client._transport.cancel(self.kind, self.id)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.model_ref or ''} {self._state}>"

    def _ipython_display_(self) -> None:
        """Show a live progress view (skipped once right after a magic already showed one)."""
        if self.consume_display_suppression():
            return
        from .widgets import show_handle

        show_handle(self)


class Download(JobHandle):
    """A model download; ``wait()`` returns ``{"stage": "complete", "local_path": ...}``."""

    kind = "download"

    @property
    def local_path(self) -> str | None:
        """Where the model is on disk, once complete."""
        if self.last_event is None or self._state != "complete":
            self.state  # noqa: B018 - refresh
        return (self.last_event or {}).get("local_path") if self._state == "complete" else None


class LoadJob(JobHandle):
    """A worker's load: download events (if the model was not on disk), then one per block, then ready."""

    kind = "load"


class Worker:
    """A worker process holding one model; ``id`` is its worker id.

    ``loading`` is the load job (events, wait, cancel); ``generate``/``chat`` run on this
    worker (waiting for it to be ready first); ``unload`` stops it and frees its memory.
    """

    def __init__(self, client: Client, worker_id: str, *, model_ref: str | None = None, ready: bool = False) -> None:
        """``ready``: the hive already said it is loaded (its load job may be long gone)."""
        self.client = client
        self.id = worker_id
        self.model_ref = model_ref
        self.loading = LoadJob(client, worker_id, model_ref=model_ref, state="complete" if ready else "running")

    # the load job's handle, for symmetry with Download
    def events(self, **kw: Any) -> Iterator[dict[str, Any]]:
        return self.loading.events(**kw)

    def wait(self, timeout: float | None = None) -> Worker:
        """Block until the model is loaded; returns self. Raises the load's error."""
        self.loading.wait(timeout)
        return self

    def cancel(self) -> None:
        """Cancel the load (between layers) or unload; the worker process exits."""
        self.loading.cancel()

    @property
    def state(self) -> str:
        """The worker's state: ``loading``, ``idle``, ``busy``, ``draining``, ``failed`` or ``stopped``."""
        try:
            return self.info().get("state", "unknown")
        except _errors.NotFound:
            return "stopped"

    def info(self) -> dict[str, Any]:
        """The hive's record of this worker (devices, memory per device, pid, ...)."""
        return self.client._transport.worker(self.id)

    def _ensure_ready(self) -> None:
        if self.loading.last_state == "complete":
            return
        try:
            self.wait()
        except _errors.JobNotFound:  # the load job expired long ago: ask the worker itself
            if self.state not in READY_STATES:
                raise

    def generate(self, prompt: str, **options: Any) -> Generation:
        """Generate from ``prompt`` on this worker (once it is ready); see :meth:`Client.generate`."""
        self._ensure_ready()
        return self.client.generate(prompt, model=self, **options)

    def chat(self, messages: Sequence[dict[str, str]] | str, **options: Any) -> Generation:
        """Chat on this worker (once it is ready); see :meth:`Client.chat`."""
        self._ensure_ready()
        return self.client.chat(messages, model=self, **options)

    def share(self, shared: bool = True) -> WorkerView:
        """Let every user of a shared hive see and use this worker (``False``: stop); see :meth:`Client.share`."""
        return self.client.share(self, shared=shared)

    def unload(self) -> None:
        """Stop the worker (a load in progress is cancelled); its process exits and frees its memory."""
        with contextlib.suppress(_errors.NotFound):
            self.client._transport.unload(self.id)

    def __repr__(self) -> str:
        return f"<Worker {self.id} {self.model_ref or ''} {self.loading.last_state}>"

    def _ipython_display_(self) -> None:
        if self.loading.consume_display_suppression():
            return
        from .widgets import show_handle

        show_handle(self.loading, text=repr(self))


class Generation(_ShownOnce):
    """A generation in flight: iterate it for text pieces as they stream; ``text`` waits for the rest.

    The stream is read once; pieces already read are kept, so ``text`` after a loop (or
    an interrupted loop) is what was generated so far. ``end`` is the final ``end`` event
    (``total_tokens``, ``duration_ms``, ``stop_reason``, ``tokens_per_second``).
    """

    kind = "inference"

    def __init__(self, client: Client, stream: InferenceStream, *, model: str | None = None) -> None:
        self.client = client
        self.id = stream.id
        self.model = model
        self._stream = stream
        self._events = iter(stream)
        self.pieces: list[str] = []
        self.end: dict[str, Any] | None = None
        self.error: RbeeError | None = None
        self.last_event: dict[str, Any] | None = None
        self._state = "running"

    @property
    def state(self) -> str:
        return self._state

    def events(self) -> Iterator[dict[str, Any]]:
        """The raw inference events (started, token..., end or error); readable once."""
        for event in self._events:
            self.last_event = event
            kind = event.get("type")
            if kind == "token":
                self.pieces.append(event.get("t", ""))
            elif kind == "end":
                self.end, self._state = event, "complete"
            elif kind == "error":
                self.error = error_from_json(event)
                self._state = "cancelled" if isinstance(self.error, Cancelled) else "error"
            yield event

    def __iter__(self) -> Iterator[str]:
        for event in self.events():
            if event.get("type") == "token":
                yield event.get("t", "")
        if self.error is not None:
            raise self.error

    def wait(self, timeout: float | None = None) -> Generation:
        """Read to the end; raises the generation's error (``Cancelled`` when cancelled)."""
        for _ in self:
            pass
        return self

    @property
    def text(self) -> str:
        """The whole text (reads the rest of the stream first)."""
        if self._state == "running":
            self.wait()
        return "".join(self.pieces)

    @property
    def tokens_per_second(self) -> float | None:
        return (self.end or {}).get("tokens_per_second")

    def cancel(self) -> None:
        """Stop the generation on the hive (idempotent); the stream then ends with a ``CANCELLED`` error."""
        if self.id:
            with contextlib.suppress(_errors.NotFound):
                self.client._transport.cancel("inference", self.id)

    def close(self) -> None:
        """Let go of the stream without reading it; an unfinished generation stops (the client went away)."""
        self._stream.close()

    def __str__(self) -> str:
        return "".join(self.pieces)

    def __repr__(self) -> str:
        return f"<Generation {self.id} {self._state}: {''.join(self.pieces)[:60]!r}>"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text("".join(self.pieces))

    def _ipython_display_(self) -> None:
        if self.consume_display_suppression():
            return
        from .widgets import progress_mode

        if progress_mode() == "terminal":
            print(repr(self))
        else:
            from IPython.display import display

            display({"text/plain": "".join(self.pieces)}, raw=True)


# --- the client ---------------------------------------------------------------------------

def _infer_body(model: Any, options: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in options.items() if v is not None}
    if isinstance(model, Worker):
        body["worker_id"] = model.id
    elif isinstance(model, str) and model.startswith("w-"):
        body["worker_id"] = model
    elif model is not None:
        body["model_ref"] = model
    return body


if TYPE_CHECKING:
    from .batch import BatchResult


def response_format_for(schema: Any) -> dict[str, Any]:
    """``response_format`` for a pydantic model class or a JSON Schema dict."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        return {"type": "json_schema", "json_schema": {"name": schema.__name__, "schema": schema.model_json_schema()}}
    if isinstance(schema, dict):
        return {"type": "json_schema", "json_schema": {"name": str(schema.get("title") or "answer"), "schema": schema}}
    raise TypeError(f"schema must be a pydantic model class or a JSON Schema dict, not {type(schema).__name__}")


def parse_structured(gen: Generation, schema: Any) -> Any:
    """The finished generation's JSON as ``schema`` says: a validated model instance, or a dict."""
    text = gen.text
    if (gen.end or {}).get("stop_reason") == "length":
        raise RbeeError(f"The answer was cut at max_tokens ({(gen.end or {}).get('total_tokens')} tokens) before "
                        "its JSON was complete; raise max_tokens.", code="INCOMPLETE_OUTPUT", status=500,
                        details={"text": text})
    if isinstance(schema, type):
        return schema.model_validate_json(text)
    return json.loads(text)


class Client:
    """The rbee hive, wherever it runs. ``Client()`` discovers it; ``Client(url, token=...)`` names it.

    Example::

        client = Client()
        worker = client.load("hf:HuggingFaceTB/SmolLM2-135M-Instruct", quantization="nf4")
        for piece in worker.wait().generate("Once upon a time", max_tokens=32):
            print(piece, end="")
    """

    def __init__(self, url: str | None = None, *, token: str | None = None, timeout: float = 30.0,
                 verify: bool = True, sock: str | None = None, hf_token: str | None = None) -> None:
        """
        Args:
            url, token: the Jupyter server (or hub service) and its token; None: discover them.
            hf_token: your own Hugging Face token, sent with downloads and loads (header
                ``X-HF-Token``) to a shared hive in service mode, which uses it for your
                transfers only and never stores it. An embedded hive uses huggingface_hub's
                own lookup (``HF_TOKEN``) instead.
        """
        if url is not None:
            self.connection = Connection("server", "explicit", url=url, token=token, sock=sock, verify=verify)
        else:
            self.connection = discover()
        if self.connection.mode == "server":
            c = self.connection
            assert c.url is not None
            self._transport: Transport = HttpTransport(c.url, token=c.token, timeout=timeout, verify=c.verify,
                                                       sock=c.sock, hf_token=hf_token)
        else:
            from .embedded import EmbeddedTransport, shared_hive

            self._transport = EmbeddedTransport(shared_hive())

    @classmethod
    def embedded(cls, **hive_options: Any) -> Client:
        """A client on an in-process hive (never HTTP).

        Without options it is the process-wide hive (configured from ``RBEE_CACHE_DIR``,
        ``RBEE_CATALOG_PATH``, ``HF_ENDPOINT``); with options (``cache_dir``,
        ``catalog_path``, ``hub_endpoint``, any ``HiveConfig`` field) a private one, which
        :meth:`close` stops.
        """
        from .embedded import EmbeddedHive, EmbeddedTransport, shared_hive

        self = cls.__new__(cls)
        self.connection = Connection("embedded", "embedded" if not hive_options else "explicit")
        hive = EmbeddedHive.start(**hive_options) if hive_options else shared_hive()
        self._transport = EmbeddedTransport(hive, owned=bool(hive_options))
        return self

    # --- where ----------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """``"server"`` (HTTP to a Jupyter server) or ``"embedded"`` (in this process)."""
        return self.connection.mode

    @property
    def url(self) -> str | None:
        return self.connection.url

    @property
    def discovered_by(self) -> str:
        """``explicit``, ``environment``, ``jupyterhub``, ``jpy_parent_pid`` or ``embedded``."""
        return self.connection.source

    def status(self) -> dict[str, Any]:
        """Mode, how it was found, and what the hive holds now."""
        workers = self.workers()
        return {"mode": self.mode, "discovered_by": self.discovered_by, "url": self.url,
                "notes": list(self.connection.notes), "workers": len(workers),
                "ready": sum(w.ready for w in workers),
                "models": len(self.models())}

    # --- models ---------------------------------------------------------------------------

    def download(self, model_ref: str) -> Download:
        """Start (or join) a download; returns its handle at once.

        Raises:
            InvalidModelRef: the ref is malformed.
        """
        answer = self._transport.download(model_ref)
        return Download(self, answer["download_id"], model_ref=answer.get("model_ref", model_ref))

    def models(self) -> list[CatalogEntry]:
        """The catalog: ``ref``, ``local_path``, ``size_bytes``, ``files``, ``revision``, ``downloaded_at``.

        Typed entries; ``m["ref"]`` reads as before (see :class:`~rbee_jupyter.protocol.Record`).
        """
        return [CatalogEntry.from_json(m) for m in self._transport.models()]

    def delete_model(self, model_ref: str) -> None:
        """Remove a downloaded model from disk (``Conflict`` while a worker holds it)."""
        self._transport.delete_model(model_ref)

    # --- workers --------------------------------------------------------------------------

    def load(self, model_ref: str, *, device: str | Sequence[str] | None = None, quantization: str | None = None,
             dtype: str | None = None, max_memory: dict[str, Any] | None = None, kind: str | None = None) -> Worker:
        """Start a worker for ``model_ref`` (downloading it first if needed); returns at once.

        Args:
            device: "auto" (every GPU), "cpu", "cuda:0" or a list; None: the hive's default (cpu).
            quantization: "nf4", "fp4", "int8" or None.
            dtype: "bfloat16"/"bf16", "float16"/"fp16", "float32"/"fp32" or None (the checkpoint's).
            max_memory: per-device caps, e.g. ``{"cuda:0": "20GiB"}``.
            kind: "embedding" (a sentence-transformers model, for :meth:`embed`) or "generate";
                None: the hive tells from the model's files.

        Raises:
            InvalidRequest, DeviceNotAvailable, InsufficientVram: refused before anything starts.
        """
        body: dict[str, Any] = {"model_ref": model_ref}
        for key, value in (("device", list(device) if isinstance(device, (list, tuple)) else device),
                           ("quantization", quantization), ("dtype", dtype), ("max_memory", max_memory),
                           ("kind", kind)):
            if value is not None:
                body[key] = value
        answer = self._transport.load(body)
        return Worker(self, answer["worker_id"], model_ref=answer.get("model_ref", model_ref))

    def workers(self) -> list[WorkerView]:
        """Every worker: ``id``, ``model_ref``, ``state``, ``devices``, ``memory_mb``, ``kind``, ``shared``, and its
        load: ``active_sequences``, ``queue_length``, ``batch_size``, ``max_batch_size``, ``tokens_per_second``
        (the hive's last reading, at most a second old while it works) (``w["id"]`` works too)."""
        return [WorkerView.from_json(w) for w in self._transport.workers()]

    def worker(self, worker_id: str) -> Worker:
        """A handle on an existing worker (``WorkerNotFound`` if there is none)."""
        info = WorkerView.from_json(self._transport.worker(worker_id))
        return Worker(self, worker_id, model_ref=info.model_ref, ready=info.ready)

    def unload(self, worker: Worker | str) -> list[str]:
        """Unload a worker (by handle or id) or every worker of a model ref; returns the ids unloaded.

        Raises:
            WorkerNotFound: nothing matched.
        """
        if isinstance(worker, Worker):
            worker.unload()
            return [worker.id]
        workers = self.workers()
        ids = [w.id for w in workers if w.id == worker]
        if not ids and ":" in worker:  # a model ref: every worker holding it
            from ..core.refs import parse_ref

            ref = str(parse_ref(worker))
            ids = [w.id for w in workers if w.model_ref == ref and w.state != WorkerState.STOPPED]
            if not ids:
                raise _errors.WorkerNotFound(f"No worker holds {ref}. `%rbee ps` lists the workers.",
                                             details={"model_ref": ref})
        ids = ids or [worker]  # e.g. a load still downloading: the hive knows it by its job
        for worker_id in ids:
            self._transport.unload(worker_id)
        return ids

    def share(self, worker: Worker | str, *, shared: bool = True) -> WorkerView:
        """Share a worker (by handle or id) with every user of a shared hive, or stop (``shared=False``).

        Others then see it without its owner or process and may generate with it, not unload it.
        A single-user server has no one to share with; the flag is kept all the same.

        Returns:
            The worker as the hive shows it now.

        Raises:
            WorkerNotFound: no such worker. NotOwner / AccessDenied: someone else's worker, or an
                engine, and the caller is not an admin.
        """
        worker_id = worker.id if isinstance(worker, Worker) else worker
        return WorkerView.from_json(self._transport.share(worker_id, shared))

    def devices(self) -> list[DeviceInfo]:
        """The hive's devices: ``name``, ``kind``, ``total_bytes``, ``free_bytes``, ``label`` (``d["name"]`` too)."""
        return [DeviceInfo.from_json(d) for d in self._transport.devices()]

    # --- inference ------------------------------------------------------------------------

    def generate(self, prompt: str, *, model: Worker | str | None = None, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, **extra: Any) -> Generation:
        """Complete ``prompt``; returns a :class:`Generation` that streams text pieces.

        Args:
            model: a :class:`Worker`, a worker id, or a model ref (any ready worker of it).

        Raises:
            ModelNotLoaded, WorkerBusy, InvalidRequest, ContextTooLong: before the first token.
        """
        body = _infer_body(model, {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                                   "top_p": top_p, "seed": seed,
                                   "stop": [stop] if isinstance(stop, str) else stop, **extra})
        return Generation(self, self._transport.infer(body), model=_model_name(model))

    def chat(self, messages: Sequence[dict[str, str]] | str, *, model: Worker | str | None = None,
             max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
             seed: int | None = None, stop: str | Sequence[str] | None = None, schema: Any = None,
             **extra: Any) -> Any:
        """The assistant's next turn for ``messages`` (``[{"role", "content"}, ...]``; a str is one user turn).

        Args:
            schema: a pydantic model class or a JSON Schema dict: the answer is decoded under that
                schema's grammar and returned parsed (a validated instance of the model, or a dict)
                instead of a :class:`Generation`.

        Raises:
            UnsupportedSchema, InvalidSchema: a schema the grammar cannot enforce, or no schema at all.
            RbeeError: ``INCOMPLETE_OUTPUT`` when ``max_tokens`` ended the answer before the JSON did.
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if schema is not None:
            extra["response_format"] = response_format_for(schema)
        body = _infer_body(model, {"messages": [dict(m) for m in messages], "max_tokens": max_tokens,
                                   "temperature": temperature, "top_p": top_p, "seed": seed,
                                   "stop": [stop] if isinstance(stop, str) else stop, **extra})
        gen = Generation(self, self._transport.infer(body), model=_model_name(model))
        return gen if schema is None else parse_structured(gen, schema)

    def embed(self, texts: str | Sequence[str], *, model: Worker | str | None = None,
              dimensions: int | None = None) -> Any:
        """Embedding vectors of ``texts``, as the model's sentence-transformers pipeline makes them.

        Args:
            texts: one text (→ a 1-D array) or a list of texts (→ a 2-D array, one row each).
            model: an embedding :class:`Worker`, a worker id, or a model ref; None: the first
                ready embedding worker.
            dimensions: keep this many leading components (renormalised if the model normalises).

        Returns:
            A float32 numpy array.

        Raises:
            InvalidRequest: empty or non-string inputs, or a model that does not embed.
            ContextTooLong: a text longer than the model takes.
        """
        import base64

        import numpy as np

        if model is None:
            ready = [w for w in self.workers() if w.get("kind") == "embedding" and w.get("state") in ("idle", "busy")]
            if not ready:
                raise _errors.ModelNotLoaded("No embedding model is loaded: `%rbee load REF --embedding` or "
                                             "client.load(REF, kind='embedding') first.")
            model = ready[0]["id"]
        body = _infer_body(model, {"input": texts, "dimensions": dimensions})
        answer = self._transport.embed(body)
        vectors = np.array([np.frombuffer(base64.b64decode(v), dtype="<f4") for v in answer["embeddings"]])
        return vectors[0] if isinstance(texts, str) else vectors

    def generate_batch(self, items: Sequence[str | Sequence[dict[str, str]]], *, model: Worker | str | None = None,
                       max_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                       seed: int | None = None, stop: str | Sequence[str] | None = None,
                       concurrency: int | None = None, progress: bool = True, **extra: Any) -> BatchResult:
        """Run many prompts (or chats) at once; the worker decodes them together in batches.

        Args:
            items: prompts (str) or chats (lists of ``{"role", "content"}``), in any mix.
            model: a :class:`Worker`, a worker id, or a model ref.
            concurrency: requests kept in flight; None: the ready workers' ``max_batch_size``
                summed, so their batches fill without queueing.
            progress: show one progress view (items done / N, tok/s, ETA).

        Returns:
            A :class:`~rbee_jupyter.kernel.batch.BatchResult`: one ``BatchItem`` per input, in
            input order, each with ``text``, ``stop_reason`` and ``stats``, or its own ``error``
            (an invalid item fails alone). Interrupting the kernel cancels what has not finished,
            keeps what has, and returns with ``interrupted`` set.
        """
        from .batch import batch_concurrency, run_batch

        options = _infer_body(model, {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                                      "seed": seed, "stop": [stop] if isinstance(stop, str) else stop, **extra})
        if concurrency is None:
            concurrency = batch_concurrency(self._worker_details(model), model)
        view = None
        if progress:
            from .widgets import BatchView

            view = BatchView(_model_name(model) or "batch", total=len(items))
        return run_batch(lambda body: Generation(self, self._transport.infer(body), model=_model_name(model)),
                         list(items), options=options, concurrency=concurrency, view=view)

    def _worker_details(self, model: Worker | str | None) -> list[dict[str, Any]]:
        """The ready workers with their live batching figures (``max_batch_size``)."""
        rows = []
        for w in self.workers():
            if w.get("state") in ("idle", "busy"):
                with contextlib.suppress(RbeeError):
                    w = {**w, **self._transport.worker(w["id"])}
                rows.append(w)
        return rows

    # --- jobs by id -----------------------------------------------------------------------

    def cancel(self, job_id: str) -> str:
        """Cancel a download, a load or a generation by id; returns which kind it was.

        Raises:
            JobNotFound: no job with that id.
        """
        kinds = ("load", "download", "inference") if job_id.startswith("w-") else ("download", "inference", "load")
        for kind in kinds:
            try:
                self._transport.cancel(kind, job_id)
                return kind
            except _errors.NotFound:
                continue
        raise _errors.JobNotFound(f"No download, load or generation with id {job_id!r}.",
                                  details={"id": job_id})

    # --- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        where = self.url if self.mode == "server" else "in-process hive"
        return f"<rbee Client {self.mode}: {where} (found: {self.discovered_by})>"


def _model_name(model: Any) -> str | None:
    if isinstance(model, Worker):
        return model.model_ref or model.id
    return model


# --- the kernel's client ------------------------------------------------------------------

_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The client magics and ``load_model`` use: discovered once per process, replaceable."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def set_default_client(client: Client | None) -> Client | None:
    """Replace the process's default client (``%rbee connect``); returns the previous one."""
    global _default
    with _default_lock:
        previous, _default = _default, client
    return previous
