"""Each worker's load where users look: ``GET v1/workers``, the feed (``v1/events``), the client, the OpenAI models.

One ``jupyter server`` process with a tiny Llama worker (``max_batch_size`` 8, 100 ms per decode
step, so that four streams of 48 tokens last five seconds or more: several of the hive's
once-a-second readings fall inside them) serves the module. The counters come from the hive's
last-known copy (core/live.py), read from the worker once a second while it works.
"""

from __future__ import annotations

import itertools
import threading

import openai
import pytest

from rbee_jupyter.kernel.client import Client
from rbee_jupyter.protocol import WorkerView
from rbee_jupyter.testing.feed import FeedReader, stats_of, until
from rbee_jupyter.testing.pytest_plugin import TINY_REPO
from rbee_jupyter.testing.server import ServerProcess
from rbee_jupyter.testing.sse import parse_frames
from rbee_jupyter.worker.protocol import TOKEN_DELAY_ENV

BATCH = 8
WAIT_S = 60.0  # generous bound for anything on a busy 2-core machine
PROMPTS = ["Once upon a time", "The quick brown fox", "Hello world", "Jupyter notebooks run"]
ZERO = {"active_sequences": 0, "queue_length": 0, "batch_size": 0, "tokens_per_second": 0.0}


@pytest.fixture(scope="module")
def server(rbee_hub_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("load")
    settings = {"cache_dir": str(folder / "cache"), "catalog_path": str(folder / "catalog.sqlite"),
                "hub_endpoint": rbee_hub_session.url, "sse_keepalive_s": 0.5, "max_batch_size": BATCH}
    with ServerProcess(folder, rbee=settings, env={TOKEN_DELAY_ENV: "0.1"}) as server:
        yield server


@pytest.fixture(scope="module")
def worker(server) -> str:
    r = server.post("v1/workers", {"model_ref": f"hf:{TINY_REPO}", "device": "cpu"})
    assert r.status_code == 202, r.text
    assert server.events(r.json()["progress_url"], timeout=WAIT_S)[-1]["stage"] == "ready"
    return r.json()["worker_id"]


class Stream:
    """A ``v1/inference`` stream read to its end in a thread."""

    def __init__(self, server, body: dict) -> None:
        self.text = ""
        self.thread = threading.Thread(target=self._read, args=(server, body), daemon=True)
        self.thread.start()

    def _read(self, server, body: dict) -> None:
        with server.client.stream("POST", "v1/inference", json=body, timeout=WAIT_S) as r:
            for chunk in r.iter_text():
                self.text += chunk

    def answer(self) -> str:
        self.thread.join(5 * WAIT_S)
        assert not self.thread.is_alive(), "the stream did not end"
        events = [f.data for f in parse_frames(self.text) if f.comment is None]
        assert events[-1] == "[DONE]" and events[-2]["type"] == "end", events[-2:]
        return "".join(e["t"] for e in events if isinstance(e, dict) and e.get("type") == "token")


def listed(server, worker_id: str) -> dict:
    (w,) = [w for w in server.get("v1/workers").json()["workers"] if w["id"] == worker_id]
    return w


def test_an_idle_worker_lists_zero_load_and_its_batch_size(server, worker):
    w = until(lambda: (w := listed(server, worker))["max_batch_size"] is not None and w, "the first reading")
    assert w["state"] == "idle" and w["kind"] == "generate" and w["shared"] is False and w["load"] == 0
    assert {k: w[k] for k in ZERO} == ZERO and w["max_batch_size"] == BATCH


def test_the_list_and_the_feed_show_four_streams_then_zero(server, worker):
    with FeedReader(server.client) as feed:
        feed.wait_for(lambda es: any(e["topic"] == "snapshot" for e in es), "the snapshot")
        # When: four streams run at once
        streams = [Stream(server, {"worker_id": worker, "prompt": p, "max_tokens": 48, "temperature": 0})
                   for p in PROMPTS]
        # Then: the list shows them batched, with a rate
        busy = until(lambda: (w := listed(server, worker))["active_sequences"] == 4 and w["batch_size"] == 4
                     and w["tokens_per_second"] and w, "four sequences in one batch in v1/workers")
        assert busy["state"] == "busy" and busy["batch_size"] == 4 and busy["queue_length"] == 0
        assert busy["max_batch_size"] == BATCH and busy["load"] == 4 and busy["tokens_per_second"] > 0
        # ... and so does the feed, as "stats" events of the worker
        feed.wait_for(lambda es: any(s["active_sequences"] == 4 for s in stats_of(es, worker)), "4 active on the feed")
        for s in streams:
            assert s.answer()
        # Then: both go back to zero once they are done
        idle = until(lambda: (w := listed(server, worker))["state"] == "idle" and w, "the worker to be idle")
        assert {k: idle[k] for k in ZERO} == ZERO and idle["load"] == 0
        feed.wait_for(lambda es: (s := stats_of(es, worker)) and {k: s[-1][k] for k in ZERO} == ZERO,
                      "zero load on the feed")
        # ... and while it is idle the feed says nothing more of its load (two device reports go by)
        seen = len(feed.events())
        feed.wait_for(lambda es: sum(e["topic"] == "devices" for e in es[seen:]) >= 2, "two device reports")
        assert stats_of(feed.events()[seen:], worker) == []
    stats = [(f.arrived, f.data["worker"]) for f in feed.frames
             if isinstance(f.data, dict) and f.data.get("action") == "stats" and f.data["worker"]["id"] == worker]
    assert all(b - a >= 0.9 for (a, _), (b, _) in itertools.pairwise(stats)), "at most one a second"
    assert all(set(ZERO) | {"max_batch_size", "shared", "load", "kind"} <= set(s) for _, s in stats)


def test_the_client_reads_the_load_and_shares(server, worker):
    client = Client(server.url, token=server.token)
    try:
        (w,) = [w for w in client.workers() if w.id == worker]
        assert isinstance(w, WorkerView)
        assert (w.active_sequences, w.queue_length, w.max_batch_size, w.kind) == (0, 0, BATCH, "generate")
        assert w.tokens_per_second == 0.0 and w.shared is False
        # a single user has no one to share with, but the flag is kept (and undone) all the same
        assert client.share(worker).shared is True
        assert [w.shared for w in client.workers() if w.id == worker] == [True]
        assert client.worker(worker).share(False).shared is False
    finally:
        client.close()


def test_openai_models_say_which_generate(server, worker):
    client = openai.OpenAI(base_url=server.url + "rbee/openai/v1", api_key=server.token, max_retries=0)
    try:
        (model,) = client.models.list().data
        assert model.id == TINY_REPO and model.object == "model" and model.owned_by == "rbee"
        assert model.model_extra["kind"] == "generate"  # an extra field the official client keeps
    finally:
        client.close()
