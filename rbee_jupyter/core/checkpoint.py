"""A safetensors checkpoint's files and headers, read with the standard library only.

The loader (in the worker and the kernel) and the hive's planning both need "which files,
which tensors"; the hive first has a helper process read them (:func:`probe`, through
:mod:`rbee_jupyter.hub.isolate`) with a memory limit, because the files come from whoever
published the model. Without torch this module starts in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from ..errors import InvalidCheckpoint
from .confine import ModelFolder, model_folder, open_resolved, resolve_inside

__all__ = ["MAX_HEADER_BYTES", "checkpoint_files", "probe", "read_header"]

MAX_HEADER_BYTES = 100_000_000
"""Largest safetensors header read, as the safetensors library limits it (``MAX_HEADER_SIZE``)."""
INDEX = "model.safetensors.index.json"


def checkpoint_files(folder: str | Path | ModelFolder, *, confined: bool = True) -> list[Path]:
    """The resolved paths of a single-file or sharded checkpoint's weight files (all inside ``folder``).

    Args:
        confined: False for a single user's own ``file://`` folder: its links may lead anywhere
            (see :mod:`.confine`); names the index spells still may not be absolute or hold ``..``.

    Raises:
        InvalidCheckpoint: no weights, an unreadable index, or a name that leaves the folder.
    """
    where = model_folder(folder, confined=confined)
    root = where.root
    if (root / INDEX).is_file():
        try:
            weight_map = json.loads(resolve_inside(where, INDEX).read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidCheckpoint(f"{INDEX} is not a valid shard index ({exc}).",
                                    details={"file": str(root / INDEX)}) from None
    elif (root / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        others = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
        hint = f" (found {', '.join(others)}: convert it to safetensors)" if others else ""
        raise InvalidCheckpoint(f"No model.safetensors (or {INDEX}) in {folder}{hint}.", details={"path": str(folder)})
    return [resolve_inside(where, name) for name in names]


def read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (dtype, shape)}`` of a safetensors file, checked so a truncated or corrupt
    file fails before loading starts.

    ``file`` is a resolved path (:func:`checkpoint_files`); it is opened one part at a time
    without following a link (:func:`.confine.open_resolved`), so a file or folder swapped for a
    link after the check fails instead of being read. The header
    is capped at :data:`MAX_HEADER_BYTES` before it is read, as the safetensors library caps it.

    Raises:
        InvalidCheckpoint: unreadable, over the cap, corrupt, or truncated.
    """
    fd = open_resolved(file)
    try:
        with os.fdopen(fd, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(fh.read(n))
        tensors = {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}
        end = max((header[k]["data_offsets"][1] for k in tensors), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise InvalidCheckpoint(f"{file.name} is not a valid safetensors file ({exc}); download it again.",
                                details={"file": str(file)}) from None
    if 8 + n + end != size:
        raise InvalidCheckpoint(
            f"{file.name} is truncated or corrupt: its header describes {8 + n + end} bytes but the file has "
            f"{size}; download it again.", details={"file": str(file), "expected_bytes": 8 + n + end,
                                                   "actual_bytes": size})
    return tensors


def probe(emit: Any, *, folder: str, confined: bool = True) -> int:
    """Read every header of the checkpoint in ``folder``; the number of tensors (a helper process's job)."""
    return sum(len(read_header(f)) for f in checkpoint_files(folder, confined=confined))
