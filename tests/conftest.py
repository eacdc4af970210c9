from collections.abc import Iterator
from pathlib import Path

import pytest

from rbee_jupyter.testing.pytest_plugin import TINY_REPO
from rbee_jupyter.testing.server import ServerProcess
from rbee_jupyter.core.procs import wait_exited
from rbee_jupyter.worker.process import child_worker_pids

pytest_plugins = ["pytest_jupyter.jupyter_server", "rbee_jupyter.testing.pytest_plugin"]


@pytest.fixture(scope="session")
def rbee_server(rbee_hub_session, tmp_path_factory):
    """A real `jupyter server` process with the extension, shared by the session's API tests."""
    folder = tmp_path_factory.mktemp("server")
    settings = {"cache_dir": str(folder / "cache"), "catalog_path": str(folder / "catalog.sqlite"),
                "hub_endpoint": rbee_hub_session.url, "sse_keepalive_s": 0.5, "queue_depth": 1,
                "max_batch_size": 1}  # one running, one waiting: the queue tests count on it (batching: test_batching)
    with ServerProcess(folder, rbee=settings, base_url="/user/alice/") as server:
        yield server


@pytest.fixture(scope="session")
def rbee_worker(rbee_server):
    """The id of a tiny Llama worker loaded on the CPU (downloaded first, in the same job)."""
    r = rbee_server.post("v1/workers", {"model_ref": f"hf:{TINY_REPO}", "device": "cpu"})
    assert r.status_code == 202, r.text
    events = rbee_server.events(r.json()["progress_url"])
    assert events[-1]["stage"] == "ready", events[-1]
    return r.json()["worker_id"]


@pytest.fixture
def openai_client(rbee_server):
    """The official openai SDK against the session server's OpenAI-compatible routes."""
    import openai

    client = openai.OpenAI(base_url=rbee_server.url + "rbee/openai/v1", api_key=rbee_server.token, max_retries=0)
    yield client
    client.close()


@pytest.fixture
def no_worker_left_behind() -> Iterator[None]:
    """After the test, no worker process of this one may be alive (pools are closed inside tests).

    Modules whose every test starts workers use it for all:
    ``pytestmark = pytest.mark.usefixtures("no_worker_left_behind")``.
    """
    yield
    wait_exited(child_worker_pids(), 120)  # a stopped worker exits at once; a busy machine may delay it
    assert child_worker_pids() == set()


@pytest.fixture(scope="module")
def reference(rbee_tiny_model: Path, request: pytest.FixtureRequest):
    """The module's ``PROMPT`` run in this process (loader + Generator, 12 greedy tokens): what a
    worker must send. Returns the ``(text, index)`` chunks and the stream's stats."""
    from transformers import AutoTokenizer

    from rbee_jupyter.engine.generate import GenerationRequest, Generator
    from rbee_jupyter.engine.loader import load_model

    gen = Generator(load_model(rbee_tiny_model), AutoTokenizer.from_pretrained(rbee_tiny_model))
    stream = gen.stream(GenerationRequest(prompt=request.module.PROMPT, max_tokens=12))
    return [(c.text, c.index) for c in stream], stream.stats
