"""Exit when the parent is gone, so that no worker ever outlives its server.

Two signals, either enough: stdin reaching EOF (the pool holds the pipe's write end for
the worker's whole life, and the kernel closes it when the pool's process dies, even by
SIGKILL) and the parent pid changing (re-parented to init or a subreaper).
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Callable

__all__ = ["watch_parent"]


def watch_parent(on_gone: Callable[[str], None], *, stdin: bool = True, poll_s: float = 1.0) -> asyncio.Task:
    """Call ``on_gone(reason)`` on the running loop once the parent is gone; returns the polling task."""
    loop = asyncio.get_running_loop()
    parent = os.getppid()

    if stdin:
        def read_until_eof() -> None:
            try:
                while sys.stdin.buffer.read1(65536):
                    pass
            except (OSError, ValueError):
                pass
            loop.call_soon_threadsafe(on_gone, "stdin closed: the parent process is gone")

        threading.Thread(target=read_until_eof, name="rbee-lifeline", daemon=True).start()

    async def poll() -> None:
        while os.getppid() == parent:
            await asyncio.sleep(poll_s)
        on_gone(f"parent process {parent} is gone")

    return loop.create_task(poll(), name="rbee-lifeline-poll")
