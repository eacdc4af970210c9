"""The batched decoder in this process: exactness against solo runs and from_pretrained.

Tolerance, and why: a request alone must give the very logits of ``from_pretrained``
(bit for bit: the same kernels on the same shapes). Inside a batch, other rows change the
shapes of the matrix products (so their summation order) and add masked columns to the
attention, which moves the last bits of fp32 logits: we require the same greedy token at
every step and max |logit diff| <= 1e-4 (fp32 logits here are O(1), float32 has ~7
significant digits, and a few reorderings of sums of hundreds of terms stay well under
1e-4; a real bug — a wrong position, an unmasked pad — moves them by 1e-2 and more).
For nf4 the matrix products dequantize per row the same way, so we hold it to the same
greedy tokens.

The logits are recorded by subclassing (the production classes run unchanged).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from rbee_jupyter.engine.batch import BatchDecoder, BatchSequence, kv_bytes_per_token
from rbee_jupyter.engine.generate import GenerationRequest, Generator
from rbee_jupyter.testing.tiny_model import make_tiny_model

PROMPTS = ["Once upon a time", "The quick brown fox jumps", "Hello", "Jupyter notebooks run Python code in cells,",
           "Layers load one by one", "a b c"]
TOLERANCE = 1e-4


class RecordingGenerator(Generator):
    """A Generator that keeps the logits of each forward step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.logits: list[torch.Tensor] = []

    def _forward(self, ids, past):
        logits, cache = super()._forward(ids, past)
        self.logits.append(logits.clone())
        return logits, cache


class RecordingDecoder(BatchDecoder):
    """A BatchDecoder that keeps, per sequence, the logits it sampled from and its text."""

    def __init__(self, gen: Generator) -> None:
        self.logits: dict[str, list[torch.Tensor]] = {}
        self.ids: dict[str, list[int]] = {}
        self.text: dict[str, str] = {}
        self.stats: dict[str, object] = {}
        super().__init__(gen, on_chunk=self._chunk, on_done=self._done)

    def _chunk(self, seq, chunk) -> None:
        self.text[seq.id] = self.text.get(seq.id, "") + chunk.text

    def _done(self, seq, stats) -> None:
        self.stats[seq.id] = stats

    def _take(self, seq, logits):
        self.logits.setdefault(seq.id, []).append(logits.clone())
        super()._take(seq, logits)
        self.ids.setdefault(seq.id, []).append(seq.last_token)

    def submit(self, name: str, **kwargs) -> BatchSequence:
        req = GenerationRequest(**{"prompt": name, "max_tokens": 16, **kwargs})
        seq = BatchSequence(name, req, self.gen.encode(req))
        self.add(seq)
        return seq

    def drain(self) -> None:
        while self.rows:
            self.step()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("batch") / "llama")


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_path).eval(), AutoTokenizer.from_pretrained(tiny_path)


def solo(model, tok, prompt: str, **kwargs) -> tuple[RecordingGenerator, str, object]:
    gen = RecordingGenerator(model, tok)
    stream = gen.stream(GenerationRequest(**{"prompt": prompt, "max_tokens": 16, **kwargs}))
    text = "".join(c.text for c in stream)
    return gen, text, stream.stats


def test_a_batch_of_one_gives_the_logits_of_from_pretrained_bit_for_bit(model_and_tokenizer):
    model, tok = model_and_tokenizer
    dec = RecordingDecoder(Generator(model, tok))
    dec.submit(PROMPTS[0], max_tokens=12)
    dec.drain()
    # The reference: from_pretrained's model, called step by step as generate() does.
    from transformers import DynamicCache

    ids, cache, expected = tok(PROMPTS[0], return_tensors="pt").input_ids, DynamicCache(), []
    with torch.inference_mode():
        for _ in range(len(dec.logits[PROMPTS[0]])):
            out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
            expected.append(out.logits[0, -1])
            ids = out.logits[:, -1].argmax(-1, keepdim=True)
    assert len(expected) == 12
    for got, want in zip(dec.logits[PROMPTS[0]], expected, strict=True):
        assert torch.equal(got, want)
    assert dec.kv_slots == 0 and dec.rows == []


def test_sequences_that_join_and_leave_at_any_step_match_their_solo_runs(model_and_tokenizer):
    model, tok = model_and_tokenizer
    dec = RecordingDecoder(Generator(model, tok))
    lengths = {p: 6 + 3 * i for i, p in enumerate(PROMPTS)}  # they leave at different steps
    # When: three start together, two join after 3 steps, one more after 5 (different prompt lengths)
    for p in PROMPTS[:3]:
        dec.submit(p, max_tokens=lengths[p])
    for _ in range(3):
        dec.step()
    for p in PROMPTS[3:5]:
        dec.submit(p, max_tokens=lengths[p])
    assert len(dec.rows) == 5
    dec.step()
    dec.step()
    dec.submit(PROMPTS[5], max_tokens=lengths[PROMPTS[5]])
    dec.drain()
    # Then: each equals its solo run, token for token, text for text, within the tolerance in logits
    for p in PROMPTS:
        gen, text, stats = solo(model, tok, p, max_tokens=lengths[p])
        assert dec.text.get(p, "") == text, p
        assert dec.stats[p].completion_tokens == stats.completion_tokens
        assert dec.stats[p].stop_reason == stats.stop_reason
        assert len(dec.logits[p]) == len(gen.logits)
        for got, want in zip(dec.logits[p], gen.logits, strict=True):
            assert int(got.argmax()) == int(want.argmax()), p
            assert float((got - want).abs().max()) <= TOLERANCE, p
    assert dec.kv_slots == 0  # everyone left: the batched cache is gone


def test_newcomers_prefilled_together_match_their_solo_runs(model_and_tokenizer):
    """What the worker does when several requests arrive at once: one padded prefill for all."""
    model, tok = model_and_tokenizer
    gen = Generator(model, tok)
    dec = RecordingDecoder(gen)
    dec.submit(PROMPTS[5], max_tokens=12)  # already running when the others arrive
    dec.step()
    seqs = []
    for p in PROMPTS[:5]:
        req = GenerationRequest(prompt=p, max_tokens=12)
        seqs.append(BatchSequence(p, req, gen.encode(req)))
    dec.add_all(seqs)
    assert len(dec.rows) == 6
    dec.drain()
    for p in PROMPTS:
        ref, text, _ = solo(model, tok, p, max_tokens=12)
        assert dec.text.get(p, "") == text, p
        for got, want in zip(dec.logits[p], ref.logits, strict=True):
            assert int(got.argmax()) == int(want.argmax()) and float((got - want).abs().max()) <= TOLERANCE, p


def test_a_cancelled_row_leaves_at_the_next_step_and_the_others_are_undisturbed(model_and_tokenizer):
    model, tok = model_and_tokenizer
    gen = Generator(model, tok)
    dec = RecordingDecoder(gen)
    seqs = {p: dec.submit(p, max_tokens=20) for p in PROMPTS[:4]}
    for _ in range(4):
        dec.step()
    width = dec.kv_slots // len(dec.rows)
    # When
    seqs[PROMPTS[1]].cancel.set()
    before = gen.tokens_computed
    dec.cancel_flagged()
    dec.step()
    # Then: one token for each of the three left, none for the cancelled one; its KV row is gone
    assert gen.tokens_computed - before == 3
    assert dec.stats[PROMPTS[1]].stop_reason == "cancelled" and len(dec.ids[PROMPTS[1]]) == 5
    assert dec.kv_slots <= 3 * (width + 1)
    dec.drain()
    for p in (PROMPTS[0], PROMPTS[2], PROMPTS[3]):
        assert dec.text[p] == solo(model, tok, p, max_tokens=20)[1]


def test_sampling_seeds_and_stop_strings_hold_per_row(model_and_tokenizer):
    model, tok = model_and_tokenizer
    _, greedy_text, _ = solo(model, tok, PROMPTS[0], max_tokens=16)
    stop = greedy_text[4:7]  # a stop string that greedy decoding is bound to meet
    assert stop.strip()
    sampled = dict(temperature=0.9, top_p=0.9, top_k=40, seed=1234, repetition_penalty=1.2)
    dec = RecordingDecoder(Generator(model, tok))
    dec.submit(PROMPTS[0], max_tokens=16, stop=[stop])
    dec.submit(PROMPTS[1], max_tokens=16, **sampled)
    dec.submit(PROMPTS[2], max_tokens=16, **{**sampled, "seed": 99})
    dec.drain()
    assert dec.text.get(PROMPTS[0], "") == solo(model, tok, PROMPTS[0], max_tokens=16, stop=[stop])[1]
    assert dec.stats[PROMPTS[0]].stop_reason == "stop" and stop not in dec.text.get(PROMPTS[0], "")
    # The same seed gives the same text as alone (the tiny logit differences do not flip a draw here).
    assert dec.text[PROMPTS[1]] == solo(model, tok, PROMPTS[1], max_tokens=16, **sampled)[1]
    assert dec.text[PROMPTS[2]] == solo(model, tok, PROMPTS[2], max_tokens=16, **{**sampled, "seed": 99})[1]


def test_an_nf4_model_batches_with_the_same_greedy_tokens(tiny_path):
    from transformers import AutoTokenizer

    from rbee_jupyter.engine.loader import load_model

    model, tok = load_model(tiny_path, quantization="nf4"), AutoTokenizer.from_pretrained(tiny_path)
    dec = RecordingDecoder(Generator(model, tok))
    for p in PROMPTS[:4]:
        dec.submit(p, max_tokens=10)
    dec.drain()
    for p in PROMPTS[:4]:
        gen, text, _ = solo(model, tok, p, max_tokens=10)
        assert dec.text.get(p, "") == text
        assert [int(x.argmax()) for x in dec.logits[p]] == [int(x.argmax()) for x in gen.logits]


def test_kv_bytes_per_token_matches_what_the_cache_holds(model_and_tokenizer):
    model, tok = model_and_tokenizer
    gen = Generator(model, tok)
    _, cache = gen._forward(tok(PROMPTS[3])["input_ids"], None)
    held = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)
    assert held == kv_bytes_per_token(model) * cache.get_seq_length()


def test_a_flag_set_before_the_prefill_costs_no_compute(model_and_tokenizer):
    model, tok = model_and_tokenizer
    gen = Generator(model, tok)
    dec = RecordingDecoder(gen)
    req = GenerationRequest(prompt=PROMPTS[0], max_tokens=5)
    seq = BatchSequence("x", req, gen.encode(req), cancel=threading.Event())
    seq.cancel.set()
    dec.add(seq)
    assert gen.tokens_computed == 0 and dec.stats["x"].stop_reason == "cancelled" and dec.rows == []


def test_requests_with_the_same_prompt_share_one_prefill_and_keep_their_own_sampling(model_and_tokenizer):
    model, tok = model_and_tokenizer
    gen = RecordingGenerator(model, tok)
    dec = RecordingDecoder(gen)
    sampled = dict(temperature=0.9, top_p=0.9, max_tokens=8)
    seqs = []
    for i in range(3):  # what OpenAI n=3 sends: one prompt, seeds 7, 8, 9
        req = GenerationRequest(prompt=PROMPTS[0], seed=7 + i, **sampled)
        seqs.append(BatchSequence(f"n{i}", req, gen.encode(req)))
    dec.add_all(seqs)
    assert len(gen.logits) == 1  # one prefill forward for the three
    assert gen.tokens_computed == 3  # one first token each
    dec.drain()
    for i in range(3):
        assert dec.text.get(f"n{i}", "") == solo(model, tok, PROMPTS[0], seed=7 + i, **sampled)[1]
        assert torch.equal(dec.logits[f"n{i}"][0], dec.logits["n0"][0])
