"""Many sequences, one forward step: a batched decoder over transformers' ``DynamicCache``.

Why our own loop and not ``model.generate`` or transformers' ``generate_batch``: requests
arrive and leave at any step, each needs its own sampler, stop strings, cancel flag and
incremental text, and a batch of one must stay bit-identical to :class:`Generator`
(measured against ``generate_batch`` in bench/RESULTS.md, "Batching mechanism").

How the batch is kept: one ``DynamicCache`` whose rows are *left-padded* so that every
row's newest token sits in the last column. A 2-D attention mask marks the padding, and
per-row ``position_ids`` give each row its own positions, so padding changes nothing but
the shapes the kernels see. A new request is prefilled alone (exactly like the
single-sequence path, so its first token is the same) and its cache is then padded and
concatenated onto the batch; a row that leaves is cut out with ``index_select`` and
columns that became padding in every row are trimmed. A batch without padding is run
without mask and position ids, i.e. exactly like :meth:`Generator._forward`: a request
alone in the worker gets the very logits ``from_pretrained`` gives.

Numerics inside a batch: other rows change the shapes of the matrix products (and thus
their summation order) and add masked columns, so logits may differ from a solo run in
the last bits; tests hold them to equal greedy tokens and max |logit diff| <= 1e-4 in
fp32 (``tests/test_batch.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .generate import (GenerationClock, GenerationRequest, GenerationStats, Generator, Sampler, StopReason,
                       TextAssembler, TokenChunk)
from .grammar import GrammarMatcher

__all__ = ["BatchDecoder", "BatchSequence", "kv_bytes_per_token", "supports_batching"]

ChunkSink = Callable[["BatchSequence", TokenChunk], None]
DoneSink = Callable[["BatchSequence", GenerationStats], None]


@dataclass(eq=False)
class BatchSequence:
    """One request inside the decoder: its sampler, text, clock and cancel flag."""

    id: str
    request: GenerationRequest
    prompt_ids: list[int]
    cancel: threading.Event = field(default_factory=threading.Event)
    sampler: Sampler = field(init=False)
    clock: GenerationClock = field(init=False)
    text: TextAssembler | None = None
    grammar: GrammarMatcher | None = None  # its own grammar state when its output is constrained (JSON)
    last_token: int | None = None
    reason: StopReason | None = None

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.request)
        self.sampler.observe(self.prompt_ids)
        self.clock = GenerationClock(len(self.prompt_ids))

    @property
    def done(self) -> bool:
        return self.reason is not None


def supports_batching(model: Any) -> bool:
    """Whether the rows of ``model``'s KV cache can be padded, joined and cut: full-attention
    dynamic layers only. Sliding-window and recurrent layers keep state that left padding
    would corrupt; such a model decodes one sequence at a time."""
    from transformers import DynamicCache

    try:
        layers = DynamicCache(config=model.config).layers
    except Exception:  # noqa: BLE001 - remote code, unusual configs: do not guess, do not batch
        return False
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


class BatchDecoder:
    """Runs the sequences it is given, one token each per :meth:`step`; one thread drives it.

    ``on_chunk`` gets each piece of final text, ``on_done`` each finished sequence's stats
    (``stop_reason`` "cancelled" for a cancelled one). The decoder never blocks and never
    waits: the caller decides when to add, cancel and step (see ``worker/batcher.py``).
    """

    def __init__(self, generator: Generator, *, on_chunk: ChunkSink, on_done: DoneSink) -> None:
        self.gen = generator
        self._on_chunk, self._on_done = on_chunk, on_done
        self.rows: list[BatchSequence] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [rows, width], 1 = a real token, 0 = left padding
        self._positions: torch.Tensor | None = None  # [rows], the position of each row's next token
        self.batching = supports_batching(generator.model)  # False: the caller runs one row at a time

    # --- membership --------------------------------------------------------------------

    def add(self, seq: BatchSequence) -> None:
        """Prefill ``seq`` alone and sample its first token; it joins the batch for the next step."""
        self.add_all([seq])

    def add_all(self, seqs: Sequence[BatchSequence]) -> None:
        """Prefill newcomers and sample their first tokens; they join the batch for the next step.

        Distinct prompts are prefilled together, left-padded, in one forward pass (eight
        prompts cost far less than eight passes, which is what makes the first token come
        early under load); a single one is prefilled alone, exactly as :class:`Generator`
        does. Requests with the same prompt (OpenAI ``n`` > 1) share one prefill: the others
        start from a copy of its cache and its logits, exactly what their own would be.
        """
        live = []
        for seq in seqs:
            if seq.cancel.is_set():
                self._finish(seq, "cancelled")
                continue
            seq.text = TextAssembler(self.gen.tokenizer, seq.request.stop)
            seq.grammar = self.gen.grammar_matcher(seq.request)
            live.append(seq)
        if not live:
            return
        groups: dict[tuple[int, ...], int] = {}
        for seq in live:
            groups.setdefault(tuple(seq.prompt_ids), len(groups))
        prompts = [list(key) for key in groups]
        if len(prompts) > 1 and self.batching:
            logits, cache, mask = self._prefill_together(prompts)
        else:  # one prompt (a model that cannot batch only ever gets one newcomer at a time)
            assert len(prompts) == 1, "newcomers with different prompts need a model that batches"
            logits, cache = self.gen._forward(prompts[0], None)
            logits, mask = logits.unsqueeze(0), torch.ones((1, len(prompts[0])), dtype=torch.long)
        rows = [groups[tuple(seq.prompt_ids)] for seq in live]
        self.gen._count_tokens(len(live) - len(prompts))  # the shared prefills' extra first tokens
        for seq, row in zip(live, rows):
            self._take(seq, logits[row])
        kept = [(seq, row) for seq, row in zip(live, rows) if not seq.done]
        if kept:
            self._join_rows([seq for seq, _ in kept], cache, mask, [row for _, row in kept])

    def _prefill_together(self, prompts: list[list[int]]) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """One forward pass over left-padded prompts; returns last-position logits, cache and mask."""
        gen = self.gen
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[p[0]] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        device = gen._device()
        kwargs: dict[str, Any] = {gen._cache_kw: None, "use_cache": True, "attention_mask": mask.to(device),
                                  "position_ids": positions.to(device)}
        if gen._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        with torch.inference_mode():
            out = gen.model(input_ids=ids.to(device), **kwargs)
        gen._count_tokens(len(prompts))
        return out.logits[:, -1], out[gen._cache_kw], mask

    def cancel_flagged(self) -> None:
        """Drop every row whose cancel flag is set (before a step: stop within one token)."""
        cancelled = [r for r in self.rows if r.cancel.is_set()]
        for row in cancelled:
            self._finish(row, "cancelled")
        if cancelled:
            self._keep([r for r in self.rows if not r.done])

    def abandon(self) -> list[BatchSequence]:
        """Forget every row without a callback (after a failed step: the caller reports the
        error to each); returns them."""
        rows = self.rows
        self._keep([])
        return rows

    # --- the step ----------------------------------------------------------------------

    def step(self) -> None:
        """One forward pass for every row, one token sampled per row; finished rows leave."""
        if not self.rows:
            return
        logits = self._forward()
        for i, row in enumerate(self.rows):
            self._take(row, logits[i])
        if any(r.done for r in self.rows):
            self._keep([r for r in self.rows if not r.done])

    def _forward(self) -> torch.Tensor:
        gen, rows = self.gen, self.rows
        assert self._mask is not None and self._positions is not None
        device = gen._device()
        input_ids = torch.tensor([[r.last_token] for r in rows], dtype=torch.long, device=device)
        kwargs: dict[str, Any] = {gen._cache_kw: self._cache, "use_cache": True}
        if gen._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        if not bool(self._mask.all()):  # padding: say where, and where each row really is
            kwargs["attention_mask"] = mask.to(device)
            kwargs["position_ids"] = self._positions.unsqueeze(1).to(device)
        with torch.inference_mode():
            out = gen.model(input_ids=input_ids, **kwargs)
        gen._count_tokens(len(rows))
        self._cache, self._mask, self._positions = out[gen._cache_kw], mask, self._positions + 1
        return out.logits[:, -1]

    def _take(self, seq: BatchSequence, logits: torch.Tensor) -> None:
        """Sample ``seq``'s next token from its logits and turn it into text (or an end).

        A constrained row masks its own logits row with its own grammar state, as
        :class:`Generator` does for one sequence; the other rows are not touched.
        """
        assert seq.text is not None
        if seq.grammar is not None:
            logits = seq.grammar.mask(logits)
        token = seq.sampler(logits)
        seq.clock.count()
        seq.sampler.observe([token])
        seq.last_token = token
        if token in self.gen.eos_token_ids:
            self._finish(seq, "eos")
            return
        if seq.grammar is not None:
            seq.grammar.advance(token)
        chunk = seq.text.push(token)
        if chunk is not None:
            self._on_chunk(seq, chunk)
        if seq.grammar is not None and seq.grammar.is_done():  # the document is whole: only EOS could follow
            self._finish(seq, "eos")
        elif seq.text.stopped:
            self._finish(seq, "stop")
        elif seq.clock.produced >= seq.request.max_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: BatchSequence, reason: StopReason) -> None:
        if reason in ("eos", "length") and seq.text is not None:
            chunk = seq.text.finish()
            if chunk is not None:
                self._on_chunk(seq, chunk)
            if seq.text.stopped:
                reason = "stop"
        seq.reason = reason
        self._on_done(seq, seq.clock.stats(reason))

    # --- the cache -----------------------------------------------------------------------

    def _join_rows(self, seqs: list[BatchSequence], cache: Any, mask: torch.Tensor, rows: list[int]) -> None:
        """Append ``seqs`` to the batch; sequence i takes row ``rows[i]`` of the prefill ``cache``
        (rows repeat for requests that shared a prompt: each gets its own copy)."""
        if rows != list(range(mask.shape[0])):
            index = torch.tensor(rows, dtype=torch.long)
            for layer in cache.layers:
                layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))
                layer.values = layer.values.index_select(0, index.to(layer.values.device))
            mask = mask[index]
        positions = torch.tensor([len(s.prompt_ids) for s in seqs], dtype=torch.long)
        if not self.rows:
            self._cache, self._mask, self._positions = cache, mask, positions
        else:
            assert self._mask is not None and self._positions is not None
            new = max(self._mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self._cache.layers, cache.layers):
                mine.keys = torch.cat([_left_pad(mine.keys, new), _left_pad(theirs.keys, new)])
                mine.values = torch.cat([_left_pad(mine.values, new), _left_pad(theirs.values, new)])
            self._mask = torch.cat([_left_pad(self._mask, new, dim=1), _left_pad(mask, new, dim=1)])
            self._positions = torch.cat([self._positions, positions])
        self.rows.extend(seqs)

    def _keep(self, keep: Sequence[BatchSequence]) -> None:
        """Cut the batch down to ``keep`` (its KV memory is freed) and trim all-padding columns."""
        if not keep:
            self.rows, self._cache, self._mask, self._positions = [], None, None, None
            return
        index = [self.rows.index(r) for r in keep]
        assert self._mask is not None and self._positions is not None
        mask = self._mask[index]
        lead = int(mask.any(dim=0).long().argmax())  # first column some row really uses
        device_index = torch.tensor(index, dtype=torch.long, device=self._cache.layers[0].keys.device)
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, device_index)[:, :, lead:]
            layer.values = layer.values.index_select(0, device_index)[:, :, lead:]
        self._mask, self._positions = mask[:, lead:], self._positions[index]
        self.rows = list(keep)

    @property
    def kv_slots(self) -> int:
        """Token slots the batched cache holds now (rows × width)."""
        return 0 if self._mask is None else int(self._mask.numel())


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def kv_bytes_per_token(model: Any) -> int:
    """Bytes one token's keys and values take over all layers (what a KV slot costs)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1)
    dtype = model.get_input_embeddings().weight.dtype  # activations (and the cache) use it, quantized or not
    return max(1, 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size())
