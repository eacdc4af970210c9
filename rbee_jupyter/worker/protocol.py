"""What the pool and a worker process agree on: the start-up spec, env names, routes, errors.

Kept free of torch and tornado imports on purpose: the pool imports it in the server
process, and the worker imports it before it announces its port (start-up must be quick;
the heavy imports happen in the loading thread, where they count as loading, or in a spare
worker before its spec arrives).
"""

from __future__ import annotations

import json
import signal
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import errors
from ..errors import InvalidRequest, RbeeError

__all__ = ["WorkerConfig", "SECRET_ENV", "BLOCK_DELAY_ENV", "TOKEN_DELAY_ENV", "SPARE_ENV", "SPARE_READY",
           "WORKER_STATES", "WORKER_KINDS", "EMBEDDING", "error_from_json", "describe_exit", "mb"]

#: The per-worker secret travels in the environment, never in argv (argv is world-readable in /proc).
SECRET_ENV = "RBEE_WORKER_SECRET"
#: Test hooks: sleep after each loaded block / each emitted chunk (both interruptible by cancel).
BLOCK_DELAY_ENV = "RBEE_WORKER_BLOCK_DELAY_S"
TOKEN_DELAY_ENV = "RBEE_WORKER_TOKEN_DELAY_S"
#: Set ("1") by the pool on a spare worker: import the heavy modules first, then wait for the spec.
SPARE_ENV = "RBEE_WORKER_SPARE"
#: The stderr line a spare writes once its imports are done, followed by a JSON object (what it
#: imported, how long it took). Stderr, because stdout carries the one announcement line only.
SPARE_READY = "rbee spare worker: imports done "

WORKER_STATES = ("loading", "idle", "busy", "draining", "failed")
#: What a worker's model does: generate text, or embed it (a sentence-transformers model).
WORKER_KINDS = ("generate", "embedding")
EMBEDDING = "embedding"

MiB = 1 << 20


def mb(n_bytes: int) -> int:
    """Bytes to MB, rounded up: a block that holds anything never reads as 0 MB."""
    return -(-int(n_bytes) // MiB)


@dataclass
class WorkerConfig:
    """The JSON line a worker reads from stdin at start-up.

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
    queue_depth: int = 8
    max_tokens_limit: int = 4096
    keepalive_s: float = 10.0
    watch_stdin: bool = True
    kind: str = "generate"  # "generate" (a causal LM) or "embedding" (a sentence-transformers model)
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
        if config.kind not in WORKER_KINDS:
            raise InvalidRequest(f"kind must be one of {', '.join(WORKER_KINDS)}")
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


# --- errors across the process boundary -------------------------------------------------

def _error_classes() -> dict[str, type[RbeeError]]:
    """code → class for every error in errors.py (the most specific class owns its code)."""
    table: dict[str, type[RbeeError]] = {}
    stack: list[type[RbeeError]] = [RbeeError]
    while stack:
        cls = stack.pop()
        if cls.__module__ == errors.__name__:
            table[cls.code] = cls  # subclasses are visited after their base, so they win
        stack.extend(cls.__subclasses__())
    return table


def error_from_json(data: Any, status: int | None = None) -> RbeeError:
    """Rebuild an :class:`RbeeError` from its JSON, so callers can ``except WorkerBusy``.

    Accepts the HTTP shape ``{"error": {code, message, details}}`` as well as an error
    event ``{"type"|"stage": "error", code, message, details}``. An unknown code keeps
    its code and status on a plain ``RbeeError``.
    """
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        data = data["error"]
    if not isinstance(data, dict):
        return RbeeError(f"The worker answered {status or 'an error'} without an error body: {data!r}",
                         status=status)
    code = str(data.get("code") or "INTERNAL_ERROR")
    message = str(data.get("message") or code)
    details = data.get("details") if isinstance(data.get("details"), dict) else None
    cls = _error_classes().get(code)
    if cls is None:
        return RbeeError(message, details=details, code=code, status=status or 500)
    return cls(message, details=details)


def describe_exit(returncode: int | None) -> str:
    """"killed by signal 9 (SIGKILL)", "exit code 1", "exited normally" — for messages and exit_reason."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-returncode} ({name})"
    if returncode == 0:
        return "exited normally (exit code 0)"
    return f"exit code {returncode}"
