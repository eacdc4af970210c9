"""The Python client against a real Jupyter server (HTTP + SSE) and in embedded mode.

Slow transfers come from the local hub's ``chunk_delay_s``, so running states are seen
for real; every wait is bounded by a stream that ends or an explicit timeout.
"""

from __future__ import annotations

import itertools

import pytest

from rbee_jupyter.kernel.client import Client, Download, Generation, Worker, error_from_json
from rbee_jupyter.errors import (Cancelled, DeviceNotAvailable, InvalidModelRef, JobNotFound, ModelNotFound,
                                 ModelNotLoaded, RbeeError, WorkerBusy, WorkerNotFound)
from rbee_jupyter.kernel.inkernel import load_model
from rbee_jupyter.testing.pytest_plugin import TINY_REPO
from rbee_jupyter.kernel.widgets import DownloadView, follow

TINY = f"hf:{TINY_REPO}"
_names = itertools.count()


@pytest.fixture(scope="module")
def client(rbee_server):
    with Client(rbee_server.url, token=rbee_server.token) as client:
        yield client


@pytest.fixture
def new_repo(rbee_hub, rbee_tiny_model):
    """A fresh repo on the hub (never downloaded before), as a ref."""
    def make() -> str:
        repo = f"rbee-test/client-{next(_names)}"
        rbee_hub.add_repo(repo, rbee_tiny_model)
        return f"hf:{repo}"
    return make


def first_bytes(events):
    """Read events until bytes are flowing; returns that event."""
    for event in events:
        if event.get("stage") == "downloading" and event["bytes_downloaded"] > 0:
            return event
    raise AssertionError("the download ended before any bytes arrived")


def test_catalog_devices_and_workers(client, rbee_server):
    assert (client.mode, client.discovered_by, client.url) == ("server", "explicit", rbee_server.url)
    assert repr(client) == f"<rbee Client server: {rbee_server.url} (found: explicit)>"
    cpu = client.devices()[0]
    assert cpu["name"] == "cpu" and cpu["total_bytes"] >= cpu["free_bytes"] > 0
    assert isinstance(client.models(), list) and isinstance(client.workers(), list)


def test_download_runs_then_completes(client, rbee_hub, new_repo):
    ref = new_repo()
    rbee_hub.faults.chunk_delay_s = 0.3
    download = client.download(ref)
    assert isinstance(download, Download) and download.model_ref == ref
    events = download.events()
    first_bytes(events)
    assert download.state == "running"  # asked from the server, on a second connection
    assert client.download(ref).id == download.id  # joining the running download
    rbee_hub.faults.chunk_delay_s = 0
    *_, last = events
    assert last["stage"] == "complete" and download.state == "complete"
    assert download.wait(timeout=60) == last and download.local_path == last["local_path"]
    assert ref in [m["ref"] for m in client.models()]


def test_cancel_a_download(client, rbee_hub, new_repo):
    ref = new_repo()
    rbee_hub.faults.chunk_delay_s = 0.5
    download = client.download(ref)
    events = download.events()
    first_bytes(events)
    assert client.cancel(download.id) == "download"
    *_, last = events
    assert last["stage"] == "error" and last["code"] == "CANCELLED"
    assert download.state == "cancelled"
    with pytest.raises(Cancelled):
        download.wait(timeout=60)
    download.cancel()  # idempotent
    assert ref not in [m["ref"] for m in client.models()]


def test_http_errors_come_back_as_their_classes(client):
    with pytest.raises(InvalidModelRef) as exc:
        client.download("hf:../../x")
    assert exc.value.status == 400 and "Accepted forms" in exc.value.message
    with pytest.raises(ModelNotFound):
        client.download("hf:rbee-test/no-such-repo").wait(timeout=60)
    with pytest.raises(WorkerNotFound):
        client.worker("w-nope")
    with pytest.raises(ModelNotLoaded):
        client.generate("hi", model="hf:rbee-test/never-loaded")
    with pytest.raises(JobNotFound):
        client.cancel("nope")


def test_error_mapping_by_code_then_status():
    assert type(error_from_json({"error": {"code": "MODEL_NOT_FOUND", "message": "m"}}, 404)) is ModelNotFound
    assert type(error_from_json({"stage": "error", "code": "CANCELLED", "message": "m"})) is Cancelled
    busy = error_from_json({"error": {"code": "SOMETHING_NEW", "message": "later"}}, 503)
    assert isinstance(busy, WorkerBusy) and busy.code == "SOMETHING_NEW"
    other = error_from_json({"error": {"code": "ODD", "message": "m"}}, 502)
    assert type(other) is RbeeError and (other.code, other.status) == ("ODD", 502)


def test_generate_and_chat_stream_text(client, rbee_worker):
    gen = client.generate("Once upon a time", model=rbee_worker, max_tokens=8, temperature=0)
    assert isinstance(gen, Generation) and gen.id
    pieces = list(gen)
    assert pieces and "".join(pieces) == gen.text == str(gen)
    assert gen.state == "complete" and gen.end["total_tokens"] <= 8 and gen.end["stop_reason"] in ("length", "eos")
    again = client.generate("Once upon a time", model=TINY, max_tokens=8, temperature=0)
    assert again.text == gen.text  # greedy, on any worker of the ref
    reply = client.worker(rbee_worker).chat("Hello!", max_tokens=4)
    assert reply.wait().state == "complete" and reply.end["total_tokens"] <= 4


def test_cancel_a_generation(client, rbee_worker):
    gen = client.generate("Tell me everything", model=rbee_worker, max_tokens=240, temperature=0)
    events = gen.events()
    assert next(events)["type"] == "started"
    gen.cancel()
    rest = list(events)
    assert gen.state == "cancelled", gen.end  # 240 tokens take far longer than a DELETE
    assert not rest or rest[-1]["type"] in ("error", "end")
    assert client.generate("ok", model=rbee_worker, max_tokens=2).wait().state == "complete"  # slot freed


def test_load_generate_unload(client):
    worker = client.load(TINY, device="cpu", quantization="nf4")
    assert isinstance(worker, Worker) and worker.model_ref == TINY
    events = list(worker.events())
    assert events[-1]["stage"] == "ready", events[-1]
    blocks = [e for e in events if e["stage"] == "loading_to_vram"]
    assert blocks and blocks[-1]["layers_loaded"] == blocks[-1]["layers_total"]
    assert worker.state == "idle" and worker.info()["quantization"] == "nf4"
    assert worker.generate("Hi", max_tokens=3).wait().state == "complete"
    assert client.unload(worker.id) == [worker.id]
    assert worker.id not in [w["id"] for w in client.workers() if w["state"] in ("idle", "busy")]


def test_load_model_in_this_process(client, rbee_worker, capsys):
    """The model object itself, loaded block by block here; the ref resolved through the server."""
    import torch

    model, tokenizer = load_model(TINY, client=client, quantization="nf4")
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.rstrip().split("\r")[-1].startswith(f"✔ loaded {TINY} — ")
    with pytest.raises(DeviceNotAvailable):
        load_model(TINY, client=client, device="cuda:7", progress=False)


def test_embedded_client_has_the_same_api(rbee_hub, new_repo, tmp_path):
    ref = new_repo()
    client = Client.embedded(cache_dir=tmp_path / "cache", catalog_path=tmp_path / "catalog.sqlite",
                             hub_endpoint=rbee_hub.url)
    try:
        assert (client.mode, client.url) == ("embedded", None)
        assert client.devices()[0]["name"] == "cpu"
        done = client.download(ref).wait(timeout=60)
        assert done["stage"] == "complete" and client.models()[0]["ref"] == ref
        with pytest.raises(InvalidModelRef):
            client.download("hf:bad ref")
        with pytest.raises(ModelNotLoaded):
            client.generate("hi", model=ref)

        class Interrupted(DownloadView):  # Ctrl-C while the first bytes are shown
            def update(self, event):
                super().update(event)
                if event.get("bytes_downloaded"):
                    raise KeyboardInterrupt

        rbee_hub.faults.chunk_delay_s = 0.5
        download = client.download(new_repo())
        with pytest.raises(KeyboardInterrupt):
            follow(download, Interrupted(download.model_ref, mode="terminal"))
        with pytest.raises(Cancelled):
            download.wait(timeout=60)
        assert download.state == "cancelled"
    finally:
        client.close()
