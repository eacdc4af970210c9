"""The hive: the transport-free core that owns downloads, the catalog and the workers.

The Jupyter server extension, the embedded (in-kernel) mode and the tests all drive
this one object; nothing here knows about Tornado or HTTP. Every method returns plain
data or a ``Job`` whose event log subscribers read.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalog import Catalog, CatalogEntry
from .download import Downloader
from .errors import Conflict, InvalidCheckpoint, ModelNotFound
from .events import DownloadComplete, FeedEvent
from .jobs import Job, JobRegistry
from .refs import ModelRef, parse_ref


@dataclass
class HiveConfig:
    """What the hive needs to know; the server fills it from ``RbeeApp`` traits."""

    cache_dir: Path
    catalog_path: Path
    hub_endpoint: str | None = None
    hf_token: str | None = None
    download_stall_s: float = 60.0
    download_retries: int = 6
    download_backoff_s: float = 0.5
    max_concurrent_downloads: int = 2
    disk_reserve_mb: int = 0
    job_retention_s: float = 600.0
    extra: dict[str, Any] = field(default_factory=dict)


class Hive:
    """Downloads, catalog and (later) workers, behind one asynchronous API."""

    def __init__(self, config: HiveConfig) -> None:
        self.config = config
        self.jobs = JobRegistry(retention_s=config.job_retention_s)
        self.catalog = Catalog(config.catalog_path)
        self.downloader = Downloader(
            cache_dir=Path(config.cache_dir), endpoint=config.hub_endpoint, token=config.hf_token,
            stall_s=config.download_stall_s, retries=config.download_retries,
            backoff_s=config.download_backoff_s, disk_reserve_bytes=config.disk_reserve_mb * 2**20)
        self._download_slots: asyncio.Semaphore | None = None
        self.feed: Job | None = None  # the server-wide event feed, when a UI asked for one
        self.catalog.resync()

    async def stop(self) -> None:
        await self.jobs.shutdown()
        self.catalog.close()

    # --- downloads ----------------------------------------------------------------

    def download(self, model_ref: str | ModelRef, *, owner: str | None = None) -> Job:
        """Start (or join) the download of ``model_ref``; returns its job at once.

        The same ref asked for while it is downloading gives the same job: one
        transfer, any number of watchers.

        Raises:
            InvalidModelRef: the ref is malformed (nothing is started).
        """
        ref = model_ref if isinstance(model_ref, ModelRef) else parse_ref(model_ref)
        key = ("download", str(ref))
        existing = self.jobs.find_active(key)
        if existing is not None:
            return existing
        job = self.jobs.create("download", key=key, owner=owner)
        job.meta["model_ref"] = str(ref)
        return self.jobs.start(job, lambda j: self._download(j, ref))

    async def _download(self, job: Job, ref: ModelRef) -> None:
        if ref.scheme == "file":
            entry = register_local(ref)
        else:
            if self._download_slots is None:
                self._download_slots = asyncio.Semaphore(max(1, self.config.max_concurrent_downloads))
            async with self._download_slots:
                entry = await self._fetch(job, ref)
        self.catalog.add(entry)
        self._feed("catalog", {"action": "added", "model": entry.to_dict()})
        job.finish(DownloadComplete(local_path=entry.local_path, model_ref=entry.ref,
                                    revision=entry.revision, size_bytes=entry.size_bytes))

    async def _fetch(self, job: Job, ref: ModelRef) -> CatalogEntry:
        plan = await asyncio.to_thread(self.downloader.resolve, ref)
        job.meta.update(revision=plan.commit, bytes_total=plan.bytes_total)
        active: list[Any] = []

        def remember(response: Any) -> None:
            active[:] = [response] if response is not None else []

        def interrupt() -> None:  # a blocked read returns at once when its response closes
            for r in list(active):
                try:
                    r.close()
                except Exception:
                    pass

        job.on_cancel(interrupt)
        path = await asyncio.to_thread(self.downloader.fetch, plan, emit=job.publish_threadsafe,
                                       cancel=job.cancel_event, on_response=remember)
        await asyncio.sleep(0)  # let the last threadsafe progress event land before `complete`
        return CatalogEntry(ref=str(ref), repo_id=ref.repo_id, revision=plan.commit, local_path=str(path),
                            size_bytes=plan.bytes_total, files=[f.path for f in plan.files], source="hub")

    def job(self, job_id: str, kind: str | None = None) -> Job:
        return self.jobs.get(job_id, kind)

    def cancel(self, job_id: str, kind: str | None = None) -> None:
        """Cancel a job; cancelling a finished job is not an error (idempotent)."""
        self.jobs.get(job_id, kind).cancel()

    # --- catalog ------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        self.catalog.resync()
        return [e.to_dict() for e in self.catalog.list()]

    def delete_model(self, model_ref: str | ModelRef) -> None:
        """Remove a model from disk and catalog (a ``file://`` folder is only forgotten).

        Raises:
            ModelNotFound: not in the catalog.
            Conflict: a worker holds it, or it is downloading.
        """
        ref = model_ref if isinstance(model_ref, ModelRef) else parse_ref(model_ref)
        entry = self.catalog.get(str(ref))
        if entry is None:
            raise ModelNotFound(f"{ref} is not in the catalog.", details={"model_ref": str(ref)})
        if self.jobs.find_active(("download", str(ref))) is not None:
            raise Conflict(f"{ref} is downloading; cancel the download first.", details={"model_ref": str(ref)})
        self._check_not_in_use(str(ref))
        self.catalog.remove(str(ref))
        if entry.source == "hub":
            _remove_snapshot(Path(entry.local_path), still_used={Path(e.local_path) for e in self.catalog.list()})
        self._feed("catalog", {"action": "removed", "model": entry.to_dict()})

    def _check_not_in_use(self, ref: str) -> None:
        """Hook for the worker pool: refuse to delete what a worker holds."""

    # --- server-wide feed -----------------------------------------------------------

    def _feed(self, topic: str, data: dict[str, Any]) -> None:
        if self.feed is not None:
            self.feed.publish(FeedEvent(topic=topic, data=data))


def register_local(ref: ModelRef) -> CatalogEntry:
    """Check a local model folder (or GGUF file) and describe it; nothing is copied."""
    assert ref.path is not None
    path = Path(ref.path)
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


def _remove_snapshot(snapshot: Path, *, still_used: set[Path]) -> None:
    """Delete a snapshot and the blobs only it pointed at; the repo folder goes when empty."""
    if not snapshot.exists():
        return
    repo_dir = snapshot.parent.parent
    keep = set()
    for other in still_used:
        if other.parent.parent == repo_dir and other.exists():
            keep |= {p.resolve() for p in other.rglob("*") if p.is_symlink()}
    blobs = {p.resolve() for p in snapshot.rglob("*") if p.is_symlink()}
    shutil.rmtree(snapshot, ignore_errors=True)
    for blob in blobs - keep:
        blob.unlink(missing_ok=True)
    if not any((repo_dir / "snapshots").iterdir()):
        shutil.rmtree(repo_dir, ignore_errors=True)
