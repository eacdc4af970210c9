"""The worker's entry point: read the spec, listen, announce the port, load, serve, exit.

Stdout carries exactly one line, the announcement the pool waits for. Everything else a
library might print goes to stderr (fd 1 is pointed at stderr before anything is
imported), so a stray ``print`` can neither corrupt the handshake nor fill a pipe nobody
reads.

A *spare* (``RBEE_WORKER_SPARE=1``, started by the pool ahead of any load) first imports
what a load needs, then waits for its spec: the seconds of ``import torch, transformers``
are paid while nobody waits, instead of inside a user's load. Stdin reaching EOF before a
spec means the server is gone: the spare exits quietly (code 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import select
import sys
import time
from typing import IO, Any

from .protocol import SECRET_ENV, SPARE_ENV, SPARE_READY, WorkerConfig

__all__ = ["main", "serve", "SPARE_IMPORTS"]

#: What a spare imports before its spec: (module, names read from it so lazy modules load them).
#: Everything a load's first seconds import, model-independent. None of it creates a CUDA
#: context: transformers and accelerate do not touch the device; bitsandbytes asks torch for the
#: GPUs' compute capability, which initialises torch's CUDA state but allocates no context and
#: no GPU memory (seen on an H100: 4 MiB used on the card, no process listed, against 612 MiB
#: once a tensor is created). Any of them may be missing or broken: a spare then simply did not
#: import it, and the load reports the problem as it does without a spare.
SPARE_IMPORTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("torch", ()),
    ("safetensors.torch", ()),
    ("transformers", ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "GenerationConfig",
                      "BitsAndBytesConfig")),
    ("transformers.modeling_utils", ()),
    ("transformers.generation", ()),
    ("accelerate", ()),
    ("bitsandbytes", ()),
    ("tornado.httpserver", ()),
    ("tornado.netutil", ()),
    ("rbee_jupyter.engine.devices", ()),
    ("rbee_jupyter.engine.loader", ()),
    ("rbee_jupyter.engine.generate", ()),
    ("rbee_jupyter.worker.app", ()),
)


def preimport() -> dict[str, Any]:
    """Import :data:`SPARE_IMPORTS`; returns what was imported, what failed, and how long it took."""
    started = time.perf_counter()
    imported: list[str] = []
    failed: dict[str, str] = {}
    for name, attributes in SPARE_IMPORTS:
        try:
            module = importlib.import_module(name)
            for attribute in attributes:
                getattr(module, attribute)
        except Exception as exc:  # noqa: BLE001 - optional (accelerate, bitsandbytes) or broken: the load says so
            failed[name] = f"{type(exc).__name__}: {exc}"[:300]
        else:
            imported.append(name)
    return {"import_s": round(time.perf_counter() - started, 3), "imported": imported, "failed": failed}


def _cuda_initialized() -> bool:
    """Whether torch's CUDA state was initialised (reading it initialises nothing)."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def wait_as_spare() -> tuple[bytes, dict[str, Any]]:
    """A spare's start: import, say so on stderr, then block until the spec line (b"" at EOF).

    Returns the line and the facts ``/health`` reports under ``spare`` (so the pool and
    tests can tell what the spec found: imports done, CUDA untouched).
    """
    facts = preimport()
    facts["cuda_initialized"] = _cuda_initialized()
    ready = time.monotonic()
    # Looked at before saying "imports done", so that a spec sent after that line never counts:
    # readable already means a load was handed over early and waited for the imports.
    facts["spec_waiting"] = bool(select.select([sys.stdin], [], [], 0)[0])
    print(SPARE_READY + json.dumps(facts), file=sys.stderr, flush=True)
    line = sys.stdin.buffer.readline()
    facts["idle_s"] = round(time.monotonic() - ready, 3)
    facts["cuda_initialized"] = _cuda_initialized()  # again, as the spec arrives
    return line, facts


async def serve(config: WorkerConfig, secret: str, announce: IO[str], spare: dict[str, Any] | None = None,
                spec_at: float | None = None) -> str:
    """Run until told to exit; returns the reason. ``spare``: what this process did as a spare;
    ``spec_at``: when its spec arrived (``time.monotonic``)."""
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    from .app import make_app
    from .lifeline import watch_parent
    from ..protocol import EMBEDDING
    from .embedding import EmbeddingRuntime
    from .runtime import LoadTimeline, WorkerRuntime

    runtime = (EmbeddingRuntime if config.kind == EMBEDDING else WorkerRuntime).from_env(config)
    runtime.spare = spare
    if spare is not None:  # its load began with the spec, not with the process (imported, then idle)
        runtime.load_timeline = LoadTimeline(since=spec_at)
    sockets = bind_sockets(0, "127.0.0.1")
    server = HTTPServer(make_app(runtime, secret))
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    announce.write(json.dumps({"port": port, "pid": os.getpid()}) + "\n")
    announce.flush()
    announce.close()
    runtime.start_loading()
    lifeline = watch_parent(runtime.request_exit, stdin=config.watch_stdin)
    await runtime.exit_requested.wait()
    lifeline.cancel()
    server.stop()
    return runtime.exit_reason or "exit requested"


def main() -> int:
    announce = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    secret = os.environ.pop(SECRET_ENV, "")  # children and libraries never see it
    if not secret:
        print(f"rbee worker: {SECRET_ENV} is not set; refusing to serve without a secret.", file=sys.stderr)
        return 2
    spare = None
    if os.environ.pop(SPARE_ENV, "") == "1":
        line, spare = wait_as_spare()
        if not line:  # the server went away before handing it a load: nothing to report to anyone
            with contextlib.suppress(OSError, ValueError):
                print("rbee spare worker: stdin closed before a spec (the server is gone); exiting.",
                      file=sys.stderr, flush=True)
            os._exit(0)  # not a slow interpreter teardown with torch loaded
    else:
        line = sys.stdin.buffer.readline()
    spec_at = time.monotonic()
    try:
        config = WorkerConfig.from_json(json.loads(line or b"null"))
    except ValueError as exc:
        print(f"rbee worker: bad spec on stdin: {exc}", file=sys.stderr)
        return 2
    code = 1
    try:
        reason = asyncio.run(serve(config, secret, announce, spare, spec_at))
        code = 0
        with contextlib.suppress(OSError, ValueError):  # stderr's reader may be gone with the parent
            print(f"rbee worker {config.worker_id}: exiting ({reason}).", file=sys.stderr)
            sys.stderr.flush()
    finally:
        # Loading and generation threads may sit inside torch, and interpreter teardown with
        # torch loaded takes seconds; exiting the process is what frees the memory, so exit now.
        os._exit(code)
