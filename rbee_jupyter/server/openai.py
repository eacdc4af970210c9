"""OpenAI-compatible routes over the hive: ``openai/v1/models``, ``chat/completions``, ``completions``.

So that ``OpenAI(base_url=f"{server}rbee/openai/v1", api_key=jupyter_token)`` — and
everything built on the openai SDK (jupyter-ai, LangChain, editors) — talks to the
loaded models. Requests are translated into the hive's inference request and its
events into OpenAI's objects; errors take OpenAI's shape.
"""

from __future__ import annotations

import abc
import asyncio
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


#: Most choices one request may ask for (``n``): each is a sequence in the worker's batch.
MAX_CHOICES = 8


def _choices(body: dict[str, Any]) -> int:
    n = body.get("n", 1)
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
        raise InvalidRequest(f"n must be an integer between 1 and {MAX_CHOICES}.", details={"field": "n"})
    return n


def _common(body: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields both routes share, in the hive's vocabulary."""
    _choices(body)
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
    def full_choice(self, i: int, text: str, finish: str) -> dict[str, Any]:
        """Choice ``i`` of a non-streamed answer."""

    def text_choices(self, i: int, text: str) -> list[dict[str, Any]]:
        """The streamed choices for one piece of choice ``i``'s text (chat with tools may hold it back)."""
        return [self.chunk_choice(text, None, False)]

    def end_choices(self, i: int, finish: str) -> list[dict[str, Any]]:
        """The streamed choices that close choice ``i``."""
        return [self.chunk_choice(None, finish, False)]

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.json_body()
        n = _choices(body)
        request = {**_common(body), **self.request_fields(body), "worker_id": self.resolve_worker(body.get("model"))}
        model = body["model"]
        jobs = self._start(request, n)
        opened = []
        try:
            for job in jobs:  # a choice refused before its first event (queue full) refuses the request
                opened.append(await open_owned(self, job, cancel_on_close=n == 1))
        except RbeeError:
            for job in jobs:
                job.cancel("Another choice of the request was refused.")
            raise
        subs, firsts = [sub for sub, _ in opened], [first for _, first in opened]
        created = int(time.time())
        base = {"id": f"{'chatcmpl' if self.chunk_object.startswith('chat') else 'cmpl'}-{jobs[0].id}",
                "created": created, "model": model}
        events = _merged(subs, firsts)
        if body.get("stream"):
            await self._stream(subs, events, base, bool((body.get("stream_options") or {}).get("include_usage")))
        else:
            await self._collect(subs, events, base)

    def _start(self, request: dict[str, Any], n: int) -> list[Any]:
        """One generation per choice, all on the same worker so they share its batch.

        With a seed, choice ``i`` uses ``seed + i``: reproducible, yet the choices differ.
        """
        jobs: list[Any] = []
        try:
            for i in range(n):
                seed = request.get("seed")
                choice = request if seed is None or i == 0 else {**request, "seed": seed + i}
                jobs.append(self.hive.infer(choice, principal=self.principal))
        except RbeeError:
            for job in jobs:
                job.cancel("Another choice of the request was refused.")
            raise
        self._rbee_owned_job = jobs[0] if n == 1 else None
        self._rbee_owned_jobs = jobs
        return jobs

    def on_connection_close(self) -> None:
        for job in getattr(self, "_rbee_owned_jobs", ()):
            if not job.state.finished:
                job.cancel("The client went away.")
        super().on_connection_close()

    async def _stream(self, subs, events, base: dict[str, Any], include_usage: bool) -> None:
        from .sse import start_stream

        start_stream(self)

        async def send(obj: dict[str, Any]) -> None:
            self.write(f"data: {to_json(obj)}\n\n".encode())
            await self.flush()

        chunk = {**base, "object": self.chunk_object}
        ends: list[dict[str, Any]] = []
        try:
            for i in range(len(subs)):
                await send({**chunk, "choices": [{**self.chunk_choice(None, None, True), "index": i}]})
            async for i, event in events:
                kind = event.get("type")
                if kind == "token":
                    for choice in self.text_choices(i, event["t"]):
                        await send({**chunk, "choices": [{**choice, "index": i}]})
                elif kind == "end":
                    for choice in self.end_choices(i, _FINISH.get(event["stop_reason"], "stop")):
                        await send({**chunk, "choices": [{**choice, "index": i}]})
                    ends.append(event)
                elif kind == "error":
                    await send({"error": {"message": event["message"], "type": "server_error", "param": None,
                                          "code": event["code"].lower()}})
            if include_usage and len(ends) == len(subs):
                await send({**chunk, "choices": [], "usage": _usage(ends)})
            self.write(sse_done())
            await self.flush()
        except StreamClosedError:  # the client went away: the finally below cancels its work
            pass
        finally:
            _cancel_all(subs)

    async def _collect(self, subs, events, base: dict[str, Any]) -> None:
        texts: list[list[str]] = [[] for _ in subs]
        ends: dict[int, dict[str, Any]] = {}
        try:
            async for i, event in events:
                if event.get("type") == "token":
                    texts[i].append(event["t"])
                elif event.get("type") == "end":
                    ends[i] = event
                elif event.get("type") == "error":
                    job = subs[i].job
                    raise job.error if isinstance(job.error, RbeeError) else RbeeError(event["message"],
                                                                                    code=event["code"])
        finally:
            _cancel_all(subs)
        if len(ends) != len(subs):  # an inference job always ends with end or error; say so if that ever breaks
            raise RbeeError("A generation ended without its end event.")
        choices = [{**self.full_choice(i, "".join(texts[i]), _FINISH.get(ends[i]["stop_reason"], "stop")), "index": i}
                   for i in range(len(subs))]
        self.reply(200, {**base, "object": self.object_name, "choices": choices,
                         "usage": _usage([ends[i] for i in range(len(subs))])})


async def _merged(subs, firsts):
    """``(choice index, event)`` from every subscription, in the order they come, until all end."""
    async def one(i: int, sub, first, out: asyncio.Queue) -> None:
        record = first
        try:
            while record is not None:
                await out.put((i, json.loads(record.data)))
                try:
                    record = await sub.get()
                except StopAsyncIteration:
                    return
        finally:
            await out.put((i, None))

    queue: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.ensure_future(one(i, sub, first, queue)) for i, (sub, first) in enumerate(zip(subs, firsts))]
    open_streams = len(tasks)
    try:
        while open_streams:
            i, event = await queue.get()
            if event is None:
                open_streams -= 1
            else:
                yield i, event
    finally:
        for task in tasks:
            task.cancel()


def _cancel_all(subs) -> None:
    """Close the subscriptions; a generation nobody reads any more stops."""
    for sub in subs:
        release(sub, cancel=True)


def _usage(ends: list[dict[str, Any]]) -> dict[str, int]:
    """One prompt (counted once, as OpenAI does) and the completion tokens of every choice."""
    prompt = int(ends[0].get("prompt_tokens") or 0) if ends else 0
    completion = sum(int(end.get("total_tokens") or 0) for end in ends)
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
        self._answers = [ToolAnswer(plan) for _ in range(_choices(body))]  # each choice its own parser
        return {**fields, **tool_fields_}

    def text_choices(self, i: int, text: str) -> list[dict[str, Any]]:
        if not self._answers[i].active:
            return super().text_choices(i, text)
        return [_delta(d) for d in self._answers[i].deltas(text)]

    def end_choices(self, i: int, finish: str) -> list[dict[str, Any]]:
        if not self._answers[i].active:
            return super().end_choices(i, finish)
        deltas, is_call = self._answers[i].final_deltas()
        return [*map(_delta, deltas), self.chunk_choice(None, "tool_calls" if is_call and finish == "stop" else finish,
                                                         False)]

    def chunk_choice(self, text: str | None, finish: str | None, first: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
            {"content": text} if text is not None else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def full_choice(self, i: int, text: str, finish: str) -> dict[str, Any]:
        message, is_call = self._answers[i].message(text)
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

    def full_choice(self, i: int, text: str, finish: str) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


def openai_handlers(kw: dict[str, Any]) -> list[tuple[str, type, dict[str, Any]]]:
    return [
        (r"/rbee/openai/v1/models", ModelsHandler, kw),
        (r"/rbee/openai/v1/chat/completions", ChatCompletionsHandler, kw),
        (r"/rbee/openai/v1/completions", CompletionsHandler, kw),
        (r"/rbee/openai/v1/embeddings", EmbeddingsHandler, kw),
    ]


from .embeddings import EmbeddingsHandler  # noqa: E402 - it subclasses OpenAIHandler above
