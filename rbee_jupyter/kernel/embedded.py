"""Embedded mode: the hive inside this process, on its own asyncio loop in a background thread.

Why a thread and not the caller's loop: the caller is usually a kernel's main thread,
which is busy running the user's cell (and ipykernel's loop must never be blocked by,
nor re-entered for, our work). The hive's code is the server's code, unchanged: same
jobs, same catalog, real worker processes; only the transport differs, so everything a
notebook does against a server also works in plain IPython, VS Code, or a notebook run
by nbclient.

Sync callers get the hive's async jobs as plain iterators: each next event is awaited on
the hive's loop through ``run_coroutine_threadsafe``, so the caller blocks in an
interruptible wait (Ctrl-C / a kernel interrupt raises ``KeyboardInterrupt`` there, and
the caller cancels the job).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import RbeeError
from ..core.paths import default_cache_dir, default_catalog_path

if TYPE_CHECKING:
    from ..core.hive import Hive, HiveConfig
    from ..core.jobs import Job, Record, Subscription

__all__ = ["EmbeddedHive", "EmbeddedTransport", "default_config", "shared_hive"]

T = TypeVar("T")
_END = object()


def default_config(**options: Any) -> HiveConfig:
    """The embedded hive's settings: ``options`` (any ``HiveConfig`` field), else the environment.

    ``RBEE_CACHE_DIR`` (else huggingface_hub's cache), ``RBEE_CATALOG_PATH`` (else the
    server's default, so both modes list the same downloads) and ``HF_ENDPOINT``.
    """
    from ..core.hive import HiveConfig

    known = {f.name for f in fields(HiveConfig)}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"Unknown embedded hive option(s): {', '.join(sorted(unknown))}; "
                        f"use HiveConfig fields ({', '.join(sorted(known))}).")
    cache = options.pop("cache_dir", None) or os.environ.get("RBEE_CACHE_DIR") or default_cache_dir()
    catalog = options.pop("catalog_path", None) or os.environ.get("RBEE_CATALOG_PATH") or default_catalog_path()
    endpoint = options.pop("hub_endpoint", None) or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return HiveConfig(cache_dir=Path(cache).expanduser(), catalog_path=Path(catalog).expanduser(),
                      hub_endpoint=endpoint.rstrip("/"), **options)


class EmbeddedHive:
    """A :class:`~rbee_jupyter.core.hive.Hive` running on a private loop thread; call it from any thread."""

    def __init__(self, config: HiveConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run_loop, name="rbee-embedded-hive", daemon=True)
        self.hive: Hive | None = None
        self.closed = False

    @classmethod
    def start(cls, **options: Any) -> EmbeddedHive:
        """Start a hive with :func:`default_config` ``(**options)``; stop it with :meth:`close`."""
        self = cls(default_config(**options))
        self.thread.start()

        async def create() -> Hive:
            from ..core.hive import Hive

            hive = Hive(self.config)  # on the loop: jobs and pools bind to the running loop
            hive.pool.warm_up()  # a spare worker, if pool_options asked for one
            return hive

        self.hive = self.run(create())
        return self

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the hive's loop and wait; an interrupt here cancels it and propagates."""
        if self.closed:
            coro.close()
            raise RbeeError("The embedded hive has been stopped.", code="HIVE_STOPPED", status=503)
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call a (sync) hive method on the loop thread, where jobs must be created."""
        async def invoke() -> T:
            return fn(*args, **kwargs)
        return self.run(invoke())

    def close(self, timeout: float = 20.0) -> None:
        """Stop every job and worker (bounded), then the loop thread."""
        if self.closed or self.hive is None:
            return
        try:
            self.run(asyncio.wait_for(self.hive.stop(), timeout), timeout + 5)
        except (Exception, asyncio.CancelledError):  # noqa: BLE001 - shutting down whatever happens
            pass
        finally:
            self.closed = True
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


# --- the transport ------------------------------------------------------------------------

async def _next(sub: Subscription, timeout: float | None) -> Record | object | None:
    try:
        return await sub.get(timeout)
    except StopAsyncIteration:
        return _END


class _EmbeddedInference:
    """A generation job seen as a stream; early refusals raise like the server's HTTP errors do."""

    def __init__(self, owner: EmbeddedHive, job: Job) -> None:
        self.owner, self.job, self.id = owner, job, job.id
        self.sub = owner.call(job.subscribe, last_event_id=0)
        self._first = owner.run(_next(self.sub, None))
        if job.state.finished and len(job.records) == 1 and isinstance(job.error, RbeeError):
            self.close()
            raise job.error

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            record = self._first
            while record is not _END:
                if record is not None:
                    yield record.event.to_dict()  # type: ignore[union-attr]
                record = self.owner.run(_next(self.sub, None))
        finally:
            self.close()

    def close(self) -> None:
        """Let go of the stream; like an HTTP client going away, an unfinished generation is cancelled."""
        if self.owner.closed:
            return
        def release() -> None:
            self.sub.close()
            if not self.job.state.finished:
                self.job.cancel("The client went away.")
        self.owner.loop.call_soon_threadsafe(release)


class EmbeddedTransport:
    """:class:`~rbee_jupyter.kernel.client.Transport` over an :class:`EmbeddedHive` (no HTTP)."""

    mode = "embedded"
    url = None

    def __init__(self, hive: EmbeddedHive, *, owned: bool = False) -> None:
        self.owner = hive
        self.owned = owned

    @property
    def hive(self) -> Hive:
        assert self.owner.hive is not None
        return self.owner.hive

    def _job(self, kind: str, job_id: str) -> Job:
        return self.hive.load_job(job_id) if kind == "load" else self.hive.job(job_id, kind)

    def download(self, ref: str) -> dict[str, Any]:
        job = self.owner.call(self.hive.download, ref)
        return {"download_id": job.id, "model_ref": job.meta["model_ref"]}

    def load(self, body: dict[str, Any]) -> dict[str, Any]:
        job = self.owner.call(self.hive.load, body)
        return {"worker_id": job.id, "model_ref": job.meta["model_ref"], "state": "loading"}

    def stream(self, kind: str, job_id: str, *, last_event_id: int | None = 0,
               deadline: float | None = None) -> Iterator[tuple[int | None, dict[str, Any]]]:
        job = self.owner.call(self._job, kind, job_id)
        sub = self.owner.call(job.subscribe, last_event_id=last_event_id)
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"No {kind} event for job {job_id} before the deadline.")
                record = self.owner.run(_next(sub, left))
                if record is _END:
                    return
                if record is None:
                    raise TimeoutError(f"No {kind} event for job {job_id} before the deadline.")
                yield record.id, record.event.to_dict()  # type: ignore[union-attr]
        finally:
            if not self.owner.closed:
                self.owner.loop.call_soon_threadsafe(sub.close)

    def infer(self, body: dict[str, Any]) -> _EmbeddedInference:
        job = self.owner.call(self.hive.infer, body)
        return _EmbeddedInference(self.owner, job)

    def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.owner.run(self.hive.embed(body))

    def cancel(self, kind: str, job_id: str) -> None:
        if kind == "load":
            self.owner.run(self.hive.unload(job_id))
        else:
            self.owner.call(self.hive.cancel, job_id, kind)

    def models(self) -> list[dict[str, Any]]:
        return self.owner.call(self.hive.models)

    def delete_model(self, ref: str) -> None:
        self.owner.call(self.hive.delete_model, ref)

    def workers(self) -> list[dict[str, Any]]:
        return self.owner.call(self.hive.workers)

    def worker(self, worker_id: str) -> dict[str, Any]:
        return self.owner.run(self.hive.worker_detail(worker_id))  # live figures too, as over HTTP

    def unload(self, worker_id: str) -> None:
        self.owner.run(self.hive.unload(worker_id))

    def share(self, worker_id: str, shared: bool) -> dict[str, Any]:
        return self.owner.call(self.hive.set_shared, worker_id, shared)

    def devices(self) -> list[dict[str, Any]]:
        from ..engine.devices import inventory

        found = inventory()  # here: it may take a moment, and the hive's loop need not wait
        return self.owner.call(self.hive.devices, found)

    def close(self) -> None:
        if self.owned:
            self.owner.close()


# --- the process's hive -------------------------------------------------------------------

_shared: EmbeddedHive | None = None
_shared_lock = threading.Lock()


def shared_hive() -> EmbeddedHive:
    """The process-wide embedded hive, started on first use and stopped at exit."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.closed:
            _shared = EmbeddedHive.start()
            atexit.register(_shared.close)
        return _shared
