"""A local Hugging Face hub that the real ``huggingface_hub`` client downloads from.

The hub cannot be reached from CI (nor from many workstations), and a download path
that is only ever tested against mocks breaks on the first real transfer. This server
answers the few routes the client actually calls (model info, file tree, ``HEAD`` and
``GET`` on ``resolve``) with the headers and error codes the real hub sends, so tests
exercise huggingface_hub's own HTTP, cache and error mapping end to end. ``Faults``
injects what real networks do (slow links, dropped connections, stalls, corrupted
bytes), per request and mutable while a transfer runs.

It is a stdlib ``ThreadingHTTPServer`` on ``127.0.0.1`` (random port) in a background
thread. Every wait inside a handler is on one stop event, so ``stop()`` returns promptly
even while a transfer is stalled or crawling.

Behaviour the real hub has and tests may rely on:

* Metadata of a *gated* repo (info, tree) is public; only ``resolve`` needs the token
  (401 without ``Authorization``, 403 with a wrong one, ``X-Error-Code: GatedRepo``).
* A *private* repo without the token is indistinguishable from a missing one
  (401 + ``X-Error-Code: RepoNotFound``).
* Model info lists ``size``/``blobId``/``lfs`` of siblings only with ``?blobs=true``
  (``HfApi.model_info(files_metadata=True)``); the tree always carries them.
* For LFS files the tree's ``oid`` is the git oid of the *pointer* file, and the
  ``ETag``/``X-Linked-Etag`` of ``resolve`` is the content's sha256; for other files
  both are the git blob sha1 of the content.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import TCPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["CHUNK_SIZE", "Faults", "HubFile", "HubServer", "RequestRecord", "make_hub_repo"]

CHUNK_SIZE = 64 * 1024
"""Bodies go out in chunks of this size; ``Faults.chunk_delay_s`` is slept between them."""

STOP_WAIT_S = 60.0
"""Bound on ``HubServer.stop`` waiting for its handlers, which end at once: only a hang reaches it."""

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")
"""Files stored in git-LFS whatever their size (the hub's default ``.gitattributes``, abridged)."""

LFS_MIN_SIZE = 1_000_000
"""Files larger than this are LFS-tracked too (the hub rejects big plain-git files)."""

_NOT_FOUND = "Sorry, we can't find the page you are looking for."  # the hub's own words
_SKIPPED_DIRS = {".git", ".cache"}  # never part of a repo (``.cache`` is where local_dir downloads keep state)


# --------------------------------------------------------------------------- data


@dataclass
class Faults:
    """What goes wrong, applied to each ``GET .../resolve/...`` body as it is sent.

    All fields may be changed while the server runs; ``chunk_delay_s`` is re-read before
    every chunk, the others when a request starts. ``drop_times`` and ``stall_times``
    count down as faults happen, so a test sees what is left and the fault stops once
    it has hit often enough (which is what lets a client's resume succeed).
    """

    chunk_delay_s: float = 0.0
    """Sleep between body chunks (``CHUNK_SIZE``): a slow link, for progress and cancel tests."""
    drop_after_bytes: int | None = None
    """Close the connection (a clean FIN, so clients see an incomplete body) after this many
    body bytes of one response; only responses longer than that are dropped."""
    drop_times: int = 1
    """How many responses are still to be dropped."""
    stall_after_bytes: int | None = None
    """Stop sending, connection held open, after this many body bytes of one response."""
    stall_s: float = 3600.0
    """How long a stall lasts before the rest is sent (cut short by ``HubServer.stop``)."""
    stall_times: int = 1
    """How many responses are still to be stalled."""
    wrong_hash_files: set[str] = field(default_factory=set)
    """Paths in the repo (any repo) served with one byte flipped, at the true length,
    while the tree and headers still publish the true sha256 and size."""
    connection_rate_bps: float | None = None
    """Bytes per second one response's body may go out at (a CDN's per-connection cap);
    None: as fast as the loopback allows. Read when a request starts."""
    link_rate_bps: float | None = None
    """Bytes per second all bodies together may go out at: a token bucket shared by every
    connection (the user's link). None: no cap. Read before every chunk."""
    ignore_range: bool = False
    """Answer like a server without ranges: no ``Accept-Ranges``, and a ``Range`` request
    gets ``200`` with the whole body."""
    announce_commit: str | None = None
    """A hostile or broken hub: model info answers this commit sha instead of the real one."""
    announce_paths: dict[str, str] = field(default_factory=dict)
    """A hostile hub: the tree lists the file ``key`` under the name ``value`` (``../x``, ...)."""
    announce_oids: dict[str, str] = field(default_factory=dict)
    """A hostile hub: the tree gives the file ``key`` this oid (the LFS sha256 for LFS files,
    the git oid otherwise), the name the client's cache stores its blob under."""


@dataclass
class RequestRecord:
    """One request the server received; updated in place while its response goes out."""

    method: str
    path: str
    """The raw request target, query included."""
    headers: dict[str, str]
    """Request headers, names lower-cased."""
    range: str | None
    """The ``Range`` header, if any (e.g. ``"bytes=10485760-"`` on a resume)."""
    status: int = 0
    """Status answered; 0 until the status line is sent."""
    bytes_sent: int = 0
    """Body bytes sent so far."""
    repo_id: str | None = None
    """The known repo the request addressed, if any."""
    filename: str | None = None
    """For ``resolve`` requests: the path in the repo."""
    fault: str | None = None
    """``"dropped"``, ``"stalled"`` (set when the stall begins), ``"stopped"`` (the server
    stopped mid-body) or ``"client_gone"`` (the client hung up mid-body)."""
    completed: bool = False
    """True once the whole response was sent. It is set when the handler returns, which may
    be a moment after the client has everything: wait for it with ``HubServer.wait_until``.
    (``status`` and ``bytes_sent`` are updated before the client can see them.)"""


@dataclass(frozen=True)
class HubFile:
    """A file of a commit, with the hashes the hub publishes for it."""

    path: str
    data: bytes
    git_oid: str
    """What the tree calls ``oid``: the git blob sha1 of the content, or of the LFS pointer."""
    sha256: str
    lfs: bool
    pointer_size: int
    """Length of the LFS pointer file (meaningful for LFS files only)."""

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def etag(self) -> str:
        """What ``resolve`` answers as ETag, and the blob name in huggingface_hub's cache."""
        return self.sha256 if self.lfs else self.git_oid

    @classmethod
    def make(cls, path: str, data: bytes) -> HubFile:
        sha256 = hashlib.sha256(data).hexdigest()
        lfs = path.endswith(LFS_SUFFIXES) or len(data) > LFS_MIN_SIZE
        pointer = (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
        )
        return cls(path=path, data=data, git_oid=_git_blob_oid(pointer if lfs else data), sha256=sha256,
                   lfs=lfs, pointer_size=len(pointer))


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Commit:
    sha: str
    files: dict[str, HubFile]
    date: str


@dataclass
class _Repo:
    repo_id: str
    gated: bool = False
    private: bool = False
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)
    created: str = ""


class _Reply(Exception):
    """Raised by route code to answer an error; carries what the hub would send."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


# --------------------------------------------------------------------------- server


class HubServer:
    """A hub on ``127.0.0.1`` serving repos added with :meth:`add_repo`.

    Use as a context manager (or ``start()``/``stop()``) and point the client at
    :attr:`url` explicitly (``endpoint=hub.url``): huggingface_hub reads ``HF_ENDPOINT``
    only when it is imported.
    """

    def __init__(self, *, port: int = 0) -> None:
        self.port = port
        """Port to listen on; 0 picks a free one."""
        self.faults = Faults()
        self.token: str | None = None
        """Gated and private repos are served only to ``Authorization: Bearer <token>``;
        while it is None, to nobody."""
        self.requests: list[RequestRecord] = []
        self.errors: list[str] = []
        """Unexpected handler exceptions (formatted); a healthy test leaves it empty."""
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._link = _TokenBucket()

    # -- repos ---------------------------------------------------------------

    def add_repo(self, repo_id: str, folder: str | Path | None = None, *, revision: str = "main",
                 gated: bool = False, private: bool = False,
                 extra_files: dict[str, bytes] | None = None) -> str:
        """Publish the files of ``folder`` (plus ``extra_files``) as ``revision`` of ``repo_id``.

        The files are read now, so the folder may change afterwards. Adding another
        revision keeps the earlier ones; ``gated``/``private`` apply to the whole repo
        (the latest call wins).

        Returns:
            The commit sha: 40 hex digits, a pure function of the files (paths and bytes).
        """
        parts = repo_id.split("/")
        if not 1 <= len(parts) <= 2 or not all(parts):
            raise ValueError(f"repo_id must be 'name' or 'org/name', got {repo_id!r}")
        contents: dict[str, bytes] = {}
        if folder is not None:
            root = Path(folder)
            if not root.is_dir():
                raise FileNotFoundError(f"{root} is not a folder")
            for p in sorted(root.rglob("*")):
                rel = p.relative_to(root)
                if p.is_file() and not _SKIPPED_DIRS.intersection(rel.parts[:-1]):
                    contents[rel.as_posix()] = p.read_bytes()
        contents.update(extra_files or {})
        files = {path: HubFile.make(path, data) for path, data in sorted(contents.items())}
        digest = hashlib.sha1()
        for f in files.values():
            digest.update(f"{f.path}\0{f.sha256}\n".encode())
        sha = digest.hexdigest()
        now = _iso(time.time())
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo(repo_id, created=now))
            repo.gated, repo.private = gated, private
            repo.refs[revision] = sha
            repo.commits.setdefault(sha, _Commit(sha, files, now))
        return sha

    # -- lifecycle -----------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (only while started)."""
        if self._server is None:
            raise RuntimeError("HubServer is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> HubServer:
        """Listen (on ``port``, or a free one) and serve in a daemon thread; returns self."""
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"hub-server-{self._server.server_address[1]}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and end every open transfer (stalled ones too), and wait until their handlers are done.

        Stalls, delays and sends are cut short at once (the stop event, shut sockets), so this returns in
        milliseconds; the joins are bounded (``STOP_WAIT_S``) only against a handler that hangs, with room
        for a machine busy with other work, where a shorter bound would return while handlers still run.
        """
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        server.shutdown()
        server.server_close()
        with self._lock:
            open_connections = list(self._connections.items())
        for conn, _ in open_connections:  # unblock handlers stuck in send() or waiting for a request
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + STOP_WAIT_S
        for _, handler_thread in open_connections:
            handler_thread.join(max(0.0, deadline - time.monotonic()))
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._server = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inspection ----------------------------------------------------------

    def file_gets(self, repo_id: str, filename: str) -> list[RequestRecord]:
        """The ``GET`` requests on ``resolve`` of that file, in arrival order."""
        with self._lock:
            return [r for r in self.requests
                    if r.method == "GET" and r.repo_id == repo_id and r.filename == filename]

    def bytes_served(self, repo_id: str, filename: str) -> int:
        """File bytes sent for that file over all its GETs (re-sent bytes count twice;
        error answers do not count)."""
        return sum(r.bytes_sent for r in self.file_gets(repo_id, filename) if r.status in (200, 206))

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
        """Block until ``predicate()`` is true (re-checked on every request event), or timeout.

        Tests use it to synchronise with a transfer in flight (e.g. "the GET has stalled")
        without sleeping. Returns the predicate's last value.
        """
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # -- used by handlers ----------------------------------------------------

    def _record(self, rec: RequestRecord) -> None:
        with self._changed:
            self.requests.append(rec)
            self._changed.notify_all()

    def _find_repo(self, segments: list[str]) -> tuple[_Repo, list[str]] | None:
        """Split ``org/name/rest...`` or ``name/rest...`` on a known repo id."""
        with self._lock:
            if len(segments) >= 2 and (repo := self._repos.get("/".join(segments[:2]))):
                return repo, segments[2:]
            if segments and (repo := self._repos.get(segments[0])):
                return repo, segments[1:]
        return None

    def _authorized(self, headers: dict[str, str]) -> bool:
        return self.token is not None and headers.get("authorization") == f"Bearer {self.token}"

    def _take(self, kind: str) -> bool:
        """Consume one ``drop``/``stall`` from the fault budget; False if none is left."""
        with self._lock:
            attr = f"{kind}_times"
            left = getattr(self.faults, attr)
            if left <= 0:
                return False
            setattr(self.faults, attr, left - 1)
            return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() joins the handlers itself, with a deadline

    def __init__(self, hub: HubServer) -> None:
        self.hub = hub
        super().__init__(("127.0.0.1", hub.port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn), slow without a network.
        TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not self.hub._stopping.is_set():
            self.hub.errors.append(traceback.format_exc())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every answer has a Content-Length
    server: _Server
    rec: RequestRecord
    head: bool
    query: dict[str, str]

    # -- plumbing ------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Silence: requests are recorded in ``HubServer.requests``, never printed."""

    def setup(self) -> None:
        super().setup()
        with self.server.hub._lock:
            self.server.hub._connections[self.connection] = threading.current_thread()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.hub._lock:
                self.server.hub._connections.pop(self.connection, None)

    def handle_one_request(self) -> None:
        if self.server.hub._stopping.is_set():
            self.close_connection = True
            return
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _other(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self._dispatch(head=False, allowed=False)

    do_POST = do_PUT = do_DELETE = do_PATCH = _other

    # -- routing -------------------------------------------------------------

    def _dispatch(self, *, head: bool, allowed: bool = True) -> None:
        hub = self.server.hub
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.rec = RequestRecord(self.command, self.path, headers, headers.get("range"))
        hub._record(self.rec)
        self.head = head
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        # Split the raw path first, then decode: a revision may hold an encoded "/".
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        answered = False
        try:
            if not allowed:
                raise _Reply(405, f"{self.command} is not served here (a read-only hub)")
            if segments[:2] == ["api", "models"] and len(segments) > 2:
                self._api_models(segments[2:])
            elif len(segments) >= 3 and "resolve" in segments[1:3]:
                self._resolve(segments)
            else:  # includes /api/agent-harnesses: huggingface_hub tolerates a 404, not a list
                raise _Reply(404, _NOT_FOUND)
            answered = True
        except _Reply as r:
            self._send_error(r)
            answered = True
        finally:
            self.rec.completed = answered and self.rec.fault is None
            hub._notify()

    def _repo(self, segments: list[str]) -> tuple[_Repo, list[str]]:
        found = self.server.hub._find_repo(segments)
        if found is None:
            raise _Reply(404, "Repository not found", "RepoNotFound")
        repo, rest = found
        self.rec.repo_id = repo.repo_id
        if repo.private and not self.server.hub._authorized(self.rec.headers):
            # The real hub hides private repos: same answer as for a missing one.
            raise _Reply(401, "Invalid username or password.", "RepoNotFound")
        return repo, rest

    def _commit(self, repo: _Repo, revision: str) -> _Commit:
        with self.server.hub._lock:
            sha = repo.refs.get(revision, revision)
            commit = repo.commits.get(sha)
        if commit is None:
            raise _Reply(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # -- /api/models ---------------------------------------------------------

    def _api_models(self, segments: list[str]) -> None:
        repo, rest = self._repo(segments)
        if not rest:
            self._model_info(repo, self._commit(repo, "main"))
        elif rest[0] == "revision" and len(rest) == 2:
            self._model_info(repo, self._commit(repo, rest[1]))
        elif rest[0] == "tree" and len(rest) >= 2:
            self._tree(self._commit(repo, rest[1]), "/".join(rest[2:]).strip("/"))
        else:
            raise _Reply(404, _NOT_FOUND)

    def _model_info(self, repo: _Repo, commit: _Commit) -> None:
        blobs = self.query.get("blobs", "").lower() == "true"
        siblings: list[dict[str, Any]] = []
        for f in commit.files.values():
            entry: dict[str, Any] = {"rfilename": f.path}
            if blobs:  # like the hub: sizes and hashes only when asked for
                entry.update(size=f.size, blobId=f.git_oid)
                if f.lfs:
                    entry["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": f.pointer_size}
            siblings.append(entry)
        config: dict[str, Any] = {}
        if "config.json" in commit.files:
            try:
                raw = json.loads(commit.files["config.json"].data)
                config = {k: raw[k] for k in ("architectures", "model_type") if k in raw}
            except (ValueError, TypeError):
                pass
        org = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        self._send_json(200, {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id, "modelId": repo.repo_id, "author": org,
            "sha": self.server.hub.faults.announce_commit or commit.sha,
            "lastModified": commit.date, "createdAt": repo.created,
            "private": repo.private, "gated": "manual" if repo.gated else False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": [], "library_name": "transformers",
            "pipeline_tag": "text-generation", "config": config, "siblings": siblings, "spaces": [],
            "usedStorage": sum(f.size for f in commit.files.values()),
        })

    def _tree(self, commit: _Commit, base: str) -> None:
        recursive = self.query.get("recursive", "").lower() == "true"
        expand = self.query.get("expand", "").lower() == "true"
        prefix = f"{base}/" if base else ""
        if base in commit.files:
            raise _Reply(404, f"{base} is a file, not a folder", "EntryNotFound", commit.sha)
        under = [f for f in commit.files.values() if f.path.startswith(prefix)]
        if base and not under:
            raise _Reply(404, f"{base} does not exist on {commit.sha}", "EntryNotFound", commit.sha)
        last_commit = {"id": commit.sha, "title": "Upload folder", "date": commit.date}
        folders: set[str] = set()
        files: list[dict[str, Any]] = []
        for f in under:
            parts = f.path[len(prefix):].split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                faults = self.server.hub.faults
                oid = faults.announce_oids.get(f.path)
                entry: dict[str, Any] = {"type": "file", "oid": oid if oid and not f.lfs else f.git_oid,
                                         "size": f.size, "path": faults.announce_paths.get(f.path, f.path)}
                if f.lfs:
                    entry["lfs"] = {"oid": oid or f.sha256, "size": f.size, "pointerSize": f.pointer_size}
                if expand:
                    entry["lastCommit"] = last_commit
                files.append(entry)
        entries: list[dict[str, Any]] = []
        for d in sorted(folders):
            entry = {"type": "directory", "oid": hashlib.sha1(f"{commit.sha}:{d}".encode()).hexdigest(),
                     "size": 0, "path": d}
            if expand:
                entry["lastCommit"] = last_commit
            entries.append(entry)
        self._send_json(200, entries + files)  # everything on one page: no Link header

    # -- /{repo}/resolve/{revision}/{path} -------------------------------------

    def _resolve(self, segments: list[str]) -> None:
        hub = self.server.hub
        repo, rest = self._repo(segments)
        if len(rest) < 3 or rest[0] != "resolve":
            raise _Reply(404, _NOT_FOUND)
        filename = "/".join(rest[2:])
        self.rec.filename = filename
        if repo.gated and not hub._authorized(self.rec.headers):
            if "authorization" in self.rec.headers:
                raise _Reply(403, f"Access to model {repo.repo_id} is restricted and you are not in the "
                                  f"authorized list. Visit {hub.url}/{repo.repo_id} to ask for access.", "GatedRepo")
            raise _Reply(401, f"Access to model {repo.repo_id} is restricted. You must have access to it "
                              "and be authenticated to access it. Please log in.", "GatedRepo")
        commit = self._commit(repo, rest[1])
        f = commit.files.get(filename)
        if f is None:
            raise _Reply(404, f"{filename} does not exist on {commit.sha}", "EntryNotFound", commit.sha)

        data = f.data
        if filename in hub.faults.wrong_hash_files and data:
            i = len(data) // 2
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
        start, end = 0, len(data)  # end exclusive
        status = 200
        if self.rec.range is not None and not hub.faults.ignore_range:
            parsed = _parse_range(self.rec.range, len(data))
            if parsed is None:
                raise _Reply(416, f"Requested range not satisfiable: {self.rec.range}", None, commit.sha)
            start, end = parsed
            status = 206
        headers = {
            "Content-Type": "application/octet-stream",
            **({} if hub.faults.ignore_range else {"Accept-Ranges": "bytes"}),
            "ETag": f'"{f.etag}"',
            "X-Repo-Commit": commit.sha,
            "Content-Disposition": f'inline; filename="{filename.rsplit("/", 1)[-1]}"',
        }
        if f.lfs:  # what the hub sends on its redirect to the CDN; the client prefers it to ETag
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        self._start(status, end - start, headers)
        if not self.head:
            self._stream(data[start:end])

    def _stream(self, body: bytes) -> None:
        """Send ``body`` in chunks, with the faults in force when the request started."""
        hub, faults, stopping = self.server.hub, self.server.hub.faults, self.server.hub._stopping
        n = len(body)
        drop_at = faults.drop_after_bytes if faults.drop_times > 0 else None
        drop_at = drop_at if drop_at is not None and drop_at < n else None
        stall_at = faults.stall_after_bytes if faults.stall_times > 0 else None
        stall_at = stall_at if stall_at is not None and stall_at < n else None
        per_connection = _TokenBucket(faults.connection_rate_bps)
        pos = 0
        try:
            while True:
                if pos == drop_at and hub._take("drop"):
                    self._abort("dropped")
                    return
                if pos == stall_at and hub._take("stall"):
                    self.rec.fault = "stalled"
                    hub._notify()
                    if stopping.wait(faults.stall_s):
                        self._abort("stopped")
                        return
                    self.rec.fault = None  # the stall is over: the rest goes out normally
                if pos >= n:
                    break
                if pos > 0 and faults.chunk_delay_s > 0 and stopping.wait(faults.chunk_delay_s):
                    self._abort("stopped")
                    return
                limit = min(x for x in (n, drop_at, stall_at) if x is not None and x > pos)
                chunk = body[pos:min(pos + CHUNK_SIZE, limit)]
                hub._link.rate = faults.link_rate_bps
                pace = max(per_connection.take(len(chunk)), hub._link.take(len(chunk)))
                if pace > 0 and stopping.wait(pace):
                    self._abort("stopped")
                    return
                # Count first: a client that got the bytes must never see a smaller count.
                self.rec.bytes_sent = pos + len(chunk)
                self.wfile.write(chunk)
                pos += len(chunk)
                hub._notify()
        except OSError:  # BrokenPipe, ConnectionReset, or our own socket shut by stop()
            self.rec.bytes_sent = pos  # (approximately) what went out before the failure
            self._abort("stopped" if stopping.is_set() else "client_gone")

    def _abort(self, why: str) -> None:
        """End the response short: the client sees a body shorter than Content-Length."""
        self.rec.fault = why
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- answers ---------------------------------------------------------------

    def _start(self, status: int, length: int, headers: dict[str, str]) -> None:
        self.rec.status = status  # before the client can see it
        self.send_response(status)
        for k, v in headers.items():  # header values are latin-1 on the wire: escape the rest
            self.send_header(k, v.encode("ascii", "backslashreplace").decode())
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self._start(status, len(body), {"Content-Type": "application/json; charset=utf-8", **(headers or {})})
        if not self.head:
            self.rec.bytes_sent = len(body)
            self.wfile.write(body)

    def _send_error(self, r: _Reply) -> None:
        headers = {"X-Error-Message": r.message}
        if r.code:
            headers["X-Error-Code"] = r.code
        if r.commit:
            headers["X-Repo-Commit"] = r.commit
        self._send_json(r.status, {"error": r.message}, headers)


class _TokenBucket:
    """Paces bytes to ``rate`` per second, shared by every thread that takes from it.

    A taker reserves its bytes at once (the balance may go negative) and is told how long
    to wait before sending them, so many connections share the rate fairly without a
    thread of their own. The burst is one chunk: a cap holds over any 0.1 s, not on average.
    """

    def __init__(self, rate: float | None = None) -> None:
        self.rate = rate
        self._balance = 0.0
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> float:
        """Reserve ``n`` bytes; returns the seconds to wait before sending them (0: none)."""
        rate = self.rate
        if not rate:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._balance = min(float(CHUNK_SIZE), self._balance + (now - self._at) * rate) - n
            self._at = now
            return -self._balance / rate if self._balance < 0 else 0.0


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` → ``(start, end_exclusive)``; None if unsatisfiable."""
    unit, _, spec = value.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            return (max(0, size - n), size) if n > 0 and size > 0 else None
        start = int(first)
        end = min(int(last) + 1, size) if last else size
    except ValueError:
        return None
    return (start, end) if 0 <= start < end else None


# --------------------------------------------------------------------------- helpers


def make_hub_repo(tmp_path: str | Path, hub: HubServer, repo_id: str = "rbee-test/tiny-llama", *,
                  revision: str = "main", gated: bool = False, private: bool = False,
                  extra_files: dict[str, bytes] | None = None, **make_tiny_model_kwargs: Any) -> tuple[Path, str]:
    """Make a tiny model under ``tmp_path`` and publish it on ``hub``.

    ``make_tiny_model_kwargs`` go to :func:`~rbee_jupyter.testing.tiny_model.make_tiny_model`
    (``arch``, ``layers``, ``max_shard_size``, ...).

    Returns:
        ``(folder, commit_sha)``: the folder holds exactly the files the hub serves
        (minus ``extra_files``), for byte comparisons.
    """
    from .tiny_model import make_tiny_model

    folder = Path(tmp_path) / f"hub-{repo_id.replace('/', '--')}-{revision.replace('/', '--')}"
    make_tiny_model(folder, **make_tiny_model_kwargs)
    sha = hub.add_repo(repo_id, folder, revision=revision, gated=gated, private=private, extra_files=extra_files)
    return folder, sha
