"""A real external OpenAI-compatible engine (``transformers serve``) behind a real server process.

The engine serves the session's tiny Llama from its folder, offline, on loopback. Some
requests go through :class:`CountingProxy`, a TCP proxy in front of the engine that records
each connection's request head and when it closes: that is how the tests see, from the
engine's side, that the hive sent the key and that it closed an upstream request when its
client went away.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from rbee_jupyter.sse_client import SSEParser
from rbee_jupyter.testing.engine import TransformersServe
from rbee_jupyter.testing.server import ServerProcess, free_port

pytest.importorskip("fastapi", reason="transformers serve needs `pip install transformers[serving]`")
pytest.importorskip("uvicorn", reason="transformers serve needs `pip install transformers[serving]`")

KEY = "sk-rbee-test-SECRET-7f3a"
ADMIN_KEY = "sk-rbee-admin-SECRET-91c2"
PROMPT = "Once upon a time"
LONG = 1000  # tokens: tens of seconds on these machines, far longer than any test waits


# --- the engine ------------------------------------------------------------------------------

class Engine(TransformersServe):
    """The engine, plus its own (not proxied) answer to compare the hive's relay with."""

    def stream_text(self, path: str, body: dict[str, Any]) -> str:
        """The engine's own answer to a streamed request, not proxied: the reference text."""
        text = []
        with httpx.stream("POST", f"{self.url}/{path}", json={**body, "model": self.model, "stream": True},
                          timeout=60) as r:
            r.raise_for_status()
            parser = SSEParser()
            for line in r.iter_lines():
                message = parser.feed_line(line)
                if message is None or message.data is None or message.done:
                    continue
                for choice in message.json().get("choices") or []:
                    text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
        return "".join(text)


class CountingProxy:
    """A TCP proxy that records, per connection, the bytes the hive sent and when it closed."""

    class Connection:
        def __init__(self) -> None:
            self.head = b""
            self.closed = threading.Event()

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections: list[CountingProxy.Connection] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            conn = CountingProxy.Connection()
            with self._lock:
                self.connections.append(conn)
            threading.Thread(target=self._pump, args=(client, upstream, conn, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, conn, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, conn: Connection, from_hive: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_hive:
                    conn.head += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            conn.closed.set()
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def carrying(self, request_line: bytes, since: dict[int, int] | None = None) -> list[Connection]:
        """Connections that sent ``request_line`` (after the ``mark()`` ``since``: connections are reused)."""
        since = since or {}
        with self._lock:
            return [c for c in self.connections if request_line in c.head[since.get(id(c), 0):]]

    def mark(self) -> dict[int, int]:
        with self._lock:
            return {id(c): len(c.head) for c in self.connections}

    def close(self) -> None:
        self.server.close()


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(rbee_tiny_model, tmp_path_factory):
    e = Engine(rbee_tiny_model, tmp_path_factory.mktemp("engine") / "engine.log").start()
    yield e
    e.stop()


@pytest.fixture(scope="module")
def proxy(engine):
    p = CountingProxy(engine.port)
    yield p
    p.close()


@pytest.fixture(scope="module")
def server(engine, proxy, tmp_path_factory):
    """A real server with one engine configured by the administrator (through the proxy, key from env)."""
    folder = tmp_path_factory.mktemp("server")
    admin = {"name": "tiny-admin", "url": f"http://127.0.0.1:{proxy.port}/v1", "model": engine.model,
             "api_key_env": "RBEE_TEST_ENGINE_KEY"}
    settings = {"cache_dir": str(folder / "cache"), "catalog_path": str(folder / "catalog.sqlite"),
                "sse_keepalive_s": 0.5, "engine_health_interval_s": 0.5, "engines": [admin]}
    with ServerProcess(folder, rbee=settings, base_url="/user/alice/", env={"RBEE_TEST_ENGINE_KEY": ADMIN_KEY}) as s:
        yield s


@pytest.fixture(scope="module")
def admin_worker(server):
    """The administrator's engine, once its registration at start has ended ``ready``."""
    [worker] = [w for w in server.get("v1/workers").json()["workers"] if w.get("name") == "tiny-admin"]
    events = server.events(f"v1/loading/progress?id={worker['id']}")
    assert events[-1] == {"stage": "ready", "worker_id": worker["id"], "memory_mb": {}}, events
    return worker["id"]


@pytest.fixture(scope="module")
def worker(server, engine):
    """An engine registered over HTTP, directly (not proxied), with a key."""
    r = server.post("v1/workers", {"backend": "openai", "url": engine.url, "model": engine.model, "api_key": KEY})
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "loading" and r.json()["model_ref"] == f"openai:{engine.model}@127.0.0.1:{engine.port}"
    events = server.events(r.json()["progress_url"])
    assert events == [{"stage": "ready", "worker_id": r.json()["worker_id"], "memory_mb": {}}]
    return r.json()["worker_id"]


def frames(server: ServerProcess, method: str, path: str, body: Any = None, *, stop_after_tokens: int | None = None,
           timeout: float = 60, on_frame: Callable[[httpx.Response, list[Any]], None] | None = None,
           ) -> tuple[httpx.Response, list[Any]]:
    """The frames of an SSE answer (``(id, data)``, comments left out); stops early after N tokens if asked.

    ``on_frame(response, frames so far)`` runs after each frame: what a test does mid-stream.
    """
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    with server.client.stream(method, path, json=body, timeout=timeout) as r:
        if not r.headers.get("content-type", "").startswith("text/event-stream"):
            r.read()
            return r, out
        parser = SSEParser()
        for line in r.iter_lines():
            assert time.monotonic() < deadline, f"stream still open after {timeout} s"
            message = parser.feed_line(line)
            if message is None or message.data is None:
                continue
            out.append((message.id, message.data if message.done else message.json()))
            if on_frame is not None:
                on_frame(r, out)
            tokens = [d for _, d in out if isinstance(d, dict) and d.get("type") == "token"]
            if stop_after_tokens is not None and len(tokens) >= stop_after_tokens:
                break
    return r, out


# --- registration --------------------------------------------------------------------------------

BASE = {"backend": "openai", "url": "http://127.0.0.1:9/v1", "model": "m"}


@pytest.mark.parametrize("body, field", [
    ({**BASE, "backend": "vllm"}, "backend"),
    ({**BASE, "url": "ftp://127.0.0.1/v1"}, "url"),
    ({**BASE, "url": "127.0.0.1:8000/v1"}, "url"),
    ({k: v for k, v in BASE.items() if k != "url"}, "url"),
    ({**BASE, "url": f"http://user:{KEY}@127.0.0.1:9/v1"}, "url"),
    ({**BASE, "url": f"http://127.0.0.1:9/v1?key={KEY}"}, "url"),
    ({**BASE, "model": ""}, "model"),
    ({**BASE, "model": 3}, "model"),
    ({**BASE, "api_key": 5}, "api_key"),
    ({**BASE, "apikey": KEY}, "apikey"),
])
def test_bad_registrations_are_refused_before_anything_starts(server, body, field):
    before = [w["id"] for w in server.get("v1/workers").json()["workers"]]
    r = server.post("v1/workers", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "INVALID_REQUEST" and error["details"]["field"] == field
    assert KEY not in r.text
    if field == "backend":
        assert error["details"]["accepted"] == ["local", "openai"] and "local, openai" in error["message"]
    assert [w["id"] for w in server.get("v1/workers").json()["workers"]] == before


def test_unreachable_url_fails_the_worker_with_a_clear_error(server):
    url = f"http://127.0.0.1:{free_port()}/v1"
    r = server.post("v1/workers", {"backend": "openai", "url": url, "model": "m", "api_key": KEY})
    assert r.status_code == 202
    worker_id = r.json()["worker_id"]
    # Then: the load stream ends with the error, the worker stays listed as failed, saying why
    [error] = server.events(r.json()["progress_url"])
    assert error["stage"] == "error" and error["code"] == "ENGINE_UNREACHABLE"
    assert f"The engine at {url} does not answer" in error["message"] and "ends in /v1" in error["message"]
    info = server.get(f"v1/workers/{worker_id}").json()
    assert info["state"] == "failed" and info["exit_reason"].startswith("ENGINE_UNREACHABLE: The engine at")
    assert info["reachable"] is False
    r = server.post("v1/inference", {"worker_id": worker_id, "prompt": PROMPT})
    assert r.status_code == 409 and "ENGINE_UNREACHABLE" in r.json()["error"]["message"]
    # When: unloaded, it is forgotten
    assert server.delete(f"v1/workers/{worker_id}").status_code == 204
    assert worker_id not in [w["id"] for w in server.get("v1/workers").json()["workers"]]


def test_a_model_the_engine_does_not_serve_is_named_with_what_it_serves(server, engine):
    r = server.post("v1/workers", {"backend": "openai", "url": engine.url, "model": "no-such-model"})
    [error] = server.events(r.json()["progress_url"])
    assert error["code"] == "MODEL_NOT_FOUND"
    assert error["message"] == (f"The engine at {engine.url} does not serve 'no-such-model'; it serves: "
                                f"{engine.model}. Register it with one of these names.")
    assert server.delete(f"v1/workers/{r.json()['worker_id']}").status_code == 204


def test_registered_engines_are_listed_everywhere_without_their_key(server, engine, proxy, worker, admin_worker):
    workers = {w["id"]: w for w in server.get("v1/workers").json()["workers"]}
    mine, admin = workers[worker], workers[admin_worker]
    assert mine["backend"] == "openai" and mine["url"] == engine.url and mine["model"] == engine.model
    assert mine["state"] == "idle" and mine["model_ref"] == f"openai:{engine.model}@127.0.0.1:{engine.port}"
    assert admin["name"] == "tiny-admin" and admin["url"] == f"http://127.0.0.1:{proxy.port}/v1"
    detail = server.get(f"v1/workers/{worker}").json()
    assert detail["reachable"] is True and detail["latency_ms"] >= 0
    models = server.get("openai/v1/models").json()
    assert {"tiny-admin", engine.model} <= {m["id"] for m in models["data"]}
    # The engine did get the administrator's key (read from the server's environment)...
    probes = proxy.carrying(b"GET /v1/models")
    assert probes and all(f"Bearer {ADMIN_KEY}".encode() in c.head for c in probes)
    # ...and no route, stream or log line gives a key back
    texts = [server.get("v1/workers").text, json.dumps(detail), server.get(f"v1/workers/{admin_worker}").text,
             server.get("openai/v1/models").text, json.dumps(server.events(f"v1/loading/progress?id={worker}")),
             _feed_snapshot(server), server.log()]
    for text in texts:
        assert KEY not in text and ADMIN_KEY not in text


def _feed_snapshot(server: ServerProcess) -> str:
    with server.client.stream("GET", "v1/events", timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                return line
    raise AssertionError("the feed sent no snapshot")


# --- inference ----------------------------------------------------------------------------------

def test_inference_relays_the_engine_stream_with_our_framing(server, engine, worker):
    expected = engine.stream_text("completions", {"prompt": PROMPT, "max_tokens": 12, "temperature": 0})
    r, got = frames(server, "POST", "v1/inference", {"worker_id": worker, "prompt": PROMPT, "max_tokens": 12,
                                                      "temperature": 0})
    assert r.status_code == 200 and r.headers["X-Request-Id"]
    ids, data = [i for i, _ in got[:-1]], [d for _, d in got]
    assert ids == list(range(1, len(got))) and data[-1] == "[DONE]"
    started, *tokens, end = data[:-1]
    assert started["type"] == "started" and started["job_id"] == r.headers["X-Request-Id"]
    assert [t["type"] for t in tokens] == ["token"] * len(tokens) and [t["i"] for t in tokens] == list(range(len(tokens)))
    assert "".join(t["t"] for t in tokens) == expected
    assert end["type"] == "end" and end["total_tokens"] == 12 and end["stop_reason"] == "length"
    assert end["prompt_tokens"] == 4 and end["job_id"] == started["job_id"]
    assert server.get(f"v1/workers/{worker}").json()["state"] == "idle"


def test_chat_and_model_ref_routing(server, engine, worker, admin_worker):
    messages = [{"role": "user", "content": "Hello there"}]
    expected = engine.stream_text("chat/completions", {"messages": messages, "max_tokens": 8, "temperature": 0})
    model_ref = server.get(f"v1/workers/{worker}").json()["model_ref"]
    _, got = frames(server, "POST", "v1/inference", {"model_ref": model_ref, "messages": messages, "max_tokens": 8,
                                                      "temperature": 0})
    assert "".join(d["t"] for _, d in got if isinstance(d, dict) and d["type"] == "token") == expected
    assert got[-2][1]["type"] == "end" and got[-1][1] == "[DONE]"
    _, got = frames(server, "POST", "v1/inference", {"model_ref": "tiny-admin", "messages": messages, "max_tokens": 8,
                                                      "temperature": 0})  # an engine's name works as a model_ref
    assert "".join(d["t"] for _, d in got if isinstance(d, dict) and d["type"] == "token") == expected


def test_what_the_engine_refuses_comes_back_as_our_error(server, worker):
    # transformers serve refuses fields that are not OpenAI's (top_k): a 400 naming them, before any stream
    r = server.post("v1/inference", {"worker_id": worker, "prompt": PROMPT, "max_tokens": 4, "top_k": 5})
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_REQUEST"
    assert r.json()["error"]["message"].startswith("The request was refused: the engine at ")
    assert "top_k" in r.json()["error"]["message"] and r.json()["error"]["details"]["engine_status"] == 422
    assert server.get(f"v1/workers/{worker}").json()["state"] == "idle"


def test_openai_routes_with_the_official_client(server, engine, admin_worker):
    client = openai.OpenAI(base_url=server.url + "rbee/openai/v1", api_key=server.token, max_retries=0)
    prompt = {"prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = {"messages": messages, "max_tokens": 8, "temperature": 0}
    text, chat_text = engine.stream_text("completions", prompt), engine.stream_text("chat/completions", chat)

    r = client.completions.create(model="tiny-admin", **prompt)
    assert r.choices[0].text == text and r.usage.completion_tokens == 10 and r.choices[0].finish_reason == "length"
    stream = client.completions.create(model="tiny-admin", stream=True, **prompt)
    assert "".join(c.choices[0].text for c in stream if c.choices) == text
    r = client.chat.completions.create(model="tiny-admin", **chat)
    assert r.choices[0].message.content == chat_text and r.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model=engine.model, stream=True,
                                                 stream_options={"include_usage": True}, **chat))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat_text
    assert chunks[-1].usage.completion_tokens == 8
    client.close()
    # The raw stream ends with our [DONE]
    with server.client.stream("POST", "openai/v1/completions", json={"model": "tiny-admin", "stream": True,
                                                                     **prompt}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[-2][5:])["choices"][0]["finish_reason"] == "length"


def test_magics_use_the_engine(server, engine, worker, capsys):
    from IPython.core.interactiveshell import InteractiveShell

    from rbee_jupyter.kernel.client import set_default_client

    expected = engine.stream_text("completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    shell = InteractiveShell.instance()
    try:
        shell.run_line_magic("load_ext", "rbee_jupyter.kernel.magics")
        shell.run_line_magic("rbee", f"connect {server.url} --token {server.token}")
        ps = shell.run_line_magic("rbee", "ps")
        assert worker in [w["id"] for w in ps] and f"openai:{engine.model}@127.0.0.1:{engine.port}" in repr(ps)
        result = shell.run_cell(f"%%rbee generate --model {worker} --max-tokens 6 --temperature 0\n{PROMPT}")
        assert result.error_in_exec is None and result.result.text == expected
    finally:
        set_default_client(None)
        InteractiveShell.clear_instance()


# --- cancellation ----------------------------------------------------------------------------------

def test_client_disconnect_closes_the_upstream_request(server, proxy, admin_worker):
    mark = proxy.mark()
    r, got = frames(server, "POST", "v1/inference", {"worker_id": admin_worker, "prompt": PROMPT, "max_tokens": LONG,
                                                      "temperature": 0}, stop_after_tokens=3)
    assert [d["type"] for _, d in got] == ["started", "token", "token", "token"]
    # When: the client went away (the stream above is closed). Then: the hive closes its engine request
    [upstream] = proxy.carrying(b"POST /v1/completions", since=mark)
    assert b'"max_tokens":1000' in upstream.head[mark.get(id(upstream), 0):].replace(b" ", b"")
    assert upstream.closed.wait(60), "the upstream request is still open"


def test_delete_cancels_and_closes_the_upstream_request(server, proxy, admin_worker):
    mark = proxy.mark()
    body = {"worker_id": admin_worker, "prompt": PROMPT, "max_tokens": LONG, "temperature": 0}

    def cancel_at_first_token(r: httpx.Response, got: list[Any]) -> None:
        if len(got) == 2:  # started and a first token: cancel it from elsewhere
            assert server.delete(f"v1/inference/{r.headers['X-Request-Id']}").status_code == 204
    _, got = frames(server, "POST", "v1/inference", body, on_frame=cancel_at_first_token)
    data = [d for _, d in got]
    assert data[-1] == "[DONE]" and data[-2]["type"] == "error" and data[-2]["code"] == "CANCELLED"
    [upstream] = proxy.carrying(b"POST /v1/completions", since=mark)
    assert upstream.closed.wait(60), "the upstream request is still open"


# --- an engine that dies ---------------------------------------------------------------------------

def test_engine_killed_fails_the_worker_and_its_stream_and_comes_back(server, rbee_tiny_model, tmp_path):
    engine = Engine(rbee_tiny_model, tmp_path / "engine.log").start()
    try:
        r = server.post("v1/workers", {"backend": "openai", "url": engine.url, "model": engine.model,
                                       "name": "doomed"})
        worker_id = r.json()["worker_id"]
        assert server.events(r.json()["progress_url"])[-1]["stage"] == "ready"
        body = {"worker_id": worker_id, "prompt": PROMPT, "max_tokens": LONG, "temperature": 0}

        def kill_at_second_token(_r: httpx.Response, got: list[Any]) -> None:
            if len(got) == 3:
                engine.kill()  # When: the engine dies mid-stream
        _, got = frames(server, "POST", "v1/inference", body, on_frame=kill_at_second_token)
        data = [d for _, d in got]
        # Then: the stream ends with a clear error and [DONE]; the worker is failed, saying why
        assert data[-1] == "[DONE]" and data[-2]["type"] == "error", data[-3:]
        assert data[-2]["code"] == "ENGINE_UNREACHABLE" and engine.url in data[-2]["message"]
        assert data[-2]["message"].startswith("The engine stopped answering during the generation")
        info = server.get(f"v1/workers/{worker_id}").json()
        assert info["state"] == "failed" and info["exit_reason"].startswith("ENGINE_UNREACHABLE")
        # A new request gets a clear error, on both APIs
        r = server.post("v1/inference", body)
        assert r.status_code == 409 and f"Worker {worker_id} is failed (ENGINE_UNREACHABLE: The engine at " \
            f"{engine.url} does not answer" in r.json()["error"]["message"]
        r = server.post("openai/v1/completions", {"model": "doomed", "prompt": PROMPT})
        assert r.status_code == 409 and r.json()["error"]["message"].startswith(
            f"The model 'doomed' (worker {worker_id}) is failed (ENGINE_UNREACHABLE")
        # When: the engine is back on its port, the health check makes the worker idle again
        with server.client.stream("GET", "v1/events", timeout=60) as feed:
            engine.start()
            deadline = time.monotonic() + 60
            for line in feed.iter_lines():  # keep-alives every 0.5 s: the deadline is checked often
                assert time.monotonic() < deadline, "the worker did not come back within 60 s of the engine"
                if line.startswith("data:") and worker_id in line:
                    event = json.loads(line[5:])
                    if event.get("topic") == "worker" and event["action"] == "ready":
                        break
        assert server.get(f"v1/workers/{worker_id}").json()["state"] == "idle"
        _, got = frames(server, "POST", "v1/inference", {**body, "max_tokens": 4})
        assert got[-2][1]["type"] == "end" and got[-1][1] == "[DONE]"
        assert server.delete(f"v1/workers/{worker_id}").status_code == 204
    finally:
        engine.stop()


# --- configuration -----------------------------------------------------------------------------------

async def test_an_engine_that_stops_sending_mid_stream_ends_it_with_inference_stalled(engine):
    """SIGSTOP the engine mid-generation: the relay's stall watchdog ends the stream with
    INFERENCE_STALLED after ``inference_stall_s``, then the engine goes on serving."""
    import asyncio

    from rbee_jupyter.pools.engines import EngineSpec, OpenAIEnginePool
    from rbee_jupyter.events import ErrorEvent
    from rbee_jupyter.core.jobs import Job, JobRegistry, JobState
    from rbee_jupyter.protocol import GenerationRequest

    # a limit a busy machine's healthy engine never reaches between two chunks (nor its register check,
    # whose read timeout it also is), and that a frozen one does
    pool, jobs = OpenAIEnginePool(timeout_s=30.0, health_interval_s=None, inference_stall_s=5.0), JobRegistry()
    try:
        load = Job("load")
        info = await pool.start(EngineSpec.from_json({"backend": "openai", "url": engine.url, "model": engine.model}),
                                load)
        assert await load.wait(60) is JobState.COMPLETE, load.last.data
        body = GenerationRequest(prompt=PROMPT, max_tokens=LONG, temperature=0)
        job = jobs.start(jobs.create("inference", error_style="type"), lambda j: pool.generate(info.id, body, j))

        async def first_token() -> None:
            async for record in job.subscribe(last_event_id=0):
                if record.event.to_dict().get("type") == "token":
                    return
        await asyncio.wait_for(first_token(), 60)
        engine.proc.send_signal(signal.SIGSTOP)  # When: the engine freezes mid-stream
        try:
            started = time.monotonic()
            await job.wait(60)  # ends after inference_stall_s (5 s); the bound is for a busy machine
            stalled_after = time.monotonic() - started
        finally:
            engine.proc.send_signal(signal.SIGCONT)
        event = job.last.event
        assert isinstance(event, ErrorEvent) and event.code == "INFERENCE_STALLED", job.last.data
        assert stalled_after >= 4.9, stalled_after  # not before the limit
        body = GenerationRequest(prompt=PROMPT, max_tokens=4, temperature=0)
        again = jobs.start(jobs.create("inference", error_style="type"), lambda j: pool.generate(info.id, body, j))
        assert await again.wait(60) is JobState.COMPLETE, again.last.data  # the engine serves on
    finally:
        await jobs.shutdown()
        await pool.close()


def test_configured_engines_are_checked_when_the_config_is_read(monkeypatch):
    from traitlets import TraitError
    from traitlets.config import Config

    from rbee_jupyter.server.app import RbeeApp, _engine_body

    config = Config()
    config.RbeeApp.engines = [{"url": "http://gpu:8000/v1", "model": ""}]
    with pytest.raises(TraitError, match=r"c\.RbeeApp\.engines: model must be the model's name on the engine"):
        RbeeApp(config=config)
    entry = {"name": "big", "url": "http://gpu:8000/v1", "model": "m", "api_key_env": "RBEE_TEST_KEY"}
    monkeypatch.setenv("RBEE_TEST_KEY", KEY)
    assert RbeeApp(engines=[entry]).engines == [entry]
    assert _engine_body(entry) == {"backend": "openai", "name": "big", "url": "http://gpu:8000/v1", "model": "m",
                                   "api_key": KEY}
