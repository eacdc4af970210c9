"""OpenAI-compatible routes over the hive: ``openai/v1/models``, ``chat/completions``, ``completions``.

So that ``OpenAI(base_url=f"{server}rbee/openai/v1", api_key=jupyter_token)`` — and
everything built on the openai SDK (jupyter-ai, LangChain, editors) — talks to the
loaded models. Requests are translated into the hive's inference request and its
events into OpenAI's objects; errors take OpenAI's shape.
"""

from __future__ import annotations

import abc
import json
import time
from http import HTTPStatus
from typing import Any

from jupyter_server.auth.decorator import authorized
from tornado import web
from tornado.iostream import StreamClosedError

from ..errors import Conflict, InvalidRequest, ModelNotFound, RbeeError
from ..events import sse_done, to_json
from ..core.refs import parse_ref
from ..engine.tool_calls import ToolPlan
from .handlers import _HTTP_CODES, RbeeHandler
from .tools import ToolAnswer, tool_fields

_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "invalid_request_error", 413: "invalid_request_error",
                503: "server_error"}


def _model_id(ref: str) -> str:
    """The ``model`` name clients use: the ref without ``hf:`` (``org/repo``)."""
    try:
        return parse_ref(ref).display_name
    except RbeeError:
        return ref


def _names(w: Any) -> list[str]:
    """Every ``model`` a worker answers to; the first is the one ``GET models`` lists.

    An external engine answers to its configured name and its model's name on the engine.
    """
    engine = [n for n in (getattr(w, "name", None), getattr(w, "model", None)) if n]
    return [*engine, _model_id(w.model_ref), w.model_ref, w.id]


class OpenAIHandler(RbeeHandler):
    """Base: OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, RbeeError):
            status, code, message = exc.status, exc.code.lower(), exc.message
            param = exc.details.get("field")
        else:
            status, param = status_code, None
            code = _HTTP_CODES.get(status_code, "internal_error" if status_code >= 500 else f"http_{status_code}").lower()
            message = getattr(exc, "log_message", None) or HTTPStatus(status_code).phrase
        self.set_status(status if status in range(400, 600) and status != 499 else 500)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"),
                                          "param": param, "code": code}}))

    def resolve_worker(self, model: object, kind: str = "generate") -> str:
        """An OpenAI ``model`` → a ready worker of ``kind``: by worker id, ref, or ``org/repo``."""
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model is required: one of GET openai/v1/models.", details={"field": "model"})
        principal = self.principal
        workers = [w for w in self.hive.pool.list() if self.hive.may_use_worker(principal, w)]
        other = [w for w in workers if getattr(w, "kind", "generate") != kind and model in _names(w)]
        workers = [w for w in workers if getattr(w, "kind", "generate") == kind]
        if other and not any(model in _names(w) for w in workers):
            raise InvalidRequest(f"The model {model!r} is an {other[0].kind} model; this route needs one that "
                                 f"{'embeds' if kind == 'embedding' else 'generates text'}.",
                                 details={"field": "model", "kind": other[0].kind})
        ready = [w for w in workers if w.state in ("idle", "busy")]
        for w in sorted(ready, key=lambda w: (w.state != "idle", w.last_used)):
            if model in _names(w):
                return w.id
        for w in workers:  # there, but not usable: say why rather than "not loaded"
            if model in _names(w):
                why = f" ({w.exit_reason})" if w.exit_reason else ""
                raise Conflict(f"The model {model!r} (worker {w.id}) is {w.state}{why}.",
                               details={"field": "model", "worker_id": w.id, "state": w.state})
        raise ModelNotFound(f"The model {model!r} is not loaded. Load it first (POST rbee/v1/workers or "
                            f"%rbee load); loaded: {', '.join(_names(w)[0] for w in ready) or 'none'}.",
                            details={"field": "model"})


def _common(body: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields both routes share, in the hive's vocabulary."""
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise InvalidRequest("Only n=1 is supported.", details={"field": "n"})
    out: dict[str, Any] = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    out["temperature"] = body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0
    for key in ("top_p", "seed", "stop"):
        if body.get(key) is not None:
            out[key] = body[key]
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidRequest("stream must be true or false.", details={"field": "stream"})
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("stream_options must be an object.", details={"field": "stream_options"})
    return out


class ModelsHandler(OpenAIHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        seen: dict[str, Any] = {}
        principal = self.principal
        for w in self.hive.pool.list():
            if w.state in ("idle", "busy") and self.hive.may_use_worker(principal, w):
                name = _names(w)[0]
                seen.setdefault(name, {"id": name, "object": "model", "created": int(w.created_at), "owned_by": "rbee",
                                       "kind": getattr(w, "kind", "generate")})
        self.reply(200, {"object": "list", "data": list(seen.values())})


class _CompletionBase(OpenAIHandler, metaclass=abc.ABCMeta):
    """Shared by chat and text completions; subclasses shape the request and the chunks."""

    object_name = ""
    chunk_object = ""

    @abc.abstractmethod
    def request_fields(self, body: dict[str, Any]) -> dict[str, Any]:
        """The route's own fields (``messages`` or ``prompt``) in the hive's vocabulary."""

    @abc.abstractmethod
    def chunk_choice(self, text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
        """One streamed choice: the first (role), a piece of text, or the finish."""

    @abc.abstractmethod
    def full_choice(self, text: str, finish: str) -> dict[str, Any]:
        """The single choice of a non-streamed answer."""

    def text_choices(self, text: str) -> list[dict[str, Any]]:
        """The streamed choices for one piece of text (chat with tools may hold it back)."""
        return [self.chunk_choice(text, None, False)]

    def end_choices(self, finish: str) -> list[dict[str, Any]]:
        """The streamed choices that close the answer."""
        return [self.chunk_choice(None, finish, False)]

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.json_body()
        request = {**_common(body), **self.request_fields(body), "worker_id": self.resolve_worker(body.get("model"))}
        model = body["model"]
        job = self.hive.infer(request, principal=self.principal)
        self._rbee_owned_job = job
        sub = job.subscribe(last_event_id=0)
        self._rbee_subscription = sub
        first = await sub.get()
        if job.state.finished and len(job.records) == 1 and isinstance(job.error, RbeeError):
            raise job.error
        created = int(time.time())
        base = {"id": f"{'chatcmpl' if self.chunk_object.startswith('chat') else 'cmpl'}-{job.id}",
                "created": created, "model": model}
        if body.get("stream"):
            await self._stream(sub, first, base, bool((body.get("stream_options") or {}).get("include_usage")))
        else:
            await self._collect(sub, first, base)

    async def _events(self, sub, first):
        record = first
        while record is not None:
            yield json.loads(record.data)
            try:
                record = await sub.get()
            except StopAsyncIteration:
                return

    async def _stream(self, sub, first, base: dict[str, Any], include_usage: bool) -> None:
        from .sse import start_stream

        start_stream(self)

        async def send(obj: dict[str, Any]) -> None:
            self.write(f"data: {to_json(obj)}\n\n".encode())
            await self.flush()

        chunk = {**base, "object": self.chunk_object}
        try:
            await send({**chunk, "choices": [self.chunk_choice(None, None, True)]})
            async for event in self._events(sub, first):
                kind = event.get("type")
                if kind == "token":
                    for choice in self.text_choices(event["t"]):
                        await send({**chunk, "choices": [choice]})
                elif kind == "end":
                    for choice in self.end_choices(_FINISH.get(event["stop_reason"], "stop")):
                        await send({**chunk, "choices": [choice]})
                    if include_usage:
                        await send({**chunk, "choices": [], "usage": _usage(event)})
                elif kind == "error":
                    await send({"error": {"message": event["message"], "type": "server_error", "param": None,
                                          "code": event["code"].lower()}})
            self.write(sse_done())
            await self.flush()
        except StreamClosedError:  # the client went away: the finally below cancels its work
            pass
        finally:
            sub.close()
            if not sub.job.state.finished:
                sub.job.cancel("The client went away.")

    async def _collect(self, sub, first, base: dict[str, Any]) -> None:
        text, end = [], None
        async for event in self._events(sub, first):
            if event.get("type") == "token":
                text.append(event["t"])
            elif event.get("type") == "end":
                end = event
            elif event.get("type") == "error":
                raise sub.job.error if isinstance(sub.job.error, RbeeError) else RbeeError(event["message"],
                                                                                        code=event["code"])
        assert end is not None
        self.reply(200, {**base, "object": self.object_name,
                         "choices": [self.full_choice("".join(text), _FINISH.get(end["stop_reason"], "stop"))],
                         "usage": _usage(end)})


def _usage(end: dict[str, Any]) -> dict[str, int]:
    prompt = int(end.get("prompt_tokens") or 0)
    completion = int(end.get("total_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class ChatCompletionsHandler(_CompletionBase):
    object_name, chunk_object = "chat.completion", "chat.completion.chunk"

    def request_fields(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("messages must be a non-empty list of {role, content}.", details={"field": "messages"})
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise InvalidRequest(f"messages[{i}] has no role.", details={"field": "messages"})
            content = m.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            out.append({**{k: m[k] for k in ("tool_calls", "tool_call_id") if k in m},
                        "role": m["role"], "content": content})
        fields: dict[str, Any] = {"messages": out}
        if body.get("response_format") is not None:  # checked by the hive, enforced by the worker's grammar
            fields["response_format"] = body["response_format"]
        plan, tool_fields_ = tool_fields(body)
        self._tools = ToolAnswer(plan)
        return {**fields, **tool_fields_}

    _tools = ToolAnswer(ToolPlan("none"))

    def text_choices(self, text: str) -> list[dict[str, Any]]:
        if not self._tools.active:
            return super().text_choices(text)
        return [_delta(d) for d in self._tools.deltas(text)]

    def end_choices(self, finish: str) -> list[dict[str, Any]]:
        if not self._tools.active:
            return super().end_choices(finish)
        deltas, is_call = self._tools.final_deltas()
        return [*map(_delta, deltas), self.chunk_choice(None, "tool_calls" if is_call and finish == "stop" else finish,
                                                         False)]

    def chunk_choice(self, text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
            {"content": text} if text is not None else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def full_choice(self, text: str, finish: str) -> dict[str, Any]:
        message, is_call = self._tools.message(text)
        return {"index": 0, "message": message, "logprobs": None,
                "finish_reason": "tool_calls" if is_call and finish == "stop" else finish}


def _delta(delta: dict[str, Any]) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}


class CompletionsHandler(_CompletionBase):
    object_name, chunk_object = "text_completion", "text_completion"

    def request_fields(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InvalidRequest("prompt must be a string.", details={"field": "prompt"})
        return {"prompt": prompt}

    def chunk_choice(self, text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def full_choice(self, text: str, finish: str) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


def openai_handlers(kw: dict[str, Any]) -> list[tuple[str, type, dict[str, Any]]]:
    return [
        (r"/rbee/openai/v1/models", ModelsHandler, kw),
        (r"/rbee/openai/v1/chat/completions", ChatCompletionsHandler, kw),
        (r"/rbee/openai/v1/completions", CompletionsHandler, kw),
        (r"/rbee/openai/v1/embeddings", EmbeddingsHandler, kw),
    ]


from .embeddings import EmbeddingsHandler  # noqa: E402 - it subclasses OpenAIHandler above
