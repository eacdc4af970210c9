"""nbval settings for the notebooks here (``python -m pytest --nbval notebooks/``).

Progress views show the model reference as their ``text/plain`` (``generate file:///…/x.gguf``),
and a ``file://`` path depends on where the package or the test's temporary folder is: it is
replaced by a constant before outputs are compared, so the cells that stream generated text
stay compared. A ``--nbval-sanitize-with`` file, if given, applies as well.
"""

from __future__ import annotations

SANITIZE = {
    r"file://[^\s'\"]+": "file://MODEL",  # a local model: its folder differs between machines
}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        patterns = getattr(item.parent, "sanitize_patterns", None)  # nbval's IPyNbFile
        if patterns is not None:
            for regex, replacement in SANITIZE.items():
                patterns.setdefault(regex, replacement)
