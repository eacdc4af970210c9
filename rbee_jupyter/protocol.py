"""The types both ends share: requests, worker states and snapshots, load specs, option names.

Why one module: the server parses a body once at its edge into these types and hands them
inward (hive, pools, worker process, Ray actor, client), so a field, a default or a state
name is declared once. It imports neither torch nor tornado, so the server, the kernel
client and the worker's start-up can all import it cheaply (``tests/test_layers.py``
checks that, and import-linter keeps it at the bottom of the layers).
"""

from __future__ import annotations

import json
import re
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .errors import InvalidRequest
from .response_format import ResponseFormat

if TYPE_CHECKING:
    from .core.egress import EgressPolicy

__all__ = ["WORKER_KINDS", "EMBEDDING",
           "WorkerState", "READY_STATES", "ACTIVE_STATES", "GONE_STATES", "QUANTIZATIONS", "DTYPES", "DTYPE_NAMES",
           "GenerationRequest", "WorkerInfo", "WorkerSpec", "WorkerConfig", "MAX_TOKENS_LIMIT", "QUEUE_DEPTH",
           "INFERENCE_STALL_S", "LOADING_TIMEOUT_S", "FAILED_RETENTION_S", "is_int",
           "BACKENDS", "EngineSpec", "EngineInfo", "backend_of",
           "Record", "CatalogEntry", "DeviceInfo", "WorkerView"]


# --- defaults (the traits, dataclasses and pools that take these settings all read them here) ---

#: Largest ``max_tokens`` a request may ask for (``c.RbeeApp.max_tokens_limit``).
MAX_TOKENS_LIMIT = 4096
#: Generations that may wait for a worker before 503 ``WORKER_BUSY`` (``c.RbeeApp.queue_depth``).
QUEUE_DEPTH = 8
#: Seconds a started generation may send nothing before ``INFERENCE_STALLED`` (``c.Pool.inference_stall_s``).
INFERENCE_STALL_S = 120.0
#: Seconds without a byte before a transfer is retried, then ``DOWNLOAD_STALLED`` (``c.RbeeApp.download_stall_s``).
DOWNLOAD_STALL_S = 60.0
#: Tries per file of a download, each resuming (``c.RbeeApp.download_retries``).
DOWNLOAD_RETRIES = 6
#: First wait between tries of a download, doubled each time (``c.RbeeApp.download_backoff_s``).
DOWNLOAD_BACKOFF_S = 0.5
#: HTTP transfers of one download at once, files and segments (``c.RbeeApp.download_connections``).
DOWNLOAD_CONNECTIONS = 8
#: Files of at least twice this many MiB come as ranged segments (``c.RbeeApp.download_segment_mb``).
DOWNLOAD_SEGMENT_MB = 8.0
#: A big file's first connection at least this fast (MB/s) is taken as uncapped: its segments then
#: go one after another over it (``c.RbeeApp.download_spread_below_mbps``).
DOWNLOAD_SPREAD_BELOW_MBPS = 150.0
#: Seconds a load may take before ``LOADING_TIMEOUT`` (``c.Pool.loading_timeout_s``).
LOADING_TIMEOUT_S = 1800.0
#: Seconds a failed worker stays listed with its reason (``c.Pool.failed_retention_s``).
FAILED_RETENTION_S = 600.0


# --- names ---------------------------------------------------------------------------------

class WorkerState(str, Enum):
    """Where a worker is in its life. A ``str``: JSON, comparisons with ``"idle"`` and f-strings are unchanged."""

    LOADING = "loading"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPED = "stopped"

    def __str__(self) -> str:  # "idle", as the plain string it replaces (not "WorkerState.IDLE")
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:  # 'idle' in a WorkerInfo's repr, as a notebook shows it
        return repr(self.value)

    def __hash__(self) -> int:  # as its value's, so "idle" in READY_STATES holds for plain strings too
        return str.__hash__(self)

    @property
    def ready(self) -> bool:
        """Whether it can take a generation now (idle, or busy with room in its queue)."""
        return self in READY_STATES


#: The states in which a worker serves generations.
READY_STATES = frozenset({WorkerState.IDLE, WorkerState.BUSY})
#: The states of a worker that holds (or is getting) a model: ready, or still loading.
ACTIVE_STATES = READY_STATES | {WorkerState.LOADING}
#: The states of a worker that holds nothing any more (its entry stays a while to say why).
GONE_STATES = frozenset({WorkerState.FAILED, WorkerState.STOPPED})

#: bitsandbytes quantizations a load may ask for (``null``: none).
QUANTIZATIONS: tuple[str, ...] = ("nf4", "fp4", "int8")
#: The dtype names a load accepts, each to its canonical name (the loader maps those to torch dtypes).
DTYPES: dict[str, str] = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                          "float16": "float16", "fp16": "float16", "half": "float16"}
#: The canonical dtype names.
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")

ROLES = frozenset({"system", "user", "assistant", "tool"})
#: What a worker's model does: generate text, or embed it (a sentence-transformers model).
WORKER_KINDS = ("generate", "embedding")
EMBEDDING = "embedding"
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
"""Longest stop string: the matcher holds back and rescans up to this much text at every token."""


# --- generation ----------------------------------------------------------------------------

@dataclass
class GenerationRequest:
    """What to generate and how; exactly one of ``prompt`` and ``messages`` is set."""

    prompt: str | None = None
    messages: list[dict] | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    repetition_penalty: float = 1.0
    response_format: ResponseFormat | None = None  # constrained decoding (engine/grammar.py)
    tools: list[dict] | None = None  # function definitions the chat template renders

    @classmethod
    def from_json(cls, body: Any, *, max_tokens_limit: int = MAX_TOKENS_LIMIT) -> GenerationRequest:
        """Validate an untrusted HTTP body.

        Every rejection names the field (in the message and in ``details["field"]``) so a
        client can point at what to fix. Unknown keys are ignored on purpose: OpenAI-style
        bodies carry ``model``, ``stream`` and more that the routing layer consumes.
        """
        if not isinstance(body, Mapping):
            raise InvalidRequest("the request body must be a JSON object", details={"field": "body"})
        prompt, messages = _prompt_or_messages(body)
        return cls(
            prompt=prompt,
            messages=messages,
            max_tokens=_max_tokens(body, max_tokens_limit),
            temperature=_number(body, "temperature", 0.0, low=0.0, high=2.0),
            top_p=_number(body, "top_p", 1.0, low=0.0, high=1.0, low_open=True),
            top_k=_int(body, "top_k", 0, low=0),
            seed=_seed(body),
            stop=_stop(body),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, low=0.0, low_open=True),
            response_format=ResponseFormat.from_json(body.get("response_format")),
            tools=_tools(body),
        )

    def to_json(self) -> dict[str, Any]:
        """The body that :meth:`from_json` reads back as this request (unset fields left out)."""
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if self.response_format is not None:
            out["response_format"] = self.response_format.to_json()
        return out


def _bad(fld: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, details={"field": fld})


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON ``true`` is no count)."""
    # JSON true/false arrive as bool, which Python treats as int; a client sending
    # "max_tokens": true has a bug we should report, not read as 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _prompt_or_messages(body: Mapping) -> tuple[str | None, list[dict] | None]:
    prompt, messages = body.get("prompt"), body.get("messages")
    if (prompt is None) == (messages is None):
        raise _bad("prompt", "send exactly one of 'prompt' (a string) or 'messages' (a chat list)")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise _bad("prompt", "'prompt' must be a non-empty string")
        return prompt, None
    return None, _messages(messages)


def _messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise _bad("messages", f"'messages[{i}]' must be an object with 'role' and 'content'")
        if msg.get("role") not in ROLES:
            raise _bad("messages", f"'messages[{i}].role' must be one of {sorted(ROLES)}")
        calls = msg.get("tool_calls") if msg["role"] == "assistant" else None
        if calls is not None and not isinstance(calls, list):
            raise _bad("messages", f"'messages[{i}].tool_calls' must be a list")
        if not isinstance(msg.get("content"), str) and not (calls and msg.get("content") is None):
            raise _bad("messages", f"'messages[{i}].content' must be a string")
        item = {"role": msg["role"], "content": msg.get("content") or ""}
        if calls:  # an earlier turn's calls, rendered by the chat template (its arguments as objects)
            item["tool_calls"] = [_template_call(c, i) for c in calls]
        if msg["role"] == "tool" and isinstance(msg.get("tool_call_id"), str):
            item["tool_call_id"] = msg["tool_call_id"]
        out.append(item)
    return out


def _template_call(call: Any, i: int) -> dict:
    """An OpenAI tool call of a past assistant turn, with ``arguments`` parsed for the chat template."""
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise _bad("messages", f"'messages[{i}].tool_calls' items must be "
                               "{\"function\": {\"name\", \"arguments\"}}")
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        raise _bad("messages", f"'messages[{i}].tool_calls' arguments must be JSON") from None
    return {"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}


def _tools(body: Mapping) -> list[dict] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools):
        raise _bad("tools", "'tools' must be a list of {\"type\": \"function\", \"function\": {...}} objects")
    return [dict(t) for t in tools] or None


def _max_tokens(body: Mapping, limit: int) -> int:
    default = min(GenerationRequest.max_tokens, limit)
    return _int(body, "max_tokens", default, low=1, high=limit)


def _int(body: Mapping, name: str, default: int, *, low: int, high: int | None = None) -> int:
    value = body.get(name)
    if value is None:
        return default
    span = f"between {low} and {high}" if high is not None else f">= {low}"
    if not is_int(value) or value < low or (high is not None and value > high):
        raise _bad(name, f"'{name}' must be an integer {span}, got {value!r}")
    return value


def _number(body: Mapping, name: str, default: float, *, low: float, high: float | None = None,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if low_open else value >= low) and (high is None or value <= high))
    if not ok:
        lo = f"> {low}" if low_open else f">= {low}"
        span = f"{lo} and <= {high}" if high is not None else lo
        raise _bad(name, f"'{name}' must be a number {span}, got {value!r}")
    return float(value)


def _seed(body: Mapping) -> int | None:
    value = body.get("seed")
    if value is None:
        return None
    if not is_int(value) or not 0 <= value < 2**63:
        raise _bad("seed", f"'seed' must be an integer between 0 and 2**63-1, got {value!r}")
    return value


def _stop(body: Mapping) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise _bad("stop", f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS} "
                           f"non-empty strings, each at most {MAX_STOP_CHARS} characters")
    return list(stops)


# --- answers: typed, and readable as the dicts they replace -----------------------------------

class Record(Mapping[str, Any]):
    """Typed answers that still read like the JSON objects they came from.

    ``w.state`` is the typed way; ``w["state"]``, ``w.get("state")`` and ``dict(w)`` keep
    working for code written when the client returned plain dicts. Fields the server sends
    that this version does not know land in ``extra`` (also readable by key), so a newer
    server never breaks an older client.
    """

    extra: dict[str, Any]

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name != "extra")  # type: ignore[arg-type]

    def __getitem__(self, key: str) -> Any:
        if key in self._field_names():
            return getattr(self, key)
        return self.extra[key]

    def __iter__(self) -> Iterator[str]:
        yield from self._field_names()
        yield from self.extra

    def __len__(self) -> int:
        return len(self._field_names()) + len(self.extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (the API's shape: ``extra`` merged back in)."""
        data = asdict(self)  # type: ignore[call-overload]
        data.update(data.pop("extra", {}))
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Any:
        """From the API's JSON; unknown keys go to ``extra``."""
        names = set(cls._field_names())
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})


@dataclass(eq=False)
class CatalogEntry(Record):
    """One model on disk (``GET v1/models``). ``revision`` is the commit sha for hub models."""

    ref: str
    local_path: str
    size_bytes: int
    files: list[str]
    revision: str | None = None
    repo_id: str | None = None
    source: str = "hub"
    downloaded_at: float = field(default_factory=time.time)
    owner: str | None = None
    """Who downloaded it, on a shared server (service mode); None otherwise."""
    restricted: bool = False
    """The hub repo is gated or private: on a shared server only users with access may use it."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CatalogEntry) and self.to_dict() == other.to_dict()


@dataclass(eq=False)
class DeviceInfo(Record):
    """A device the hive may use (``GET v1/devices``): memory in bytes, this server's quota and use in MB."""

    name: str
    kind: str
    total_bytes: int
    free_bytes: int
    label: str = ""
    quota_mb: int | None = None
    in_use_mb: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


# --- workers -------------------------------------------------------------------------------

@dataclass(eq=False)
class WorkerInfo(Record):
    """A worker as the registry sees it (a snapshot: pools hand out copies)."""

    id: str
    model_ref: str
    state: WorkerState
    devices: list[str]
    memory_mb: dict[str, int]
    pid: int | None
    quantization: str | None
    dtype: str | None
    owner: str | None
    created_at: float
    last_used: float
    exit_reason: str | None = None
    layers_loaded: int = 0
    layers_total: int = 0
    node: str | None = None  # the cluster node it runs on; None: this machine
    kind: str = "generate"  # what its model does: "generate" text or "embedding" vectors
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.state in WorkerState._value2member_map_:  # a state a newer server invented stays a str
            self.state = WorkerState(self.state)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkerInfo) and self.to_dict() == other.to_dict()

    @property
    def ready(self) -> bool:
        """Whether it serves generations now."""
        return self.state in READY_STATES

    def copy(self) -> WorkerInfo:
        """A snapshot that later changes to this one do not reach."""
        return replace(self, devices=list(self.devices), memory_mb=dict(self.memory_mb), extra=dict(self.extra))

    @classmethod
    def pending(cls, worker_id: str, model_ref: str, *, owner: str | None, state: WorkerState) -> WorkerInfo:
        """A worker the hive announced whose process does not exist yet (its model is downloading)."""
        now = time.time()
        return cls(id=worker_id, model_ref=model_ref, state=WorkerState(state), devices=[], memory_mb={},
                   pid=None, quantization=None, dtype=None, owner=owner, created_at=now, last_used=now)


@dataclass(eq=False)
class WorkerView(WorkerInfo):
    """A worker as ``GET v1/workers`` and the feed show it: the registry's view, whether it is shared,
    the hive's ``load`` (its generations not yet ended) and the worker's last-known load counters
    (None while it is not ready, and for engines). Another user's shared worker comes without
    ``owner``, ``pid`` and ``exit_reason`` (None here)."""

    shared: bool = False
    load: int = 0
    active_sequences: int | None = None  # sequences in the running batch
    queue_length: int | None = None  # requests waiting for room in the batch
    batch_size: int | None = None  # rows in the last decode step
    max_batch_size: int | None = None
    tokens_per_second: float | None = None  # every sequence together, over the last seconds

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Any:
        """As :meth:`Record.from_json`; a public view lacks fields a full one has, and they read as None."""
        return super().from_json({"pid": None, "owner": None, "created_at": 0.0, "last_used": 0.0,
                                  "devices": [], "memory_mb": {}, "quantization": None, "dtype": None, **data})


@dataclass
class WorkerSpec:
    """What to load and how: the one load description, from the hive to the pool to the worker.

    ``device_map`` is one device or a ``{block: device}`` plan. The worker process gets the
    same fields as a :class:`WorkerConfig` (:meth:`worker_config`), never copied by hand.
    """

    model_ref: str
    model_path: str
    device_map: dict[str, str] | str = "cpu"
    quantization: str | None = None
    dtype: str | None = None
    double_quant: bool = False
    compute_dtype: str | None = None
    owner: str | None = None
    queue_depth: int = QUEUE_DEPTH
    max_tokens_limit: int = MAX_TOKENS_LIMIT
    max_batch_size: int | None = None  # None: the worker picks for its device (worker/runtime.py)
    kv_budget_mb: float | None = None  # None: the worker picks from the memory free after loading
    worker_id: str | None = None  # the hive names workers before they start (their load job's id)
    node: str | None = None  # a cluster node asked for by name or id (pools that have nodes; validated first)
    kind: str = "generate"  # "embedding": a sentence-transformers model served by worker/embedding.py
    confined: bool = True  # False: a single user's own file:// folder, whose links may lead outside it
    pinned: bool = False  # True: model_path is the real path the hive checked (see WorkerConfig.pinned)

    def worker_config(self, worker_id: str, **overrides: Any) -> WorkerConfig:
        """The start-up spec a worker reads: this load's fields plus the transport's ``overrides``."""
        shared = {f.name for f in fields(WorkerConfig)} & {f.name for f in fields(self)}
        values = {name: getattr(self, name) for name in shared}
        return WorkerConfig(**{**values, "worker_id": worker_id, **overrides})


@dataclass
class WorkerConfig:
    """The JSON line a worker reads from stdin at start-up (or a Ray actor gets as its argument).

    ``watch_stdin``: exit when stdin reaches EOF. The pool keeps the pipe open for the
    worker's life, so EOF means the parent died (even by SIGKILL): no orphaned workers.
    """

    model_path: str
    worker_id: str = "worker"
    quantization: str | None = None
    dtype: str | None = None
    device_map: dict[str, str] | str = "cpu"
    double_quant: bool = False
    compute_dtype: str | None = None
    queue_depth: int = QUEUE_DEPTH
    max_tokens_limit: int = MAX_TOKENS_LIMIT
    #: Sequences decoded together per forward step; None: 8 on a CPU, 32 on a GPU.
    max_batch_size: int | None = None
    #: MB of KV cache the running batch may reserve; None: a share of the memory free after loading.
    kv_budget_mb: float | None = None
    keepalive_s: float = 10.0
    watch_stdin: bool = True
    kind: str = "generate"  # "generate" (a causal LM) or "embedding" (a sentence-transformers model)
    #: False: a single user's own file:// folder, whose links may lead outside it (core/confine.py).
    confined: bool = True
    #: True: ``model_path`` is the real path the hive resolved and checked (a shared server's file://
    #: folder, allowed by ``allowed_local_dirs``); the worker refuses it if it now resolves elsewhere.
    pinned: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> WorkerConfig:
        if not isinstance(data, dict) or not isinstance(data.get("model_path"), str):
            raise InvalidRequest("the worker spec must be a JSON object with a string 'model_path'")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        config = cls(**{k: v for k, v in data.items() if k in known},
                     extra={k: v for k, v in data.items() if k not in known})
        if not isinstance(config.device_map, (str, dict)):
            raise InvalidRequest("device_map must be a device name or a {block: device} object")
        if not isinstance(config.queue_depth, int) or config.queue_depth < 0:
            raise InvalidRequest("queue_depth must be an integer >= 0")
        if not isinstance(config.max_tokens_limit, int) or config.max_tokens_limit < 1:
            raise InvalidRequest("max_tokens_limit must be an integer >= 1")
        if config.max_batch_size is not None and (not isinstance(config.max_batch_size, int)
                                                  or isinstance(config.max_batch_size, bool)
                                                  or config.max_batch_size < 1):
            raise InvalidRequest("max_batch_size must be an integer >= 1 or null")
        if config.kv_budget_mb is not None and (not isinstance(config.kv_budget_mb, (int, float))
                                                or isinstance(config.kv_budget_mb, bool) or config.kv_budget_mb < 0):
            raise InvalidRequest("kv_budget_mb must be a number >= 0 (0: no limit) or null")
        if config.kind not in WORKER_KINDS:
            raise InvalidRequest(f"kind must be one of {', '.join(WORKER_KINDS)}")
        if not isinstance(config.confined, bool):
            raise InvalidRequest("confined must be true or false")
        if not isinstance(config.pinned, bool):
            raise InvalidRequest("pinned must be true or false")
        return config

    def to_json(self) -> str:
        data = asdict(self)
        data.update(data.pop("extra"))
        return json.dumps(data, separators=(",", ":"))

    @property
    def devices(self) -> list[str]:
        if isinstance(self.device_map, str):
            return [self.device_map]
        return list(dict.fromkeys(self.device_map.values()))


# --- engines (POST v1/workers with backend "openai") --------------------------------------

BACKENDS = ("local", "openai")
_FIELDS = ("backend", "url", "model", "api_key", "name", "shared")
#: An engine's name lives in a namespace of its own: no ``:`` or ``/``, so it can never read as a
#: model ref (``hf:org/repo``, ``org/repo``, ``file://``), and no ``w-`` prefix, which worker ids have.
_ENGINE_NAME = re.compile(r"^(?!w-)[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
EXAMPLE_ENGINE_URL = "http://gpu-node:8000/v1"


# --- request ------------------------------------------------------------------------------

def backend_of(body: Any) -> str:
    """Which backend a ``POST v1/workers`` body asks for (``local`` when it does not say)."""
    backend = body.get("backend", "local") if isinstance(body, Mapping) else "local"
    if backend not in BACKENDS:
        raise InvalidRequest(f"Unknown backend {backend!r}; use one of {', '.join(BACKENDS)} "
                             "(local: load a model here; openai: an OpenAI-compatible engine by URL).",
                             details={"field": "backend", "accepted": list(BACKENDS)})
    return backend


@dataclass(frozen=True)
class EngineSpec:
    """A validated engine registration; ``url`` is the OpenAI base (``.../v1``) without a trailing slash."""

    url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    name: str | None = None
    #: In service mode, for a user who is not an admin: every connection is checked against it.
    egress: EgressPolicy | None = field(default=None, repr=False, compare=False)  # core/egress.py

    @classmethod
    def from_json(cls, body: Any) -> EngineSpec:
        """Validate an untrusted body; each mistake is a 400 naming the field.

        Unknown keys are refused: a misspelt ``apikey`` would otherwise register the engine
        without its key and fail later with a confusing 401.
        """
        if not isinstance(body, Mapping):
            raise InvalidRequest("The engine registration must be a JSON object.", details={"field": "body"})
        unknown = sorted(set(body) - set(_FIELDS))
        if unknown:
            raise InvalidRequest(f"Unknown field(s) {', '.join(unknown)} for an openai engine; accepted: "
                                 f"{', '.join(_FIELDS)}.", details={"field": unknown[0], "accepted": list(_FIELDS)})
        url = _url(body.get("url"))
        model = body.get("model")
        if not isinstance(model, str) or not model.strip() or len(model) > 256:
            raise InvalidRequest("model must be the model's name on the engine (what its GET /v1/models lists), "
                                 "a non-empty string.", details={"field": "model"})
        api_key = body.get("api_key")
        if api_key is not None and not isinstance(api_key, str):
            raise InvalidRequest("api_key must be a string (or left out for an engine without a key).",
                                 details={"field": "api_key"})
        name = body.get("name")
        if name is not None and (not isinstance(name, str) or not _ENGINE_NAME.match(name.strip())):
            raise InvalidRequest("name must be the model name clients use for this engine: 1 to 64 letters, digits, "
                                 "'.', '_' or '-', not starting with 'w-' (so it cannot be read as a model ref or a "
                                 "worker id).", details={"field": "name"})
        if not isinstance(body.get("shared", False), bool):
            raise InvalidRequest("shared must be true or false.", details={"field": "shared"})
        return cls(url=url, model=model.strip(), api_key=api_key or None, name=name.strip() if name else None)

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def model_ref(self) -> str:
        return f"openai:{self.model}@{self.host}"


def _url(value: Any) -> str:
    bad = InvalidRequest(f"url must be the engine's OpenAI base URL with http or https, e.g. {EXAMPLE_ENGINE_URL!r}.",
                         details={"field": "url"})
    if not isinstance(value, str) or not value.strip():
        raise bad
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise bad from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise InvalidRequest("url must not carry credentials or a query: put the key in api_key, which is never "
                             "shown back.", details={"field": "url"})
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


@dataclass
class EngineInfo(WorkerInfo):
    """A worker that is an external engine: where it is and what it serves (never its key)."""

    backend: str = "openai"
    url: str = ""
    model: str = ""
    name: str | None = None
