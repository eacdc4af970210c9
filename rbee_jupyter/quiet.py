"""Keep transformers' own tqdm bars out of our output while we call transformers.

Our events are the progress ("downloading", "loading_to_vram", "importing"); bars such as
"Writing model shards" or "Loading weights" that transformers prints to stderr get mixed
into our terminal lines and into notebook cells. transformers has one process-wide switch
for them, so the switch is held with a count: the bars are off while any of our calls is
inside :func:`transformers_bars_off`, and the state the user had is restored when the last
one leaves (a user who switched them off themselves keeps them off).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["transformers_bars_off"]

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextlib.contextmanager
def transformers_bars_off() -> Iterator[None]:
    """``with transformers_bars_off(): model.save_pretrained(...)``: no transformers bar inside.

    Safe across threads (a download thread and a loader thread may both be inside) and
    nested calls: only the outermost exit puts the previous state back.
    """
    global _depth, _was_enabled
    from transformers.utils import logging as tf_logging

    with _lock:
        if _depth == 0:
            _was_enabled = tf_logging.is_progress_bar_enabled()
            if _was_enabled:
                tf_logging.disable_progress_bar()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                tf_logging.enable_progress_bar()
