"""Many requests, one worker: concurrent streams batch together through a real server.

One ``jupyter server`` process with a tiny Llama worker (``max_batch_size`` 4, queue depth 4,
20 ms per decode step so that cancels and disconnects land mid-stream) serves the module;
the official ``openai`` client and raw SSE clients run in threads, as separate users would.
Each stream's text is compared with the same request run alone in this process (greedy:
equal text; see tests/test_batch.py for the tolerance on logits).
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from rbee_jupyter.testing.pytest_plugin import TINY_REPO
from rbee_jupyter.testing.server import ServerProcess
from rbee_jupyter.testing.sse import parse_frames
from rbee_jupyter.worker.protocol import TOKEN_DELAY_ENV

MODEL = TINY_REPO
PROMPTS = [f"{start} {i}" for i, start in enumerate(["Once upon a time", "The quick brown fox", "Hello world",
                                                      "Jupyter notebooks run", "Layers load one by one",
                                                      "a b c", "Bonjour le monde", "The lazy dog"])]
BATCH, DEPTH = 4, 4
WAIT_S = 60.0  # generous bound for anything on a busy 2-core machine


@pytest.fixture(scope="module")
def server(rbee_hub_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("batching")
    settings = {"cache_dir": str(folder / "cache"), "catalog_path": str(folder / "catalog.sqlite"),
                "hub_endpoint": rbee_hub_session.url, "sse_keepalive_s": 0.5, "queue_depth": DEPTH,
                "max_batch_size": BATCH}
    with ServerProcess(folder, rbee=settings, env={TOKEN_DELAY_ENV: "0.02"}) as server:
        yield server


def load(server, ref: str = f"hf:{TINY_REPO}") -> str:
    r = server.post("v1/workers", {"model_ref": ref, "device": "cpu"})
    assert r.status_code == 202, r.text
    assert server.events(r.json()["progress_url"], timeout=WAIT_S)[-1]["stage"] == "ready"
    return r.json()["worker_id"]


@pytest.fixture(scope="module")
def worker(server) -> str:
    return load(server)


@pytest.fixture(scope="module")
def solo(rbee_tiny_model):
    """Each request run alone in this process: what every batched stream must equal."""
    from transformers import AutoTokenizer

    from rbee_jupyter.engine.generate import GenerationRequest, Generator
    from rbee_jupyter.engine.loader import load_model

    gen = Generator(load_model(rbee_tiny_model), AutoTokenizer.from_pretrained(rbee_tiny_model))

    def run(**kwargs) -> str:
        return "".join(c.text for c in gen.stream(GenerationRequest(**kwargs)))
    return run


def detail(server, worker_id: str) -> dict:
    return server.get(f"v1/workers/{worker_id}").json()


def until(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


class Stream:
    """A raw ``v1/inference`` stream read in a thread; ``tokens`` counts what arrived."""

    def __init__(self, server, body: dict, *, hang_up_after: int | None = None) -> None:
        self.server, self.body, self.hang_up_after = server, body, hang_up_after
        self.text, self.tokens, self.status = "", 0, None
        self.first_token = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with self.server.client.stream("POST", "v1/inference", json=self.body, timeout=WAIT_S) as r:
            self.status = r.status_code
            for chunk in r.iter_text():
                self.text += chunk
                self.tokens = self.text.count('"type":"token"')
                if self.tokens:
                    self.first_token.set()
                if self.hang_up_after is not None and self.tokens >= self.hang_up_after:
                    return

    def events(self) -> list:
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()
        return [f.data for f in parse_frames(self.text)]

    def answer(self) -> str:
        events = self.events()
        assert events[-1] == "[DONE]" and events[-2]["type"] == "end", events[-2:]
        return "".join(e["t"] for e in events if isinstance(e, dict) and e.get("type") == "token")


def test_eight_concurrent_openai_streams_batch_and_each_equals_its_solo_run(server, worker, solo):
    client = openai.OpenAI(base_url=server.url + "rbee/openai/v1", api_key=server.token, max_retries=0)
    peak = []
    watching = threading.Event()

    def watch() -> None:  # what the worker reports while the streams run
        while not watching.is_set():
            peak.append(detail(server, worker).get("batch_size", 0))
            watching.wait(0.05)

    def one(prompt: str) -> tuple[str, str]:
        stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True)
        pieces, finish = [], None
        for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].text or "")
                finish = chunk.choices[0].finish_reason or finish
        return "".join(pieces), finish

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            results = list(pool.map(one, PROMPTS))
    finally:
        watching.set()
        watcher.join(WAIT_S)
        client.close()
    for prompt, (text, finish) in zip(PROMPTS, results, strict=True):
        assert text == solo(prompt=prompt, max_tokens=16), prompt
        assert finish in ("length", "stop")
    assert max(peak) > 1  # they really shared forward steps
    assert max(peak) <= BATCH
    info = until(lambda: (d := detail(server, worker))["state"] == "idle" and d, "the worker to be idle")
    assert (info["active_sequences"], info["queue_length"], info["batch_size"]) == (0, 0, 0)
    assert info["max_batch_size"] == BATCH


def test_a_cancelled_stream_leaves_the_batch_and_its_slot_goes_to_the_next_in_line(server, worker, solo):
    bodies = [{"worker_id": worker, "prompt": p, "max_tokens": 40, "temperature": 0} for p in PROMPTS[:BATCH + 1]]
    streams = [Stream(server, b) for b in bodies[:BATCH]]
    for s in streams:
        assert s.first_token.wait(WAIT_S)
    waiting = Stream(server, bodies[BATCH])  # the batch is full: it queues
    until(lambda: detail(server, worker)["queue_length"] == 1, "the fifth request to queue")
    assert not waiting.first_token.is_set()
    # When: the second stream is cancelled by its id
    job_id = next(e for e in parse_frames(streams[1].text) if isinstance(e.data, dict))
    job_id = job_id.data["job_id"]
    assert server.delete(f"v1/inference/{job_id}").status_code == 204
    # Then: it ends CANCELLED, the queued one takes its place, and the others are undisturbed
    cancelled = streams[1].events()
    assert cancelled[-2]["code"] == "CANCELLED" and cancelled[-1] == "[DONE]"
    assert waiting.first_token.wait(WAIT_S)
    for i in (0, 2, 3):
        assert streams[i].answer() == solo(prompt=PROMPTS[i], max_tokens=40)
    assert waiting.answer() == solo(prompt=PROMPTS[BATCH], max_tokens=40)
    until(lambda: detail(server, worker)["state"] == "idle", "the worker to be idle")


def test_a_client_that_disconnects_mid_batch_frees_its_row_only(server, worker, solo):
    bodies = [{"worker_id": worker, "prompt": p, "max_tokens": 200, "temperature": 0} for p in PROMPTS[:3]]
    leaving = Stream(server, bodies[0], hang_up_after=3)
    staying = [Stream(server, b) for b in bodies[1:]]
    leaving.thread.join(WAIT_S)
    until(lambda: detail(server, worker)["active_sequences"] <= 2, "the row of the client that left to go")
    # in the middle of the others (200 steps of 20 ms each), not when the batch ends: no clock, which
    # a busy machine would stretch, but the order of events
    assert all(s.thread.is_alive() and s.tokens < 200 for s in staying)
    for i, s in enumerate(staying, start=1):
        assert s.answer() == solo(prompt=PROMPTS[i], max_tokens=200)


def test_a_full_batch_and_queue_answer_503_worker_busy(server, worker):
    body = {"worker_id": worker, "prompt": PROMPTS[0], "max_tokens": 1000, "temperature": 0}
    streams = [Stream(server, body) for _ in range(BATCH + DEPTH)]
    try:
        until(lambda: (d := detail(server, worker))["active_sequences"] == BATCH and d["queue_length"] == DEPTH,
              "the batch and the queue to fill")
        r = server.post("v1/inference", body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "WORKER_BUSY"
        assert r.json()["error"]["details"] == {"queue_length": DEPTH, "queue_depth": DEPTH}
    finally:
        for s in streams:
            job = next((f.data for f in parse_frames(s.text) if isinstance(f.data, dict)), None)
            if job is not None:
                server.delete(f"v1/inference/{job['job_id']}")
    for s in streams:
        assert s.events()[-1] == "[DONE]"
    until(lambda: detail(server, worker)["state"] == "idle", "the worker to be idle")


def test_kill_9_of_a_batching_worker_ends_every_stream_with_worker_died(server, rbee_tiny_model):
    worker_id = load(server, f"file://{rbee_tiny_model}")
    pid = detail(server, worker_id)["pid"]
    body = {"worker_id": worker_id, "prompt": PROMPTS[0], "max_tokens": 1000, "temperature": 0}
    streams = [Stream(server, body) for _ in range(3)]
    for s in streams:
        assert s.first_token.wait(WAIT_S)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    for s in streams:
        events = s.events()
        assert events[-2]["type"] == "error" and events[-2]["code"] == "WORKER_DIED" and events[-1] == "[DONE]"
    # 2 s per the error table on an idle machine (bench/worker_died.py); the bound here holds on a busy one, and is still far
    # below what a stall (120 s) or a read timeout would take
    assert time.monotonic() - killed < 10.0
    assert detail(server, worker_id)["state"] == "failed"


def test_routing_picks_the_least_loaded_replica(server, worker, rbee_tiny_model):
    second = load(server)  # a second replica of the same model
    try:
        body = {"model_ref": f"hf:{TINY_REPO}", "prompt": PROMPTS[0], "max_tokens": 1000, "temperature": 0}
        streams = [Stream(server, body) for _ in range(4)]
        for s in streams:
            assert s.first_token.wait(WAIT_S)
        loads = sorted(detail(server, w)["active_sequences"] for w in (worker, second))
        assert loads == [2, 2]  # not all on the one that was idle first
        listed = {w["id"]: w for w in server.get("v1/workers").json()["workers"]}
        assert listed[worker]["load"] == 2 and listed[second]["load"] == 2
        for s in streams:
            job = next(f.data for f in parse_frames(s.text) if isinstance(f.data, dict))
            server.delete(f"v1/inference/{job['job_id']}")
        for s in streams:
            assert s.events()[-1] == "[DONE]"
    finally:
        assert server.delete(f"v1/workers/{second}").status_code == 204


# --- notebooks ---------------------------------------------------------------------------------

def test_generate_batch_over_50_prompts_keeps_order_and_one_bad_item_fails_alone(server, worker, solo):
    from rbee_jupyter.errors import InvalidRequest
    from rbee_jupyter.kernel.client import Client

    prompts: list = [f"{PROMPTS[i % len(PROMPTS)]} item {i}" for i in range(50)]
    prompts[17] = ""  # the server refuses it (400 INVALID_REQUEST)
    prompts[30] = [{"role": "user", "content": "Hello there"}]  # a chat among prompts
    with Client(server.url, token=server.token) as client:
        result = client.generate_batch(prompts, model=worker, max_tokens=6, temperature=0, progress=False)
    assert len(result) == 50 and [item.index for item in result] == list(range(50))
    assert set(result.errors) == {17} and isinstance(result.errors[17], InvalidRequest)
    assert result.errors[17].details["field"] == "prompt" and not result.interrupted
    for i, item in enumerate(result):
        if i == 17:
            assert item.text == "" and result.texts[i] is None
            continue
        expected = solo(messages=prompts[i], max_tokens=6) if i == 30 else solo(prompt=prompts[i], max_tokens=6)
        assert item.text == expected and item.stop_reason in ("length", "eos")
        assert item.stats["total_tokens"] >= 1 and item.stats["tokens_per_second"] > 0


def test_generate_batch_fills_the_workers_batches(server, worker):
    from rbee_jupyter.kernel.batch import batch_concurrency
    from rbee_jupyter.kernel.client import Client

    with Client(server.url, token=server.token) as client:
        assert batch_concurrency(client._worker_details(worker), worker) == BATCH


def test_rbee_batch_in_a_real_kernel_writes_the_answers_back(server, worker, solo, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("RBEE_SERVER_URL", server.url)
    monkeypatch.setenv("RBEE_TOKEN", server.token)
    for name in ("JPY_PARENT_PID", "RBEE_SERVER_PID", "RBEE_SERVER_SOCK", "RBEE_SSL_VERIFY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RBEE_PROGRESS", "text")
    questions = PROMPTS[:5]
    data = f"pd.Series({questions!r}, index=list('abcde'), name='q')"  # pandas: the test extra has it
    cells = ["%load_ext rbee_jupyter.kernel.magics",
             f"import pandas as pd\nquestions = {data}",
             f"%rbee batch questions --out answers --model {worker} --max-tokens 6 --temperature 0",
             "print(type(answers).__name__, list(answers.index) if hasattr(answers, 'index') and "
             "not isinstance(answers, list) else None)\nfor a in list(answers): print(repr(a))"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    shown = [o for o in nb.cells[2].outputs if o["output_type"] in ("display_data", "execute_result")]
    assert re.fullmatch(rf"✔ generated {worker} — 5/5 items · [0-9.]+ tok/s", shown[0]["data"]["text/plain"])
    assert shown[-1]["data"]["text/plain"] == "<BatchResult 5 items, 5 ok, 0 failed>"
    printed = "".join(o["text"] for o in nb.cells[3].outputs if o["output_type"] == "stream").splitlines()
    assert printed[0] == "Series ['a', 'b', 'c', 'd', 'e']"  # a Series in, a Series with its index out
    assert printed[1:] == [repr(solo(prompt=q, max_tokens=6)) for q in questions]


def test_an_interrupt_cancels_what_is_not_done_and_keeps_what_is(server, worker, solo):
    from rbee_jupyter.errors import Cancelled
    from rbee_jupyter.kernel.batch import run_batch
    from rbee_jupyter.kernel.client import Client, Generation
    from rbee_jupyter.kernel.widgets import BatchView

    prompts = [f"{p} again" for p in PROMPTS]
    view = BatchView(worker, total=len(prompts), mode="terminal")
    armed = threading.Event()

    def on_sigint(signum, frame):  # only while the batch runs: never into pytest itself
        if armed.is_set():
            raise KeyboardInterrupt

    def interrupt():  # once the first wave is done and the second is under way
        until(lambda: view.done >= BATCH, "the first items to finish")
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, on_sigint)
    helper = threading.Thread(target=interrupt, daemon=True)
    with Client(server.url, token=server.token) as client:
        try:
            armed.set()
            helper.start()
            result = run_batch(lambda body: Generation(client, client._transport.infer(body)), prompts,
                               options={"worker_id": worker, "max_tokens": 24, "temperature": 0},
                               concurrency=BATCH, view=view)
        finally:
            armed.clear()
            signal.signal(signal.SIGINT, previous)
    helper.join(WAIT_S)
    assert result.interrupted and view.state == "cancelled"
    done = [item for item in result if item.ok]
    assert len(done) >= BATCH and len(done) < len(prompts)
    for item in done:
        assert item.text == solo(prompt=item.input, max_tokens=24)
    for item in result:
        assert item.ok or isinstance(item.error, Cancelled)
    info = until(lambda: (d := detail(server, worker))["state"] == "idle" and d, "the worker to stop")
    assert info["active_sequences"] == 0 and info["queue_length"] == 0


def test_n_3_returns_three_choices_from_one_request(server, worker, solo):
    client = openai.OpenAI(base_url=server.url + "rbee/openai/v1", api_key=server.token, max_retries=0)
    try:
        expected = solo(prompt=PROMPTS[0], max_tokens=8)
        r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, n=3)
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert [c.text for c in r.choices] == [expected] * 3  # greedy: three times the same answer
        one = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert r.usage.prompt_tokens == one.usage.prompt_tokens  # one prompt, counted once
        assert r.usage.completion_tokens == 3 * one.usage.completion_tokens
        messages = [{"role": "user", "content": "Hello there"}]
        stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0.9,
                                                seed=5, n=3, stream=True, stream_options={"include_usage": True})
        texts, finishes, usage = {}, {}, None
        for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
                finishes[choice.index] = choice.finish_reason or finishes.get(choice.index)
        assert sorted(texts) == [0, 1, 2] and all(finishes[i] in ("length", "stop") for i in range(3))
        for i in range(3):  # choice i is the request with seed 5 + i
            assert texts[i] == solo(messages=messages, max_tokens=8, temperature=0.9, seed=5 + i)
        assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    finally:
        client.close()
