"""What the service-mode egress check costs an engine's requests (``core/egress.py``).

A user's engine is reached through ``CheckedTransport``: every request resolves the host,
checks each address and connects to the checked one. Measured against httpx's plain
``AsyncHTTPTransport`` in the same process, rounds alternating, on loopback (an
administrator opened 127.0.0.1/32): a small ``GET /v1/models`` (a health probe), and a
streamed answer of ``--tokens`` SSE chunks (a generation as an engine sends it), each with
the engine named by address (``127.0.0.1``) and by name (``localhost``: a real resolution).

    python bench/egress.py [--rounds 7] [--requests 200] [--tokens 256]
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import (
    MachineLoad,
    add_machine_options,
    apply_machine_options,
    wait_for_quiet,
)

from rbee_jupyter.core.egress import EgressPolicy


def engine(tokens: int) -> int:
    """A threaded loopback server: ``GET /v1/models`` and ``POST /v1/completions`` (``tokens`` SSE chunks)."""
    chunk = b"".join(f"data: {json.dumps({'choices': [{'text': ' tok', 'finish_reason': None}]})}\n\n".encode()
                     for _ in range(tokens)) + b"data: [DONE]\n\n"

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:  # headers and body are two writes: without this, Nagle adds 40 ms each
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _send(self, body: bytes, kind: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._send(b'{"object": "list", "data": [{"id": "m"}]}', "application/json")

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self._send(chunk, "text/event-stream")

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


async def run(transport: httpx.AsyncBaseTransport, base: str, requests: int, kind: str) -> float:
    """Seconds per request, ``requests`` in a row on one client (connections kept alive)."""
    async with httpx.AsyncClient(base_url=base, transport=transport) as client:
        t0 = time.perf_counter()
        for _ in range(requests):
            if kind == "probe":
                (await client.get("models")).raise_for_status()
            else:
                async with client.stream("POST", "completions", json={"prompt": "x", "stream": True}) as r:
                    async for _ in r.aiter_raw():
                        pass
        return (time.perf_counter() - t0) / requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=256)
    add_machine_options(ap)
    args = ap.parse_args()
    apply_machine_options(args)
    port = engine(args.tokens)
    policy = EgressPolicy.from_config([], ["127.0.0.1/32"])
    rows = []
    with MachineLoad() as load:
        for kind in ("probe", "stream"):
            for host in ("127.0.0.1", "localhost"):
                base = f"http://{host}:{port}/v1/"
                times: dict[str, list[float]] = {"plain": [], "checked": []}
                wait_for_quiet()
                for i in range(args.rounds):
                    order = ("plain", "checked") if i % 2 == 0 else ("checked", "plain")
                    for name in order:
                        transport = httpx.AsyncHTTPTransport() if name == "plain" else policy.transport()
                        times[name].append(asyncio.run(run(transport, base, args.requests, kind)))
                plain, checked = statistics.median(times["plain"]), statistics.median(times["checked"])
                rows.append((kind, host, plain * 1e3, checked * 1e3, (checked - plain) * 1e6, checked / plain))
    print(f"\n{args.rounds} rounds x {args.requests} requests, stream = {args.tokens} SSE chunks; medians\n")
    print("| request | engine named by | plain ms | checked ms | added µs | ratio checked/plain |")
    print("|---|---|---|---|---|---|")
    for kind, host, plain, checked, added, ratio in rows:
        print(f"| {kind} | {host} | {plain:.3f} | {checked:.3f} | {added:.0f} | {ratio:.3f} |")
    print(f"\n{load.note()}")


if __name__ == "__main__":
    main()
