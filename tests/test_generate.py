"""Streaming generation: parity with transformers, text assembly, stopping, cancel, validation.

One real tiny Llama is made per module; every test drives the production code path
(``from_pretrained``, the tokenizer's own decode) rather than mocks.
"""

from __future__ import annotations

import copy
import queue
import threading

import pytest
import torch

from rbee_jupyter.errors import ContextTooLong, InvalidRequest
from rbee_jupyter.engine.generate import (
    GenerationRequest,
    Generator,
    IncrementalDetokenizer,
    StopStringMatcher,
    TokenChunk,
)
from rbee_jupyter.testing.tiny_model import make_tiny_model

PROMPT = "Once upon a time"
N = 24
WAIT_S = 60  # bound on every cross-thread wait (a busy machine included)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(tmp_path_factory.mktemp("gen") / "llama")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture
def gen(tiny):
    return Generator(*tiny)


def reference_ids(tiny, prompt: str, n: int, **kwargs) -> list[int]:
    model, tok = tiny
    ids = tok(prompt)["input_ids"]
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, **kwargs)
    return out[0, len(ids):].tolist()


def run(gen: Generator, **kwargs) -> tuple[list[TokenChunk], object]:
    kwargs.setdefault("prompt", PROMPT)
    stream = gen.stream(GenerationRequest(**kwargs))
    return list(stream), stream.stats


def text_of(chunks: list[TokenChunk]) -> str:
    return "".join(c.text for c in chunks)


def ids_of(chunks: list[TokenChunk]) -> list[int]:
    return [i for c in chunks for i in c.token_ids]


# --- parity and text assembly ----------------------------------------------------------

@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_matches_transformers_generate_token_for_token(tiny, gen, penalty):
    ref = reference_ids(tiny, PROMPT, N, repetition_penalty=penalty)
    chunks, stats = run(gen, max_tokens=N, repetition_penalty=penalty)
    assert ids_of(chunks) == ref
    assert text_of(chunks) == tiny[1].decode(ref, skip_special_tokens=True)
    assert stats.completion_tokens == N


@pytest.mark.parametrize("prompt", ["The quick brown", "Layers load one", "Hello world!"])
def test_chunks_concatenate_to_the_full_decode(tiny, gen, prompt):
    ref = reference_ids(tiny, prompt, N)
    chunks, _ = run(gen, prompt=prompt, max_tokens=N)
    assert text_of(chunks) == tiny[1].decode(ref, skip_special_tokens=True)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.text and c.token_ids for c in chunks)


DETOK_TEXTS = [
    "Hello world",
    "  leading, double  spaces and trailing ",
    "line one\nline two\n\n\tindented",
    "🙂🚀 你好世界",
    "こんにちは世界 🙂 Bonjour le monde",
    "mixed: café ñ 🚀 end 👨‍👩‍👧 family",
    "🙂",
    "a🙂b你c",
]


@pytest.mark.parametrize("text", DETOK_TEXTS)
def test_incremental_detokenizer_is_exact_and_never_emits_partial_characters(tiny, text):
    tok = tiny[1]
    ids = [1] + tok(text, add_special_tokens=False)["input_ids"] + [2]  # specials are skipped
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == text == tok.decode(ids, skip_special_tokens=True)


def test_the_emoji_case_really_splits_characters_across_tokens(tiny):
    """Guards the test above: a byte-level BPE must split some character for it to mean anything."""
    tok = tiny[1]
    ids = tok("🙂🚀 你好世界", add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids)


def test_flush_releases_an_incomplete_character(tiny):
    tok = tiny[1]
    ids = tok("🙂", add_special_tokens=False)["input_ids"][:-1]
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add(i) for i in ids) == ""
    assert detok.flush() == tok.decode(ids)


# --- stopping --------------------------------------------------------------------------

def _stop_spanning_two_tokens(pieces: list[str]) -> tuple[str, int]:
    """A two-character string whose first occurrence straddles a token boundary, not at 0."""
    full = "".join(pieces)
    bounds, pos = [], 0
    for p in pieces:
        pos += len(p)
        bounds.append(pos)
    for b in bounds[:-1]:
        cand = full[b - 1:b + 1]
        at = full.find(cand)
        if len(cand) == 2 and "\ufffd" not in cand and at > 0 and any(at < q < at + 2 for q in bounds):
            return cand, at
    raise AssertionError(f"no suitable stop string in {pieces!r}")


def test_stop_string_spanning_two_tokens_is_cut_with_what_follows(tiny, gen):
    ref = reference_ids(tiny, PROMPT, N)
    detok = IncrementalDetokenizer(tiny[1])
    stop, at = _stop_spanning_two_tokens([detok.add(i) for i in ref])
    full = tiny[1].decode(ref, skip_special_tokens=True)
    chunks, stats = run(gen, max_tokens=N, stop=[stop])
    assert text_of(chunks) == full[:at]
    assert stats.stop_reason == "stop"
    assert stats.completion_tokens < N


def test_earliest_of_several_stop_strings_wins_and_partial_matches_are_released(tiny, gen):
    full = tiny[1].decode(reference_ids(tiny, PROMPT, N), skip_special_tokens=True)
    never = full[:3] + "\x00"  # starts like the output, then diverges: held, then released
    chunks, stats = run(gen, max_tokens=N, stop=[never])
    assert (text_of(chunks), stats.stop_reason) == (full, "length")
    late, early = full[10:13], full[4:6]
    chunks, stats = run(gen, max_tokens=N, stop=[late, early])
    assert text_of(chunks) == full[:full.find(early)]
    assert stats.stop_reason == "stop"


def test_stop_string_matcher_holds_back_only_possible_starts():
    m = StopStringMatcher(["END", "xy"])
    assert m.push("abcE") == "abc"
    assert m.push("N") == ""
    assert m.push("d") == "ENd"
    assert m.push("__x") == "__"
    assert m.push("yz") == "" and m.stopped
    assert m.push("more") == ""


def test_max_tokens_gives_length_and_exactly_n_tokens(gen):
    chunks, stats = run(gen, max_tokens=7)
    assert stats.stop_reason == "length"
    assert stats.completion_tokens == 7
    assert len(ids_of(chunks)) <= 7


def test_eos_stops_generation(tiny, gen, monkeypatch):
    ref = reference_ids(tiny, PROMPT, N)
    eos = ref[5]
    k = ref.index(eos)  # the first time greedy produces it
    monkeypatch.setattr(tiny[0].generation_config, "eos_token_id", [2, eos])
    chunks, stats = run(Generator(*tiny), max_tokens=N)
    assert stats.stop_reason == "eos"
    assert stats.completion_tokens == k + 1
    assert text_of(chunks) == tiny[1].decode(ref[:k], skip_special_tokens=True)


# --- sampling --------------------------------------------------------------------------

def test_same_seed_same_text_and_the_global_rng_is_untouched(gen):
    rng_before = torch.get_rng_state()
    texts = [text_of(run(gen, max_tokens=16, temperature=1.0, seed=s)[0]) for s in (7, 7, 8, 9, 10)]
    assert texts[0] == texts[1]
    assert len(set(texts[1:])) > 1
    assert torch.equal(torch.get_rng_state(), rng_before)


@pytest.mark.parametrize("knobs", [{"top_k": 1}, {"top_p": 1e-6}])
def test_sampling_filters_that_keep_one_token_reduce_to_greedy(tiny, gen, knobs):
    ref = reference_ids(tiny, PROMPT, 12)
    chunks, _ = run(gen, max_tokens=12, temperature=1.5, seed=3, **knobs)
    assert ids_of(chunks) == ref


# --- cancel ----------------------------------------------------------------------------

def test_cancel_from_the_consumer_stops_within_one_token(gen):
    cancel = threading.Event()
    stream = gen.stream(GenerationRequest(prompt=PROMPT, max_tokens=100), cancel=cancel)
    seen = 0
    for _ in stream:
        seen += 1
        if seen == 3:
            cancel.set()
            at_cancel = gen.tokens_computed
    assert stream.stats.stop_reason == "cancelled"
    assert gen.tokens_computed - at_cancel <= 1
    assert stream.stats.completion_tokens < 100
    after = gen.tokens_computed
    assert list(stream) == [] and gen.tokens_computed == after


def test_cancel_from_another_thread(gen):
    cancel, chunks = threading.Event(), queue.Queue()

    def produce():
        # 1000 (no EOS on the way): the producer may run ahead while a busy machine starves this thread
        for c in gen.stream(GenerationRequest(prompt=PROMPT, max_tokens=1000), cancel=cancel):
            chunks.put(c)
        chunks.put(None)

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    for _ in range(3):
        assert chunks.get(timeout=WAIT_S) is not None
    cancel.set()
    worker.join(timeout=WAIT_S)
    assert not worker.is_alive()
    assert gen.stats.stop_reason == "cancelled"
    assert gen.stats.completion_tokens < 1000


def test_closing_an_abandoned_stream_stops_it(gen):
    stream = gen.stream(GenerationRequest(prompt=PROMPT, max_tokens=50))
    next(stream), next(stream)
    stream.close()
    after = gen.tokens_computed
    assert list(stream) == [] and gen.tokens_computed == after
    assert stream.stats.stop_reason == "cancelled" and stream.stats.completion_tokens < 50


def test_cancelled_before_start_computes_nothing(gen):
    cancel = threading.Event()
    cancel.set()
    before = gen.tokens_computed
    chunks = list(gen.stream(GenerationRequest(prompt=PROMPT, max_tokens=10), cancel=cancel))
    assert chunks == [] and gen.tokens_computed == before
    assert gen.stats.stop_reason == "cancelled" and gen.stats.time_to_first_token_ms is None


# --- encoding and limits ---------------------------------------------------------------

def test_chat_messages_use_the_template(tiny, gen):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    want = tiny[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    stream = gen.stream(GenerationRequest(messages=messages, max_tokens=4))
    assert stream.prompt_ids == list(want)
    list(stream)
    assert stream.stats.prompt_tokens == len(want) and 1 <= stream.stats.completion_tokens <= 4


def test_messages_without_a_chat_template_are_refused(tiny):
    tok = copy.deepcopy(tiny[1])
    tok.chat_template = None
    gen = Generator(tiny[0], tok)
    with pytest.raises(InvalidRequest, match="no chat template; send a prompt instead"):
        gen.stream(GenerationRequest(messages=[{"role": "user", "content": "hi"}]))
    assert gen.encode(GenerationRequest(prompt=PROMPT, max_tokens=4)) == tok(PROMPT)["input_ids"]


def test_context_too_long_reports_the_numbers(tiny, gen):
    n_prompt = len(tiny[1](PROMPT)["input_ids"])
    assert gen.context_length == 1024  # from config.max_position_embeddings
    with pytest.raises(ContextTooLong) as err:
        gen.stream(GenerationRequest(prompt=PROMPT, max_tokens=1024))
    assert err.value.details == {"prompt_tokens": n_prompt, "max_tokens": 1024, "context_length": 1024}
    assert err.value.status == 400
    small = Generator(*tiny, context_length=n_prompt + 2)
    assert small.encode(GenerationRequest(prompt=PROMPT, max_tokens=2))
    with pytest.raises(ContextTooLong):
        small.encode(GenerationRequest(prompt=PROMPT, max_tokens=3))


def test_stats_are_consistent(gen):
    _, stats = run(gen, max_tokens=5)
    assert stats.prompt_tokens == 4 and stats.completion_tokens == 5
    assert 0 <= stats.time_to_first_token_ms <= stats.duration_ms
    assert stats.tokens_per_second > 0


# --- request validation ----------------------------------------------------------------

BAD_BODIES = [
    ({}, "prompt"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages"),
    ({"messages": ["hi"]}, "messages"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 4097}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens"),
    ({"prompt": "a", "temperature": -0.1}, "temperature"),
    ({"prompt": "a", "temperature": 2.5}, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "temperature": float("nan")}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "top_k": -1}, "top_k"),
    ({"prompt": "a", "top_k": False}, "top_k"),
    ({"prompt": "a", "seed": "42"}, "seed"),
    ({"prompt": "a", "seed": True}, "seed"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "a", "stop": [""]}, "stop"),
    ({"prompt": "a", "stop": ""}, "stop"),
    ({"prompt": "a", "stop": [1]}, "stop"),
    ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "a", "repetition_penalty": -1.0}, "repetition_penalty"),
]


@pytest.mark.parametrize("body, field", BAD_BODIES, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_BODIES)])
def test_from_json_rejects_bad_bodies_naming_the_field(body, field):
    with pytest.raises(InvalidRequest) as err:
        GenerationRequest.from_json(body)
    assert err.value.details["field"] == field
    assert field in err.value.message
    assert err.value.code == "INVALID_REQUEST" and err.value.status == 400


def test_from_json_accepts_a_full_body_and_fills_defaults():
    req = GenerationRequest.from_json({"prompt": "hi", "max_tokens": 8, "temperature": 1, "top_p": 0.9,
                                       "top_k": 40, "seed": 3, "stop": "\n", "repetition_penalty": 1.1,
                                       "stream": True, "model_ref": "hf:x/y"})
    assert req == GenerationRequest(prompt="hi", max_tokens=8, temperature=1.0, top_p=0.9, top_k=40, seed=3,
                                    stop=["\n"], repetition_penalty=1.1)
    assert GenerationRequest.from_json({"prompt": "hi"}, max_tokens_limit=100).max_tokens == 100
    assert GenerationRequest.from_json({"prompt": "hi", "max_tokens": 200},
                                       max_tokens_limit=200).max_tokens == 200
    with pytest.raises(InvalidRequest):
        GenerationRequest.from_json({"prompt": "hi", "max_tokens": 201}, max_tokens_limit=200)
    with pytest.raises(InvalidRequest):
        GenerationRequest.from_json(["not", "an", "object"])
