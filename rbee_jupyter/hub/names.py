"""Checks on what the hub answers before any of it becomes part of a path on disk.

The commit sha names ``snapshots/<sha>``, a file's hash names ``blobs/<etag>`` and its lock,
and every path of the tree listing names a link under the snapshot. A hostile or broken
hub (or a mirror, or a proxy in between) could answer ``../../.bashrc`` for any of them and
make the server write outside its cache. So each is checked here, before the first byte
is fetched, and a bad one fails the download with ``DOWNLOAD_FAILED`` naming what was wrong.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from ..errors import DownloadFailed

_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _refuse(what: str, value: str, repo_id: str, why: str) -> DownloadFailed:
    return DownloadFailed(
        f"The hub answered an unsafe {what} for {repo_id} ({why}): {value[:200]!r}. Nothing was written. "
        "Check c.RbeeApp.hub_endpoint: the server it names (or a proxy) is not a Hugging Face hub.",
        details={"reason": "unsafe_hub_answer", "field": what, "value": value[:200], "repo_id": repo_id})


def check_commit(commit: object, repo_id: str) -> str:
    """A commit sha is 40 lower-case hex digits (it names ``snapshots/<sha>``)."""
    if not isinstance(commit, str) or not _HEX40.fullmatch(commit):
        raise _refuse("commit sha", str(commit), repo_id, "not 40 hex digits")
    return commit


def check_etag(etag: object, *, lfs: bool, repo_id: str) -> str:
    """A blob name: the sha256 of an LFS file (64 hex), the git oid of any other (40 hex)."""
    pattern = _HEX64 if lfs else _HEX40
    if not isinstance(etag, str) or not pattern.fullmatch(etag):
        raise _refuse("file hash", str(etag), repo_id, f"not {64 if lfs else 40} hex digits")
    return etag


def check_repo_path(path: object, repo_id: str) -> str:
    """A file path of the tree: relative, ``/``-separated, no ``..``, ``.``, empty part, ``\\`` or NUL."""
    if not isinstance(path, str) or not path:
        raise _refuse("file path", str(path), repo_id, "empty")
    if "\\" in path or "\0" in path or any(ord(c) < 32 for c in path):
        raise _refuse("file path", path, repo_id, "backslash or control character")
    if path.startswith("/") or PurePosixPath(path).is_absolute():
        raise _refuse("file path", path, repo_id, "absolute")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise _refuse("file path", path, repo_id, "'..', '.' or an empty part")
    return path


def check_inside(folder: Path, path: str, repo_id: str) -> Path:
    """``folder / path``, refused if its folder resolves (links followed) outside ``folder``.

    The last part is not followed: in a complete snapshot it is the link to the blob.
    """
    target = folder / path
    root = folder.resolve()
    if not target.parent.resolve().is_relative_to(root):
        raise _refuse("file path", path, repo_id, "leaves the snapshot folder")
    return target
