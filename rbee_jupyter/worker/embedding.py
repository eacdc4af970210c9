"""The embedding worker: a :class:`WorkerRuntime` whose model embeds instead of generating.

Same process, same loading stream, same lifecycle (cancel, shutdown, health) as a
generating worker; only the model and the one route differ. The model comes whole from
sentence-transformers (one "block"), so its load stream is one progress event then
``ready``. Requests answer with JSON, not SSE: an embedding has no tokens to stream.

Requests that arrive while an ``encode`` runs wait in a queue; the next ``encode`` takes
all of them, up to ``batch_size`` texts, in one call (continuous batching, as the
generating worker's decoder does), so eight notebook cells or RAG workers embedding at once
cost about one forward pass, not eight in a row. Each caller gets exactly its own rows.

The vectors cross the process boundary as base64 float32 (exact, and a quarter of the
bytes of JSON numbers); the OpenAI layer turns them into what the client asked for.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..errors import Conflict, ModelNotLoaded, WorkerBusy
from ..events import Ready
from ..protocol import EMBEDDING
from .runtime import WorkerRuntime, WorkerState

__all__ = ["EmbeddingRuntime", "EMBEDDING"]


@dataclass
class _Progress:
    """The loader's progress shape, for the one block an embedding model is."""

    layers_loaded: int
    layers_total: int
    block: str
    device: str
    bytes_on_device: dict[str, int] = field(default_factory=dict)


@dataclass
class _Waiting:
    """One request in the queue, and where its ``(token counts, vectors)`` go."""

    req: Any  # engine.embed.EmbeddingRequest
    done: asyncio.Future


class EmbeddingRuntime(WorkerRuntime):
    """Loads a sentence-transformers model and answers :meth:`embed`; refuses generations.

    ``token_delay_s`` (the test hook behind ``RBEE_WORKER_TOKEN_DELAY_S``) is, here, a pause
    in each ``encode``: tests send requests together and know they queue behind the first.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._embedder: Any = None  # engine.embed.Embedder, set once loaded
        self._in_flight = 0
        self._queue: deque[_Waiting] = deque()
        self._drainer: asyncio.Task | None = None
        self.embed_requests = 0

    def _load(self) -> None:
        """Loading thread: import, read the model onto its device, report it as one block."""
        timeline = self.load_timeline
        try:
            from ..engine.embed import Embedder

            timeline.mark("imports")
            c = self.config
            device = c.devices[0] if c.devices else "cpu"
            embedder = Embedder.load(c.model_path, device=device, batch_size=int(c.extra.get("batch_size", 32)),
                                     confined=c.confined,
                                     on_loaded=lambda n: self._on_progress(
                                         _Progress(1, 1, "model", device, {device: n})))
            timeline.mark("finish")
        except BaseException as exc:  # noqa: BLE001 - every failure must become an error event
            self._load_crashed(exc)
        else:
            print(f"rbee embedding worker {self.config.worker_id}: {timeline.describe()}", file=sys.stderr,
                  flush=True)
            self.loop.call_soon_threadsafe(self._embedder_loaded, embedder)

    def _embedder_loaded(self, embedder: Any) -> None:
        if self.state is not WorkerState.LOADING:  # shut down meanwhile
            return
        self._embedder = embedder
        self.state = WorkerState.IDLE
        self.load_job.finish(Ready(worker_id=self.config.worker_id, memory_mb=self.memory_mb))

    def submit(self, body: Any) -> Any:
        raise Conflict("This worker holds an embedding model: it embeds (POST openai/v1/embeddings) and does "
                       "not generate text. Load a generating model for completions.",
                       details={"kind": EMBEDDING, "worker_id": self.config.worker_id})

    async def embed(self, body: Any) -> dict[str, Any]:
        """Embed ``body["input"]`` (validated here too: the worker trusts no caller).

        Returns ``{"embeddings": [base64 float32...], "dimension", "prompt_tokens"}``.
        The request waits for the next ``encode``, which it shares with every request then
        waiting (up to ``batch_size`` texts); up to ``queue_depth`` requests wait, beyond
        that ``WorkerBusy``.
        """
        from ..engine.embed import EmbeddingRequest, encode_base64

        if self.state is WorkerState.LOADING:
            raise ModelNotLoaded("The model is still loading; wait for the load stream's 'ready' event.",
                                 details={"state": self.state.value})
        if self._embedder is None or self.state not in (WorkerState.IDLE, WorkerState.BUSY):
            raise Conflict(f"This worker is {self.state.value} and takes no requests.",
                           details={"state": self.state.value})
        req = EmbeddingRequest.from_json(body)
        if self._in_flight > self.config.queue_depth:
            raise WorkerBusy(f"The worker is busy: {self._in_flight} embedding requests running or queued "
                             f"(queue_depth {self.config.queue_depth}). Retry later.",
                             details={"queue_length": self._in_flight - 1, "queue_depth": self.config.queue_depth})
        waiting = _Waiting(req, self.loop.create_future())
        self._queue.append(waiting)
        self._in_flight += 1
        self.embed_requests += 1
        self.state = WorkerState.BUSY
        if self._drainer is None or self._drainer.done():
            self._drainer = self.loop.create_task(self._drain())
        try:
            counts, vectors = await waiting.done
        finally:
            self._in_flight -= 1
            if self._in_flight == 0 and self.state is WorkerState.BUSY:
                self.state = WorkerState.IDLE
        return {"embeddings": [encode_base64(v) for v in vectors], "dimension": int(vectors.shape[1]),
                "prompt_tokens": sum(counts)}

    async def _drain(self) -> None:
        """Encode the queue, group by group, until it is empty (one task at a time)."""
        while self._queue:
            group = self._next_group()
            if not group:
                continue
            try:
                results = await asyncio.to_thread(self._encode_group, [w.req for w in group])
            except asyncio.CancelledError:  # the worker stops: nobody may wait forever
                for w in (*group, *self._queue):
                    w.done.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - the model failed: every caller of the group gets it
                results = [exc] * len(group)
            for w, result in zip(group, results):
                if w.done.done():  # its caller went away meanwhile
                    continue
                if isinstance(result, BaseException):
                    w.done.set_exception(result)
                else:
                    w.done.set_result(result)

    def _next_group(self) -> list[_Waiting]:
        """The requests at the head of the queue, up to ``batch_size`` texts (always at least one)."""
        group: list[_Waiting] = []
        texts = 0
        while self._queue:
            head = self._queue[0]
            if head.done.done():  # its caller went away while it waited
                self._queue.popleft()
                continue
            if group and texts + len(head.req.texts) > self._embedder.batch_size:
                break
            group.append(self._queue.popleft())
            texts += len(head.req.texts)
        return group

    def _encode_group(self, reqs: list[Any]) -> list[Any]:
        """Worker thread: check each request (alone), then one ``encode`` for those that passed.

        The tokenizer is not thread-safe, so the checks run in the same thread as ``encode``.
        A request that fails its check gets its own error; the others are not affected.
        """
        results: list[Any] = [None] * len(reqs)
        passed: list[tuple[int, list[int]]] = []
        for i, req in enumerate(reqs):
            try:
                passed.append((i, self._embedder.check(req)))
            except Exception as exc:  # noqa: BLE001 - the caller's error (too long, bad dimensions)
                results[i] = exc
        if self.token_delay_s:  # test hook: an encode that takes a while
            time.sleep(self.token_delay_s)
        if passed:
            vectors = self._embedder.encode_many([reqs[i] for i, _ in passed])
            for (i, counts), v in zip(passed, vectors):
                results[i] = (counts, v)
        return results

    def health(self) -> dict[str, Any]:
        data = super().health()
        embedder = self._embedder
        data.update(kind=EMBEDDING, running=None, queue_length=max(0, self._in_flight - 1),
                    dimension=embedder.dimension if embedder is not None else None,
                    batch_size=embedder.batch_size if embedder is not None else None,
                    embed_requests=self.embed_requests,
                    encode_calls=embedder.encode_calls if embedder is not None else 0)
        return data
