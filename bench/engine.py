"""Benchmark: tokens per second through the hive relaying an external engine vs the engine directly.

One ``transformers serve`` (the real OpenAI-compatible engine of tests/test_engines.py, offline,
loopback, pinned to one model folder) and one ``jupyter server`` with the extension, where the
engine is registered as a worker (``POST v1/workers {"backend": "openai", ...}``). Both are
started, and the engine warmed up, before any clock. Then ``--rounds`` rounds, order
alternating, of the same greedy request (``max_tokens`` tokens, temperature 0):

* direct: ``POST {engine}/v1/completions`` with ``stream: true``, read with an httpx client kept
  open across rounds (as the hive keeps its connection to the engine, and the bench its own to the hive);
  time = request -> the engine's last chunk (its stream end), TTFT = request -> first text chunk.
* hive: ``POST rbee/v1/inference {"worker_id", ...}`` read with httpx; time = request -> ``[DONE]``,
  TTFT = request -> first ``token`` event. The hive opens its own streaming request to the engine
  and translates every chunk into our events.

tok/s = completion tokens / time (the ``usage`` the engine reports, equal for both; checked),
and the texts must be equal. Ratio = median hive tok/s / median direct tok/s (goal >= 0.97); the
median of the per-round ratios (the two runs of a round are back to back) drifts less with the
machine's load.
CPU ms per token of the engine and of the jupyter server process (``/proc/<pid>/stat``) say
what relaying costs: on a machine with fewer free cores than busy processes, the hive's CPU
is taken from the engine.

The default model is the test suite's tiny Llama, whose tokens come fastest, so the relay's cost
per token weighs the most; ``--model-dir`` names any other transformers folder.

``--engine-threads 1`` leaves the engine one core fewer than the machine has, the way a GPU
engine leaves the host's CPU to others: then the relay's CPU does not come out of the engine's.

``--profile N`` measures the relay alone instead: ``OpenAIEnginePool.generate`` in this process
(no jupyter server), N generations against the same engine; it prints this process's CPU ms per
token and per relayed chunk (median over the N) and a cProfile of one more generation, grouped by
package, which is where a cheaper relay has to come from; then the CPU of only reading the
stream with httpx (as the relay does) vs h11 over asyncio streams (what a hand-made reader could save).

Usage: python bench/engine.py [--rounds 5] [--tokens 128] [--engine-threads N] [--engine-device cuda:0]
                              [--model-dir DIR] [--nice -10] [--quiet-wait 60] [--profile N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import httpx

from machine import MachineLoad, add_machine_options, apply_machine_options, cpu_of, wait_for_quiet

PROMPT = "Once upon a time"


def sse_data(lines):
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()


def run_direct(client: httpx.Client, model: str, tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    text, ttft, usage = [], None, {}
    t0 = time.perf_counter()
    with client.stream("POST", "completions", json=body, timeout=120) as r:
        r.raise_for_status()
        for data in sse_data(r.iter_lines()):
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    ttft = ttft or time.perf_counter() - t0
                    text.append(choice["text"])
    s = time.perf_counter() - t0
    n = int(usage.get("completion_tokens") or 0)
    return {"s": s, "tokens": n, "tps": n / s, "ttft_ms": 1000 * (ttft or s), "text": "".join(text)}


def run_hive(server, worker_id: str, tokens: int) -> dict[str, Any]:
    body = {"worker_id": worker_id, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
    text, ttft, end, events = [], None, {}, 0
    t0 = time.perf_counter()
    with server.client.stream("POST", "v1/inference", json=body, timeout=120) as r:
        r.raise_for_status()
        for data in sse_data(r.iter_lines()):
            if data == "[DONE]":
                break
            event = json.loads(data)
            if event["type"] == "token":
                events += 1
                ttft = ttft or time.perf_counter() - t0
                text.append(event["t"])
            elif event["type"] == "end":
                end = event
            elif event["type"] == "error":
                raise RuntimeError(event)
    s = time.perf_counter() - t0
    n = int(end.get("total_tokens") or 0)
    return {"s": s, "tokens": n, "tps": n / s, "ttft_ms": 1000 * (ttft or s), "text": "".join(text), "events": events}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--model-dir", type=Path, default=None, help="a transformers folder; default: the tiny test Llama")
    ap.add_argument("--engine-threads", type=int, default=None,
                    help="torch threads of the engine (OMP_NUM_THREADS); default: torch's, i.e. every core")
    ap.add_argument("--engine-device", default="cpu", help="the engine's --device (e.g. cuda:0 on a GPU box)")
    add_machine_options(ap)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile the relay in-process over N generations instead of the hive-vs-direct rounds")
    args = ap.parse_args()
    apply_machine_options(args)

    from rbee_jupyter.testing.engine import TransformersServe
    from rbee_jupyter.testing.server import ServerProcess, free_port
    from rbee_jupyter.testing.tiny_model import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="rbee-bench-engine-") as tmp:
        model = args.model_dir or make_tiny_model(Path(tmp) / "tiny-llama")
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1"
        engine = TransformersServe(model, Path(tmp) / "engine.log", port, device=args.engine_device,
                                   threads=args.engine_threads).start()
        settings = {"cache_dir": str(Path(tmp) / "cache"), "catalog_path": str(Path(tmp) / "catalog.sqlite")}
        if args.profile:
            try:
                asyncio.run(profile_relay(url, str(model), args.tokens, args.profile))
            finally:
                engine.stop()
            return
        direct = httpx.Client(base_url=url + "/")  # kept open like the hive's and the bench's hive client
        try:
            with ServerProcess(Path(tmp) / "server", rbee=settings) as server:
                r = server.post("v1/workers", {"backend": "openai", "url": url, "model": str(model)})
                r.raise_for_status()
                worker_id = r.json()["worker_id"]
                ready = server.events(r.json()["progress_url"])[-1]
                assert ready["stage"] == "ready", ready
                run_direct(direct, str(model), 8), run_hive(server, worker_id, 8)  # warm-up, off the clock
                res: dict[str, list] = {"direct": [], "hive": []}
                MachineLoad.pids = (engine.pid, server.proc.pid)  # their CPU is ours, not "other"
                with MachineLoad() as load:
                    for i in range(args.rounds):
                        wait_for_quiet()
                        order = ("direct", "hive") if i % 2 == 0 else ("hive", "direct")
                        for who in order:
                            cpu0 = {"engine": cpu_of(engine.pid), "server": cpu_of(server.proc.pid)}
                            run = run_direct(direct, str(model), args.tokens) if who == "direct" else \
                                run_hive(server, worker_id, args.tokens)
                            for part, pid in (("engine", engine.pid), ("server", server.proc.pid)):
                                run[f"{part}_cpu_ms"] = 1000 * (cpu_of(pid) - cpu0[part]) / max(run["tokens"], 1)
                            res[who].append(run)
                            print(f"round {i + 1} {who:6s}: {run['tokens']} tokens in {run['s']:.3f} s, "
                                  f"{run['tps']:.2f} tok/s, TTFT {run['ttft_ms']:.1f} ms", flush=True)
        finally:
            direct.close()
            engine.stop()
    report(args, res, load)


async def profile_relay(url: str, model: str, tokens: int, n: int) -> None:
    """The relay's own CPU (this process only: the engine is another process) per token and per chunk."""
    import cProfile
    import pstats
    from collections import defaultdict

    from rbee_jupyter.pools.engines import EngineSpec, OpenAIEnginePool
    from rbee_jupyter.protocol import GenerationRequest
    from rbee_jupyter.events import Token
    from rbee_jupyter.core.jobs import Job

    pool = OpenAIEnginePool(health_interval_s=None)
    load = Job("load")
    await pool.start(EngineSpec.from_json({"url": url, "model": model}), load)
    await asyncio.wait_for(load.task, 60)
    body = GenerationRequest(prompt=PROMPT, max_tokens=tokens, temperature=0)

    async def one() -> tuple[float, int, int, str]:
        job = Job("inference")
        c0 = time.process_time()
        await pool.generate(load.id, body, job)
        cpu = time.process_time() - c0
        events = [r.event for r in job.records]
        toks = [ev for ev in events if isinstance(ev, Token)]
        end = events[-1] if events else None
        return cpu, int(getattr(end, "total_tokens", 0) or 0), len(toks), "".join(t.t for t in toks)

    await one()  # warm-up, off the clock
    runs = [await one() for _ in range(n)]
    texts = {r[3] for r in runs}
    cpu = statistics.median(r[0] for r in runs)
    total, chunks = runs[0][1], runs[0][2]
    print(f"relay in-process, {n} generations of {total} tokens ({chunks} chunks), same text: {len(texts) == 1}")
    print(f"relay CPU per generation {1000 * cpu:.1f} ms (median; min {1000 * min(r[0] for r in runs):.1f}), "
          f"{1000 * cpu / max(total, 1):.3f} ms/token, {1000 * cpu / max(chunks, 1):.3f} ms/chunk")
    prof = cProfile.Profile()
    prof.enable()
    await one()
    prof.disable()
    stats = pstats.Stats(prof)
    by_pkg: dict[str, float] = defaultdict(float)
    for (file, _, name), (_, _, tt, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "poll" in name and file == "~":
            continue  # waiting for the engine's next chunk, not work
        parts = Path(file).parts
        pkg = next((x for x in ("rbee_jupyter", "httpx", "httpcore", "h11", "anyio", "asyncio", "json")
                    if x in parts), "builtins" if file == "~" else "other")
        by_pkg[pkg] += tt
    whole = sum(by_pkg.values())
    print(f"cProfile of one generation: {1000 * whole:.0f} ms of work (epoll waits left out), own time by package: "
          + ", ".join(
        f"{k} {100 * v / whole:.0f}%" for k, v in sorted(by_pkg.items(), key=lambda kv: -kv[1])))
    stats.sort_stats("tottime").print_stats(12)
    await pool.close()
    await compare_readers(url, model, tokens, n)


async def compare_readers(url: str, model: str, tokens: int, n: int) -> None:
    """Reading alone (no SSE, no JSON, no events): httpx as the relay uses it vs h11 over asyncio streams.

    What a hand-made HTTP/1.1 reader for the streaming call could save at most, to weigh
    against what it would have to redo (connection reuse, TLS, proxies, errors).
    """
    import h11

    host, port = httpx.URL(url).host, httpx.URL(url).port
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    payload = json.dumps(body).encode()

    async def via_httpx(client: httpx.AsyncClient) -> int:
        pieces = 0
        async with client.stream("POST", "completions", json=body) as r:
            async for _ in r.aiter_raw():
                pieces += 1
        return pieces

    async def via_h11() -> int:
        reader, writer = await asyncio.open_connection(host, port)
        conn, pieces = h11.Connection(h11.CLIENT), 0
        writer.write(conn.send(h11.Request(method="POST", target=httpx.URL(url).path + "/completions", headers=[
            ("Host", f"{host}:{port}"), ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload)))])) + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Data):
                    pieces += 1
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return pieces
        finally:
            writer.close()

    cpu: dict[str, list[float]] = {"httpx aiter_raw": [], "h11 + asyncio streams": []}
    async with httpx.AsyncClient(base_url=url + "/", timeout=120) as client:
        await via_httpx(client), await via_h11()  # warm-up
        for i in range(n):
            for who in list(cpu) if i % 2 == 0 else list(cpu)[::-1]:
                c0 = time.process_time()
                await (via_httpx(client) if who.startswith("httpx") else via_h11())
                cpu[who].append(1000 * (time.process_time() - c0))
    print("reading only, CPU ms per generation (median, alternating): " + ", ".join(
        f"{who} {statistics.median(xs):.1f}" for who, xs in cpu.items()))


def report(args, res: dict, load: MachineLoad) -> None:
    med = statistics.median
    same_text = len({r["text"] for r in res["direct"] + res["hive"]}) == 1
    same_tokens = len({r["tokens"] for r in res["direct"] + res["hive"]}) == 1
    threads = f"engine threads {args.engine_threads}" if args.engine_threads else "engine threads: torch's default"
    events = med(x["events"] for x in res["hive"])
    print(f"\n`transformers serve` relayed by the hive vs direct, greedy, {args.tokens} tokens ({events:.0f} token "
          f"events), {args.rounds} rounds alternating (median), {os.cpu_count()} cores, {threads}")
    print(f"| {'path':44s} | {'tok/s':>7s} | {'TTFT ms':>7s} | {'total s':>7s} | engine CPU ms/token | "
          f"hive CPU ms/token |")
    print(f"|{'-' * 46}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 21}|{'-' * 19}|")
    for who, label in (("direct", "engine direct (POST /v1/completions stream)"),
                       ("hive", "hive (POST rbee/v1/inference -> [DONE])")):
        xs = res[who]
        print(f"| {label:44s} | {med(x['tps'] for x in xs):7.2f} | {med(x['ttft_ms'] for x in xs):7.1f} | "
              f"{med(x['s'] for x in xs):7.3f} | {med(x['engine_cpu_ms'] for x in xs):19.2f} | "
              f"{med(x['server_cpu_ms'] for x in xs):17.2f} |")
    ratio = med(x["tps"] for x in res["hive"]) / med(x["tps"] for x in res["direct"])
    paired = med(h["tps"] / d["tps"] for h, d in zip(res["hive"], res["direct"]))
    ttft = med(x["ttft_ms"] for x in res["hive"]) - med(x["ttft_ms"] for x in res["direct"])
    print(f"\nratio hive/direct tok/s: {ratio:.3f} (goal >= 0.97: {'PASS' if ratio >= 0.97 else 'FAIL'}); "
          f"median of the per-round ratios {paired:.3f}; TTFT overhead {ttft:+.1f} ms; same text: {same_text}; "
          f"same token count: {same_tokens}")
    print(load.note())


if __name__ == "__main__":
    main()
