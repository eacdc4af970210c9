"""Streaming text generation with cancellation, independent of any transport.

The worker process drives a :class:`Generator` and turns each :class:`TokenChunk` into an
SSE ``token`` event; bodies are parsed at the edge into a
:class:`~rbee_jupyter.protocol.GenerationRequest` (torch-free, shared with the hive).
Keeping the decode loop here, rather than using
``model.generate`` with a streamer, gives us three things a streamer cannot: a cancel
check before every forward step (a client that goes away frees the slot within one token),
stop strings that never leak into the output, and a counter of forward steps that tests and
the pool can watch to prove that cancelled work really stopped.
"""

from __future__ import annotations

import inspect
import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import ContextTooLong, InvalidRequest
from ..protocol import GenerationRequest, is_int as _is_int
from .grammar import GrammarCompiler, GrammarMatcher

__all__ = [
    "GenerationRequest",
    "GenerationStats",
    "Generator",
    "IncrementalDetokenizer",
    "StopReason",
    "Sampler",
    "StopStringMatcher",
    "TextAssembler",
    "TokenChunk",
    "TokenStream",
]

StopReason = Literal["eos", "length", "stop", "cancelled"]

_REPLACEMENT = "\ufffd"
# Config attributes that different model families use for the context window.
_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length",
                  "seq_length", "max_seq_len")


# --- results -----------------------------------------------------------------------------

@dataclass
class TokenChunk:
    """A piece of text ready to show; ``token_ids`` are the tokens it covers."""

    text: str
    index: int
    token_ids: list[int]


@dataclass
class GenerationStats:
    """Numbers for the ``end`` event; ``completion_tokens`` counts every sampled token."""

    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_ms: float | None
    tokens_per_second: float
    duration_ms: float
    stop_reason: StopReason


# --- text assembly -----------------------------------------------------------------------

class IncrementalDetokenizer:
    """Turns token ids, one at a time, into text that is safe to show right away.

    Decoding token by token is wrong twice over: byte-level BPEs split one character (an
    emoji, a CJK ideograph) over several tokens, and SentencePiece-style decoders drop or
    add spaces depending on what precedes a token. So, like text-generation-inference and
    vLLM, we decode a short window ``ids[prefix:]`` and subtract the text of
    ``ids[prefix:read]``; what remains is new. Text ending in U+FFFD is an incomplete
    character and is held back until a later token completes it (or :meth:`flush`).
    The concatenation of everything returned equals ``tokenizer.decode(ids,
    skip_special_tokens=True)``.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens before this have been emitted

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _pending(self) -> tuple[str, str]:
        """The text already emitted in the window, and the window's full text."""
        return self._decode(self._ids[self._prefix:self._read]), self._decode(self._ids[self._prefix:])

    def add(self, token_id: int) -> str:
        """Append a token; return the text that became final (often "")."""
        self._ids.append(int(token_id))
        seen, full = self._pending()
        if len(full) <= len(seen) or full.endswith(_REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(seen):]

    def flush(self) -> str:
        """Release whatever is held back, even an incomplete character, at the end of a stream."""
        seen, full = self._pending()
        self._prefix = self._read = len(self._ids)
        return full[len(seen):]


class StopStringMatcher:
    """Cuts the output at the first stop string, which itself is never shown.

    Text that could be the start of a stop string is held back until the next text
    decides it, because a stop string usually spans several tokens.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add text; return what is safe to emit. Sets ``stopped`` once a stop string appears."""
        if self.stopped:
            return ""
        buf = self._held + text
        cut = self._first_stop(buf)
        if cut is not None:
            self._held, self.stopped = "", True
            return buf[:cut]
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """At the end of a stream a partial match is just text: release it."""
        held, self._held = self._held, ""
        return held

    def _first_stop(self, buf: str) -> int | None:
        hits = [i for i in (buf.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best


class TextAssembler:
    """One request's text, pushed one token id at a time: chunks of final text, stop strings cut.

    The single-sequence :class:`TokenStream` and the batched decoder (``batch.py``) both
    turn sampled ids into ``token`` events through this, so incremental detokenization and
    stop handling are the same however the tokens were made.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopStringMatcher(stops)
        self._index = 0
        self._pending: list[int] = []

    @property
    def stopped(self) -> bool:
        """A stop string appeared: nothing more is emitted, and the request should end."""
        return self._stops.stopped

    def push(self, token_id: int) -> TokenChunk | None:
        """Add a sampled id; returns the chunk that became final, if any."""
        self._pending.append(token_id)
        return self._emit(self._stops.push(self._detok.add(token_id)))

    def finish(self) -> TokenChunk | None:
        """The end of the stream decides everything held back: an incomplete character is
        shown as U+FFFD (as decode() would) and a partial stop string is just text."""
        if self._stops.stopped:
            return None
        text = self._stops.push(self._detok.flush())
        text += "" if self._stops.stopped else self._stops.flush()
        return self._emit(text)

    def _emit(self, text: str) -> TokenChunk | None:
        if not text:
            return None
        chunk = TokenChunk(text, self._index, self._pending)
        self._index, self._pending = self._index + 1, []
        return chunk


class GenerationClock:
    """Counts one request's tokens and times them, for its :class:`GenerationStats`."""

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.produced = 0
        self.started = time.perf_counter()
        self.first_token_at: float | None = None

    def count(self) -> None:
        """One more sampled token (EOS included: it cost a forward step)."""
        self.produced += 1
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def stats(self, reason: StopReason) -> GenerationStats:
        seconds = time.perf_counter() - self.started
        first = self.first_token_at
        return GenerationStats(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.produced,
            time_to_first_token_ms=None if first is None else (first - self.started) * 1000,
            tokens_per_second=self.produced / seconds if seconds > 0 else 0.0,
            duration_ms=seconds * 1000,
            stop_reason=reason,
        )


# --- sampling ----------------------------------------------------------------------------

class Sampler:
    """Picks the next token with transformers' processor order and semantics.

    Order as in ``GenerationMixin._get_logits_processor``: repetition penalty (greedy too),
    then, only when sampling, temperature, top-k, top-p. Sampling draws from a private
    ``torch.Generator`` so that a seed reproduces text and concurrent requests never
    disturb each other or the global RNG.
    """

    def __init__(self, req: GenerationRequest) -> None:
        self._req = req
        self._history: list[int] | None = [] if req.repetition_penalty != 1.0 else None
        # Sized from the first logits, not the config: quantized heads and padded
        # vocabularies make the config's vocab_size unreliable.
        self._seen: torch.Tensor | None = None
        self._rng: torch.Generator | None = None
        if req.temperature > 0:
            self._rng = torch.Generator(device="cpu")
            if req.seed is None:
                self._rng.seed()
            else:
                self._rng.manual_seed(req.seed)

    def observe(self, token_ids: Sequence[int]) -> None:
        """Record tokens (prompt and generated) that the repetition penalty applies to."""
        if self._history is None:
            return
        if self._seen is None:
            self._history.extend(token_ids)
        else:
            self._mark(token_ids)

    def _mark(self, token_ids: Sequence[int]) -> None:
        assert self._seen is not None
        ids = [i for i in token_ids if 0 <= i < self._seen.shape[0]]
        if ids:
            self._seen[torch.as_tensor(ids, device=self._seen.device)] = True

    def __call__(self, logits: torch.Tensor) -> int:
        scores = logits.float()
        scores = self._penalise(scores)
        if self._rng is None:
            return int(scores.argmax())
        scores = self._warp(scores)
        probs = torch.softmax(scores.cpu(), dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._rng))

    def _penalise(self, scores: torch.Tensor) -> torch.Tensor:
        if self._history is None:
            return scores
        if self._seen is None:
            self._seen = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            self._mark(self._history)
        p = self._req.repetition_penalty
        penalised = torch.where(scores < 0, scores * p, scores / p)
        return torch.where(self._seen, penalised, scores)

    def _warp(self, scores: torch.Tensor) -> torch.Tensor:
        req = self._req
        if req.temperature != 1.0:
            scores = scores / req.temperature
        if req.top_k:
            k = min(req.top_k, scores.shape[-1])
            scores = scores.masked_fill(scores < torch.topk(scores, k)[0][-1], -math.inf)
        if req.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            remove = sorted_scores.softmax(-1).cumsum(-1) <= (1 - req.top_p)
            remove[-1] = False
            scores = scores.masked_fill(remove.scatter(0, order, remove), -math.inf)
        return scores


# --- generator ---------------------------------------------------------------------------

def context_length_of(config: Any) -> int | None:
    """The model's context window from its config, looking into a nested text config too."""
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        configs.insert(0, get_text())
    for cfg in configs:
        for attr in _CONTEXT_ATTRS:
            value = getattr(cfg, attr, None)
            if _is_int(value) and value > 0:
                return value
    return None


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else [int(e) for e in eos])


class Generator:
    """Generates for one loaded model; one stream at a time per instance.

    ``tokens_computed`` counts tokens computed over the instance's life (a forward step makes
    one per sequence in it) so that a caller can check that a cancelled request stopped consuming compute.
    """

    def __init__(self, model: Any, tokenizer: Any, *, context_length: int | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length if context_length is not None else context_length_of(model.config)
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.stats: GenerationStats | None = None  # of the last finished stream
        self._tokens_computed = 0
        self._counter_lock = threading.Lock()
        # Computing only the last position's logits is what generate() does; it saves the
        # prompt-length LM-head matmul and keeps greedy output bit-identical to it.
        self._logits_to_keep = _accepts(model, "logits_to_keep")
        # transformers 5.2x renamed the KV-cache argument and output to ``cache`` and warns
        # on ``past_key_values``; older models and remote code still use the old name.
        self._cache_kw = "cache" if _accepts(model, "cache") else "past_key_values"
        self._grammars: GrammarCompiler | None = None  # made on the first constrained request

    @property
    def tokens_computed(self) -> int:
        return self._tokens_computed

    def encode(self, req: GenerationRequest) -> list[int]:
        """Prompt ids; raises before any compute if the request cannot fit the context."""
        ids = self._chat_ids(req.messages, req.tools) if req.messages is not None else \
            list(self.tokenizer(req.prompt)["input_ids"])
        if not ids:
            raise InvalidRequest("the prompt encodes to no tokens", details={"field": "prompt"})
        ctx = self.context_length
        if ctx is not None and len(ids) + req.max_tokens > ctx:
            raise ContextTooLong(
                f"the prompt has {len(ids)} tokens and max_tokens is {req.max_tokens}, together over the "
                f"model's context of {ctx}; shorten the prompt or lower max_tokens",
                details={"prompt_tokens": len(ids), "max_tokens": req.max_tokens, "context_length": ctx},
            )
        if req.response_format is not None:  # an uncompilable schema is a 400 now, not a late error event
            self.grammar_compiler().compile(req.response_format)
        return ids

    def grammar_compiler(self) -> GrammarCompiler:
        """This model's grammar compiler (its tokenizer, its logits' width, its EOS ids)."""
        if self._grammars is None:
            config = self.model.config
            text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
            vocab = getattr(text, "vocab_size", None) or len(self.tokenizer)
            self._grammars = GrammarCompiler(self.tokenizer, vocab_size=max(int(vocab), len(self.tokenizer)),
                                             stop_token_ids=sorted(self.eos_token_ids))
        return self._grammars

    def grammar_matcher(self, req: GenerationRequest) -> GrammarMatcher | None:
        """A fresh grammar state for one sequence of ``req``; None when its output is free text."""
        return None if req.response_format is None else self.grammar_compiler().matcher(req.response_format)

    def _chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("model has no chat template; send a prompt instead",
                                 details={"field": "messages"})
        extra = {"tools": tools} if tools else {}
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
        if isinstance(out, Mapping):  # transformers 5 returns a BatchEncoding by default
            out = out["input_ids"]
        return [int(i) for i in out]

    def stream(self, req: GenerationRequest, *, cancel: threading.Event | None = None) -> TokenStream:
        """Start a generation; encoding errors raise here, before the first chunk is asked for."""
        prompt_ids = self.encode(req)
        return TokenStream(self, req, prompt_ids, cancel)

    # -- the loop's pieces, used by TokenStream --

    def _device(self) -> torch.device:
        return getattr(self.model, "device", None) or next(self.model.parameters()).device

    def _count_tokens(self, n: int) -> None:
        with self._counter_lock:
            self._tokens_computed += n

    def _forward(self, ids: Sequence[int], past: Any) -> tuple[torch.Tensor, Any]:
        """One forward step; returns the last position's logits and the grown KV cache."""
        kwargs: dict[str, Any] = {self._cache_kw: past, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self._device())
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, **kwargs)
        self._count_tokens(1)
        return out.logits[0, -1], out[self._cache_kw]


def _accepts(model: Any, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


class TokenStream(Iterator[TokenChunk]):
    """Iterator of chunks for one request; ``stats`` is set once it ends.

    Work happens only while the consumer pulls, so a consumer that stops pulling also
    stops the model; ``cancel`` covers a consumer in another thread, and :meth:`close`
    one that walks away (its stats then say ``"cancelled"``).
    """

    def __init__(self, gen: Generator, req: GenerationRequest, prompt_ids: list[int],
                 cancel: threading.Event | None) -> None:
        self.request = req
        self.prompt_ids = prompt_ids
        self.stats: GenerationStats | None = None
        self._gen = gen
        self._cancel = cancel
        self._reason: StopReason = "cancelled"
        self._clock = GenerationClock(len(prompt_ids))
        self._it = self._run()

    def __next__(self) -> TokenChunk:
        return next(self._it)

    def close(self) -> None:
        """Abandon the generation; no further forward step runs."""
        self._it.close()

    def _run(self) -> Iterator[TokenChunk]:
        try:
            yield from self._chunks()
        except GeneratorExit:
            self._reason = "cancelled"
            self._finish()
            raise
        self._finish()

    def _chunks(self) -> Iterator[TokenChunk]:
        """Text in the order it becomes final; stop strings and what follows them are dropped."""
        text = TextAssembler(self._gen.tokenizer, self.request.stop)
        for token in self._tokens():
            chunk = text.push(token)
            if chunk is not None:
                yield chunk
            if text.stopped:
                self._reason = "stop"
                return
        chunk = text.finish()
        if chunk is not None:
            yield chunk
        if text.stopped:
            self._reason = "stop"

    def _tokens(self) -> Iterator[int]:
        """Sampled ids (EOS excluded); records why it ended in ``_reason``."""
        gen, req = self._gen, self.request
        sampler = Sampler(req)
        sampler.observe(self.prompt_ids)
        grammar = gen.grammar_matcher(req)
        past, step_ids = None, self.prompt_ids
        while self._clock.produced < req.max_tokens:
            if self._cancel is not None and self._cancel.is_set():
                self._reason = "cancelled"
                return
            logits, past = gen._forward(step_ids, past)
            if grammar is not None:
                logits = grammar.mask(logits)
            token = sampler(logits)
            self._clock.count()
            sampler.observe([token])
            if token in gen.eos_token_ids:
                self._reason = "eos"
                return
            if grammar is not None:
                grammar.advance(token)
            yield token
            if grammar is not None and grammar.is_done():  # the document is whole: only EOS could follow
                self._reason = "eos"
                return
            step_ids = [token]
        self._reason = "length"

    def _finish(self) -> None:
        self.stats = self._clock.stats(self._reason)
        self._gen.stats = self.stats
