"""Benchmark: one job's events fanned out to many SSE subscribers through the real SSE writer.

Server process: a ``jobs.Job`` streamed by ``rbee_jupyter.server.sse.stream_job`` behind a
minimal Tornado handler (no Jupyter auth, otherwise the production path: the same Job,
Subscription, framing and ``handler.write``/``flush``). Client processes (``--clients``
of them, default 2) hold the subscribers as raw asyncio sockets speaking HTTP/1.1 with
chunked transfer, like a browser's EventSource, doing as little work as possible per
byte so the clients are not what is measured.

Each published event is a frozen dataclass subclassing ``events.Event`` that carries the
wall-clock ``ts`` of its creation (plus download-progress-like fields, so frames have a
realistic size); a client computes ``arrival - ts`` (same machine, same clock) when the
bytes reach it. After every subscriber got the job's current state, the server publishes
``--rate`` events/s for ``--seconds`` s, then a terminal event; every subscriber must get
the terminal event and ``[DONE]``.

Memory per subscriber = (server RSS with N subscribers connected - RSS with none) / N,
measured after one warm-up subscriber came and went.

Usage: python bench/fanout.py [--subscribers 100 1000] [--clients 2] [--rate 10] [--seconds 15]
                              [--profile] [--nice -10] [--quiet-wait 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import MachineLoad, add_machine_options, apply_machine_options, wait_for_quiet  # noqa: E402

from rbee_jupyter.events import Event
from rbee_jupyter.testing.rawsse import RawSSEProtocol


@dataclass(frozen=True)
class Stamped(Event):
    """A progress-like event that knows when it was made (``time.time()``)."""

    skippable: ClassVar[bool] = False  # every one must arrive: each is a measurement
    seq: int
    ts: float
    bytes_downloaded: int = 0
    bytes_total: int = 200_000_000
    speed_mbps: float = 0.0
    stage: Literal["downloading"] = "downloading"


@dataclass(frozen=True)
class StampedEnd(Event):
    """The terminal event, stamped too."""

    seq: int
    ts: float
    local_path: str = "/tmp/models--bench--fanout/snapshots/0123456789abcdef0123456789abcdef01234567"
    stage: Literal["complete"] = "complete"


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def serve(rate: float, count: int, profile_to: str | None = None) -> None:
    from tornado.httpserver import HTTPServer
    from tornado.netutil import bind_sockets
    from tornado.web import Application, RequestHandler

    from rbee_jupyter.core.jobs import Job
    from rbee_jupyter.server.sse import stream_job

    job = Job("bench")
    job.publish(Stamped(seq=0, ts=time.time()))  # the current state every new subscriber gets first
    stats: dict = {}

    class StreamHandler(RequestHandler):
        def initialize(self) -> None:
            self._rbee_subscription = None

        async def get(self) -> None:
            await stream_job(self, job, keepalive_s=10.0)

        def on_connection_close(self) -> None:  # as RbeeHandler does
            if self._rbee_subscription is not None:
                self._rbee_subscription.close()

    class StatsHandler(RequestHandler):
        def get(self) -> None:
            self.finish({"rss_kb": _rss_kb(), "subscribers": len(job.subscriptions), "records": len(job.records),
                         "state": job.state.value, "cpu_s": time.process_time(), **stats})

    async def publish() -> None:
        loop = asyncio.get_running_loop()
        prof = None
        if profile_to:
            import cProfile
            prof = cProfile.Profile()
            prof.enable()
        cpu0, t0 = time.process_time(), loop.time()
        for i in range(1, count + 1):
            await asyncio.sleep(max(0.0, t0 + i / rate - loop.time()))
            job.publish(Stamped(seq=i, ts=time.time(), bytes_downloaded=i * 1_000_000, speed_mbps=80.0))
        stats["rss_streaming_kb"] = _rss_kb()
        await asyncio.sleep(max(0.0, t0 + (count + 1) / rate - loop.time()))
        job.finish(StampedEnd(seq=count + 1, ts=time.time()))
        stats["publish_wall_s"] = loop.time() - t0
        stats["publish_cpu_s"] = time.process_time() - cpu0
        if prof is not None:
            await asyncio.sleep(0.5)  # the terminal event and [DONE] go out
            prof.disable()
            prof.dump_stats(profile_to)

    class PublishHandler(RequestHandler):
        def get(self) -> None:
            asyncio.get_running_loop().create_task(publish())
            self.finish({"started": True})

    app = Application([(r"/stream", StreamHandler), (r"/stats", StatsHandler), (r"/publish", PublishHandler)])
    sockets = bind_sockets(0, "127.0.0.1", backlog=4096)
    HTTPServer(app).add_sockets(sockets)
    print(sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


# --- client process -------------------------------------------------------------------

REQUEST = b"GET /stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"


class Subscriber(RawSSEProtocol):
    """One SSE subscriber; the arrival time is taken once per ``data_received`` before any parsing."""

    def __init__(self, connected: asyncio.Future, finished: asyncio.Future) -> None:
        super().__init__(REQUEST, finished, clock=time.time)
        self.connected = connected
        self.delays: list[float] = []
        self.seqs: list[int] = []
        self.terminal_delay: float | None = None
        self.done = False

    def on_frame(self, block: bytes, now: float) -> None:
        for line in block.split(b"\n"):
            if not line.startswith(b"data: "):
                continue
            payload = line[6:]
            if payload == b"[DONE]":
                self.done = True
                self.finish()
                return
            event = json.loads(payload)
            seq = event["seq"]
            if seq == 0:
                if not self.connected.done():
                    self.connected.set_result(True)
                continue
            self.seqs.append(seq)
            if event.get("stage") == "complete":
                self.terminal_delay = now - event["ts"]
            else:
                self.delays.append(now - event["ts"])

    def finish(self, error: BaseException | None = None) -> None:
        if not self.connected.done():
            self.connected.set_exception(error or RuntimeError("stream ended before its first event"))
        super().finish(error)


async def clients(port: int, n: int, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    subs: list[Subscriber] = []
    connected, finished = [], []
    sem = asyncio.Semaphore(200)  # connect in waves, not 1000 SYNs at once

    async def connect() -> None:
        c, f = loop.create_future(), loop.create_future()
        connected.append(c)
        finished.append(f)
        async with sem:
            _, proto = await loop.create_connection(lambda: Subscriber(c, f), "127.0.0.1", port)
            subs.append(proto)
            await c

    await asyncio.gather(*(connect() for _ in range(n)))
    print("connected", flush=True)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.wait(finished, timeout=timeout)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    out = {
        "n": n,
        "delays": [round(d, 6) for s in subs for d in s.delays],
        "terminal": [s.terminal_delay for s in subs],
        "done": [s.done for s in subs],
        "in_order": [s.seqs == sorted(s.seqs) and len(set(s.seqs)) == len(s.seqs) for s in subs],
        "events": [len(s.seqs) for s in subs],
        "cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
    }
    print(json.dumps(out), flush=True)


# --- orchestrator ---------------------------------------------------------------------

def _get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return json.loads(r.read())


def _wait_stats(port: int, pred, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = _get(port, "/stats")
        if pred(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.1)  # polling another process: nothing to wait on instead


def _wait_file(path: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.1)  # another process writes it: polling is all there is


def _print_profile(path: str, n: int) -> None:
    """Where the server's time went (cProfile slows everything; read the shares, not the totals)."""
    import io
    import pstats

    s = io.StringIO()
    st = pstats.Stats(path, stream=s)
    total = st.total_tt
    print(f"\nServer profile, {n} subscribers (cProfile; total {total:.2f} s CPU in profiled code):")
    st.sort_stats("tottime").print_stats(14)
    print("\n".join(line for line in s.getvalue().splitlines()[6:] if line.strip()))
    s.truncate(0)
    s.seek(0)
    st.sort_stats("cumulative").print_stats(r"stream_job|Subscription.get|wait_for|flush|write|_next_ready|Event.set")
    print("\n".join(line for line in s.getvalue().splitlines()[6:] if line.strip()))


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def run_case(n: int, n_clients: int, rate: float, seconds: float, profile_to: str | None = None) -> dict:
    count = int(rate * seconds)
    me = [sys.executable, str(Path(__file__).resolve())]
    server = subprocess.Popen(me + ["--serve", "--rate", str(rate), "--count", str(count)]
                              + (["--profile-to", profile_to] if profile_to else []),
                              stdout=subprocess.PIPE, text=True)
    procs: list[subprocess.Popen] = []
    try:
        port = int(server.stdout.readline())
        # warm-up: one subscriber comes and goes, so first-request allocations are in the baseline
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(REQUEST)
            buf = b""
            while b"data: " not in buf or not buf.endswith(b"\r\n"):
                buf += s.recv(65536)
        _wait_stats(port, lambda s: s["subscribers"] == 0)
        time.sleep(0.3)  # let the freed connection's memory settle before the baseline RSS is read
        base = _get(port, "/stats")

        per = [n // n_clients + (1 if i < n % n_clients else 0) for i in range(n_clients)]
        timeout = seconds + 60
        for k in per:
            procs.append(subprocess.Popen(me + ["--client", "--port", str(port), "--n", str(k),
                                                "--timeout", str(timeout)], stdout=subprocess.PIPE, text=True))
        for p in procs:
            line = p.stdout.readline().strip()
            if line != "connected":
                raise RuntimeError(f"a client process failed to connect: {line!r}")
        full = _wait_stats(port, lambda s: s["subscribers"] == n)
        time.sleep(0.5)  # RSS with N subscribers: let their buffers settle before reading it
        full = _get(port, "/stats")
        _get(port, "/publish")
        results = [json.loads(p.stdout.readline()) for p in procs]
        for p in procs:
            p.wait(30)
        end = _wait_stats(port, lambda s: "publish_cpu_s" in s)
        if profile_to:
            _wait_file(profile_to)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        server.terminate()
        server.wait(10)

    delays = [d for r in results for d in r["delays"]]
    terminal = [t for r in results for t in r["terminal"]]
    done = [d for r in results for d in r["done"]]
    in_order = [o for r in results for o in r["in_order"]]
    events = [e for r in results for e in r["events"]]
    got_terminal = [t is not None for t in terminal]
    return {
        "n": n, "clients": n_clients, "count": count,
        "median_ms": statistics.median(delays) * 1e3 if delays else float("nan"),
        "p99_ms": _pct(delays, 99) * 1e3 if delays else float("nan"),
        "max_ms": max(delays) * 1e3 if delays else float("nan"),
        "terminal_p99_ms": _pct([t for t in terminal if t is not None], 99) * 1e3 if any(got_terminal) else float("nan"),
        "samples": len(delays),
        "missing_terminal": got_terminal.count(False),
        "missing_done": done.count(False),
        "short": sum(1 for e in events if e != count + 1),
        "out_of_order": in_order.count(False),
        "base_mb": base["rss_kb"] / 1024, "full_mb": full["rss_kb"] / 1024,
        "streaming_mb": end.get("rss_streaming_kb", 0) / 1024,
        "kb_per_sub": (full["rss_kb"] - base["rss_kb"]) / n,
        "kb_per_sub_streaming": (end.get("rss_streaming_kb", 0) - base["rss_kb"]) / n,
        "server_cpu_pct": 100 * end["publish_cpu_s"] / end["publish_wall_s"],
        "server_us_per_delivery": 1e6 * end["publish_cpu_s"] / (n * (count + 1)),
        "client_cpu_pct": 100 * sum(r["cpu_s"] for r in results) / end["publish_wall_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subscribers", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--clients", type=int, default=2, help="client processes holding the subscribers")
    ap.add_argument("--rate", type=float, default=10.0, help="events per second")
    ap.add_argument("--seconds", type=float, default=15.0)
    add_machine_options(ap)
    ap.add_argument("--profile", action="store_true",
                    help="also cProfile the server during the largest case and print where its time goes")
    ap.add_argument("--profile-to", help=argparse.SUPPRESS)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    apply_machine_options(args)
    _raise_nofile()
    if args.serve:
        asyncio.run(serve(args.rate, args.count, args.profile_to))
        return
    if args.client:
        asyncio.run(clients(args.port, args.n, args.timeout))
        return

    print(f"{os.cpu_count()} CPUs; {args.rate:g} events/s for {args.seconds:g} s then a terminal event; "
          f"subscribers in {args.clients} client processes (raw asyncio sockets, HTTP/1.1 chunked)", flush=True)
    rows = []
    for n in args.subscribers:
        if args.quiet_wait > 0:
            wait_for_quiet()
        with MachineLoad() as load:
            r = run_case(n, args.clients, args.rate, args.seconds)
        r["other_pct"] = load.other_pct
        rows.append(r)
        print(f"  {n} subscribers: {r['samples']} deliveries measured", flush=True)

    print("\nDelay = arrival at a subscriber - event creation (wall clock, same machine)")
    print("| subscribers | median ms | p99 ms | max ms | terminal p99 ms | missing terminal/[DONE] "
          "| RSS 0 subs MB | RSS N subs MB | KB/sub idle | KB/sub streaming | server CPU | server us/delivery "
          "| clients CPU | other procs |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.2f} | {r['terminal_p99_ms']:.2f} "
              f"| {r['missing_terminal']}/{r['missing_done']} | {r['base_mb']:.1f} | {r['full_mb']:.1f} "
              f"| {r['kb_per_sub']:.1f} | {r['kb_per_sub_streaming']:.1f} "
              f"| {r['server_cpu_pct']:.0f}% | {r['server_us_per_delivery']:.0f} "
              f"| {r['client_cpu_pct']:.0f}% | {r['other_pct']:.0f}% |")
    bad = [r for r in rows if r["missing_terminal"] or r["missing_done"] or r["short"] or r["out_of_order"]]
    for r in bad:
        print(f"!! {r['n']} subscribers: {r['missing_terminal']} without the terminal event, {r['missing_done']} "
              f"without [DONE], {r['short']} with a wrong event count, {r['out_of_order']} out of order")
    print("CPU columns: % of one core over the publishing phase (server us/delivery: its CPU per event per "
          "subscriber, which contention does not inflate); other procs: % of the whole machine used by "
          "processes outside this bench" + ("  !! timings skewed" if any(r["other_pct"] > 10 for r in rows) else ""))
    if not bad:
        print(f"every subscriber got all {rows[0]['count']} events in order, the terminal event and [DONE]")
    if args.profile:
        n = max(args.subscribers)
        print(f"\nprofiling the server with {n} subscribers (a separate run, not the table's)...", flush=True)
        with tempfile.TemporaryDirectory(prefix="rbee-fanout-") as tmp:
            path = os.path.join(tmp, "server.prof")
            run_case(n, args.clients, args.rate, min(args.seconds, 5.0), profile_to=path)
            _print_profile(path, n)


if __name__ == "__main__":
    main()
