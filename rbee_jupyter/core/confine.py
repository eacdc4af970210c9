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
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import InvalidCheckpoint

__all__ = ["ModelFolder", "check_folder", "model_folder", "remove_snapshot", "resolve_inside"]


@dataclass(frozen=True)
class ModelFolder:
    """A model folder with symlinks resolved, and the blobs folder its links may point into."""

    root: Path
    blobs: Path | None  # ``<repo>/blobs`` when ``root`` is a huggingface_hub snapshot, else None

    def holds(self, target: Path) -> bool:
        """Whether the resolved path ``target`` is inside the folder (or is a blob of its own repo)."""
        if target == self.root or target.is_relative_to(self.root):
            return True
        return self.blobs is not None and target.parent == self.blobs


def model_folder(folder: str | Path) -> ModelFolder:
    """``folder`` resolved; in huggingface_hub's layout, with its repository's ``blobs/``."""
    root = Path(folder).expanduser().resolve()
    snapshots = root.parent
    repo = snapshots.parent
    blobs = repo / "blobs" if snapshots.name == "snapshots" and repo.name.startswith(("models--", "datasets--")) \
        else None
    return ModelFolder(root, blobs)


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
            outside the folder (other than into its own repository's blobs), or is not a regular file.
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


def check_folder(folder: str | Path) -> ModelFolder:
    """Refuse a model folder any of whose entries is a symlink that leads outside it.

    What transformers reads by itself (``config.json``, ``tokenizer.json``, ``tokenizer_config.json``,
    the chat template, ...) is read through the folder, so every link in it must stay inside
    before any of them is opened.

    Raises:
        InvalidCheckpoint: a link resolves outside the folder (or into another repository's blobs).
    """
    where = model_folder(folder)
    if not where.root.is_dir():
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
