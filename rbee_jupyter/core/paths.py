"""Default places on disk, shared by the server extension and the embedded hive.

Both modes must agree, so that a model downloaded from a notebook run by nbclient is
found by the Jupyter server later, and by transformers at any time.
"""

from __future__ import annotations

import os


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
