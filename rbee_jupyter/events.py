"""Event types (the JSON the README's "The events of a stream" shows) and their SSE framing.

Events are small frozen dataclasses so that producers cannot get a field name wrong;
``to_dict`` gives the wire JSON. Progress events are *skippable*: a subscriber that
falls behind may jump to the newest one, because each carries the full state. Tokens
and terminal events are never skipped.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

DONE = "[DONE]"


@dataclass(frozen=True)
class Event:
    """Base: one JSON object on the wire."""

    skippable: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# --- download -----------------------------------------------------------------------

@dataclass(frozen=True)
class DownloadProgress(Event):
    """Whole-repository byte progress; ``bytes_total`` is known before the first byte."""

    skippable: ClassVar[bool] = True
    bytes_downloaded: int
    bytes_total: int
    speed_mbps: float
    files_done: int = 0
    files_total: int = 0
    file: str | None = None
    files_active: dict[str, int] | None = None
    """Per-file detail: bytes on disk of each file being fetched now (files run in parallel)."""
    stage: Literal["downloading"] = "downloading"

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        return {"stage": d.pop("stage"), **d}


@dataclass(frozen=True)
class DownloadComplete(Event):
    local_path: str
    model_ref: str | None = None
    revision: str | None = None
    size_bytes: int | None = None
    stage: Literal["complete"] = "complete"

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        return {"stage": d.pop("stage"), **d}


@dataclass(frozen=True)
class ImportProgress(Event):
    """A GGUF file being turned into safetensors (after its download, before loading)."""

    skippable: ClassVar[bool] = True
    step: str
    fraction: float
    stage: Literal["importing"] = "importing"

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        return {"stage": d.pop("stage"), **d}


# --- loading ------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadingProgress(Event):
    """One block placed; ``vram_mb`` is what the model holds on ``device`` afterwards."""

    skippable: ClassVar[bool] = True
    layers_loaded: int
    layers_total: int
    vram_mb: int
    device: str
    block: str | None = None
    memory_mb: dict[str, int] | None = None
    node: str | None = None  # the cluster node the worker runs on (pools that place workers remotely)
    timestamp: int | None = None  # ms since the epoch when the block was placed, on the worker's clock
    stage: Literal["loading_to_vram"] = "loading_to_vram"

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        return {"stage": d.pop("stage"), **d}


@dataclass(frozen=True)
class Ready(Event):
    worker_id: str | None = None
    memory_mb: dict[str, int] | None = None
    node: str | None = None
    stage: Literal["ready"] = "ready"

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        return {"stage": d.pop("stage"), **d}


# --- inference ----------------------------------------------------------------------

@dataclass(frozen=True)
class InferenceStarted(Event):
    job_id: str
    timestamp: int = field(default_factory=lambda: int(time.time() * 1000))
    type: Literal["started"] = "started"

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        return {"type": d.pop("type"), **d}


@dataclass(frozen=True)
class Heartbeat(Event):
    """Worker to pool only: a request is alive although it has sent no text for a while.

    ``queued`` is its place in line (0: in the batch, computing tokens that make no text yet,
    e.g. bytes of a character still incomplete). Sent about every
    :data:`~rbee_jupyter.worker.batcher.HEARTBEAT_S`, and only while the batch makes progress,
    so the pool's ``inference_stall_s`` watchdog measures a stuck worker, not time in line
    behind long generations or tokens held back by the detokenizer. A worker whose steps stop
    sends none, and its requests stall. Pools do not relay it to clients.
    """

    queued: int = 0
    type: Literal["heartbeat"] = "heartbeat"

    def to_dict(self) -> dict[str, Any]:
        return {"type": "heartbeat", "queued": self.queued}


@dataclass(frozen=True)
class Token(Event):
    t: str
    i: int
    type: Literal["token"] = "token"

    def to_dict(self) -> dict[str, Any]:
        return {"type": "token", "t": self.t, "i": self.i}


@dataclass(frozen=True)
class InferenceEnd(Event):
    job_id: str
    total_tokens: int
    duration_ms: int
    stop_reason: str
    prompt_tokens: int | None = None
    time_to_first_token_ms: float | None = None
    tokens_per_second: float | None = None
    type: Literal["end"] = "end"

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        return {"type": d.pop("type"), **d}


# --- errors -------------------------------------------------------------------------

@dataclass(frozen=True)
class ErrorEvent(Event):
    """A job's failure. Download and loading streams say ``stage``, inference says ``type``."""

    message: str
    code: str
    details: dict[str, Any] | None = None
    style: Literal["stage", "type"] = "stage"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {self.style: "error", "message": self.message, "code": self.code}
        if self.details:
            d["details"] = self.details
        return d


# --- server-wide feed ---------------------------------------------------------------

@dataclass(frozen=True)
class FeedEvent(Event):
    """An entry of the server-wide feed: what changed (``topic``) and its new state."""

    topic: str
    data: dict[str, Any]
    skippable: ClassVar[bool] = False

    def to_dict(self) -> dict[str, Any]:
        return {"topic": self.topic, **self.data}


# --- SSE framing --------------------------------------------------------------------

_UNSAFE = re.compile("[\u2028\u2029\x85\ud800-\udfff]")


def to_json(obj: Any) -> str:
    """Compact JSON for one SSE ``data:`` line, UTF-8 kept, safe for every line splitter.

    JSON leaves U+2028, U+2029 and U+0085 raw, but ``str.splitlines`` (httpx's
    ``iter_lines``, hence httpx-sse and our own relay) breaks lines there, which would cut
    an event holding one in two; a lone surrogate (legal in JSON text) cannot be encoded
    as UTF-8 at all. Only JSON strings can hold these, where ``\\uXXXX`` is the same text,
    so escaping them changes nothing a JSON parser sees.
    """
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def sse_event(event_id: int | None, data: str | dict[str, Any]) -> bytes:
    """Frame one event: ``id:`` (for ``Last-Event-ID``), one JSON object on ``data:``."""
    payload = data if isinstance(data, str) else to_json(data)
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}data: {payload}\n\n".encode()


def sse_comment(text: str = "keep-alive") -> bytes:
    """A comment line: proxies see traffic, clients ignore it."""
    return f": {text}\n\n".encode()


def sse_done() -> bytes:
    """The last frame of every stream, after errors and cancels too."""
    return f"data: {DONE}\n\n".encode()


def dumps(event: Event) -> str:
    return to_json(event.to_dict())
