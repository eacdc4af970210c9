"""The official openai SDK against the OpenAI-compatible routes of a real server."""

import httpx
import openai
import pytest
import torch

from rbee_jupyter.testing.pytest_plugin import TINY_REPO

MODEL = TINY_REPO  # the model id clients use: the ref without "hf:"
PROMPT = "Once upon a time"


@pytest.fixture
def client(openai_client, rbee_worker):
    return openai_client


@pytest.fixture(scope="module")
def tiny(rbee_tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(rbee_tiny_model), AutoTokenizer.from_pretrained(rbee_tiny_model)


def greedy(tiny, ids: list[int], n: int) -> tuple[str, int]:
    model, tok = tiny
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    new = out[0, len(ids):].tolist()
    return tok.decode(new, skip_special_tokens=True), len(new)


def chat_ids(tiny, messages) -> list[int]:
    _, tok = tiny
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_models_lists_what_is_loaded(client):
    models = client.models.list()
    assert MODEL in [m.id for m in models.data]
    assert all(m.object == "model" and m.owned_by == "rbee" for m in models.data)


def test_completion_equals_transformers_greedy(client, tiny):
    _, tok = tiny
    ids = tok(PROMPT).input_ids
    expected, n = greedy(tiny, ids, 10)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == expected
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == n
    assert r.usage.total_tokens == len(ids) + n
    assert r.choices[0].finish_reason in ("length", "stop")


def test_streamed_completion_concatenates_to_the_same_text(client, tiny):
    _, tok = tiny
    expected, _ = greedy(tiny, tok(PROMPT).input_ids, 10)
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected


def test_chat_completion_uses_the_chat_template(client, tiny):
    messages = [{"role": "user", "content": "Hello there"}]
    ids = chat_ids(tiny, messages)
    expected, n = greedy(tiny, ids, 8)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == n


def test_streamed_chat_with_usage(client, tiny):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected, n = greedy(tiny, chat_ids(tiny, messages), 8)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=8,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"] or finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_stop_and_seed(client, tiny):
    _, tok = tiny
    expected, _ = greedy(tiny, tok(PROMPT).input_ids, 12)
    stop = expected[3:6]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == expected[: expected.index(stop)] and r.choices[0].finish_reason == "stop"
    a, b = (client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9,
                                      seed=99).choices[0].text for _ in range(2))
    assert a == b


@pytest.mark.parametrize("kwargs, status, param", [
    ({"n": 9}, 400, "n"),  # over MAX_CHOICES
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"temperature": -0.5}, 400, "temperature"),
    ({"model": "no/such-model"}, 404, "model"),
])
def test_errors_in_openai_shape(client, kwargs, status, param):
    args = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(**args)
    assert info.value.status_code == status
    error = info.value.body if isinstance(info.value.body, dict) and "message" in info.value.body \
        else info.value.response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_wrong_key_is_refused(rbee_server, rbee_worker):
    bad = openai.OpenAI(base_url=rbee_server.url + "rbee/openai/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        bad.models.list()
    r = httpx.get(rbee_server.url + "rbee/openai/v1/models", headers={"Authorization": f"Bearer {rbee_server.token}"})
    assert r.status_code == 200
