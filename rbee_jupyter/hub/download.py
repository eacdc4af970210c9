"""Hub downloads with whole-repository byte progress, resume, stall detection and checks.

huggingface_hub does the HTTP (its session, headers, token and endpoint handling, and
its mapping of hub errors); this module decides *which* files, streams each one into
the hub cache layout (``models--org--repo/blobs``, ``snapshots/<sha>``, ``refs``) so
transformers finds them, and reports bytes as they arrive.

Why not ``snapshot_download``: its progress hook does not see per-file bytes, it cannot
be cancelled mid-file, and it drops a partial file on failure. Here a partial file lives
next to its blob as ``<blob>.rbee-incomplete`` and every retry (and a restarted server)
resumes from it with a ``Range`` request; it is deleted on cancel or final failure, and
only renamed into place once its size and hash match what the hub publishes.

Several servers may share one cache (JupyterHub: ``c.RbeeApp.cache_dir`` on a shared
folder). Each blob is fetched under huggingface_hub's own lock file
(``.locks/models--org--repo/<etag>.lock``), so another server, or transformers in a
kernel, fetching the same blob waits instead of transferring it twice. The waiting side
is not blind: it reports the holder's partial file as its own progress, checks the blob
it gets, and if the holder dies (the lock is released, the partial left behind) it
takes over and resumes from that partial file.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout
from huggingface_hub import HfApi
from huggingface_hub import errors as hf_errors
from huggingface_hub.file_download import hf_hub_url, repo_folder_name
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from .. import __version__
from ..core.paths import nearest_existing
from ..core.refs import ModelRef
from ..errors import (
    AccessDenied,
    CacheNotWritable,
    Cancelled,
    ChecksumMismatch,
    DownloadFailed,
    DownloadStalled,
    InsufficientDisk,
    ModelNotFound,
    RbeeError,
    RevisionNotFound,
)
from ..events import DownloadProgress
from ..protocol import (DOWNLOAD_BACKOFF_S, DOWNLOAD_CONNECTIONS, DOWNLOAD_RETRIES, DOWNLOAD_SEGMENT_MB,
                        DOWNLOAD_SPREAD_BELOW_MBPS, DOWNLOAD_STALL_S)
from .names import check_commit, check_etag, check_inside, check_repo_path
from .segments import PrefixHasher, Segment, SegmentTable, done_bytes, sidecar_of, start_writeback

try:  # huggingface_hub >= 2 ships its own fork of httpx
    import httpx2 as _http
except ImportError:  # pragma: no cover - older huggingface_hub
    import httpx as _http

_SKIP_WHEN_SAFETENSORS = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ot", ".ckpt", ".gguf")
_TOKENIZER_AND_CONFIG = (".json", ".model", ".txt", ".jinja", ".tiktoken", ".py")


@dataclass(frozen=True)
class RepoFile:
    """One file of a repository at a commit, with what the hub says it must hash to."""

    path: str
    size: int
    git_oid: str
    sha256: str | None = None

    @property
    def etag(self) -> str:
        """The blob name huggingface_hub uses in its cache (sha256 for LFS, git oid otherwise)."""
        return self.sha256 or self.git_oid


@dataclass
class DownloadPlan:
    """What one download will fetch: resolved before the first byte so totals are known."""

    ref: ModelRef
    commit: str
    files: list[RepoFile]
    repo_dir: Path
    restricted: bool = False
    """The repo is gated or private: the cache alone must not stand in for the hub's permission."""
    token: str | bool | None = field(default=None, repr=False, compare=False)
    """The token for this plan's requests (one user's, on a shared server); None: the downloader's."""

    @property
    def bytes_total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def snapshot_dir(self) -> Path:
        return self.repo_dir / "snapshots" / self.commit

    def blob(self, f: RepoFile) -> Path:
        return self.repo_dir / "blobs" / f.etag

    def lock(self, f: RepoFile) -> Path:
        """huggingface_hub's lock file for this blob: sharing it is what makes the wait mutual."""
        return self.repo_dir.parent / ".locks" / self.repo_dir.name / f"{f.etag}.lock"


def _check_names(repo_dir: Path, commit: str, files: list[RepoFile], repo_id: str) -> None:
    """Every name the hub gave that becomes a path is safe (see ``names``), before any byte moves."""
    snapshot = repo_dir / "snapshots" / commit
    for f in files:
        check_repo_path(f.path, repo_id)
        check_etag(f.git_oid, lfs=False, repo_id=repo_id)
        if f.sha256 is not None:
            check_etag(f.sha256, lfs=True, repo_id=repo_id)
        check_inside(snapshot, f.path, repo_id)
        if not isinstance(f.size, int) or f.size < 0:
            raise DownloadFailed(f"The hub answered a size of {f.size!r} for {f.path} of {repo_id}.",
                                 details={"reason": "unsafe_hub_answer", "field": "size", "file": f.path})


def select_files(paths: list[str], gguf_file: str | None = None) -> list[str]:
    """The files loading needs: weights in one format, config and tokenizer.

    safetensors win over every other weight format; a ``.gguf`` is fetched only when
    the ref names it. Docs, images and other formats' weights are skipped.
    """
    def is_meta(p: str) -> bool:
        name = p.rsplit("/", 1)[-1]
        return name.endswith(_TOKENIZER_AND_CONFIG) and not name.startswith(".") and name not in (
            "requirements.txt",)

    if gguf_file is not None:
        return [p for p in paths if p == gguf_file or ("/" not in p and is_meta(p))]
    has_safetensors = any(p.endswith(".safetensors") for p in paths)
    chosen = []
    for p in paths:
        if p.endswith(".safetensors") or p.endswith(".safetensors.index.json"):
            chosen.append(p)
        elif p.endswith(_SKIP_WHEN_SAFETENSORS):
            if not has_safetensors and not p.endswith(".gguf") and "/" not in p:
                chosen.append(p)
        elif is_meta(p):
            chosen.append(p)
    return chosen


class ByteMeter:
    """Whole-repository byte counter that only grows, with a windowed speed and a throttle.

    A file that must be fetched again (bad hash) does not move the total back: each
    file counts its high-water mark, so ``bytes_downloaded`` is monotonic.
    """

    def __init__(self, plan: DownloadPlan, emit: Callable[[DownloadProgress], None], *,
                 min_interval_s: float = 0.1, window_s: float = 3.0) -> None:
        self.total = plan.bytes_total
        self.files_total = len(plan.files)
        self.files_done = 0
        self._emit = emit
        self._current: dict[str, int] = {}
        self._best: dict[str, int] = {}
        self._reported = 0
        self._samples: deque[tuple[float, int]] = deque()
        self._min_interval = min_interval_s
        self._window = window_s
        self._last_emit = 0.0
        self._file: str | None = None
        self._done: set[str] = set()
        self._lock = threading.RLock()  # files and segments report from their own threads

    @property
    def bytes_downloaded(self) -> int:
        return self._reported

    def set(self, path: str, nbytes: int) -> None:
        """The file at ``path`` now holds ``nbytes`` on disk."""
        with self._lock:
            self._file = path
            self._current[path] = nbytes
            if nbytes > self._best.get(path, 0):
                self._reported += nbytes - self._best.get(path, 0)
                self._best[path] = nbytes
            self.tick()

    def file_done(self, path: str, size: int) -> None:
        with self._lock:
            self.set(path, size)
            if path not in self._done:
                self._done.add(path)
                self.files_done += 1
            self.tick(force=self.files_done == self.files_total)

    def active(self) -> dict[str, int]:
        """Per-file detail: bytes on disk of each file started and not finished yet."""
        return {p: n for p, n in self._current.items() if p not in self._done}

    def speed_mbps(self, now: float) -> float:
        samples = self._samples
        samples.append((now, self._reported))
        while len(samples) > 2 and now - samples[0][0] > self._window:
            samples.popleft()
        t0, b0 = samples[0]
        return round((self._reported - b0) * 8 / 1e6 / (now - t0), 3) if now > t0 else 0.0

    def tick(self, *, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_emit < self._min_interval:
                return
            self._last_emit = now
            self._emit(DownloadProgress(bytes_downloaded=self._reported, bytes_total=self.total,
                                        speed_mbps=self.speed_mbps(now), files_done=self.files_done,
                                        files_total=self.files_total, file=self._file, files_active=self.active()))


@dataclass
class Downloader:
    """Fetches hub repositories into ``cache_dir`` (huggingface_hub's cache layout).

    Thread-based: ``resolve`` and ``fetch`` block, so the hive runs them in threads.
    """

    cache_dir: Path
    endpoint: str | None = None
    token: str | None = None
    stall_s: float = DOWNLOAD_STALL_S
    retries: int = DOWNLOAD_RETRIES
    backoff_s: float = DOWNLOAD_BACKOFF_S
    disk_reserve_bytes: int = 0
    lock_poll_s: float = 0.25
    """While another process holds a blob's lock: how often its partial file is measured."""
    connections: int = DOWNLOAD_CONNECTIONS
    """HTTP transfers of one download at once, across its files and its big files' segments."""
    segment_bytes: int = int(DOWNLOAD_SEGMENT_MB * 2**20)
    """Files of at least twice this size are fetched as ranged segments of about this size."""
    spread_below_bps: float = DOWNLOAD_SPREAD_BELOW_MBPS * 1e6
    """A first ranged connection at least this fast keeps a file's segments to itself (see :class:`_RangeProbe`)."""
    _api: HfApi = field(init=False)

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir)
        self._api = HfApi(endpoint=self.endpoint, token=self.token, library_name="rbee-jupyter",
                          library_version=__version__)

    # --- planning -----------------------------------------------------------------

    def resolve(self, ref: ModelRef, *, token: str | bool | None = None) -> DownloadPlan:
        """Ask the hub for the commit and the file tree; map its errors to ours.

        Args:
            token: used for this plan's requests instead of the downloader's (False: none).
        """
        assert ref.scheme == "hf" and ref.repo_id
        with _hub_errors(ref):
            info = self._api.model_info(ref.repo_id, revision=ref.revision, token=token)
            commit = check_commit(info.sha, ref.repo_id)
            tree = [e for e in self._api.list_repo_tree(ref.repo_id, revision=commit, recursive=True, token=token)
                    if hasattr(e, "size") and hasattr(e, "blob_id")]
        by_path = {e.path: e for e in tree}
        if ref.filename and ref.filename not in by_path:
            raise ModelNotFound(f"{ref.repo_id} has no file {ref.filename!r} at {ref.revision or 'main'}.",
                                details={"model_ref": str(ref), "files": sorted(by_path)[:50]})
        chosen = select_files(sorted(by_path), ref.filename)
        if not chosen:
            raise ModelNotFound(f"{ref.repo_id} holds no model weights this server can load.",
                                details={"model_ref": str(ref)})
        files = [RepoFile(p, by_path[p].size, by_path[p].blob_id,
                          by_path[p].lfs.sha256 if by_path[p].lfs else None) for p in chosen]
        repo_dir = self.cache_dir / repo_folder_name(repo_id=ref.repo_id, repo_type="model")
        _check_names(repo_dir, commit, files, ref.repo_id)
        return DownloadPlan(ref, commit, files, repo_dir, restricted=bool(info.gated or info.private), token=token)

    def check_access(self, plan: DownloadPlan) -> None:
        """Ask the hub whether the plan's token may read the repo's files (``HEAD`` of one file).

        Files already in the cache are never fetched again, so for a gated or private repo
        this question must be put to the hub explicitly before they are handed out.

        Raises:
            AccessDenied: the hub refused.
        """
        f = plan.files[0]
        url = hf_hub_url(plan.ref.repo_id, f.path, revision=plan.commit, endpoint=self.endpoint)
        headers = build_hf_headers(token=self._token(plan), library_name="rbee-jupyter", library_version=__version__)
        with _hub_errors(plan.ref):
            r = get_session().head(url, headers=headers, timeout=min(self.stall_s, 30.0), follow_redirects=False)
            if r.status_code >= 400:
                hf_raise_for_status(r)

    def _token(self, plan: DownloadPlan) -> str | bool | None:
        return self.token if plan.token is None else plan.token

    def check_disk(self, plan: DownloadPlan) -> None:
        """Refuse before the first byte when the cache's disk cannot hold what is missing."""
        need = sum(f.size - _have(_partial(plan.blob(f)), f.size) for f in plan.files if not plan.blob(f).exists())
        free = shutil.disk_usage(nearest_existing(self.cache_dir)).free - self.disk_reserve_bytes
        if need > free:
            raise InsufficientDisk(
                f"Not enough disk space in {self.cache_dir}: the download needs {need // 2**20} MB, "
                f"{max(free, 0) // 2**20} MB are free. Free some space or set c.RbeeApp.cache_dir.",
                details={"need_mb": need // 2**20, "free_mb": max(free, 0) // 2**20,
                         "folder": str(self.cache_dir)})

    def check_writable(self, ref: ModelRef) -> None:
        """Refuse before anything starts when the cache, or a folder of this repo in it, cannot be written.

        Probes by creating (and removing) a file, because permission bits say nothing
        about read-only mounts, ACLs, or root. Only the folders this download writes into
        are probed (for one that does not exist yet: the parent it will be created in), so
        a repository whose folders all exist needs no write access to the cache's top.

        Raises:
            CacheNotWritable: names the first folder that cannot be written.
        """
        folders = []
        if ref.scheme == "hf" and ref.repo_id:
            repo_dir = self.cache_dir / repo_folder_name(repo_id=ref.repo_id, repo_type="model")
            folders += [self.cache_dir / ".locks" / repo_dir.name, repo_dir / "blobs", repo_dir / "snapshots",
                        repo_dir / "refs"]
        if ref.is_gguf:  # imported into <cache>/rbee-gguf/
            folders.append(self.cache_dir / "rbee-gguf")
        for folder in dict.fromkeys(nearest_existing(f) for f in folders):
            _probe_writable(folder)

    def partial_files(self) -> list[tuple[str, Path]]:
        """``(repo_id, path)`` of every partial file in the cache: transfers that have not finished."""
        out = []
        for partial in sorted(self.cache_dir.glob("models--*/blobs/*.rbee-incomplete")):
            repo_id = partial.parent.parent.name.removeprefix("models--").replace("--", "/")
            out.append((repo_id, partial))
        return out

    # --- fetching -----------------------------------------------------------------

    def fetch(self, plan: DownloadPlan, *, emit: Callable[[DownloadProgress], None],
              cancel: threading.Event) -> Path:
        """Download every file of ``plan``; returns the snapshot folder.

        Up to ``connections`` transfers run at once, across files and across the ranged
        segments of big files; the first file that fails for good stops the others.

        Args:
            emit: receives throttled progress (the last state is always emitted).
            cancel: when set, the fetch stops at once: a watcher wakes on it, marks the fetch
                stopped and then closes every open response, so blocked reads return and end as
                ``Cancelled`` (closed in the other order, a reader would see a closed stream it
                could not tell from a bug); partial files are removed.

        Raises:
            CacheNotWritable: a folder of the cache cannot be written (named in the error).
            DownloadStalled: also when another process holding a blob's lock stops making progress.
        """
        with _cache_errors(self.cache_dir):
            self.check_disk(plan)
            meter = ByteMeter(plan, emit)
            meter.tick(force=True)
            run = _Run(threading.Event(), _Responses(), threading.BoundedSemaphore(max(1, self.connections)))
            watcher = threading.Thread(target=run.watch, args=(cancel,), name="rbee-download-cancel", daemon=True)
            watcher.start()
            try:
                self._fetch_files(plan, meter, run)
            finally:
                run.finish()
            ref_file = plan.repo_dir / "refs" / (plan.ref.revision or "main")
            if plan.ref.revision != plan.commit and _read(ref_file) != plan.commit:
                _write_atomic(ref_file, plan.commit)
        return plan.snapshot_dir

    def _fetch_files(self, plan: DownloadPlan, meter: ByteMeter, run: _Run) -> None:
        """Every file in a pool of ``connections`` threads; the first real error wins."""
        def one(f: RepoFile) -> None:
            try:
                if run.stop.is_set():
                    raise Cancelled("Download cancelled.")
                self._fetch_file(plan, f, meter, run)
                self._link(plan, f)
            except BaseException as e:
                run.fail(e)
                raise

        with ThreadPoolExecutor(max(1, min(self.connections, len(plan.files))),
                                thread_name_prefix="rbee-file") as pool:
            futures = [pool.submit(one, f) for f in plan.files]
            wait(futures)
        if run.error is not None:
            raise run.error

    def _fetch_file(self, plan: DownloadPlan, f: RepoFile, meter: ByteMeter, run: _Run) -> None:
        blob = plan.blob(f)
        if _size(blob) == f.size:
            meter.file_done(f.path, f.size)
            return
        blob.parent.mkdir(parents=True, exist_ok=True)
        lock_path = plan.lock(f)
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_path), mode=0o664, thread_local=False)  # group-writable, as huggingface_hub makes it
        waited = self._acquire(lock, plan, f, meter, run.stop)
        try:
            if _size(blob) == f.size:
                if not waited or _digest(blob, f) == f.etag:
                    meter.file_done(f.path, f.size)
                    return
                blob.unlink()  # whoever wrote it did not check it: fetch it again, ourselves
            partial = _partial(blob)
            try:
                self._fetch_checked(plan, f, partial, meter, run)
            except BaseException:
                _remove_partial(partial)
                raise
            os.replace(partial, blob)  # atomic: a reader sees no blob or the whole, checked blob
            with contextlib.suppress(OSError):
                sidecar_of(partial).unlink(missing_ok=True)
        finally:
            lock.release()
        meter.file_done(f.path, f.size)

    def _acquire(self, lock: FileLock, plan: DownloadPlan, f: RepoFile, meter: ByteMeter,
                 cancel: threading.Event) -> bool:
        """Take the blob's lock; while another process holds it, show its progress as ours.

        Returns whether we had to wait (then the blob we find was written by someone else
        and gets checked). Gives up with ``DOWNLOAD_STALLED`` when the holder's partial file
        has not grown for longer than our own stall budget (every retry stalling), since a
        holder that is alive but stuck would otherwise keep us waiting for ever.
        """
        waited = False
        blob = plan.blob(f)
        patience = self.stall_s * (max(1, self.retries) + 1)
        seen, since = -1, time.monotonic()
        while True:
            try:
                lock.acquire(timeout=self.lock_poll_s)
                return waited
            except Timeout:
                waited = True
            if cancel.is_set():
                raise Cancelled("Download cancelled.")
            have = f.size if _size(blob) == f.size else _holder_progress(blob, f.size)
            meter.set(f.path, min(have, f.size))
            now = time.monotonic()
            if have != seen:
                seen, since = have, now
            elif now - since > patience:
                raise DownloadStalled(
                    f"Another process has been fetching {f.path} into the shared cache, and its partial file "
                    f"has not grown for {patience:g} s. If that process is stuck, stop it; if it is gone and the "
                    f"lock stayed (filesystems without flock), delete {plan.lock(f)}. Then try again.",
                    details={"file": f.path, "stall_s": patience, "lock": str(plan.lock(f))})

    def _fetch_checked(self, plan: DownloadPlan, f: RepoFile, partial: Path, meter: ByteMeter,
                       run: _Run) -> None:
        """Fetch (resuming what is on disk) until the bytes hash to what the hub publishes."""
        last: RbeeError | None = None
        for attempt in range(max(1, self.retries)):
            if attempt and run.stop.wait(min(self.backoff_s * 2 ** (attempt - 1), 8.0)):
                raise Cancelled("Download cancelled.")
            segmented = sidecar_of(partial).exists() or (
                self.connections > 1 and f.size >= 2 * self.segment_bytes and not partial.exists())
            if segmented:
                digest = self._fetch_segments(plan, f, partial, meter, run)
            else:
                self._with_retries(plan, f, run, lambda: self._transfer(plan, f, partial, meter, run))
                digest = None
            if (digest or _digest(partial, f)) == f.etag:
                return
            _remove_partial(partial)
            meter.set(f.path, 0)
            last = ChecksumMismatch(
                f"{f.path} does not match the hash the hub publishes ({self.retries} tries); "
                "the file was deleted. The mirror or a proxy may be corrupting data.",
                details={"file": f.path, "expected": f.etag})
        assert last is not None
        raise last

    def _with_retries(self, plan: DownloadPlan, f: RepoFile, run: _Run, attempt: Callable[[], None]) -> None:
        """Run one transfer (a whole file or one segment), retrying drops, stalls and 5xx with backoff.

        Each try resumes from what the previous one left on disk.
        """
        last: RbeeError | None = None
        for i in range(max(1, self.retries)):
            if i and run.stop.wait(min(self.backoff_s * 2 ** (i - 1), 8.0)):
                raise Cancelled("Download cancelled.")
            try:
                attempt()
                return
            except _http.TimeoutException:
                last = DownloadStalled(
                    f"No bytes arrived for {self.stall_s:g} s while fetching {f.path} "
                    f"({self.retries} tries). Check the network or raise c.RbeeApp.download_stall_s.",
                    details={"file": f.path, "stall_s": self.stall_s})
            except RbeeError:
                raise
            except Exception as e:
                if run.stop.is_set():  # a canceller closed the response under us
                    raise Cancelled("Download cancelled.") from e
                if isinstance(e, hf_errors.HfHubHTTPError) and not _retryable(e):
                    with _hub_errors(plan.ref):
                        raise
                if not isinstance(e, (_http.TransportError, hf_errors.HfHubHTTPError)):
                    raise
                last = DownloadFailed(f"Fetching {f.path} failed after {self.retries} tries: {e}",
                                      details={"file": f.path})
        assert last is not None
        raise last

    @contextlib.contextmanager
    def _get(self, plan: DownloadPlan, f: RepoFile, run: _Run, byte_range: str | None, *, held: bool = False):
        """One ``GET`` of the file, as an open response, holding one of the fetch's connections
        (``held``: the caller already holds it)."""
        url = hf_hub_url(plan.ref.repo_id, f.path, revision=plan.commit, endpoint=self.endpoint)
        headers = build_hf_headers(token=self._token(plan), library_name="rbee-jupyter", library_version=__version__)
        if byte_range:
            headers["Range"] = byte_range
        timeout = _http.Timeout(self.stall_s, connect=min(self.stall_s, 30.0))
        connection = contextlib.nullcontext() if held else run.connection()
        with connection, get_session().stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True) as r:
            run.responses.add(r)
            try:
                hf_raise_for_status(r)
                yield r
            finally:
                run.responses.discard(r)

    def _pump(self, r, write: Callable[[bytes], None], progress: Callable[[int], None], run: _Run) -> None:
        """Copy a response body through ``write``, reporting each chunk; stops when the run stops."""
        for chunk in r.iter_bytes():
            if run.stop.is_set():
                raise Cancelled("Download cancelled.")
            _write(write, chunk, self.cache_dir)
            progress(len(chunk))

    def _transfer(self, plan: DownloadPlan, f: RepoFile, partial: Path, meter: ByteMeter, run: _Run, *,
                  held: bool = False) -> None:
        """One stream from where the partial file ends (a ``Range`` request when it is not empty)."""
        have = _size(partial)
        if have > f.size:
            partial.unlink()
            have = 0
        meter.set(f.path, have)
        if have == f.size:
            return
        with self._get(plan, f, run, f"bytes={have}-" if have else None, held=held) as r:
            have = have if have and r.status_code == 206 else 0
            have = self._stream_to_file(r, partial, have, f, meter, run)
        if have != f.size:
            raise _http.TransportError(f"connection closed after {have} of {f.size} bytes")

    def _stream_to_file(self, r, partial: Path, have: int, f: RepoFile, meter: ByteMeter, run: _Run) -> int:
        """Append (``have`` > 0) or write from the start; returns the bytes the file then holds."""
        done, flushed = [have], [have]

        def advanced(n: int) -> None:
            done[0] += n
            meter.set(f.path, done[0])
            if done[0] - flushed[0] >= self.segment_bytes:  # see start_writeback: the last fsync waits less
                out.flush()
                start_writeback(out.fileno(), flushed[0], done[0] - flushed[0])
                flushed[0] = done[0]

        with open(partial, "ab" if have else "wb") as out:
            self._pump(r, out.write, advanced, run)
            if done[0] == f.size:  # on disk before the rename publishes it, even across a crash
                out.flush()
                os.fsync(out.fileno())
        return done[0]

    def _fetch_segments(self, plan: DownloadPlan, f: RepoFile, partial: Path, meter: ByteMeter,
                        run: _Run) -> str | None:
        """Fetch a big file as parallel ranged segments; returns its hash (None: hash it from disk).

        Resumes the segments a sidecar records (ours, or a dead server's). The first
        missing segment goes out alone: a ``206`` proves the server honours ranges and the
        other workers start at once; a ``200`` (a server that ignores ranges) is kept as
        the one stream of the whole file, as for small files, and the others never start.
        """
        sidecar = sidecar_of(partial)
        table = SegmentTable.load(sidecar, f.size) if partial.exists() else None
        if table is None:
            _remove_partial(partial)
            with open(partial, "wb") as out:
                out.truncate(f.size)  # sparse: the disk fills as segments land (checked up front)
            table = SegmentTable.create(sidecar, f.size, self.segment_bytes)
        meter.set(f.path, table.done_bytes)
        hasher = PrefixHasher(partial, table, _new_hash(f))
        hasher.start()
        fd = os.open(partial, os.O_WRONLY)
        try:
            probe = _RangeProbe(fast_bps=self.spread_below_bps)
            self._segment_pool(plan, f, partial, table, fd, probe, meter, run)
            if probe.status == 200:
                return None
            os.fsync(fd)  # on disk before the rename publishes it, even across a crash
            table.sync()
            return hasher.digest()
        finally:
            hasher.stop()
            os.close(fd)
            table.close()

    def _segment_pool(self, plan: DownloadPlan, f: RepoFile, partial: Path, table: SegmentTable, fd: int,
                      probe: _RangeProbe, meter: ByteMeter, run: _Run) -> None:
        """Up to ``connections`` workers take the missing segments in file order (so the hash can
        follow); the first worker's first response decides whether the others start."""
        queue = deque(s for s in table.segments if s.remaining)
        if not queue:
            return
        take = threading.Lock()

        def worker(first: bool) -> None:
            try:
                if not first and (not probe.known.wait() or probe.status != 206 or not probe.spread()):
                    return
                while not run.stop.is_set():
                    # The connection first, then the next segment: segments start in file order
                    # even when many wait for a connection, so the hash keeps up with the bytes.
                    with run.connection():
                        with take:
                            if not queue:
                                return
                            seg = queue.popleft()
                        self._with_retries(plan, f, run, lambda seg=seg: (
                            self._transfer(plan, f, partial, meter, run, held=True) if probe.status == 200
                            else self._fetch_range(plan, f, partial, table, fd, seg, probe, meter, run)))
                    if probe.status == 200:
                        return
            finally:
                if first:
                    probe.known.set()
                    probe.decided.set()

        workers = max(1, min(self.connections, len(queue)))
        with ThreadPoolExecutor(workers, thread_name_prefix="rbee-segment") as pool:
            futures = [pool.submit(worker, i == 0) for i in range(workers)]
            wait(futures, return_when=FIRST_EXCEPTION)
            errors = [fu.exception() for fu in futures if fu.done() and fu.exception() is not None]
            if errors:
                run.fail(errors[0])
        if errors:
            raise errors[0]
        if run.stop.is_set():
            raise Cancelled("Download cancelled.")

    def _fetch_range(self, plan: DownloadPlan, f: RepoFile, partial: Path, table: SegmentTable, fd: int,
                     seg: Segment, probe: _RangeProbe, meter: ByteMeter, run: _Run) -> None:
        """One ranged ``GET`` of what ``seg`` still misses, written in place."""
        if not seg.remaining:
            return
        with self._get(plan, f, run, f"bytes={seg.pos}-{seg.end - 1}", held=True) as r:
            if r.status_code == 206 and r.headers.get("content-range", "").startswith(f"bytes {seg.pos}-"):
                probe.answer(206)
                self._pump_segment(r, table, fd, seg, f, meter, run, probe)
                return
            if probe.known.is_set():
                raise DownloadFailed(f"The hub stopped honouring byte ranges while {f.path} was fetched in "
                                     "segments; try again.", details={"file": f.path, "status": r.status_code})
            # The first answer ignores the range: this response is the whole file, one stream.
            probe.answer(200)
            _remove_partial(partial)
            meter.set(f.path, 0)
            if self._stream_to_file(r, partial, 0, f, meter, run) != f.size:
                raise _http.TransportError(f"connection closed before the end of {f.path}")

    def _pump_segment(self, r, table: SegmentTable, fd: int, seg: Segment, f: RepoFile, meter: ByteMeter,
                      run: _Run, probe: _RangeProbe) -> None:
        def write(chunk: bytes) -> None:
            chunk = chunk[:seg.remaining]  # a server sending past the range gets no say in other segments
            os.pwrite(fd, chunk, seg.pos)
            table.advance(seg, len(chunk))

        def progress(n: int) -> None:
            probe.measure(n, seg.end - seg.start)
            meter.set(f.path, table.done_bytes)

        self._pump(r, write, progress, run)
        if seg.remaining:
            raise _http.TransportError(f"connection closed {seg.remaining} bytes before the end of a segment")
        start_writeback(fd, seg.start, seg.end - seg.start)

    def _link(self, plan: DownloadPlan, f: RepoFile) -> None:
        """Point ``snapshots/<sha>/<file>`` at its blob, as huggingface_hub does."""
        pointer = plan.snapshot_dir / f.path
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if pointer.is_symlink() or pointer.exists():
            return
        target = os.path.relpath(plan.blob(f), pointer.parent)
        try:
            os.symlink(target, pointer)
        except FileExistsError:  # another server linked it a moment ago
            return
        except OSError:  # filesystems without symlinks: copy, like huggingface_hub
            tmp = pointer.with_name(f".{pointer.name}.{os.getpid()}.rbee-incomplete")
            shutil.copyfile(plan.blob(f), tmp)
            os.replace(tmp, pointer)


class _Responses:
    """The open HTTP responses of one fetch: ``close()`` interrupts every blocked read at once."""

    def __init__(self) -> None:
        self._open: set = set()
        self._closed = False
        self._lock = threading.Lock()

    def add(self, r) -> None:
        with self._lock:
            self._open.add(r)
            closed = self._closed
        if closed:
            r.close()

    def discard(self, r) -> None:
        with self._lock:
            self._open.discard(r)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            responses = list(self._open)
        for r in responses:
            with contextlib.suppress(Exception):
                r.close()


@dataclass
class _Run:
    """What the threads of one fetch share: a stop flag, the open responses, the connection budget."""

    stop: threading.Event
    responses: _Responses
    connections: threading.BoundedSemaphore
    error: BaseException | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def connection(self) -> contextlib.AbstractContextManager:
        """Hold one of the fetch's connections for the length of a request."""
        return self.connections

    def fail(self, e: BaseException) -> None:
        """The first error ends the fetch (the others are its consequences): everything stops."""
        with self._lock:
            if self.error is None:
                self.error = e
        self.stop.set()
        self.responses.close()

    def watch(self, cancel: threading.Event) -> None:
        """Turn the caller's cancel into a stop (closing every response) until the fetch ends."""
        while not self.stop.is_set():
            if cancel.wait(0.25):
                self.fail(Cancelled("Download cancelled."))
                return

    def finish(self) -> None:
        self.stop.set()


@dataclass
class _RangeProbe:
    """What the first segment's response says about this file's server.

    Its status: whether ranges work at all (206) or the server ignores them (200). And its
    speed: a connection that brings ``ramp_bytes`` at ``fast_bps`` or more (loopback, a local
    mirror) is not capped, so more connections would only cost CPU; the segments then go
    one after another over it. Anything slower (a CDN's per-connection cap, TCP still
    ramping up) spreads them over every connection, after at most ``ramp_bytes / fast_bps``.
    """

    status: int = 0
    known: threading.Event = field(default_factory=threading.Event)
    decided: threading.Event = field(default_factory=threading.Event)
    parallel: bool = True
    ramp_bytes: int = 4 << 20
    fast_bps: float = DOWNLOAD_SPREAD_BELOW_MBPS * 1e6  # 0: always spread
    _since: float = 0.0
    _got: int = 0

    def __post_init__(self) -> None:
        if self.fast_bps <= 0:  # told to spread whatever the speed
            self.decided.set()

    def answer(self, status: int) -> None:
        if not self.known.is_set():
            self.status, self._since = status, time.monotonic()
            self.known.set()

    def measure(self, nbytes: int, segment_bytes: int) -> None:
        """The first segment got ``nbytes`` more: decide once it is clearly fast or clearly not."""
        if self.decided.is_set():
            return
        self._got += nbytes
        elapsed = time.monotonic() - self._since
        ramp = min(self.ramp_bytes, segment_bytes)
        if self._got >= ramp or elapsed * self.fast_bps > ramp:
            self.parallel = self._got < ramp or self._got / max(elapsed, 1e-6) < self.fast_bps
            self.decided.set()

    def spread(self) -> bool:
        """For the other workers: start (True), or leave the file to the first connection."""
        self.decided.wait(4 * self.ramp_bytes / max(self.fast_bps, 1.0) + 0.1)  # no answer in time: a slow link
        return self.parallel


def _partial(blob: Path) -> Path:
    return blob.with_name(blob.name + ".rbee-incomplete")


def _remove_partial(partial: Path) -> None:
    """A partial file and its segment table: both, or nothing is left to resume from."""
    for p in (partial, sidecar_of(partial)):
        with contextlib.suppress(OSError):
            p.unlink(missing_ok=True)


def partial_bytes(partial: Path) -> int:
    """Bytes a partial file of the cache holds (what a resume will not fetch again)."""
    return _have(partial)


def _have(partial: Path, size: int | None = None) -> int:
    """Bytes a partial file holds: its segment table's count, or its length (one stream)."""
    done = done_bytes(sidecar_of(partial), size) if sidecar_of(partial).exists() else None
    return _size(partial) if done is None else done


def _holder_progress(blob: Path, size: int | None = None) -> int:
    """Bytes another process has of ``blob``: ours (``.rbee-incomplete``, segmented or not) or
    huggingface_hub's (``<etag>.<random>.incomplete``) partial file, whichever is larger."""
    sizes = [_have(_partial(blob), size)]
    with contextlib.suppress(OSError):
        sizes += [_size(p) for p in blob.parent.glob(glob.escape(blob.name) + ".*incomplete")
                  if p.name != _partial(blob).name]  # ours may be preallocated: its table said how much
    return max(sizes)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _write_atomic(path: Path, text: str) -> None:
    """Readers (transformers, another server) see the old content or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.rbee-incomplete")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR)


def _not_writable(folder: Path, e: OSError) -> CacheNotWritable:
    why = "is not a folder" if e.errno in (errno.ENOTDIR, errno.EEXIST) else (
        f"cannot be written ({e.strerror or e})")
    return CacheNotWritable(
        f"The model cache folder {folder} {why}. Make it writable for the user running this server (for a "
        "cache shared on JupyterHub: a group-writable folder, e.g. chmod 2775 with a common group), or point "
        "c.RbeeApp.cache_dir at a folder this user can write.",
        details={"folder": str(folder), "errno": errno.errorcode.get(e.errno or 0, str(e.errno)),
                 "setting": "c.RbeeApp.cache_dir"})


def _probe_writable(folder: Path) -> None:
    if not folder.is_dir():
        raise _not_writable(folder, NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder)))
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".rbee-probe-")
    except OSError as e:
        raise _not_writable(folder, e) from e
    os.close(fd)
    os.unlink(name)


class _cache_errors:
    """Turn a permission error met while writing the cache into ``CACHE_NOT_WRITABLE`` naming the folder."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, exc, tb) -> bool:
        if isinstance(exc, OSError) and not isinstance(exc, RbeeError) and exc.errno in _NOT_WRITABLE + (
                errno.EEXIST,):
            target = Path(exc.filename) if exc.filename else self.cache_dir
            folder = target if exc.errno == errno.EEXIST else target.parent
            raise _not_writable(folder if folder != Path(".") else self.cache_dir, exc) from exc
        return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _write(write: Callable[[bytes], object], chunk: bytes, folder: Path) -> None:
    try:
        write(chunk)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientDisk(f"The disk holding {folder} filled up during the download; "
                                   "the partial file was removed. Free some space and try again.",
                                   details={"folder": str(folder)}) from e
        raise


def _new_hash(f: RepoFile):
    """sha256 for LFS files; the git blob sha1 for the others (the hub publishes both)."""
    return hashlib.sha256() if f.sha256 else hashlib.sha1(b"blob %d\0" % f.size)


def _digest(path: Path, f: RepoFile) -> str:
    h = _new_hash(f)
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def _retryable(e: hf_errors.HfHubHTTPError) -> bool:
    status = e.response.status_code if e.response is not None else 0
    return status >= 500 or status in (408, 429)


class _hub_errors:
    """Translate huggingface_hub's exceptions into our error codes (docs/errors.md)."""

    def __init__(self, ref: ModelRef) -> None:
        self.ref = ref

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, exc, tb) -> bool:
        if exc is None or isinstance(exc, RbeeError):
            return False
        ref = str(self.ref)
        if isinstance(exc, hf_errors.GatedRepoError):
            raise AccessDenied(f"{self.ref.repo_id} is gated: accept its terms on the hub, then set HF_TOKEN "
                               "(or c.RbeeApp.hf_token) to a token of that account.",
                               details={"model_ref": ref}) from exc
        if isinstance(exc, hf_errors.RevisionNotFoundError):
            raise RevisionNotFound(f"{self.ref.repo_id} has no revision {self.ref.revision!r}.",
                                   details={"model_ref": ref, "revision": self.ref.revision}) from exc
        if isinstance(exc, hf_errors.RepositoryNotFoundError):
            raise ModelNotFound(f"{self.ref.repo_id} is not on the hub (or it is private: set HF_TOKEN).",
                                details={"model_ref": ref}) from exc
        if isinstance(exc, hf_errors.HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                raise AccessDenied(f"The hub refused access to {self.ref.repo_id}: set HF_TOKEN.",
                                   details={"model_ref": ref}) from exc
            raise DownloadFailed(f"The hub answered an error for {self.ref.repo_id}: {exc}",
                                 details={"model_ref": ref, "status": status}) from exc
        if isinstance(exc, (_http.TransportError, OSError)):
            raise DownloadFailed(f"Could not reach the hub for {self.ref.repo_id}: {exc}",
                                 details={"model_ref": ref}) from exc
        return False
