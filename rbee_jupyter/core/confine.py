"""Files a checkpoint names, kept inside the model's folder.

A checkpoint is data from whoever published it: a shard index (``weight_map``), a GGUF
ref's file name, or a planted symlink may name any path. Read as ``folder / name`` they
reach other users' gated snapshots in a shared cache, or any file the process may read.
Every such name goes through :func:`resolve_inside`, and a whole folder through
:func:`check_folder`, before anything is read; the loader then opens the *resolved* path,
so a name is judged and read as the same file.

The one way out of a folder that is allowed is huggingface_hub's own: a file of
``models--org--name/snapshots/<rev>/`` is a symlink into ``models--org--name/blobs/`` of
the same repository. Anything else that resolves outside the folder is refused with
``INVALID_CHECKPOINT`` (400): a checkpoint naming a file outside itself is malformed for
every caller, admins included, and the message is the same whether or not the target
exists, so the refusal reveals nothing about other users' files.

One exception, ``confined=False``: a ``file://`` folder of a single-user server (or read in
the user's own kernel). There the user is the administrator and may read every file the
process may, so a folder assembled from links to elsewhere (a common way to build a
checkpoint) loads as it always did. Names a checkpoint *spells* (a shard index) are still
refused when absolute or holding ``..``: those are malformed whoever loads them. Hub
snapshots are confined in every mode: their names come from whoever published the repo.

Checking a path and then reading it by name leaves a gap: a folder on the way swapped for
a link in between (a co-user of a group-writable cache can do that) redirects the read.
:func:`open_resolved` opens a checked path one part at a time, never following a link,
and :func:`private_copy` copies what transformers reads by name (config, tokenizer, chat
template; for sentence-transformers, which reads everything by name, the whole model) through
such descriptors into a folder only this process may enter. A copy a killed process left
behind is swept by the next one (:func:`sweep_private_copies`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import InvalidCheckpoint
from .procs import pid_alive

__all__ = ["ModelFolder", "check_folder", "check_unmoved", "fd_path", "model_folder", "open_resolved", "private_copy",
           "remove_snapshot", "resolve_inside", "sweep_private_copies"]


@dataclass(frozen=True)
class ModelFolder:
    """A model folder with symlinks resolved, and the blobs folder its links may point into."""

    root: Path
    blobs: Path | None  # ``<repo>/blobs`` when ``root`` is a huggingface_hub snapshot, else None
    confined: bool = True  # False: links may lead anywhere (a single user's own folder, see the module doc)

    def holds(self, target: Path) -> bool:
        """Whether the resolved path ``target`` may be read: inside the folder (or a blob of its own repo),
        anywhere when the folder is not confined."""
        if not self.confined or target == self.root or target.is_relative_to(self.root):
            return True
        return self.blobs is not None and target.parent == self.blobs


def model_folder(folder: str | Path | ModelFolder, *, confined: bool = True) -> ModelFolder:
    """``folder`` resolved; in huggingface_hub's layout, with its repository's ``blobs/``.

    ``confined=False`` is ignored for a hub snapshot: what it holds came from the hub. A
    :class:`ModelFolder` is returned as it is: resolve a folder once, and derive every path
    from that one resolution.
    """
    if isinstance(folder, ModelFolder):
        return folder
    root = Path(folder).expanduser().resolve()
    snapshots = root.parent
    repo = snapshots.parent
    blobs = repo / "blobs" if snapshots.name == "snapshots" and repo.name.startswith(("models--", "datasets--")) \
        else None
    return ModelFolder(root, blobs, confined=confined or blobs is not None)


def _refuse(name: str, folder: ModelFolder, why: str) -> InvalidCheckpoint:
    return InvalidCheckpoint(
        f"The checkpoint in {folder.root.name} names {name!r}, which {why}; a checkpoint may only name files "
        "inside its own folder. Fix or re-download the model.", details={"file": name, "path": str(folder.root)})


def resolve_inside(folder: str | Path | ModelFolder, name: str) -> Path:
    """The resolved path of the file ``name`` of a checkpoint, refused unless it stays inside ``folder``.

    Args:
        folder: the model's folder (or a :class:`ModelFolder` already made).
        name: a relative POSIX name as the checkpoint spells it (``model-00001-of-00002.safetensors``).

    Returns:
        The absolute path with every symlink resolved: open this one, not ``folder / name``.

    Raises:
        InvalidCheckpoint: ``name`` is empty, absolute, holds ``..``, a backslash or a NUL, resolves
            outside a confined folder (other than into its own repository's blobs), or is not a regular file.
    """
    where = folder if isinstance(folder, ModelFolder) else model_folder(folder)
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        raise _refuse(str(name), where, "is not a relative file name")
    parts = PurePosixPath(name)
    if parts.is_absolute() or ".." in parts.parts:
        raise _refuse(name, where, "leaves the folder (absolute names and '..' are not allowed)")
    try:
        target = (where.root / parts).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise _refuse(name, where, "cannot be resolved") from None
    if not where.holds(target):
        raise _refuse(name, where, "resolves outside the folder")
    if not target.is_file():
        raise InvalidCheckpoint(f"{name} is missing from {where.root}; download the model again.",
                                details={"file": name, "path": str(where.root)})
    return target


def check_unmoved(path: str) -> None:
    """Refuse a path the server resolved and checked that now resolves elsewhere.

    A shared server checks a ``file://`` folder against its allowed folders, then a worker reads it
    seconds later; a co-user who can write in an allowed folder could swap a part of the path for
    a link in between. The path handed over is the real one, so any link in it now is such a swap.

    Raises:
        InvalidCheckpoint: a part of ``path`` is a link now (where it leads is not said).
    """
    if os.path.realpath(path) != path:
        raise InvalidCheckpoint(f"{path} changed since the server checked it: a part of it is a link now. "
                                "Load the model again.", details={"path": path})


def check_folder(folder: str | Path | ModelFolder, *, confined: bool = True) -> ModelFolder:
    """Refuse a model folder any of whose entries is a symlink that leads outside it.

    What transformers reads by itself (``config.json``, ``tokenizer.json``, ``tokenizer_config.json``,
    the chat template, ...) is read through the folder, so every link in it must stay inside
    before any of them is opened.

    Args:
        confined: False for a single user's own ``file://`` folder, whose links may lead anywhere
            (nothing is refused then; a hub snapshot stays confined whatever this says).

    Raises:
        InvalidCheckpoint: a link resolves outside the folder (or into another repository's blobs).
    """
    where = model_folder(folder, confined=confined)
    if not where.root.is_dir() or not where.confined:
        return where  # the caller reports a missing folder in its own words
    for entry in sorted(where.root.rglob("*")):
        if entry.is_symlink():
            resolve_inside(where, entry.relative_to(where.root).as_posix()) if not entry.is_dir() \
                else _check_dir_link(where, entry)
    return where


def _check_dir_link(where: ModelFolder, entry: Path) -> None:
    try:
        target = entry.resolve()
    except (OSError, RuntimeError):
        raise _refuse(entry.name, where, "cannot be resolved") from None
    if not target.is_relative_to(where.root):
        raise _refuse(entry.relative_to(where.root).as_posix(), where, "resolves outside the folder")


# --- reading what was checked --------------------------------------------------------------

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz", ".ot")
SIDE_FILE_BYTES = 256 * 2**20
"""Largest file :func:`private_copy` copies (a big vocabulary's tokenizer.json is ~30 MB); larger ones are weights."""
_SIDE_FOLDERS = ("additional_chat_templates",)  # the only sub-folder transformers reads by name (chat templates)


def open_resolved(path: Path) -> int:
    """A read-only descriptor of the resolved absolute ``path``, opened one part at a time, never through a link.

    ``path`` came from :func:`resolve_inside`, so no part of it is a link; one that is a link
    now was swapped in since the check, and the open fails instead of following it.

    Raises:
        InvalidCheckpoint: a part of the path is a link (or is gone) now.
    """
    if not os.supports_dir_fd >= {os.open} or not path.is_absolute():  # no openat: the last part, at least
        return _checked_open(path, lambda: os.open(path, os.O_RDONLY | _NOFOLLOW))

    def walk() -> int:
        fd = os.open("/", os.O_RDONLY | _DIRECTORY)
        try:
            for part in path.parts[1:-1]:
                inner = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = inner
            return os.open(path.name, os.O_RDONLY | _NOFOLLOW, dir_fd=fd)
        finally:
            os.close(fd)
    return _checked_open(path, walk)


def fd_path(fd: int, path: Path) -> str:
    """A name for the file open as ``fd``, for a library that only takes paths (safetensors):
    ``/proc/self/fd/N`` opens that very file whatever ``path`` names now (``path`` where there is no /proc)."""
    return f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else str(path)


def _checked_open(path: Path, opener: Callable[[], int]) -> int:
    try:
        fd = opener()
    except OSError as exc:
        raise InvalidCheckpoint(f"{path.name} cannot be opened ({exc.strerror}): it changed since it was checked, "
                                "or a folder on its way was replaced by a link. Load the model again.",
                                details={"file": str(path)}) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidCheckpoint(f"{path.name} is not a regular file.", details={"file": str(path)})
    return fd


COPY_BYTES = 4 * 2**30
"""Most a copy with weights (``private_copy(weights=True)``, an embedding model) may hold in all: the largest
common sentence-transformers models (e5-large, bge-large) take 1.3-2.3 GB; beyond this, refused."""
_TORCH_WEIGHTS = ((".safetensors",), (".bin", ".pt", ".pth"))  # what a torch load reads, safetensors first
_COPY_PREFIX = "rbee-load-"
_COPY_NAME = re.compile(r"rbee-load-(\d+)-[A-Za-z0-9_]+")


@contextlib.contextmanager
def private_copy(folder: str | Path | ModelFolder, *, confined: bool = True, weights: bool = False,
                 folders: Sequence[str] = ()) -> Iterator[Path]:
    """A private copy of the files of a model folder that a library reads by name; removed on exit.

    transformers opens ``config.json``, ``generation_config.json``, the tokenizer's files and
    the chat templates by path, after our check: a folder swapped for a link in between would
    redirect those reads. So each (top-level, not a weight, at most :data:`SIDE_FILE_BYTES`)
    file is resolved and checked (:func:`resolve_inside`), opened through :func:`open_resolved`,
    and copied into a fresh folder of mode 0700, which is what transformers is pointed at.

    Args:
        weights: copy the torch weights too (the ``.safetensors`` of each copied folder, else its
            ``.bin``/``.pt``; never ONNX, OpenVINO or TF files): for sentence-transformers, which
            reads every file of a model by name. Without it the loader reads the weights itself, from
            the resolved paths it checked.
        folders: sub-folders to copy the same way (a sentence-transformers model's ``1_Pooling``,
            ``2_Dense``...), each one level deep; relative names, checked like any other.

    The copy is named ``rbee-load-<pid>-<random>``; before making one, copies left by processes
    that no longer run (a worker killed inside this window) are removed (:func:`sweep_private_copies`).

    Yields:
        The copy's folder: it exists until the ``with`` block ends, however it ends.

    Raises:
        InvalidCheckpoint: a file leads outside a confined folder, or changed since its check; with
            ``weights``, the files to copy take more than :data:`COPY_BYTES`.
    """
    where = check_folder(folder, confined=confined)
    names = _side_files(where.root, folders, weights=weights)
    if weights:
        total = sum(size for _, size in names)
        if total > COPY_BYTES:
            raise InvalidCheckpoint(
                f"{where.root.name} holds {total / 2**30:.1f} GiB of files to read; a model read through a private "
                f"copy (an embedding model) may take at most {COPY_BYTES / 2**30:.0f} GiB.",
                details={"path": str(where.root), "bytes": total, "limit": COPY_BYTES})
    sweep_private_copies()
    copy = Path(tempfile.mkdtemp(prefix=f"{_COPY_PREFIX}{os.getpid()}-"))  # mode 0700: no co-user reads or swaps
    try:
        for name, size in names:
            _copy_one(resolve_inside(where, name), copy / name, max(size, SIDE_FILE_BYTES))
        yield copy
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def _side_files(root: Path, folders: Sequence[str] = (), *, weights: bool = False) -> list[tuple[str, int]]:
    """``(relative name, size)`` of the folder's small non-weight files (top level, the chat-template folder
    and ``folders``), and with ``weights`` of each such folder's torch weights."""
    names = []
    for sub in ("", *_SIDE_FOLDERS, *folders):
        if not isinstance(sub, str) or "\0" in sub or "\\" in sub:
            raise _refuse(str(sub), model_folder(root), "is not a relative folder name")
        if PurePosixPath(sub).is_absolute() or ".." in PurePosixPath(sub).parts:
            raise _refuse(sub, model_folder(root), "leaves the folder (absolute names and '..' are not allowed)")
    for parts in dict.fromkeys(PurePosixPath(sub) for sub in ("", *_SIDE_FOLDERS, *folders)):
        folder = root / parts
        if not folder.is_dir():
            continue  # no such folder: the caller reports a missing model in its own words
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".") and e.is_file()), key=lambda e: e.name)
        kept = [e for e in entries if not e.name.endswith(_WEIGHTS) and e.stat().st_size <= SIDE_FILE_BYTES]
        if weights:
            for suffixes in _TORCH_WEIGHTS:
                found = [e for e in entries if e.name.endswith(suffixes)]
                if found:
                    kept += found
                    break
        names += [((parts / e.name).as_posix(), e.stat().st_size) for e in kept]
    return sorted(names)


def _copy_one(source: Path, target: Path, limit: int) -> None:
    fd = open_resolved(source)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with os.fdopen(fd, "rb") as src, open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as dst:
        if os.fstat(src.fileno()).st_size > limit:
            raise InvalidCheckpoint(f"{source.name} grew over {limit} bytes since it was checked.",
                                    details={"file": str(source)})
        _copy_data(src, dst)


def _copy_data(src, dst) -> None:
    """Copy an open file's bytes into another, in the kernel where it can (a 90 MB model: ~30 ms, not ~0.5 s)."""
    try:
        while os.copy_file_range(src.fileno(), dst.fileno(), 1 << 30):
            pass
    except (AttributeError, OSError):  # no copy_file_range (not Linux, an old kernel, a file system that refuses)
        src.seek(0)
        dst.seek(0)
        dst.truncate()
        shutil.copyfileobj(src, dst, 1 << 20)


def sweep_private_copies(where: str | Path | None = None) -> list[Path]:
    """Remove the private copies (``rbee-load-<pid>-*`` in the temp folder) that processes now gone left.

    A worker killed (``kill -9``, the OOM killer) inside a :func:`private_copy` window leaves its
    copy behind: a model's config and tokenizer, or a whole embedding model. Only folders of
    that exact pattern, owned by this uid, not links, whose pid no longer runs, are removed, and
    only where :func:`shutil.rmtree` cannot be led out of them through a link swapped in (it works
    through descriptors, ``shutil.rmtree.avoids_symlink_attacks``). Anything else is left alone.

    Returns:
        The folders removed.
    """
    if not shutil.rmtree.avoids_symlink_attacks:
        return []
    base = Path(where if where is not None else tempfile.gettempdir())
    removed = []
    with contextlib.suppress(OSError), os.scandir(base) as entries:
        for entry in entries:
            match = _COPY_NAME.fullmatch(entry.name)
            if match is None or int(match[1]) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not pid_alive(int(match[1])):
                    shutil.rmtree(entry.path)
                    removed.append(Path(entry.path))
    return removed


# --- deleting a snapshot ---------------------------------------------------------------------

def remove_snapshot(snapshot: Path, *, still_used: set[Path]) -> None:
    """Delete a hub snapshot and the blobs only it pointed at; the repo folder goes when empty.

    A shared cache is writable by its whole group, so any link in a snapshot may have been
    planted. Only regular files directly inside *this* repository's ``blobs/`` are unlinked,
    through a descriptor of that folder opened without following links (a folder swapped
    for a link meanwhile is not entered); a link to anywhere else is removed as a link and
    its target left alone.
    """
    if not snapshot.exists() or snapshot.is_symlink():
        return
    repo_dir = snapshot.parent.parent
    blobs_dir = repo_dir / "blobs"
    real_blobs = repo_dir.resolve() / "blobs"

    def own_blobs(folder: Path) -> set[str]:
        names = set()
        for link in folder.rglob("*"):
            if link.is_symlink():
                with contextlib.suppress(OSError, RuntimeError):
                    target = link.resolve()
                    if target.parent == real_blobs:
                        names.add(target.name)
        return names

    keep: set[str] = set()
    for other in still_used:
        if other.parent.parent == repo_dir and other != snapshot and other.exists():
            keep |= own_blobs(other)
    doomed = own_blobs(snapshot) - keep
    shutil.rmtree(snapshot, ignore_errors=True)  # removes links as links, never their targets
    _unlink_blobs(blobs_dir, doomed)
    with contextlib.suppress(OSError):
        if not any((repo_dir / "snapshots").iterdir()):
            shutil.rmtree(repo_dir, ignore_errors=True)


def _unlink_blobs(blobs_dir: Path, names: set[str]) -> None:
    """Unlink the regular files ``names`` of ``blobs_dir``, a real folder (not a link to one)."""
    if not names:
        return
    try:
        fd = os.open(blobs_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return  # no blobs folder, or a link in its place: nothing of ours to delete
    try:
        for name in names:
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
