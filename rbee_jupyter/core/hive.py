"""The hive: the transport-free core that owns downloads, the catalog and the workers.

The Jupyter server extension, the embedded (in-kernel) mode and the tests all drive
this one object; nothing here knows about Tornado or HTTP. Every method returns plain
data or a ``Job`` whose event log subscribers read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import (AccessDenied, Cancelled, Conflict, InvalidCheckpoint, InvalidRequest, JobNotFound,
                      ModelNotFound, ModelNotLoaded, RbeeError, WorkerNotFound)
from ..events import DownloadComplete, FeedEvent
from ..hub.download import Downloader, partial_bytes
from ..pools.base import Pool
from ..pools.composite import CompositePool
from ..pools.engines import OpenAIEnginePool, engine_aliases
from ..pools.local import LocalProcessPool
from ..protocol import (DOWNLOAD_BACKOFF_S, DOWNLOAD_CONNECTIONS, DOWNLOAD_RETRIES, DOWNLOAD_SEGMENT_MB,
                        DOWNLOAD_SPREAD_BELOW_MBPS, DOWNLOAD_STALL_S, DTYPE_NAMES, DTYPES, EMBEDDING, GONE_STATES,
                        MAX_TOKENS_LIMIT, QUANTIZATIONS, QUEUE_DEPTH, WORKER_KINDS, EngineSpec, GenerationRequest,
                        WorkerInfo, WorkerSpec, WorkerState, backend_of)
from .catalog import Catalog, CatalogEntry
from .confine import check_folder, remove_snapshot
from .ids import new_id
from .jobs import Job, JobRegistry
from .egress import EgressPolicy
from .limits import UserLimits, check_cap
from .live import LiveLoad
from .owners import Principal, check_control, check_local_path, may_control, may_see, public_worker, token_fingerprint
from .refs import ModelRef, parse_ref

_BLOCKS_LOCK = threading.Lock()


@dataclass
class HiveConfig:
    """What the hive needs to know; the server fills it from ``RbeeApp`` traits.

    The pools' own settings (keep-alive, timeouts, the spare worker, Ray, engines) are not
    copied here: the pools are traitlets configurables and read them from ``pool_config``
    (``c.Pool.*``, ``c.LocalProcessPool.*``...), with ``pool_options`` as keyword arguments
    for a hive built without a server (scripts, embedded, tests).
    """

    cache_dir: Path
    catalog_path: Path
    hub_endpoint: str | None = None
    hf_token: str | None = None
    download_stall_s: float = DOWNLOAD_STALL_S
    download_retries: int = DOWNLOAD_RETRIES
    download_backoff_s: float = DOWNLOAD_BACKOFF_S
    download_connections: int = DOWNLOAD_CONNECTIONS
    download_segment_mb: float = DOWNLOAD_SEGMENT_MB
    download_spread_below_mbps: float = DOWNLOAD_SPREAD_BELOW_MBPS
    max_concurrent_downloads: int = 2
    disk_reserve_mb: int = 0
    job_retention_s: float = 600.0
    pool_class: type[Pool] = LocalProcessPool
    queue_depth: int = QUEUE_DEPTH
    max_tokens_limit: int = MAX_TOKENS_LIMIT
    max_batch_size: int | None = None
    kv_budget_mb: float | None = None
    allowed_devices: list[str] | None = None
    device_quota_mb: dict[str, float] = field(default_factory=dict)
    service_mode: bool = False
    """One hive shared by a team: owners, allowed local folders, per-user hub tokens (owners.py)."""
    admin_users: frozenset[str] = frozenset()
    allowed_local_dirs: tuple[str, ...] = ()
    share_server_token: bool = False
    engine_registration: str = "admins"
    """In service mode, who may register engines over HTTP: ``"admins"`` or ``"users"`` (everyone)."""
    engine_url_patterns: tuple[str, ...] = ()
    engine_allowed_networks: tuple[str, ...] = ()
    user_limits: UserLimits = field(default_factory=UserLimits)
    """Per-user caps in service mode (admins are not capped); see core/limits.py."""
    import_memory_mb: int | None = None
    """Memory a GGUF import's helper process may use (None: the host's available memory)."""
    #: Keyword arguments for pool_class, e.g. ``{"spare_worker": True, "keep_alive_s": 60}``
    #: (the spare is off unless asked for, outside a server).
    pool_options: dict[str, Any] = field(default_factory=dict)
    #: The traitlets configurable the pools are built under (the server app; its log and config).
    parent: Any = None
    #: The traitlets ``Config`` the pools read (``c.Pool.*``, ``c.LocalProcessPool.*``...); None: the parent's.
    pool_config: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadRequest:
    """A validated ``POST v1/workers`` body."""

    ref: ModelRef
    device: str | list[str] = "cpu"
    quantization: str | None = None
    dtype: str | None = None
    double_quant: bool = False
    max_memory: dict[str, Any] | None = None
    node: str | None = None
    kind: str | None = None  # "generate" | "embedding"; None: "embedding" when the files say so

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> LoadRequest:
        """Validate every field; each mistake is a 400 naming the field."""
        from ..engine.devices import parse_bytes, parse_device_spec

        ref = parse_ref(body.get("model_ref"))
        device = parse_device_spec(body.get("device", "cpu"))
        quant = body.get("quantization")
        if quant in ("none", ""):
            quant = None
        if quant is not None and quant not in QUANTIZATIONS:
            raise InvalidRequest(f"Unknown quantization {quant!r}; use one of {', '.join(QUANTIZATIONS)} or null.",
                                 details={"field": "quantization", "accepted": list(QUANTIZATIONS)})
        dtype = body.get("dtype")
        if dtype is not None and (not isinstance(dtype, str) or dtype not in DTYPES):
            raise InvalidRequest(f"Unknown dtype {dtype!r}; use {', '.join(DTYPE_NAMES[:-1])} or {DTYPE_NAMES[-1]}.",
                                 details={"field": "dtype", "accepted": list(DTYPE_NAMES)})
        double_quant = body.get("double_quant", False)
        if not isinstance(double_quant, bool):
            raise InvalidRequest("double_quant must be true or false.", details={"field": "double_quant"})
        max_memory = body.get("max_memory")
        if max_memory is not None:
            if not isinstance(max_memory, dict):
                raise InvalidRequest('max_memory must be an object like {"cuda:0": "20GiB"}.',
                                     details={"field": "max_memory"})
            for value in max_memory.values():
                parse_bytes(value)
        node = body.get("node")
        if node is not None and (not isinstance(node, str) or not node.strip()):
            raise InvalidRequest("node must be a non-empty string: a node's name or id (GET v1/workers shows "
                                 "where workers run).", details={"field": "node"})
        kind = body.get("kind")
        if kind is not None and kind not in WORKER_KINDS:
            raise InvalidRequest(f"Unknown kind {kind!r}; use one of {', '.join(WORKER_KINDS)}, or leave it out "
                                 "to detect it from the model's files.",
                                 details={"field": "kind", "accepted": list(WORKER_KINDS)})
        return cls(ref, device, quant, DTYPES.get(dtype) if dtype else None, double_quant, max_memory, node, kind)

    def to_json(self) -> dict[str, Any]:
        """The request as a ``POST v1/workers`` body again (normalised)."""
        return {"model_ref": str(self.ref), "device": self.device, "quantization": self.quantization,
                "dtype": self.dtype, "double_quant": self.double_quant, "max_memory": self.max_memory,
                "node": self.node, "kind": self.kind}


@dataclass(frozen=True)
class _AdmittedLoad:
    """A load request that passed every check made before the checkpoint is read."""

    req: LoadRequest
    entry: CatalogEntry | None  # None: not on disk yet; the job downloads it, then plans
    owner: str | None
    hf_token: str | None
    prove: bool  # another user's gated model: ask the hub whether this caller may use it
    shared: bool = False  # other users may see and use the worker (service mode)


HEADER_MEMORY = 1 << 30
"""Memory the helper that reads a checkpoint's headers may use (headers are capped at 100 MB each)."""


class Hive:
    """Downloads, catalog and (later) workers, behind one asynchronous API."""

    def __init__(self, config: HiveConfig) -> None:
        self.config = config
        self.jobs = JobRegistry(retention_s=config.job_retention_s,
                                kept_per_owner=config.user_limits.kept_jobs if config.service_mode else 0)
        self.catalog = Catalog(config.catalog_path)
        self.downloader = Downloader(
            cache_dir=Path(config.cache_dir), endpoint=config.hub_endpoint, token=config.hf_token,
            stall_s=config.download_stall_s, retries=config.download_retries,
            backoff_s=config.download_backoff_s, disk_reserve_bytes=config.disk_reserve_mb * 2**20,
            connections=config.download_connections, segment_bytes=int(config.download_segment_mb * 2**20),
            spread_below_bps=config.download_spread_below_mbps * 1e6)
        self._download_slots: asyncio.Semaphore | None = None
        # Transfers block a thread for their whole length: they get threads of their own, so
        # that many downloads never starve asyncio's small default pool (6 threads on 2 cores),
        # which plans loads and would leave the downloads beyond the 6th without a thread.
        self._download_threads = ThreadPoolExecutor(max(1, config.max_concurrent_downloads),
                                                     thread_name_prefix="rbee-download")
        self.feed: Job | None = None  # the server-wide event feed, when a UI asked for one
        where = {"parent": config.parent, "config": config.pool_config}
        primary = config.pool_class(**where, **config.pool_options)
        engines = OpenAIEnginePool(**where, quote_upstream=not config.service_mode)
        self.pool: Pool = CompositePool(primary, engines, **where)  # external engines sit beside the primary pool
        self.live = LiveLoad(self.pool)  # each worker's last-known load, for v1/workers and the feed
        self._planned: dict[str, dict[str, int]] = {}  # worker id -> bytes per device its plan reserved
        # Service mode: workers their owner or an admin shared, and who joined whose download.
        self._shared: set[str] = set()
        self._viewers: dict[str, set[str]] = {}
        self._egress = EgressPolicy.from_config(config.engine_url_patterns, config.engine_allowed_networks)
        self.catalog.resync()

    async def stop(self) -> None:
        await self.jobs.shutdown()
        await self.live.close()
        await self.pool.close()
        self._download_threads.shutdown(wait=False, cancel_futures=True)
        self.catalog.close()

    # --- downloads ----------------------------------------------------------------

    def download(self, model_ref: str | ModelRef, *, owner: str | None = None, principal: Principal | None = None,
                 hf_token: str | None = None) -> Job:
        """Start (or join) the download of ``model_ref``; returns its job at once.

        The same ref asked for while it is downloading gives the same job: one
        transfer, any number of watchers. A request with its own ``hf_token`` only
        joins a download made with the same token, so nobody rides on another's access.

        Args:
            hf_token: the caller's hub token, for this download's requests only; it is
                kept in no job, event or catalog row.

        Raises:
            InvalidModelRef: the ref is malformed (nothing is started).
            AccessDenied: in service mode, a ``file://`` ref outside ``allowed_local_dirs``.
        """
        ref = model_ref if isinstance(model_ref, ModelRef) else parse_ref(model_ref)
        owner = principal.name if principal is not None else owner
        self._check_local(ref)
        key = ("download", str(ref)) if not hf_token else ("download", str(ref), token_fingerprint(hf_token))
        existing = self.jobs.find_active(key)
        if existing is not None:
            if owner is not None and existing.owner != owner:  # one transfer, many watchers: they may watch it
                self._viewers.setdefault(existing.id, set()).add(owner)
            return existing
        self._check_cache(ref)
        self._check_user_cap(principal, "downloads")
        job = self.jobs.create("download", key=key, owner=owner)
        job.meta.update(model_ref=str(ref), repo_id=ref.repo_id)
        job.request = {"model_ref": str(ref)}
        token = self._hub_token(hf_token)
        return self.jobs.start(job, lambda j: self._download(j, ref, token))

    async def _download(self, job: Job, ref: ModelRef, token: str | bool | None = None) -> None:
        if ref.scheme == "file":
            entry = register_local(ref)
        else:
            if self._download_slots is None:
                self._download_slots = asyncio.Semaphore(max(1, self.config.max_concurrent_downloads))
            async with self._download_slots:
                entry = await self._fetch(job, ref, token)
        if ref.is_gguf:
            entry = await self._import_gguf(job, ref, entry)
        if self.config.service_mode:  # the first to download it owns it
            known = self.catalog.get(entry.ref)
            entry.owner = known.owner if known is not None and known.owner else job.owner
        self.catalog.add(entry)
        self._feed("catalog", {"action": "added", "model": entry.to_dict()})
        job.finish(DownloadComplete(local_path=entry.local_path, model_ref=entry.ref,
                                    revision=entry.revision, size_bytes=entry.size_bytes))

    async def _fetch(self, job: Job, ref: ModelRef, token: str | bool | None = None) -> CatalogEntry:
        loop = asyncio.get_running_loop()
        plan = await loop.run_in_executor(self._download_threads,
                                          functools.partial(self.downloader.resolve, ref, token=token))
        if plan.restricted and self.config.service_mode:  # cached files must not bypass the hub's say
            await asyncio.to_thread(self._check_hub_access, plan, token)
        job.meta.update(revision=plan.commit, bytes_total=plan.bytes_total)
        # a cancel stops the fetch at once: its watcher wakes on the event and closes every open response
        path = await loop.run_in_executor(self._download_threads, functools.partial(
            self.downloader.fetch, plan, emit=job.publish_threadsafe, cancel=job.cancel_event))
        await asyncio.sleep(0)  # let the last threadsafe progress event land before `complete`
        return CatalogEntry(ref=str(ref), repo_id=ref.repo_id, revision=plan.commit, local_path=str(path),
                            size_bytes=plan.bytes_total, files=[f.path for f in plan.files], source="hub",
                            restricted=plan.restricted)

    def _check_hub_access(self, plan: Any, token: str | bool | None) -> None:
        try:
            self.downloader.check_access(plan)
        except AccessDenied as e:
            whose = {None: "the server's hub token", False: "a request without a hub token"}.get(
                token, "your hub token")  # type: ignore[arg-type]
            raise AccessDenied(
                f"{plan.ref.repo_id} is gated or private and the hub refused {whose}. This server is shared: send "
                "your own token (header X-HF-Token, or the field hf_token of the request body) from an account "
                "that has access.", details=e.details) from e

    # --- service mode ---------------------------------------------------------------

    def _hub_token(self, user_token: str | None) -> str | bool | None:
        """The token for one request's hub calls: the user's own, else the server's unless it is private.

        False means none at all, so huggingface_hub does not fall back to HF_TOKEN either.
        """
        if user_token:
            return user_token
        if self.config.service_mode and not self.config.share_server_token:
            return False
        return None

    def _check_local(self, ref: ModelRef) -> None:
        if self.config.service_mode and ref.scheme == "file":
            self._allowed_local(ref.path or "")
        if ref.scheme == "file" and not ref.is_gguf and self._confined(ref):
            check_folder(ref.path or "")  # 400 now for a link out of the folder, before any job starts

    def _allowed_local(self, path: str) -> Path:
        """``path`` resolved now, or ``ACCESS_DENIED`` when that is outside ``allowed_local_dirs`` (service mode).

        What is read must be the path checked: a co-user who can write in an allowed folder may swap a
        part of it for a link later. So a load checks again when it starts and hands the worker the
        returned path, which the worker refuses if it resolves elsewhere by then (``WorkerSpec.pinned``);
        a GGUF import checks again and opens the returned path one part at a time without following
        links (``gguf.opened(resolved=True)``).
        """
        return Path(check_local_path(path, self.config.allowed_local_dirs, cache_dir=str(self.config.cache_dir)))

    def _confined(self, ref: ModelRef) -> bool:
        """Whether every file of the model must stay inside its folder (core/confine.py): always, except a
        ``file://`` folder on a single-user server, whose user is the admin and may link it anywhere."""
        return self.config.service_mode or ref.scheme != "file"

    _CAP_JOBS = {"workers": "load", "downloads": "download", "streams": "inference"}

    def _check_user_cap(self, principal: Principal | None, cap: str) -> None:
        """429 ``USER_LIMIT`` when a non-admin of a shared hive already holds its cap of ``cap``.

        Counted now from the jobs running and (for workers) the pool's live workers, by owner.
        """
        if not self.config.service_mode or principal is None or principal.admin:
            return
        user = principal.name
        held = {j.id for j in self.jobs.list(self._CAP_JOBS[cap]) if j.owner == user and not j.state.finished}
        if cap == "workers":
            held |= {w.id for w in self.pool.list() if w.owner == user and w.state not in ("failed", "stopped")}
        check_cap(cap, getattr(self.config.user_limits, cap), len(held), user)

    def may_see_all(self, principal: Principal | None) -> bool:
        """Whether the caller may see server-wide internals (cache paths of unfinished downloads):
        everyone on a single-user server, only admins in service mode."""
        return not self.config.service_mode or principal is None or principal.admin

    def _may_use(self, principal: Principal | None, entry: CatalogEntry) -> bool:
        """Whether ``principal`` may use a catalog entry without asking the hub again."""
        return not (self.config.service_mode and entry.restricted) or may_control(principal, entry.owner)

    def may_use_worker(self, principal: Principal | None, worker: WorkerInfo) -> bool:
        """In service mode a worker serves its owner and admins, and other users only when shared; one
        holding a gated or private model serves those only if they may use the model too."""
        if not self.sees_worker(principal, worker):
            return False
        entry = self.catalog.get(worker.model_ref) if self.config.service_mode else None
        return entry is None or self._may_use(principal, entry) or may_control(principal, worker.owner)

    def sees_worker(self, principal: Principal | None, worker: WorkerInfo) -> bool:
        """Whether ``principal`` may see ``worker`` at all (in full or, when shared, its public view)."""
        return not self.config.service_mode or may_see(principal, worker.owner, shared=worker.id in self._shared)

    def may_see_all_of(self, principal: Principal | None, worker: WorkerInfo) -> bool:
        """Whether ``principal`` sees ``worker`` in full (its URL, failure text): its owner or an admin."""
        return not self.config.service_mode or may_control(principal, worker.owner)

    def is_shared(self, worker_id: str | None) -> bool:
        """Whether the owner or an admin shared this worker with every user."""
        return worker_id in self._shared

    def worker_view(self, worker: WorkerInfo, principal: Principal | None) -> dict[str, Any]:
        """A worker as ``principal`` sees it: in full (theirs, or an admin), else its public view."""
        info = {**worker.to_dict(), "shared": worker.id in self._shared, "load": self._loads().get(worker.id, 0),
                **self.live.get(worker.id)}  # the counters are public too: see PUBLIC_WORKER_FIELDS
        if self.may_see_all_of(principal, worker):
            return info
        return public_worker(info)

    def visible_worker(self, worker_id: str, principal: Principal | None) -> WorkerInfo:
        """:meth:`worker`, or 404 ``WORKER_NOT_FOUND`` when ``principal`` may not see it."""
        worker = self.worker(worker_id)
        if not self.sees_worker(principal, worker):
            raise WorkerNotFound(f"No worker {worker_id!r}. GET v1/workers lists the workers.",
                                 details={"worker_id": worker_id})  # as for an id that never existed
        return worker

    async def _import_gguf(self, job: Job, ref: ModelRef, entry: CatalogEntry) -> CatalogEntry:
        """Turn a downloaded (or local) GGUF file into a safetensors folder the loader reads."""
        from ..events import ImportProgress
        from ..hub import gguf

        source, checked = Path(entry.local_path), False
        if source.is_dir():  # a hub snapshot: the ref names the file inside it, and it must stay there
            from .confine import resolve_inside

            source, checked = resolve_inside(source, ref.filename or ""), True
        elif self.config.service_mode:  # a file:// GGUF, allowed at POST, maybe long before this job ran
            source, checked = self._allowed_local(str(source)), True
        with gguf.opened(source, resolved=checked) as fd:  # read through this descriptor only, in the child too
            target = gguf.imported_dir(Path(self.config.cache_dir), source, fd=fd)
            folder = await asyncio.to_thread(
                gguf.import_gguf_isolated, source, target, fd=fd, cancel=job.cancel_event,
                memory_bytes=self._import_budget(),
                on_progress=lambda p: job.publish_threadsafe(ImportProgress(step=p.step, fraction=p.fraction)))
        await asyncio.sleep(0)  # let the last threadsafe progress event land first
        files = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        return CatalogEntry(ref=entry.ref, repo_id=entry.repo_id, revision=entry.revision, local_path=str(folder),
                            size_bytes=sum((folder / f).stat().st_size for f in files), files=files,
                            source=entry.source, restricted=entry.restricted)

    def _import_budget(self) -> int:
        """Bytes a GGUF import's helper process may grow by: the configured cap, else what the host has free."""
        if self.config.import_memory_mb:
            return self.config.import_memory_mb * 2**20
        from ..engine.devices import _meminfo

        return _meminfo()[1]

    def _check_cache(self, ref: ModelRef) -> None:
        """403 ``CACHE_NOT_WRITABLE`` now, not an error event later, when the download could not be stored."""
        if ref.scheme == "hf" or ref.is_gguf:
            self.downloader.check_writable(ref)

    def job(self, job_id: str, kind: str | None = None, *, principal: Principal | None = None) -> Job:
        """A job by id; in service mode only its owner, those who joined it, and admins find it (else 404)."""
        job = self.jobs.get(job_id, kind)
        if not self.sees_job(principal, job):
            raise JobNotFound(f"No {kind or 'job'} with id {job_id!r}: it never existed or finished long ago.",
                              details={"id": job_id})  # word for word what an unknown id gets
        return job

    def sees_job(self, principal: Principal | None, job: Job | dict[str, Any]) -> bool:
        """Whether ``principal`` may see a job (or its summary): its owner, one who joined it (a
        download), an admin. Nobody else learns that it exists: generations carry prompts and text."""
        owner, job_id = (job.owner, job.id) if isinstance(job, Job) else (job.get("owner"), job.get("id"))
        return (not self.config.service_mode or may_control(principal, owner)
                or principal.name in self._viewers.get(job_id, ()))  # type: ignore[union-attr]

    def cancel(self, job_id: str, kind: str | None = None, *, principal: Principal | None = None) -> None:
        """Cancel a job; cancelling a finished job is not an error (idempotent).

        Raises:
            NotOwner: in service mode, ``principal`` is neither the job's owner nor an admin.
        """
        job = self.job(job_id, kind, principal=principal)
        if self.config.service_mode:
            check_control(principal, job.owner, what=f"{job.kind} {job_id}")
        job.cancel()

    # --- catalog ------------------------------------------------------------------

    def models(self, *, principal: Principal | None = None) -> list[dict[str, Any]]:
        """The catalog; in service mode without gated or private models others downloaded."""
        self.catalog.resync()
        return [e.to_dict() for e in self.catalog.list() if self._may_use(principal, e)]

    def incomplete_downloads(self) -> list[dict[str, Any]]:
        """Partial files that no running download is writing: what a killed server left behind.

        Asking for the model again resumes them from their size (a ``Range`` request), so
        they are kept; until then they take disk space, which is why they are listed.
        """
        running = {job.meta.get("repo_id") for job in self.jobs.list("download") if not job.state.finished}
        out = []
        for repo_id, path in self.downloader.partial_files():
            if not path.exists():  # finished or removed since the listing
                continue
            size = partial_bytes(path)  # a segmented file is full-length: its table says what it holds
            if repo_id not in running:
                out.append({"repo_id": repo_id, "file": path.name, "bytes": size, "path": str(path)})
        return out

    def delete_model(self, model_ref: str | ModelRef, *, principal: Principal | None = None) -> None:
        """Remove a model from disk and catalog (a ``file://`` folder is only forgotten).

        Raises:
            ModelNotFound: not in the catalog.
            NotOwner: in service mode, ``principal`` did not download it and is not an admin.
            Conflict: a worker holds it, or it is downloading.
        """
        ref = model_ref if isinstance(model_ref, ModelRef) else parse_ref(model_ref)
        entry = self.catalog.get(str(ref))
        if entry is None or not self._may_use(principal, entry):
            raise ModelNotFound(f"{ref} is not in the catalog.", details={"model_ref": str(ref)})
        if self.config.service_mode:
            check_control(principal, entry.owner, what=f"model {ref}")
        if any(j.meta.get("model_ref") == str(ref) and not j.state.finished for j in self.jobs.list("download")):
            raise Conflict(f"{ref} is downloading; cancel the download first.", details={"model_ref": str(ref)})
        self._check_not_in_use(str(ref))
        self.catalog.remove(str(ref))
        if entry.source == "hub":
            remove_snapshot(Path(entry.local_path), still_used={Path(e.local_path) for e in self.catalog.list()})
        self._feed("catalog", {"action": "removed", "model": entry.to_dict()})

    def _check_not_in_use(self, ref: str) -> None:
        holders = [w.id for w in self.pool.list() if w.model_ref == ref and w.state not in GONE_STATES]
        if holders:
            raise Conflict(f"{ref} is loaded by worker {', '.join(holders)}; unload it first.",
                           details={"model_ref": ref, "workers": holders})

    # --- workers ------------------------------------------------------------------

    def load(self, body: dict[str, Any] | LoadRequest, *, owner: str | None = None, principal: Principal | None = None,
             hf_token: str | None = None) -> Job:
        """Start a worker for a model; one job goes from nothing (download) to ready.

        Validation, and the placement plan when the model is already on disk, happen
        here, so a bad request or a plan that cannot fit is refused before anything
        starts (400 / 507). The checkpoint is read on the calling thread: on an event
        loop, use :meth:`load_async`.

        Args:
            hf_token: the caller's hub token, for the download and (service mode) for
                proving access to a gated model another user downloaded.

        Raises:
            AccessDenied: in service mode, a ``file://`` ref outside ``allowed_local_dirs``,
                or a gated model someone else downloaded and the caller sent no token.
        """
        self._check_engine_host(body, principal)
        admitted = self._admit_load(body, owner, principal, hf_token)
        if isinstance(admitted, Job):
            return admitted
        entry = admitted.entry
        return self._start_load(admitted, self._blocks(admitted.req, entry.local_path) if entry is not None else None)

    async def load_async(self, body: dict[str, Any] | LoadRequest, *, owner: str | None = None,
                         principal: Principal | None = None, hf_token: str | None = None) -> Job:
        """:meth:`load`, with the checkpoint read in a thread, for callers on the event loop.

        Reading a checkpoint's blocks imports transformers the first time (seconds) and
        builds the model's skeleton; the server's other requests and streams must not wait
        for that. The plan itself is still made on the loop, so the quota check and its
        reservation stay one step.
        """
        from ..engine.devices import inventory

        engine = not isinstance(body, LoadRequest) and backend_of(body) == "openai"
        if engine:  # resolves the engine's host name (blocking): not on the loop either
            await asyncio.to_thread(self._check_engine_host, body, principal)
        # The first inventory imports torch (seconds): not on the loop, which serves everyone's streams.
        devices = None if engine else await asyncio.to_thread(inventory)
        admitted = self._admit_load(body, owner, principal, hf_token, devices=devices)
        if isinstance(admitted, Job):
            return admitted
        entry = admitted.entry
        blocks = await asyncio.to_thread(self._blocks, admitted.req, entry.local_path) if entry is not None else None
        return self._start_load(admitted, blocks)

    def _admit_load(self, body: dict[str, Any] | LoadRequest, owner: str | None, principal: Principal | None,
                    hf_token: str | None, *, devices: list[Any] | None = None) -> _AdmittedLoad | Job:
        """Every check of a load that needs no checkpoint read; an engine registration is done here."""
        owner = principal.name if principal is not None else owner
        self._check_user_cap(principal, "workers")
        shared = _shared_field(body)
        engine = not isinstance(body, LoadRequest) and backend_of(body) == "openai"
        if shared:
            self._share_check(principal, engine=engine)
        if engine:
            return self._register_engine(self._engine_spec(body, principal), owner=owner, shared=shared)
        req = body if isinstance(body, LoadRequest) else LoadRequest.from_json(body)
        self.validate_load(req, devices=devices)
        self._check_local(req.ref)
        entry = self.catalog.get(str(req.ref))
        if entry is None:
            self._check_cache(req.ref)
        token = self._hub_token(hf_token)
        prove = entry is not None and not self._may_use(principal, entry)
        if prove and token is False:
            raise AccessDenied(f"{req.ref} is gated or private and was downloaded by another user; to load it, "
                               "send your own hub token (header X-HF-Token, or the field hf_token of the body).",
                               details={"model_ref": str(req.ref)})
        return _AdmittedLoad(req, entry, owner, hf_token, prove, shared)

    def validate_load(self, req: LoadRequest, *, devices: list[Any] | None = None) -> None:
        """Every check of a load that needs neither the checkpoint nor the hub; runs before anything starts.

        A user who mistyped a device must learn it at once, not after gigabytes arrived: the
        request's own shape first (a quantized model split between CPU and GPU), then the
        node, then this machine (devices, ``max_memory`` keys, the allowed devices) and this
        server's quota when nothing of it is left. What needs the model's size (does it fit)
        is the plan's job, made once the checkpoint is on disk.

        Args:
            devices: this machine's inventory, when the caller took it already (in a thread).

        Raises:
            InvalidRequest: a quantized CPU+GPU split, a malformed ``max_memory``, an unknown node.
            DeviceNotAvailable: a device or ``max_memory`` key not on this machine or not
                allowed; the details list the devices there are.
            DtypeNotSupported: bf16 on a GPU older than compute capability 8.0.
            QuotaExceeded: this server's quota leaves nothing on the devices asked for.
        """
        from ..engine.devices import (check_dtype_support, check_quantized_split, check_quota_room, inventory,
                                      select_devices)

        names = [req.device] if isinstance(req.device, str) else list(req.device)
        check_quantized_split(names, req.quantization is not None)
        if req.node is not None:
            self.pool.check_node(req.node)
        found = inventory() if devices is None else devices
        chosen, _ = select_devices(req.device, found, req.max_memory, allowed=self.config.allowed_devices)
        check_dtype_support(chosen, req.dtype)
        check_quota_room(chosen, self.quota())

    def _start_load(self, admitted: _AdmittedLoad, blocks: list[Any] | None) -> Job:
        req, entry = admitted.req, admitted.entry
        worker_id = new_id("w-")
        plan = self._place(req, blocks, worker_id) if blocks is not None else None
        job = self.jobs.create("load", owner=admitted.owner, job_id=worker_id)
        job.meta.update(model_ref=str(req.ref), worker_id=worker_id)
        job.request = req.to_json()
        if admitted.shared:
            self._shared.add(worker_id)
        return self.jobs.start(job, lambda j: self._load(j, req, entry, plan, hf_token=admitted.hf_token,
                                                         prove=admitted.prove))

    def _engine_spec(self, body: dict[str, Any], principal: Principal | None) -> EngineSpec:
        """Validate a registration; in service mode check who may register, the name and the URL.

        An engine's name may not be another worker's: routing by name must never hand one
        user's prompt to an engine someone else registered under that name.
        """
        spec = EngineSpec.from_json(body)
        if spec.name is not None:
            taken = [w.id for w in self.pool.list() if spec.name in (w.id, getattr(w, "name", None))]
            if taken:
                raise Conflict(f"An engine named {spec.name!r} is registered already; choose another name.",
                               details={"field": "name"})
        if not self.config.service_mode or principal is None or principal.admin:
            return spec  # the administrator (or the single user) opens what they like
        if self.config.engine_registration != "users":
            raise AccessDenied("Only administrators may register engines on this server "
                               "(c.RbeeApp.engine_registration is 'admins'); ask one to register it.",
                               details={"field": "backend"})
        self._egress.check_url(spec.url)
        return dataclasses.replace(spec, egress=self._egress)

    def _check_engine_host(self, body: dict[str, Any] | LoadRequest, principal: Principal | None) -> None:
        """403 ``URL_NOT_ALLOWED`` now, not a 202 whose first connection fails, when a user who is not an admin
        registers an engine whose host name resolves to an address the server may not open for them.

        Blocking: it resolves the name. The check at each connection stays (the name may be rebound).
        """
        if (isinstance(body, LoadRequest) or backend_of(body) != "openai" or not self.config.service_mode
                or principal is None or principal.admin or self.config.engine_registration != "users"):
            return
        self._egress.check_registration(EngineSpec.from_json(body).url)

    def _share_check(self, principal: Principal | None, *, engine: bool, owner: str | None = None) -> None:
        """A local worker is shared by its owner or an admin; an engine (its key, its URL) only by an admin."""
        if not self.config.service_mode or principal is None or principal.admin:
            return
        if engine:
            raise AccessDenied("Only an administrator may share an engine with other users: it spends its owner's "
                               "key and makes the server open its URL for them.", details={"field": "shared"})
        check_control(principal, owner if owner is not None else principal.name, what="worker")

    def set_shared(self, worker_id: str, shared: bool, *, principal: Principal | None = None) -> dict[str, Any]:
        """Share a worker with every user (or stop): ``PATCH v1/workers/{id} {"shared": ...}``.

        Raises:
            WorkerNotFound: no such worker, or one ``principal`` may not see.
            NotOwner / AccessDenied: a worker of someone else's, or an engine, and not an admin.
        """
        if not isinstance(shared, bool):
            raise InvalidRequest("shared must be true or false.", details={"field": "shared"})
        worker = self.visible_worker(worker_id, principal)
        self._share_check(principal, engine=getattr(worker, "backend", None) == "openai", owner=worker.owner)
        (self._shared.add if shared else self._shared.discard)(worker_id)
        self._feed("worker", {"action": "shared" if shared else "unshared", "worker": self.worker_view(worker, None)})
        return self.worker_view(worker, principal)

    def _register_engine(self, spec: EngineSpec, *, owner: str | None, shared: bool = False) -> Job:
        """An external engine becomes a worker; its load job ends ``ready`` once the engine answers."""
        job = self.jobs.create("load", owner=owner, job_id=new_id("w-"))
        job.meta.update(model_ref=spec.model_ref, worker_id=job.id, backend="openai")
        if shared:
            self._shared.add(job.id)

        async def register(job: Job) -> None:
            await self.pool.start(spec, job)
            await job.wait()
        return self.jobs.start(job, register)

    def _blocks(self, req: LoadRequest, path: str) -> list[Any]:
        """The checkpoint's blocks to place; none for an embedding model (it loads whole, see ``_place``)."""
        from ..engine.loader import plan_blocks

        if _kind_of(req, path) == EMBEDDING:
            return []
        if self.config.service_mode:  # a user's files: a helper with a memory limit reads the headers first
            from ..hub.isolate import run_isolated

            run_isolated("rbee_jupyter.core.checkpoint:probe", {"folder": str(path)}, memory_bytes=HEADER_MEMORY,
                         what=f"Reading the safetensors headers of {Path(path).name}")

        # One at a time: the first call imports transformers, whose lazy imports fail
        # ("cannot import name AutoConfig") in a second thread while the first is mid-way.
        with _BLOCKS_LOCK:
            return plan_blocks(path, quantization=req.quantization, dtype=req.dtype, double_quant=req.double_quant,
                               confined=self._confined(req.ref))

    def _place(self, req: LoadRequest, blocks: list[Any], worker_id: str) -> dict[str, str] | str:
        """Plan against free memory, the allowed devices and the quota; reserve what the plan takes.

        Runs on the event loop, never in a thread, so the quota check and the reservation
        are one step: two loads asked for at once cannot both pass on the same room.
        """
        from ..engine.devices import inventory, plan_placement

        if not blocks:  # an embedding model: one device, the whole model on it
            return _embedding_device(req.device, inventory())
        plan = plan_placement(blocks, req.device, inventory(), max_memory=req.max_memory,
                              allowed=self.config.allowed_devices, quota=self.quota())
        self._planned[worker_id] = dict(plan.bytes_per_device)
        return plan.assignments

    def quota(self) -> Any:
        """This server's device limits and what its workers hold (planned size while loading,
        the larger of planned and measured afterwards)."""
        from ..engine.devices import Holder, MiB, Quota, normalise_device_name

        live = {w.id: w for w in self.pool.list() if w.state not in GONE_STATES}
        for worker_id in list(self._planned):
            if worker_id not in live and self._load_over(worker_id):
                del self._planned[worker_id]
        holders = []
        for worker_id in sorted(live.keys() | self._planned.keys()):
            w = live.get(worker_id)
            planned = self._planned.get(worker_id, {})
            measured = {d: int(mb) * MiB for d, mb in (w.memory_mb if w is not None else {}).items()}
            model_ref = w.model_ref if w is not None else self.jobs.get(worker_id, "load").meta.get("model_ref", "")
            for device in sorted(planned.keys() | measured.keys()):
                held = max(planned.get(device, 0), measured.get(device, 0))
                if held:
                    holders.append(Holder(worker_id, model_ref, device, held))
        limits = {normalise_device_name(k): int(v * MiB) for k, v in self.config.device_quota_mb.items()}
        return Quota(limits, tuple(holders))

    def _load_over(self, worker_id: str) -> bool:
        try:
            return self.jobs.get(worker_id, "load").state.finished
        except RbeeError:
            return True

    def devices(self, found: list[Any] | None = None) -> list[dict[str, Any]]:
        """``GET v1/devices``, the feed and the sidebar: the devices this server may use, with its
        quota and use of each. ``found``: an inventory already taken (e.g. in a thread), since
        the quota part must run on the event loop."""
        from dataclasses import asdict

        from ..engine.devices import MiB, allowed_inventory, inventory

        quota = self.quota()
        return [{**asdict(d), "quota_mb": quota.limits[d.name] // MiB if d.name in quota.limits else None,
                 "in_use_mb": -(-quota.in_use(d.name) // MiB)}
                for d in allowed_inventory(found if found is not None else inventory(), self.config.allowed_devices)]

    async def _load(self, job: Job, req: LoadRequest, entry: CatalogEntry | None, plan: dict[str, str] | None, *,
                    hf_token: str | None = None, prove: bool = False) -> None:
        if prove:  # another user's gated model: the hub, not our cache, says whether this user may
            token = self._hub_token(hf_token)
            hub_plan = await asyncio.to_thread(self.downloader.resolve, req.ref, token=token)
            await asyncio.to_thread(self._check_hub_access, hub_plan, token)
        if entry is None:
            entry = await self._download_into(job, req.ref, hf_token)
            plan = self._place(req, await asyncio.to_thread(self._blocks, req, entry.local_path), job.id)
        if plan is None:  # the download above plans; a load of a model on disk came with its plan
            raise RbeeError(f"Loading {req.ref} has no placement plan.", details={"model_ref": str(req.ref)})
        model_path, pinned = entry.local_path, False
        if self.config.service_mode and req.ref.scheme == "file" and not req.ref.is_gguf:
            # allowed at POST; checked again now, and the worker refuses it if it resolves elsewhere later
            model_path, pinned = str(self._allowed_local(entry.local_path)), True
        spec = WorkerSpec(model_ref=str(req.ref), model_path=model_path, device_map=plan, pinned=pinned,
                          quantization=req.quantization, dtype=req.dtype, double_quant=req.double_quant,
                          owner=job.owner, queue_depth=self.config.queue_depth,
                          max_tokens_limit=self.config.max_tokens_limit, worker_id=job.id, node=req.node,
                          max_batch_size=self.config.max_batch_size, kv_budget_mb=self.config.kv_budget_mb,
                          kind=_kind_of(req, entry.local_path), confined=self._confined(req.ref))
        if job.cancel_event.is_set():
            raise Cancelled("Loading was cancelled before it started.")
        await self.pool.start(spec, job)
        await job.wait()

    async def _download_into(self, job: Job, ref: ModelRef, hf_token: str | None = None) -> CatalogEntry:
        """Run (or join) the model's download and relay its events into ``job``."""
        download = self.download(ref, owner=job.owner, hf_token=hf_token)
        job.on_cancel(download.cancel)
        async for record in download.subscribe(last_event_id=0):
            if record.event.to_dict().get("stage") == "error":
                raise download.error or RbeeError(record.event.to_dict()["message"])
            job.publish(record.event)
        entry = self.catalog.get(str(ref))
        if entry is None:
            raise Cancelled("The download was cancelled.") if job.cancel_event.is_set() else ModelNotFound(
                f"{ref} could not be downloaded.", details={"model_ref": str(ref)})
        return entry

    def workers(self, principal: Principal | None = None) -> list[dict[str, Any]]:
        """``GET v1/workers``: every worker ``principal`` may see, as they may see it, with ``load`` and the
        worker's last-known counters (:mod:`.live`: a copy the hive keeps while it works, so that one slow
        worker never slows or fails the list)."""
        return [self.worker_view(w, principal) for w in self.pool.list() if self.sees_worker(principal, w)]

    def _loads(self) -> dict[str, int]:
        """worker id → generations this hive sent it that have not ended (active plus queued)."""
        loads: dict[str, int] = {}
        for job in self.jobs.list("inference"):
            worker_id = job.meta.get("worker_id")
            if worker_id is not None and not job.state.finished:
                loads[worker_id] = loads.get(worker_id, 0) + 1
        return loads

    def worker(self, worker_id: str) -> WorkerInfo:
        try:
            return self.pool.get(worker_id)
        except WorkerNotFound:
            job = self._load_job(worker_id)
            return WorkerInfo.pending(worker_id, job.meta["model_ref"], owner=job.owner,
                                      state=WorkerState.FAILED if job.state.finished else WorkerState.LOADING)

    async def worker_detail(self, worker_id: str, *, principal: Principal | None = None) -> dict[str, Any]:
        """The registry's view plus the worker's live counters (``tokens_computed``, queue); other users
        see a shared worker's public view only."""
        worker = self.visible_worker(worker_id, principal)
        if not self.may_see_all_of(principal, worker):
            return self.worker_view(worker, principal)
        info = self.worker_view(worker, principal)
        if info.get("backend") == "openai":
            return {**await self.pool.health(worker_id), "shared": info["shared"]}  # probes the engine now
        if info["pid"] is None or info["state"] in GONE_STATES:
            return info
        live = await self.pool.health(worker_id)
        keys = ("tokens_computed", "queue_length", "queue_depth", "running", "rss_mb", "active_sequences",
                "batch_size", "max_batch_size", "tokens_per_second", "kv_budget_tokens", "kv_reserved_tokens",
                "embed_requests", "encode_calls")
        return {**info, **{k: live[k] for k in keys if k in live}}

    def _load_job(self, worker_id: str) -> Job:
        try:
            return self.jobs.get(worker_id, "load")
        except RbeeError:
            raise WorkerNotFound(f"No worker {worker_id!r}. GET v1/workers lists the workers.",
                                 details={"worker_id": worker_id}) from None

    async def unload(self, worker_id: str, *, principal: Principal | None = None) -> None:
        """Cancel a load (between layers) or unload a worker; its process exits.

        Raises:
            NotOwner: in service mode, ``principal`` is neither the worker's owner nor an admin.
        """
        if self.config.service_mode:
            check_control(principal, self.visible_worker(worker_id, principal).owner, what=f"worker {worker_id}")
        self._shared.discard(worker_id)
        job = None
        try:
            job = self._load_job(worker_id)
        except WorkerNotFound:
            pass
        if job is not None and not job.state.finished:
            job.cancel("Loading was cancelled by the user.")
        try:
            await self.pool.stop(worker_id)
        except WorkerNotFound:
            if job is None:
                raise

    def load_job(self, worker_id: str, *, principal: Principal | None = None) -> Job:
        """A worker's loading job; in service mode its owner's and admins' only (404 for others)."""
        job = self._load_job(worker_id)
        if not self.sees_job(principal, job):
            raise WorkerNotFound(f"No worker {worker_id!r}. GET v1/workers lists the workers.",
                                 details={"worker_id": worker_id})
        return job

    # --- inference ----------------------------------------------------------------

    def infer(self, body: dict[str, Any] | GenerationRequest, *, worker_id: str | None = None,
              model_ref: str | None = None, owner: str | None = None, principal: Principal | None = None) -> Job:
        """Start a generation on ``worker_id`` or on a loaded worker of ``model_ref``.

        Args:
            body: a ``POST v1/inference`` body (validated here, once: the pool gets the typed
                request), or a request already parsed at an edge (``worker_id``/``model_ref``
                then say where).

        Raises:
            InvalidRequest: a malformed body (nothing is started).
            AccessDenied: in service mode, the worker holds a gated or private model
                the caller has not shown access to.
        """
        if isinstance(body, GenerationRequest):
            req = body
        else:
            req = GenerationRequest.from_json(body, max_tokens_limit=self.config.max_tokens_limit)
            worker_id, model_ref = body.get("worker_id"), body.get("model_ref")
        owner = principal.name if principal is not None else owner
        worker = self.pick_worker(worker_id=worker_id, model_ref=model_ref, principal=principal)
        self._check_user_cap(principal, "streams")
        job = self.jobs.create("inference", owner=owner, error_style="type")
        job.meta.update(worker_id=worker.id, model_ref=worker.model_ref)
        raw = body if not isinstance(body, GenerationRequest) else {
            **req.to_json(), **{k: v for k, v in (("worker_id", worker_id), ("model_ref", model_ref)) if v}}
        job.request = {k: (f"<{len(v)} items>" if k in ("prompt", "messages") and hasattr(v, "__len__") else v)
                       for k, v in raw.items()}  # the log needs the options, not what the user wrote
        return self.jobs.start(job, lambda j: self.pool.generate(worker.id, req, j))

    def pick_worker(self, *, worker_id: Any = None, model_ref: Any = None,
                    principal: Principal | None = None) -> WorkerInfo:
        """The worker a generation goes to: ``worker_id``, else the best ready worker of ``model_ref``.

        Raises:
            InvalidRequest: neither is given, or ``worker_id`` is not a string.
            Conflict: the worker asked for is not ready.
            ModelNotLoaded: no worker holds ``model_ref``.
            AccessDenied: the only workers of it hold another user's gated model.
        """
        if worker_id is not None:
            if not isinstance(worker_id, str):
                raise InvalidRequest("worker_id must be a string.", details={"field": "worker_id"})
            worker = self.visible_worker(worker_id, principal)
            if not worker.ready:
                shown = worker.exit_reason if self.may_see_all_of(principal, worker) else None
                why = f" ({shown})" if shown else ""
                raise Conflict(f"Worker {worker_id} is {worker.state}{why}, not ready for inference.",
                               details={"worker_id": worker_id, "state": worker.state})
            if not self.may_use_worker(principal, worker):
                raise _not_yours(worker)
            return worker
        if model_ref is None:
            raise InvalidRequest("Name a worker_id or a model_ref.", details={"field": "worker_id"})
        if isinstance(model_ref, str) and self._is_engine_name(model_ref, principal):
            ref = model_ref  # an engine: by its ref or its name
            return self.route(lambda w: model_ref in (w.model_ref, *engine_aliases(w)), principal, ref)
        ref = str(parse_ref(model_ref))
        return self.route(lambda w: w.model_ref == ref, principal, ref)

    def _is_engine_name(self, name: str, principal: Principal | None) -> bool:
        return any(getattr(w, "backend", None) == "openai" and name in (w.model_ref, *engine_aliases(w))
                   for w in self.pool.list() if self.sees_worker(principal, w))

    def route(self, matches: Any, principal: Principal | None, what: str) -> WorkerInfo:
        """The ready worker for a request that names a model (v1/inference by ref, the OpenAI routes).

        Only workers the caller may use are candidates: their own, and other users' when
        shared. Their own come first, then idle before busy, then the least recently used.

        Raises:
            AccessDenied: only workers of a gated model the caller has not shown access to hold it.
            ModelNotLoaded: no usable worker holds it.
        """
        ready = [w for w in self.pool.list() if w.ready and w.kind != EMBEDDING and self.sees_worker(principal, w)
                 and matches(w)]  # a generation never goes to an embedding worker of the same model
        usable = [w for w in ready if self.may_use_worker(principal, w)]
        if ready and not usable:
            raise _not_yours(ready[0])
        if not usable:
            raise ModelNotLoaded(
                f"No worker holds {what}. Load it first: POST v1/workers {{\"model_ref\": \"{what}\"}} "
                f"or %rbee load {what}.", details={"model_ref": what})
        return _by_preference(usable, principal, loads=self._loads())[0]

    def resolve_model(self, model: Any, principal: Principal | None = None, *, kind: str = "generate") -> WorkerInfo:
        """An OpenAI ``model`` name → the best ready worker answering to it (:func:`worker_names`).

        Only workers the caller may use are candidates; their own come first, and a real holder
        of the model before an engine that merely calls its model so.

        Raises:
            InvalidRequest: no name given.
            Conflict: the model's worker is there but not ready (loading, failed).
            ModelNotFound: no worker the caller may use answers to that name.
        """
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model is required: one of GET openai/v1/models.", details={"field": "model"})
        workers = [w for w in self.pool.list() if self.may_use_worker(principal, w)]
        other = [w for w in workers if w.kind != kind and model in worker_names(w)]
        workers = [w for w in workers if w.kind == kind]
        if other and not any(model in worker_names(w) for w in workers):
            raise InvalidRequest(f"The model {model!r} is an {other[0].kind} model; this route needs one that "
                                 f"{'embeds' if kind == EMBEDDING else 'generates text'}.",
                                 details={"field": "model", "kind": other[0].kind})
        ready = _by_preference([w for w in workers if w.ready], principal, model=model, loads=self._loads())
        for w in ready:
            if model in worker_names(w):
                return w
        for w in workers:  # there, but not usable: say why rather than "not loaded"
            if model in worker_names(w):
                shown = w.exit_reason if self.may_see_all_of(principal, w) else None
                why = f" ({shown})" if shown else ""
                raise Conflict(f"The model {model!r} (worker {w.id}) is {w.state}{why}.",
                               details={"field": "model", "worker_id": w.id, "state": w.state})
        raise ModelNotFound(f"The model {model!r} is not loaded. Load it first (POST rbee/v1/workers or "
                            f"%rbee load); loaded: {', '.join(worker_names(w)[0] for w in ready) or 'none'}.",
                            details={"field": "model"})

    def served_models(self, principal: Principal | None = None) -> list[WorkerInfo]:
        """The ready workers the caller may use (what ``openai/v1/models`` lists)."""
        return [w for w in self.pool.list() if w.ready and self.may_use_worker(principal, w)]

    async def embed(self, body: dict[str, Any], *, principal: Principal | None = None) -> dict[str, Any]:
        """Embed ``body["input"]`` on an embedding worker (``worker_id`` or ``model_ref``, as for :meth:`infer`).

        The body is validated here, before any worker is asked.

        Returns:
            ``{"embeddings": [base64 float32 per input], "dimension", "prompt_tokens"}``.

        Raises:
            InvalidRequest: a bad body, or a worker that generates instead of embedding.
            AccessDenied: in service mode, a worker the caller may not use.
        """
        from ..engine.embed import EmbeddingRequest

        req = EmbeddingRequest.from_json(body)
        worker = self.pick_worker(worker_id=body.get("worker_id"), model_ref=body.get("model_ref"), principal=principal)
        if worker.kind != EMBEDDING:
            raise InvalidRequest(f"{worker.model_ref} (worker {worker.id}) generates text and does not embed; load "
                                 "a sentence-transformers model (POST v1/workers with \"kind\": \"embedding\").",
                                 details={"field": "model", "worker_id": worker.id, "kind": worker.kind})
        async with self.live.working(worker.id):  # the pool has no busy state for embeddings: watch its queue
            return await self.pool.embed(worker.id, req.to_json())

    # --- server-wide feed -----------------------------------------------------------

    def _feed(self, topic: str, data: dict[str, Any]) -> None:
        model = data.get("model") or {}
        if self.config.service_mode and model.get("restricted"):  # the feed goes to every user
            return
        if self.feed is not None:
            self.feed.publish(FeedEvent(topic=topic, data=data))


def _kind_of(req: LoadRequest, path: str) -> str:
    """The worker kind for a model: as asked, else ``embedding`` when its files are sentence-transformers'."""
    from ..engine.embed import is_embedding_model

    if req.kind is not None:
        return req.kind
    return EMBEDDING if is_embedding_model(path) else "generate"


def _embedding_device(spec: str | list[str], devices: list[Any]) -> str:
    """The one device an embedding model goes on: the first asked for; ``auto``: the first GPU, else the CPU."""
    if isinstance(spec, list):
        return spec[0]
    if spec == "auto":
        return next((d.name for d in devices if d.kind == "cuda"), "cpu")
    return spec

def _by_preference(workers: list[WorkerInfo], principal: Principal | None = None, *,
                   model: str | None = None, loads: dict[str, int] | None = None) -> list[WorkerInfo]:
    """Where a generation should go first (routing lives here): the caller's own workers, then, for
    an OpenAI ``model`` name, a real holder of that model before an engine that merely calls its
    model so, then the least loaded (generations running or queued: replicas share the requests
    instead of one batch growing while another idles), then idle before busy, then the longest unused."""
    mine = principal.name if principal is not None else None
    loads = loads or {}

    def key(w: WorkerInfo) -> tuple:
        by_alias = model is not None and model in engine_aliases(w) and model != _model_id(w.model_ref)
        return (w.owner != mine, by_alias, loads.get(w.id, 0), w.state != WorkerState.IDLE, w.last_used)
    return sorted(workers, key=key)


def worker_names(w: WorkerInfo) -> list[str]:
    """Every ``model`` name a worker answers to; the first is the one ``openai/v1/models`` lists.

    An external engine answers to its configured name and its model's name on the engine,
    every worker to its ref without ``hf:`` (``org/repo``), its ref and its id.
    """
    return [*engine_aliases(w), _model_id(w.model_ref), w.model_ref, w.id]


def _model_id(ref: str) -> str:
    try:
        return parse_ref(ref).display_name
    except RbeeError:
        return ref


def _shared_field(body: Any) -> bool:
    """The ``shared`` field of a ``POST v1/workers`` body (false when absent)."""
    shared = body.get("shared", False) if isinstance(body, dict) else False
    if not isinstance(shared, bool):
        raise InvalidRequest("shared must be true or false: whether other users may see and use the worker.",
                             details={"field": "shared"})
    return shared


def _not_yours(worker: WorkerInfo) -> AccessDenied:
    return AccessDenied(f"Worker {worker.id} holds {worker.model_ref}, a gated or private model that {worker.owner} "
                        "downloaded; load your own worker of it with your hub token (X-HF-Token).",
                        details={"worker_id": worker.id, "model_ref": worker.model_ref, "owner": worker.owner})


def register_local(ref: ModelRef) -> CatalogEntry:
    """Check a local model folder (or GGUF file) and describe it; nothing is copied."""
    path = Path(ref.path or "")
    if not path.exists():
        raise ModelNotFound(f"{path} does not exist on the server's machine.", details={"model_ref": str(ref)})
    if ref.is_gguf:
        if not path.is_file():
            raise InvalidCheckpoint(f"{path} is not a file.", details={"model_ref": str(ref)})
        files: list[str] = []
        size = path.stat().st_size
    else:
        if not path.is_dir():
            raise InvalidCheckpoint(f"{path} is neither a model folder nor a .gguf file.",
                                    details={"model_ref": str(ref)})
        names = sorted(p.name for p in path.iterdir() if p.is_file())
        if "config.json" not in names:
            raise InvalidCheckpoint(f"{path} has no config.json, so it is not a transformers model folder.",
                                    details={"model_ref": str(ref)})
        if not any(n.endswith(".safetensors") for n in names):
            raise InvalidCheckpoint(f"{path} has no .safetensors weights; convert the checkpoint to "
                                    "safetensors first.", details={"model_ref": str(ref)})
        files = names
        size = sum((path / n).stat().st_size for n in names)
    return CatalogEntry(ref=str(ref), local_path=str(path), size_bytes=size, files=files, source="file")
