"""Embeddings: a sentence-transformers model served by an embedding worker, through the openai SDK."""

import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

from rbee_jupyter.testing.pytest_plugin import EMBED_REPO, TINY_REPO
from rbee_jupyter.testing.server import ServerProcess
from rbee_jupyter.worker.protocol import TOKEN_DELAY_ENV

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world!", "Jupyter notebooks run Python code."]


@pytest.fixture(scope="module")
def embed_worker(rbee_server, rbee_embed_repo):
    """An embedding worker, picked from the model's files (no "kind" in the request)."""
    r = rbee_server.post("v1/workers", {"model_ref": f"hf:{rbee_embed_repo}", "device": "cpu"})
    assert r.status_code == 202, r.text
    events = rbee_server.events(r.json()["progress_url"])
    assert [e["stage"] for e in events if e.get("stage") != "downloading"][-2:] == ["loading_to_vram", "ready"]
    return r.json()["worker_id"]


@pytest.fixture
def client(openai_client, embed_worker):
    return openai_client


@pytest.fixture(scope="module")
def reference(rbee_tiny_embedder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(rbee_tiny_embedder), device="cpu")


def test_a_string_equals_in_process_encode(client, reference):
    r = client.embeddings.create(model=EMBED_REPO, input=TEXTS[0])
    expected = reference.encode([TEXTS[0]])
    assert r.object == "list" and r.model == EMBED_REPO and len(r.data) == 1
    assert r.data[0].index == 0 and r.data[0].object == "embedding"
    assert len(r.data[0].embedding) == reference.get_embedding_dimension() == 32
    np.testing.assert_allclose(np.array(r.data[0].embedding), expected[0], atol=1e-5, rtol=0)
    assert r.usage.prompt_tokens == len(reference.tokenizer(TEXTS[0])["input_ids"]) == r.usage.total_tokens


def test_a_list_keeps_order_and_equals_encode(client, reference):
    texts = TEXTS * 30  # 90 inputs: several batches inside the worker
    r = client.embeddings.create(model=EMBED_REPO, input=texts, encoding_format="float")
    assert [d.index for d in r.data] == list(range(len(texts)))
    np.testing.assert_allclose(np.array([d.embedding for d in r.data]), reference.encode(texts), atol=1e-5, rtol=0)


def test_base64_is_float32_little_endian(rbee_server, embed_worker, reference):
    # The SDK decodes base64 itself when it asked for floats; ask over raw HTTP to see the bytes.
    r = rbee_server.post("openai/v1/embeddings", {"model": EMBED_REPO, "input": TEXTS, "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    got = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]])
    np.testing.assert_allclose(got, reference.encode(TEXTS), atol=1e-5, rtol=0)


def test_dimensions_cut_and_renormalise(client, reference):
    r = client.embeddings.create(model=EMBED_REPO, input=TEXTS, dimensions=8)
    full = reference.encode(TEXTS)[:, :8]
    expected = full / np.linalg.norm(full, axis=1, keepdims=True)
    got = np.array([d.embedding for d in r.data])
    assert got.shape == (3, 8)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_workers_and_models_say_which_embed(rbee_server, rbee_worker, embed_worker):
    kinds = {w["id"]: w["kind"] for w in rbee_server.get("v1/workers").json()["workers"]}
    assert kinds[embed_worker] == "embedding" and kinds[rbee_worker] == "generate"
    models = {m["id"]: m["kind"] for m in rbee_server.get("openai/v1/models").json()["data"]}
    assert models[EMBED_REPO] == "embedding" and models[TINY_REPO] == "generate"


@pytest.mark.parametrize("body, param, code", [
    ({"input": ""}, "input", "invalid_request"),
    ({"input": []}, "input", "invalid_request"),
    ({"input": ["fine", "  "]}, "input", "invalid_request"),
    ({"input": [1, 2, 3]}, "input", "invalid_request"),
    ({"input": {"text": "x"}}, "input", "invalid_request"),
    ({"input": "word " * 200}, "input", "context_too_long"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_request"),
    ({"input": "x", "dimensions": 0}, "dimensions", "invalid_request"),
    ({"input": "x", "dimensions": 33}, "dimensions", "invalid_request"),
    ({"input": "x", "model": TINY_REPO}, "model", "invalid_request"),
])
def test_bad_inputs_get_400(rbee_server, embed_worker, rbee_worker, body, param, code):
    r = rbee_server.post("openai/v1/embeddings", {"model": EMBED_REPO, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == code and error["message"]


def test_a_generating_route_refuses_the_embedding_model(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=EMBED_REPO, messages=[{"role": "user", "content": "hi"}])
    assert "embedding" in info.value.response.json()["error"]["message"]


def test_load_kind_is_validated(rbee_server):
    r = rbee_server.post("v1/workers", {"model_ref": f"hf:{EMBED_REPO}", "kind": "rerank"})
    assert r.status_code == 400 and r.json()["error"]["details"]["field"] == "kind"


def test_notebook_client_embed(rbee_server, embed_worker, reference):
    from rbee_jupyter.kernel.client import Client

    with Client(rbee_server.url, token=rbee_server.token) as client:
        one = client.embed(TEXTS[1])  # the first ready embedding worker
        many = client.embed(TEXTS, model=client.worker(embed_worker))
        by_ref = client.embed(TEXTS, model=f"hf:{EMBED_REPO}", dimensions=4)
    assert one.shape == (32,) and many.shape == (3, 32) and by_ref.shape == (3, 4)
    np.testing.assert_allclose(one, reference.encode(TEXTS[1]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(many, reference.encode(TEXTS), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(by_ref, axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def slow_encode_server(rbee_hub_session, rbee_embed_repo, tmp_path_factory):
    """A server whose embedding worker pauses 2 s in each ``encode`` (the worker's test hook) and
    lets 16 requests wait: requests sent together are all queued while the first encode runs."""
    folder = tmp_path_factory.mktemp("slow-encode")
    settings = {"cache_dir": str(folder / "cache"), "catalog_path": str(folder / "catalog.sqlite"),
                "hub_endpoint": rbee_hub_session.url, "queue_depth": 16}
    with ServerProcess(folder, rbee=settings, env={TOKEN_DELAY_ENV: "2.0"}) as server:
        r = server.post("v1/workers", {"model_ref": f"hf:{rbee_embed_repo}", "device": "cpu"})
        assert r.status_code == 202, r.text
        assert server.events(r.json()["progress_url"])[-1]["stage"] == "ready"
        yield server, r.json()["worker_id"]


def test_concurrent_requests_share_encode_calls_and_each_gets_its_own_vectors(slow_encode_server, reference):
    server, worker = slow_encode_server
    sizes = [1, 5, 2, 7, 3, 6, 4, 4]  # 32 texts: the worker's batch_size
    inputs = [[f"{TEXTS[(i + k) % 3]} {'cell ' * k}" for k in range(n)] for i, n in enumerate(sizes)]
    before = server.get(f"v1/workers/{worker}").json()
    client = openai.OpenAI(base_url=server.url + "rbee/openai/v1", api_key=server.token, max_retries=0)
    # When
    with client, ThreadPoolExecutor(len(inputs)) as pool:
        answers = list(pool.map(lambda texts: client.embeddings.create(model=EMBED_REPO, input=texts), inputs))
    # Then
    for texts, answer in zip(inputs, answers):
        assert [d.index for d in answer.data] == list(range(len(texts)))
        np.testing.assert_allclose(np.array([d.embedding for d in answer.data]), reference.encode(texts),
                                   atol=1e-5, rtol=0)
    after = server.get(f"v1/workers/{worker}").json()
    assert after["embed_requests"] - before["embed_requests"] == 8
    assert after["encode_calls"] - before["encode_calls"] <= 2  # the first, then all that queued behind it
