"""The worker process: one loaded model per process, with its own small HTTP + SSE server.

A process per model means a crash, an out-of-memory kill or a stuck CUDA kernel takes
down one model, never the Jupyter server, and unloading frees every byte (the process
exits). The pool (:mod:`rbee_jupyter.pools.local`) starts it as ``python -m rbee_jupyter.worker``:

1. the pool writes one JSON line (:class:`~.protocol.WorkerConfig`) on the worker's
   stdin and keeps the pipe open; the secret comes in env ``RBEE_WORKER_SECRET``;
2. the worker binds 127.0.0.1 on a random port and prints exactly one line,
   ``{"port": N, "pid": P}``, then starts loading at once;
3. the pool follows ``GET /load`` and relays ``POST /generate`` streams (routes in
   :mod:`.app`); the worker exits on ``POST /shutdown`` or when its parent goes away.

Modules: ``protocol`` (spec, env names, errors across the boundary; no torch),
``runtime`` (state, loading thread, generation queue), ``app`` (routes), ``server``
(entry point), ``lifeline`` (parent watch), ``process`` and ``client`` (the pool's side).
"""

from .protocol import WorkerConfig, describe_exit, error_from_json

__all__ = ["WorkerConfig", "describe_exit", "error_from_json"]
