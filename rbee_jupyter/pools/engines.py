"""External OpenAI-compatible engines (vLLM, TGI, llama.cpp server, Ollama, ``transformers serve``) as workers.

A team that already runs a serving engine on a GPU box should not load the model a second
time to use it from Jupyter: it registers the engine by URL (``POST v1/workers {"backend":
"openai", "url", "model", "api_key"}`` or ``c.RbeeApp.engines``) and gets a worker like any
other, listed in ``ps``, the sidebar and ``openai/v1/models``, streaming through
``v1/inference``, the OpenAI routes and the magics with our framing (``id:``, ``[DONE]``,
keep-alives). The engine's own SSE is translated into our ``started`` / ``token`` / ``end`` /
``error`` events, so nothing downstream knows where the tokens came from.

What the hive still owns for an engine: whether it answers (``GET {url}/models`` at
registration, every ``health_interval_s`` and whenever a stream breaks: a dead engine turns
its worker ``failed`` and ends its open streams with ``ENGINE_UNREACHABLE`` + ``[DONE]``; an
engine that answers again makes the worker ``idle`` again, because engines restart on their
own schedule), and cancellation (a cancelled job closes the upstream HTTP request, which is
how every OpenAI-compatible engine learns to stop). Unloading only forgets the engine.

The API key is sent to the engine as ``Authorization: Bearer`` and nowhere else: it is not
in any ``WorkerInfo``, event, error or log line, and URLs that carry credentials (user info,
query) are refused so the key cannot hide in them.

The registry and busy/idle are :class:`~.base.RegistryPool`'s; this module is the HTTP
transport and the translation of OpenAI's stream. :class:`~.composite.CompositePool` puts
these workers beside the primary pool's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
from traitlets import Float

from ..core.jobs import Job
from ..errors import (AccessDenied, Cancelled, Conflict, EngineError, EngineUnreachable, InferenceStalled,
                      InvalidRequest, ModelNotFound, RbeeError, WorkerBusy)
from ..events import DONE, InferenceEnd, InferenceStarted, Ready, Token
from ..protocol import (BACKENDS, EXAMPLE_ENGINE_URL, EngineInfo, EngineSpec, GenerationRequest, WorkerInfo,
                        WorkerState, backend_of)
from ..sse_client import SSEParser
from .base import Entry, RegistryPool

__all__ = ["BACKENDS", "EngineSpec", "EngineInfo", "OpenAIEnginePool", "backend_of", "engine_aliases"]

log = logging.getLogger(__name__)

# --- registry -----------------------------------------------------------------------------

@dataclass(eq=False, kw_only=True)
class _Engine(Entry):
    info: EngineInfo
    spec: EngineSpec
    client: httpx.AsyncClient
    slow_probes: int = 0  # health probes in a row that timed out
    quote: bool = True  # whether errors may quote what the engine said (not in service mode: see _quote)


class OpenAIEnginePool(RegistryPool):
    """Workers that are external OpenAI-compatible engines, reached over HTTP (``c.OpenAIEnginePool.*``).

    ``inference_stall_s`` (a :class:`~.base.Pool` trait) stops a generation whose engine sends
    nothing for that long with ``INFERENCE_STALLED``, closing the upstream request.
    """

    timeout_s = Float(
        5.0, config=True,
        help="Seconds an external engine may take to accept a connection or answer GET /models before it counts "
             "as unreachable (ENGINE_UNREACHABLE). Default 5. (Was c.RbeeApp.engine_timeout_s.)",
    )
    health_interval_s = Float(
        10.0, allow_none=True, config=True,
        help="Seconds between health checks of every engine: one that stops answering turns its worker failed "
             "and ends its streams; one that answers again turns it idle. A probe that times out counts only the "
             "second time in a row (a busy engine can be slow to answer); a refused connection counts at once. "
             "None or 0: check only at registration and when a stream breaks. Default 10. "
             "(Was c.RbeeApp.engine_health_interval_s.)",
    )

    slow_probes_allowed = 1
    not_found_message = "No engine worker with id {id!r}."

    def __init__(self, *, quote_upstream: bool = True, **kwargs: Any) -> None:
        """``quote_upstream=False`` (service mode): errors never quote what an engine said, nor its URL."""
        super().__init__(**kwargs)
        self.quote_upstream = quote_upstream
        self._closing: set[asyncio.Task] = set()
        # A streaming generation has no per-read timeout (a timer armed and cancelled per chunk):
        # a _Watchdog per generation watches for the stall instead.
        self._stream_timeout = httpx.Timeout(None, connect=self.timeout_s)

    # --- registration --------------------------------------------------------------------

    async def start(self, spec: EngineSpec, job: Job) -> WorkerInfo:  # type: ignore[override]
        """Register ``spec`` as worker ``job.id``; ``job`` ends ``ready`` once the engine answers."""
        headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
        transport = spec.egress.transport() if spec.egress is not None else None
        client = httpx.AsyncClient(base_url=spec.url + "/", headers=headers, transport=transport, timeout=httpx.Timeout(
            self.inference_stall_s, connect=self.timeout_s))
        info = EngineInfo.pending(job.id, spec.model_ref, owner=job.owner, state=WorkerState.LOADING)
        info.url, info.model, info.name = spec.url, spec.model, spec.name
        e = _Engine(info=info, spec=spec, client=client, load_job=job, quote=self.quote_upstream)
        return self._register(e, self._check_in(e), lambda: self._drop(e, "registration cancelled", Cancelled(
            f"Registering the engine at {spec.url} was cancelled.", details={"worker_id": info.id}), close=True))

    async def _check_in(self, e: _Engine) -> None:
        try:
            await self._probe(e)
        except RbeeError as error:
            self._failed(e, error)
            e.load_job.fail(error)
        else:
            e.info.state = WorkerState.IDLE
            e.load_job.finish(Ready(worker_id=e.info.id, memory_mb={}))
            self._notify("ready", e.info)
        if self.health_interval_s:
            self._spawn(e, self._watch(e))

    # --- health --------------------------------------------------------------------------

    async def _probe(self, e: _Engine) -> float:
        """``GET {url}/models``: the engine answers and serves the model; returns the latency in ms.

        Raises:
            EngineUnreachable: no connection, or no answer within ``timeout_s``.
            AccessDenied: the engine refused the key.
            EngineError: an answer that is not OpenAI's model list.
            ModelNotFound: the engine does not serve ``model`` (the message lists what it serves).
        """
        url, t0 = e.spec.url, time.monotonic()
        where = {"worker_id": e.info.id, "url": url}
        try:
            r = await e.client.get("models", timeout=self.timeout_s)
        except httpx.TimeoutException:
            raise EngineUnreachable(f"The engine at {url} did not answer GET {url}/models within "
                                    f"{self.timeout_s:g} s.", details={**where, "reason": "timeout"}) from None
        except httpx.TransportError as exc:
            raise EngineUnreachable(f"The engine at {url} does not answer ({type(exc).__name__}: {exc}). Check that "
                                    "it is running and that the URL is right (it usually ends in /v1).",
                                    details={**where, "reason": "connection"}) from None
        if r.status_code in (401, 403):
            raise AccessDenied(f"The engine at {url} refused the API key (HTTP {r.status_code}): register it again "
                               "with the right api_key.", details=where)
        if r.status_code != 200:
            said = _quote(e, _message(r))
            raise EngineError(f"GET {url}/models answered HTTP {r.status_code} ({said}); is this the engine's "
                              f"OpenAI base URL (e.g. {EXAMPLE_ENGINE_URL})?", details=where)
        try:
            served = [m["id"] for m in r.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise EngineError(f"GET {url}/models did not answer an OpenAI model list; is this the engine's OpenAI "
                              f"base URL (e.g. {EXAMPLE_ENGINE_URL})?", details=where) from None
        if e.spec.model not in served:
            raise ModelNotFound(f"The engine at {url} does not serve {e.spec.model!r}; it serves: "
                                f"{', '.join(map(str, served)) or 'nothing'}. Register it with one of these names.",
                                details={**where, "served": served})
        return (time.monotonic() - t0) * 1000

    async def _check(self, e: _Engine) -> float | None:
        """Probe and update the state; the latency when the engine is healthy, else None."""
        try:
            latency = await self._probe(e)
        except RbeeError as error:
            slow = error.details.get("reason") == "timeout"
            e.slow_probes = e.slow_probes + 1 if slow else 0
            if not slow or e.slow_probes > self.slow_probes_allowed:
                self._failed(e, error)
            return None
        e.slow_probes = 0
        if e.info.state == WorkerState.FAILED and self._listed(e):  # the engine is back
            e.info.state, e.info.exit_reason = WorkerState.IDLE, None
            log.info("rbee: engine %s at %s answers again", e.info.id, e.spec.url)
            self._notify("ready", e.info)
        return latency

    async def _watch(self, e: _Engine) -> None:
        while self._listed(e):
            await asyncio.sleep(self.health_interval_s or 0)
            await self._check(e)

    def _failed(self, e: _Engine, error: RbeeError) -> None:
        """The engine does not answer (or not properly): fail the worker and every stream it feeds."""
        if not self._listed(e):
            return
        reason = f"{error.code}: {error.message}"
        if e.info.state != WorkerState.FAILED:
            log.warning("rbee: engine %s failed: %s", e.info.id, reason)
            e.info.state, e.info.exit_reason = WorkerState.FAILED, reason
            self._notify("failed", e.info)
        if e.streams:
            cut = type(error)(f"The engine stopped answering during the generation: {error.message}",
                              details=error.details) if e.quote else type(error)(
                f"The engine {_at(e)} stopped answering during the generation ({error.code}).",
                details={"worker_id": e.info.id})
            for job, task in list(e.streams.items()):
                job.fail(cut)
                if task is not asyncio.current_task():
                    task.cancel()

    async def health(self, worker_id: str) -> dict[str, Any]:
        """A live probe now (on demand): the worker's info plus ``reachable`` and ``latency_ms``."""
        e = self._get(worker_id)
        latency = await self._check(e)
        return {**e.info.to_dict(), "reachable": latency is not None,
                "latency_ms": round(latency, 1) if latency is not None else None}

    # --- generation ------------------------------------------------------------------------

    async def generate(self, worker_id: str, req: GenerationRequest, job: Job) -> None:
        e = self._get(worker_id)
        if not e.info.ready:
            raise Conflict(f"Engine worker {worker_id} is {e.info.state}"
                           f"{f' ({e.info.exit_reason})' if e.info.exit_reason else ''}.",
                           details={"worker_id": worker_id, "state": e.info.state})
        path, payload = _upstream_request(req, e.spec.model)
        relay = asyncio.get_running_loop().create_task(self._relay(e, job, path, payload, bool(req.stop)))
        e.streams[job] = relay
        job.on_cancel(relay.cancel)  # closes the upstream request: the engine stops generating
        self._update_busy(e)
        try:
            await asyncio.wait({relay})
        except asyncio.CancelledError:  # server shutting down
            relay.cancel()
            raise
        finally:
            e.streams.pop(job, None)
            e.info.last_used = time.time()
            self._update_busy(e)
        if relay.cancelled():
            job.fail(Cancelled("The generation was cancelled.", details={"request_id": job.id}))
        elif relay.exception() is not None:
            raise relay.exception()  # type: ignore[misc]

    async def _relay(self, e: _Engine, job: Job, path: str, payload: dict[str, Any], has_stops: bool) -> None:
        """POST the request with ``stream: true`` and translate the engine's chunks into ``job``'s events."""
        t0 = time.monotonic()
        first: float | None = None
        count, finish, usage, done = 0, None, None, False
        watchdog = _Watchdog(self.inference_stall_s) if self.inference_stall_s else None
        try:
            async with e.client.stream("POST", path, json=payload, timeout=self._stream_timeout) as r:
                if r.status_code != 200:
                    await r.aread()
                    raise _refusal(e, r)
                job.publish(InferenceStarted(job_id=job.id))
                parser = SSEParser()
                # The body in the transport's own pieces, parsed as bytes: aiter_lines would add a
                # text decoder and a line splitter per piece (bench/RESULTS.md, external engines, has what it saves).
                # Compressed bodies still go through httpx's decoder.
                plain = r.headers.get("content-encoding", "identity") == "identity"
                pieces = r.aiter_raw() if plain else r.aiter_bytes()
                publish = job.publish
                async for piece in pieces:
                    if watchdog is not None:
                        watchdog.last = time.monotonic()
                    for message in parser.feed_bytes(piece):
                        data = message.data
                        if data is None:
                            continue
                        if data == DONE:
                            done = True
                            break
                        chunk = _chunk(e, data)
                        usage = chunk.get("usage") or usage
                        for choice in chunk.get("choices") or ():
                            text = _text(choice)
                            if text:
                                if first is None:
                                    first = time.monotonic()
                                publish(Token(t=text, i=count))
                                count += 1
                            finish = choice.get("finish_reason") or finish
                    if done:
                        break
        except asyncio.CancelledError:
            if watchdog is None or not watchdog.fired:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr] - the stall is ours, not a cancel
            raise self._stalled(e) from None
        except httpx.TimeoutException:
            raise self._stalled(e) from None
        except httpx.TransportError as exc:
            if watchdog is not None:
                watchdog.stop()  # the probe below is bounded by timeout_s; a stall now is no stall
            raise await self._broken(e, f"{type(exc).__name__}: {exc}") from None
        finally:
            if watchdog is not None:
                watchdog.stop()
        if finish is None and not done:
            raise await self._broken(e, "the stream ended before a finish_reason")
        duration = time.monotonic() - t0
        usage = usage if isinstance(usage, dict) else {}
        total = int(usage.get("completion_tokens") or count)
        job.finish(InferenceEnd(
            job_id=job.id, total_tokens=total, duration_ms=int(duration * 1000),
            stop_reason=_stop_reason(finish, has_stops), prompt_tokens=usage.get("prompt_tokens"),
            time_to_first_token_ms=round((first - t0) * 1000, 1) if first else None,
            tokens_per_second=round(total / duration, 2) if duration > 0 else None))

    def _stalled(self, e: _Engine) -> InferenceStalled:
        return InferenceStalled(
            f"The engine {_at(e)} sent nothing for {self.inference_stall_s:g} s; the request was closed. "
            "Raise c.RbeeApp.inference_stall_s if it legitimately takes this long.",
            details={"worker_id": e.info.id, "stall_s": self.inference_stall_s})

    async def _broken(self, e: _Engine, what: str) -> RbeeError:
        """A stream broke off: a probe says whether the engine is gone or just hiccupped.

        When it is gone, ``_failed`` has already ended this stream (and every other one of
        the engine) with the probe's error; what is returned then only reaches the log.
        """
        if await self._check(e) is None and e.info.state == WorkerState.FAILED:
            return EngineUnreachable(f"The engine {_at(e)} stopped answering during the generation ({what}).",
                                     details=_where(e))
        return EngineError(f"The engine {_at(e)} broke off the stream ({what}) but still answers; try again.",
                           details=_where(e))

    # --- stopping --------------------------------------------------------------------------

    async def stop(self, worker_id: str) -> None:
        """Forget the engine (it keeps running); its open streams end with ``CANCELLED``."""
        e = self._get(worker_id)
        self._drop(e, "unloaded", Cancelled(f"Worker {worker_id} was unloaded.", details={"worker_id": worker_id}))
        await self._closed(e)

    def _drop(self, e: _Engine, reason: str, error: RbeeError, *, close: bool = False) -> None:
        """Forget ``e`` now (synchronously, so a cancel callback can call it); ``close``: release it later."""
        if not self._listed(e):
            return
        del self._workers[e.info.id]
        for job, task in list(e.streams.items()):
            job.fail(error)
            task.cancel()
        e.load_job.fail(error)
        for task in list(e.tasks):
            task.cancel()
        e.info.state, e.info.exit_reason = WorkerState.STOPPED, reason
        self._notify("stopped", e.info)
        if close:
            task = asyncio.get_running_loop().create_task(self._closed(e))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _closed(e: _Engine) -> None:
        tasks = [t for t in e.tasks if t is not asyncio.current_task()]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        with contextlib.suppress(Exception):
            await e.client.aclose()

    async def close(self) -> None:
        engines = list(self._workers.values())
        for e in engines:
            self._drop(e, "server shutting down", Cancelled("The server is shutting down."))
        for e in engines:
            await self._closed(e)
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=5)


class _Watchdog:
    """Cancels the current task once ``last`` is ``stall_s`` old: one timer per stall period, not one per read.

    The relay only stamps ``last`` per piece it reads; the timer wakes up when the stall
    could be due at the earliest and sleeps again for what is left, so a stream that keeps
    flowing costs one timer every ``stall_s`` seconds.
    """

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.last = time.monotonic()
        self.fired = False
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(stall_s, self._check)

    def _check(self) -> None:
        idle = time.monotonic() - self.last
        if idle < self.stall_s:
            self._timer = self._loop.call_later(self.stall_s - idle, self._check)
        elif self._task is not None:
            self.fired = True
            self._task.cancel()

    def stop(self) -> None:
        self._timer.cancel()


# --- translation ----------------------------------------------------------------------------

def _upstream_request(req: GenerationRequest, model: str) -> tuple[str, dict[str, Any]]:
    """Our request in OpenAI's words: the path and a streaming body.

    Only what the request sets goes out: ``top_k`` and ``repetition_penalty`` are not OpenAI
    fields, and strict engines (``transformers serve``) refuse unknown ones.
    """
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "max_tokens": req.max_tokens, "temperature": req.temperature}
    if req.top_p != 1.0:
        body["top_p"] = req.top_p
    if req.seed is not None:
        body["seed"] = req.seed
    if req.stop:
        body["stop"] = list(req.stop)
    if req.top_k:
        body["top_k"] = req.top_k
    if req.repetition_penalty != 1.0:
        body["repetition_penalty"] = req.repetition_penalty
    if req.messages is not None:
        return "chat/completions", {**body, "messages": req.messages}
    return "completions", {**body, "prompt": req.prompt}


def _chunk(e: _Engine, data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        raise EngineError(f"The engine {_at(e)} sent a stream chunk that is not JSON: {_quote(e, repr(data[:200]))}.",
                          details={"worker_id": e.info.id}) from None
    if not isinstance(chunk, dict):
        raise EngineError(f"The engine {_at(e)} sent a stream chunk that is not an object.",
                          details={"worker_id": e.info.id})
    if chunk.get("error"):
        raise EngineError(f"The engine {_at(e)} failed during the generation: {_quote(e, _error_text(chunk))}.",
                          details={"worker_id": e.info.id})
    return chunk


def _text(choice: Any) -> str | None:
    """The new text of one streamed choice: ``text`` (completions) or ``delta.content`` (chat)."""
    if not isinstance(choice, dict):
        return None
    if "text" in choice:
        return choice["text"] if isinstance(choice["text"], str) else None
    delta = choice.get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    return content if isinstance(content, str) else None


def _stop_reason(finish: str | None, has_stops: bool) -> str:
    """OpenAI's ``finish_reason`` in our words; ``stop`` is a stop string only if the request had any."""
    if finish == "length":
        return "length"
    return "stop" if has_stops and finish == "stop" else "eos"


def _error_text(data: Any) -> str:
    """The message of an engine's error body, whatever its shape (OpenAI, FastAPI, TGI)."""
    if isinstance(data, dict):
        for key in ("error", "detail", "message"):
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("message") or value.get("msg")
            if isinstance(value, list) and value and isinstance(value[0], dict):
                value = value[0].get("msg")
            if value:
                return str(value)[:500]
    return str(data)[:500]


def _at(e: _Engine) -> str:
    """How a generation's errors name the engine: by URL, or on a shared server (where a shared
    engine's streams reach users who may not see its URL) by its name or worker id."""
    return f"at {e.spec.url}" if e.quote else (e.info.name or e.info.id)


def _where(e: _Engine) -> dict[str, Any]:
    return {"worker_id": e.info.id, "url": e.spec.url} if e.quote else {"worker_id": e.info.id}


def _quote(e: _Engine, said: str) -> str:
    """What the engine said, for an error message; on a shared server only the log gets it.

    An engine's answer is whatever its URL chose to send: on a shared server that could be
    any internal page, so users are told only that the engine refused.
    """
    if e.quote:
        return said
    log.info("rbee: engine %s (%s) said: %s", e.info.id, e.spec.url, said)
    return "its answer is in the server's log"


def engine_aliases(info: WorkerInfo) -> list[str]:
    """The names an engine worker answers to besides its id and ref: its own name, and its model's
    name on the engine (e.g. vLLM's ``meta-llama/Llama-3.1-8B``, which clients use as the OpenAI
    ``model``). Routing ranks a match by the engine's model after the caller's own workers and
    after workers that really hold that hub model (``Hive.route``, the OpenAI routes)."""
    return [n for n in (getattr(info, "name", None), getattr(info, "model", None)) if n]


def _message(r: httpx.Response) -> str:
    try:
        return _error_text(r.json())
    except ValueError:
        return r.text[:200] or r.reason_phrase


def _refusal(e: _Engine, r: httpx.Response) -> RbeeError:
    """An engine that said no before streaming: the same error class a local worker would give."""
    details = {"worker_id": e.info.id, "engine_status": r.status_code}
    said = f"the engine {_at(e)} answered HTTP {r.status_code}: {_quote(e, _message(r))}"
    if r.status_code in (400, 413, 422):
        return InvalidRequest(f"The request was refused: {said}.", details=details)
    if r.status_code in (401, 403):
        return AccessDenied(f"{said[0].upper()}{said[1:]}; register the engine again with the right api_key.",
                            details=details)
    if r.status_code == 404:
        listing = f"GET {e.spec.url}/models" if e.quote else "the engine's /models"
        return ModelNotFound(f"{said[0].upper()}{said[1:]}; check the model name with {listing}.",
                             details=details)
    if r.status_code in (429, 503):
        return WorkerBusy(f"The engine is busy ({said}); try again shortly.", details=details)
    return EngineError(f"The generation failed: {said}.", details=details)
