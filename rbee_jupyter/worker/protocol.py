"""What the pool and a worker process agree on: env names, exit descriptions.

The start-up spec (``WorkerConfig``) lives in :mod:`rbee_jupyter.protocol` and the error
decoding (``error_from_json``) in :mod:`rbee_jupyter.errors`; both are re-exported here.

Kept free of torch and tornado imports on purpose: the pool imports it in the server
process, and the worker imports it before it announces its port (start-up must be quick;
the heavy imports happen in the loading thread, where they count as loading, or in a spare
worker before its spec arrives).
"""

from __future__ import annotations

import signal

from ..errors import error_from_json
from ..protocol import WorkerConfig

__all__ = ["WorkerConfig", "SECRET_ENV", "BLOCK_DELAY_ENV", "TOKEN_DELAY_ENV", "SPARE_ENV", "SPARE_READY",
           "error_from_json", "describe_exit", "mb"]

#: The per-worker secret travels in the environment, never in argv (argv is world-readable in /proc).
SECRET_ENV = "RBEE_WORKER_SECRET"
#: Test hooks: sleep after each loaded block / each emitted chunk (both interruptible by cancel).
BLOCK_DELAY_ENV = "RBEE_WORKER_BLOCK_DELAY_S"
TOKEN_DELAY_ENV = "RBEE_WORKER_TOKEN_DELAY_S"
#: Set ("1") by the pool on a spare worker: import the heavy modules first, then wait for the spec.
SPARE_ENV = "RBEE_WORKER_SPARE"
#: The stderr line a spare writes once its imports are done, followed by a JSON object (what it
#: imported, how long it took). Stderr, because stdout carries the one announcement line only.
SPARE_READY = "rbee spare worker: imports done "



MiB = 1 << 20


def mb(n_bytes: int) -> int:
    """Bytes to MB, rounded up: a block that holds anything never reads as 0 MB."""
    return -(-int(n_bytes) // MiB)


def describe_exit(returncode: int | None) -> str:
    """"killed by signal 9 (SIGKILL)", "exit code 1", "exited normally" — for messages and exit_reason."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "unknown signal"
        return f"killed by signal {-returncode} ({name})"
    if returncode == 0:
        return "exited normally (exit code 0)"
    return f"exit code {returncode}"
