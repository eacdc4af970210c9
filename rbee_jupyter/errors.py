"""Every error a user can meet, with its code and HTTP status (the table of docs/errors.md).

Each class carries a stable ``code`` (what clients branch on), an HTTP ``status``
(what the server answers), a message that says how to fix the problem, and
structured ``details``. Where a built-in exception fits, it is a base too, so plain
Python callers can ``except TimeoutError`` without knowing this module.
"""

from __future__ import annotations

from typing import Any


class RbeeError(Exception):
    """Base of all rbee errors: ``code``, ``status``, ``message``, ``details``."""

    code: str = "INTERNAL_ERROR"
    status: int = 500

    def __init__(self, message: str, *, details: dict[str, Any] | None = None, code: str | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = dict(details or {})
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of an HTTP error: ``{"error": {"code", "message", "details"}}``."""
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}

    def __reduce__(self):  # keep code/details across process boundaries (pickling)
        return (_rebuild, (type(self), self.message, self.details, self.code, self.status))


def _rebuild(cls, message, details, code, status):
    return cls(message, details=details, code=code, status=status)


# --- bad input (400) -----------------------------------------------------------------

class InvalidRequest(RbeeError, ValueError):
    """A request body, query argument or option is malformed or out of range."""
    code, status = "INVALID_REQUEST", 400


class InvalidModelRef(InvalidRequest):
    """A model reference is not one of the accepted forms."""
    code = "INVALID_MODEL_REF"


class DeviceNotAvailable(InvalidRequest):
    """A device was asked for that this machine does not have (never a silent CPU fall back)."""
    code = "DEVICE_NOT_AVAILABLE"


class DtypeNotSupported(InvalidRequest):
    """The device cannot compute in the dtype asked for (bf16 before compute capability 8.0)."""
    code = "DTYPE_NOT_SUPPORTED"


class ContextTooLong(InvalidRequest):
    """The prompt does not fit the model's context window."""
    code = "CONTEXT_TOO_LONG"


class InvalidSchema(InvalidRequest):
    """``response_format.json_schema.schema`` (or a tool's parameters) is not a valid JSON Schema."""
    code = "INVALID_SCHEMA"


class UnsupportedSchema(InvalidRequest):
    """A valid JSON Schema that constrained decoding cannot enforce; the message names the keyword."""
    code = "UNSUPPORTED_SCHEMA"


class InvalidCheckpoint(InvalidRequest):
    """A model folder lacks config.json or safetensors, or a file in it is corrupt."""
    code = "INVALID_CHECKPOINT"


# --- auth (403) ----------------------------------------------------------------------

class AccessDenied(RbeeError, PermissionError):
    """The hub refused (private or gated repo), or the caller may not touch this job."""
    code, status = "ACCESS_DENIED", 403


class CacheNotWritable(RbeeError, PermissionError):
    """The model cache (``c.RbeeApp.cache_dir``) or one of its folders cannot be written.

    On a shared JupyterHub cache this is usually a folder created by another user without
    group write permission, or a read-only mount; ``details["folder"]`` names it.
    """
    code, status = "CACHE_NOT_WRITABLE", 403


class NotOwner(AccessDenied):
    """In service mode: someone other than the owner (or an admin) tried to cancel or unload a job."""
    code = "NOT_OWNER"


class UrlNotAllowed(AccessDenied):
    """In service mode: the server may not open this URL for this user (``core/egress.py``).

    Loopback, link-local, private and metadata addresses, and URLs outside
    ``c.RbeeApp.engine_url_patterns``, stay closed unless an administrator opened them.
    """
    code = "URL_NOT_ALLOWED"


# --- not found (404) -----------------------------------------------------------------

class NotFound(RbeeError, LookupError):
    """Base of the 404s."""
    code, status = "NOT_FOUND", 404


class ModelNotFound(NotFound):
    """The repository (or local folder) does not exist."""
    code = "MODEL_NOT_FOUND"


class RevisionNotFound(NotFound):
    """The repository exists but not at that branch, tag or commit."""
    code = "REVISION_NOT_FOUND"


class JobNotFound(NotFound):
    """No job (download, load, inference) with that id, or it was dropped after expiry."""
    code = "JOB_NOT_FOUND"


class WorkerNotFound(NotFound):
    """No worker with that id."""
    code = "WORKER_NOT_FOUND"


# --- time (408) ----------------------------------------------------------------------

class LoadingTimeout(RbeeError, TimeoutError):
    """Loading took longer than the configured timeout."""
    code, status = "LOADING_TIMEOUT", 408


class DownloadStalled(RbeeError, TimeoutError):
    """No bytes arrived for the stall window, on every retry."""
    code, status = "DOWNLOAD_STALLED", 408


class InferenceStalled(RbeeError, TimeoutError):
    """Generation produced nothing for too long."""
    code, status = "INFERENCE_STALLED", 408


# --- conflict (409) ------------------------------------------------------------------

class Conflict(RbeeError):
    """The request clashes with the current state (e.g. deleting a loaded model)."""
    code, status = "CONFLICT", 409


class ModelNotLoaded(Conflict):
    """Inference asked for a model no worker holds."""
    code = "MODEL_NOT_LOADED"


# --- cancelled (499) -----------------------------------------------------------------

class Cancelled(RbeeError):
    """The job was cancelled by a user or because its client went away."""
    code, status = "CANCELLED", 499


# --- failures of the work itself (500/502) ------------------------------------------

class ChecksumMismatch(RbeeError):
    """A downloaded file's hash differs from the one the hub publishes, on every retry."""
    code, status = "CHECKSUM_MISMATCH", 502


class DownloadFailed(RbeeError):
    """The transfer failed for a reason other than those above, after retries."""
    code, status = "DOWNLOAD_FAILED", 502


class WorkerDied(RbeeError):
    """The worker process exited while it had work (crash, OOM kill, SIGKILL)."""
    code, status = "WORKER_DIED", 500


class EngineUnreachable(RbeeError, ConnectionError):
    """An external OpenAI-compatible engine (vLLM, TGI, llama.cpp...) does not answer at its URL."""
    code, status = "ENGINE_UNREACHABLE", 502


class EngineError(RbeeError):
    """An external engine answered, but with an error or something that is not OpenAI's protocol."""
    code, status = "ENGINE_ERROR", 502


class OutOfMemory(RbeeError, MemoryError):
    """A device ran out of memory while loading or generating."""
    code, status = "OUT_OF_MEMORY", 507


# --- busy / capacity (503, 507) ------------------------------------------------------

class ClusterUnavailable(RbeeError):
    """The cluster that runs workers (Ray) cannot be reached, or no node can take the worker."""
    code, status = "CLUSTER_UNAVAILABLE", 503


class WorkerBusy(RbeeError):
    """The worker's queue is full; try again or load a second worker."""
    code, status = "WORKER_BUSY", 503


class InsufficientDisk(RbeeError, OSError):
    """The cache folder's disk cannot hold the download."""
    code, status = "INSUFFICIENT_DISK", 507


class InsufficientVram(RbeeError):
    """The placement plan does not fit the devices' free memory."""
    code, status = "INSUFFICIENT_VRAM", 507


class InsufficientRam(RbeeError):
    """A CPU load would not fit the host's available memory."""
    code, status = "INSUFFICIENT_RAM", 507


class QuotaExceeded(RbeeError):
    """The load would take this server past its share of a device (``c.RbeeApp.device_quota_mb``).

    The device itself may have room: the limit is the administrator's, shared between the
    servers of one node. ``details`` says what is needed, the quota, what is in use and
    which workers hold it, so the user knows what to unload.
    """
    code, status = "QUOTA_EXCEEDED", 507


# --- shared hive ---------------------------------------------------------------------------

class UserLimit(RbeeError):
    """A per-user cap of a shared hive (service mode) was reached: too many workers, downloads or streams.

    ``details`` names the cap, its limit, what the user holds now and the trait an
    administrator sets it with (``c.RbeeApp.max_user_*``), so the user knows what to stop
    first and the administrator what to raise.
    """
    code, status = "USER_LIMIT", 429


# --- errors across a boundary (HTTP, a worker's stream, an actor) ------------------------

#: The code of an HTTP error that no ``RbeeError`` raised (Tornado's own 404, 405, 413...).
HTTP_ERROR_CODES: dict[int, str] = {400: "INVALID_REQUEST", 403: "FORBIDDEN", 404: "NOT_FOUND",
                                    405: "METHOD_NOT_ALLOWED", 413: "BODY_TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE"}

#: The class for a code this version does not know, by the HTTP status it came with.
_BY_STATUS: dict[int, type[RbeeError]] = {400: InvalidRequest, 403: AccessDenied, 404: NotFound, 409: Conflict,
                                          499: Cancelled, 503: WorkerBusy}


def _classes_by_code() -> dict[str, type[RbeeError]]:
    """code → class for every error of this module; the most specific class owns a shared code.

    Walked rather than listed, so a new class maps without an edit here.
    """
    table: dict[str, type[RbeeError]] = {}
    stack: list[type[RbeeError]] = [RbeeError]
    while stack:
        cls = stack.pop()
        if cls.__module__ == __name__:
            table[cls.code] = cls  # subclasses are visited after their base, so they win
        stack.extend(cls.__subclasses__())
    return table


def error_from_json(payload: Any, status: int | None = None) -> RbeeError:
    """Rebuild an :class:`RbeeError` from its JSON, so callers can ``except WorkerBusy``.

    The one decoder for every side (the pool reading a worker, the client reading the
    server): the same body gives the same exception everywhere.

    Args:
        payload: the HTTP shape ``{"error": {"code", "message", "details"}}`` or an error
            event ``{"type"|"stage": "error", "code", "message", "details"}``.
        status: the HTTP status it came with, if any.

    Returns:
        The class that owns the code; for a code this version does not know, the class of
        the HTTP status (e.g. 503 → :class:`WorkerBusy`), else a plain :class:`RbeeError`.
        The code and the status are kept either way.
    """
    body = payload.get("error", payload) if isinstance(payload, dict) else None
    if not isinstance(body, dict):
        body = {"message": f"The server answered {status or 'an error'} without an error body: {payload!r}"[:500]}
    code = str(body.get("code") or "")
    message = str(body.get("message") or code or f"HTTP {status}")
    details = body.get("details") if isinstance(body.get("details"), dict) else None
    cls = _classes_by_code().get(code) or _BY_STATUS.get(status or 0, RbeeError)
    return cls(message, details=details, code=code or None, status=status if cls is RbeeError and status else None)
