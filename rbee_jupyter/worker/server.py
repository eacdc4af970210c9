"""The worker's entry point: read the spec, listen, announce the port, load, serve, exit.

Stdout carries exactly one line, the announcement the pool waits for. Everything else a
library might print goes to stderr (fd 1 is pointed at stderr before anything is
imported), so a stray ``print`` can neither corrupt the handshake nor fill a pipe nobody
reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from typing import IO

from .protocol import SECRET_ENV, WorkerConfig

__all__ = ["main", "serve"]


async def serve(config: WorkerConfig, secret: str, announce: IO[str]) -> str:
    """Run until told to exit; returns the reason."""
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets

    from .app import make_app
    from .lifeline import watch_parent
    from .runtime import WorkerRuntime

    runtime = WorkerRuntime.from_env(config)
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
    try:
        config = WorkerConfig.from_json(json.loads(sys.stdin.buffer.readline() or b"null"))
    except ValueError as exc:
        print(f"rbee worker: bad spec on stdin: {exc}", file=sys.stderr)
        return 2
    code = 1
    try:
        reason = asyncio.run(serve(config, secret, announce))
        code = 0
        with contextlib.suppress(OSError, ValueError):  # stderr's reader may be gone with the parent
            print(f"rbee worker {config.worker_id}: exiting ({reason}).", file=sys.stderr)
            sys.stderr.flush()
    finally:
        # Loading and generation threads may sit inside torch, and interpreter teardown with
        # torch loaded takes seconds; exiting the process is what frees the memory, so exit now.
        os._exit(code)
