"""Default places on disk, shared by the server extension and the embedded hive.

Both modes must agree, so that a model downloaded from a notebook run by nbclient is
found by the Jupyter server later, and by transformers at any time.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> str:
    """huggingface_hub's cache as it resolves it (``HF_HUB_CACHE``, then ``HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(home, "hub")


def default_catalog_path() -> str:
    """``<jupyter data dir>/rbee/catalog.sqlite``: per user, next to Jupyter's other state."""
    from jupyter_core.paths import jupyter_data_dir

    return os.path.join(jupyter_data_dir(), "rbee", "catalog.sqlite")


def nearest_existing(folder: str | Path) -> Path:
    """The folder itself, or its closest ancestor that exists: where creating ``folder`` starts.

    A fresh account has no ``~/.cache/huggingface`` and a new JupyterHub user an empty home,
    so every folder we write into may be missing at any depth. The disk-space check and the
    writability probe look here, since that is the disk and the permissions that apply.
    """
    folder = Path(folder)
    while not (folder.exists() or folder.is_symlink()) and folder.parent != folder:
        folder = folder.parent
    return folder
