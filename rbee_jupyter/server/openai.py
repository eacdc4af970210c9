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

from ..core.hive import worker_names
from ..errors import HTTP_ERROR_CODES, InvalidRequest, RbeeError
from ..events import sse_done, to_json
from ..engine.tool_calls import ToolPlan
from .handlers import RbeeHandler
from .sse import open_owned, release
from .tools import ToolAnswer, tool_fields

_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 409: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error", 503: "server_error"}


class OpenAIHandler(RbeeHandler):
    """Base: OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, RbeeError):
            status, code, message = exc.status, exc.code.lower(), exc.message
            param = exc.details.get("field")
        else:
            status, param = status_code, None
            fallback = "internal_error" if status_code >= 500 else f"http_{status_code}"
            code = HTTP_ERROR_CODES.get(status_code, fallback).lower()
            message = getattr(exc, "log_message", None) or HTTPStatus(status_code).phrase
        self.set_status(status if status in range(400, 600) and status != 499 else 500)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"),
                                          "param": param, "code": code}}))

    def resolve_worker(self, model: object, kind: str = "generate") -> str:
        """An OpenAI ``model`` → a ready worker's id of ``kind`` (the hive decides: :meth:`Hive.resolve_model`)."""
        return self.hive.resolve_model(model, self.principal, kind=kind).id


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
        for w in self.hive.served_models(self.principal):
            name = worker_names(w)[0]
            seen.setdefault(name, {"id": name, "object": "model", "created": int(w.created_at), "owned_by": "rbee",
                                   "kind": w.kind})
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
        sub, first = await open_owned(self, job)
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
            release(sub, cancel=True)

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
        if end is None:  # an inference job always ends with end or error; say so if that ever breaks
            raise RbeeError("The generation ended without its end event.")
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
