"""The embedding worker: a :class:`WorkerRuntime` whose model embeds instead of generating.

Same process, same loading stream, same lifecycle (cancel, shutdown, health) as a
generating worker; only the model and the one route differ. The model comes whole from
sentence-transformers (one "block"), so its load stream is one progress event then
``ready``. Requests answer with JSON, not SSE: an embedding has no tokens to stream.

The vectors cross the process boundary as base64 float32 (exact, and a quarter of the
bytes of JSON numbers); the OpenAI layer turns them into what the client asked for.
"""

from __future__ import annotations

import asyncio
import sys
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


class EmbeddingRuntime(WorkerRuntime):
    """Loads a sentence-transformers model and answers :meth:`embed`; refuses generations."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._embedder: Any = None  # engine.embed.Embedder, set once loaded
        self._in_flight = 0

    def _load(self) -> None:
        """Loading thread: import, read the model onto its device, report it as one block."""
        timeline = self.load_timeline
        try:
            from ..engine.embed import Embedder

            timeline.mark("imports")
            c = self.config
            device = c.devices[0] if c.devices else "cpu"
            embedder = Embedder.load(c.model_path, device=device, batch_size=int(c.extra.get("batch_size", 32)),
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
        Requests run one at a time in a thread (each in batches of ``batch_size``); up to
        ``queue_depth`` more wait, beyond that ``WorkerBusy``.
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
        embedder = self._embedder

        def run() -> tuple[list[int], Any]:
            counts = embedder.check(req)  # the tokenizer is not thread-safe: same thread as encode
            return counts, embedder.encode(req)

        self._in_flight += 1
        self.state = WorkerState.BUSY
        try:
            counts, vectors = await asyncio.to_thread(run)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0 and self.state is WorkerState.BUSY:
                self.state = WorkerState.IDLE
        return {"embeddings": [encode_base64(v) for v in vectors], "dimension": int(vectors.shape[1]),
                "prompt_tokens": sum(counts)}

    def health(self) -> dict[str, Any]:
        data = super().health()
        data.update(kind=EMBEDDING, running=None, queue_length=max(0, self._in_flight - 1),
                    dimension=self._embedder.dimension if self._embedder is not None else None)
        return data
