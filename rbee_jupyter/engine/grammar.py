"""Constrained decoding: ``response_format`` → a grammar → a per-sequence token mask.

Why a grammar engine, not a prompt: with the mask applied before sampling, every token
the model can pick keeps the text a prefix of a JSON document that validates against the
schema, so the output parses on every run, even from a model with random weights.

The engine is xgrammar (chosen over llguidance and outlines-core: on this machine's CPU it
compiled the test schemas in 1-8 ms and masked SmolLM2's 49152-token vocabulary in
0.03-0.35 ms per token, against 2-300 ms per token for llguidance; both compiled the same
schema features. ``bench/RESULTS.md`` has the numbers).

Three layers, each usable alone:

* :class:`~rbee_jupyter.response_format.ResponseFormat` — the request's ``response_format``,
  parsed and checked without torch or the engine (``rbee_jupyter/response_format.py``).
* :class:`GrammarCompiler` — one per tokenizer (per worker); compiles (and caches) a format.
* :class:`GrammarMatcher` — one per sequence (per batch row): ``mask(logits_row)`` before
  sampling, ``advance(token_id)`` after, ``is_done()`` once the document is complete.
  For a batch, :meth:`GrammarMatcher.fill` writes each row's mask into one shared bitmask
  and :func:`apply_bitmask` masks every constrained row in one call.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from ..errors import RbeeError, UnsupportedSchema
from ..response_format import SUPPORTED_KEYWORDS, ResponseFormat, check_schema

__all__ = ["ResponseFormat", "GrammarCompiler", "GrammarMatcher", "apply_bitmask", "allocate_bitmask",
           "SUPPORTED_KEYWORDS", "check_schema"]

# --- the engine ------------------------------------------------------------------------------

class GrammarCompiler:
    """Compiles response formats for one tokenizer; compiled grammars are cached (thread-safe).

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        vocab_size: the width of the model's logits (may exceed ``len(tokenizer)``).
        stop_token_ids: the ids that end generation (the generator's EOS set).
    """

    def __init__(self, tokenizer: Any, *, vocab_size: int, stop_token_ids: Sequence[int] = (),
                 cache_size: int = 64) -> None:
        import xgrammar as xgr

        stops = [int(t) for t in stop_token_ids if 0 <= int(t) < vocab_size] or None
        self.vocab_size = vocab_size
        self._info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
        self._compiler = xgr.GrammarCompiler(self._info, max_threads=2, cache_limit_bytes=cache_size << 20)
        self._lock = threading.Lock()
        self._xgr = xgr

    def compile(self, fmt: ResponseFormat) -> Any:
        """The compiled grammar (cached by schema text).

        Raises:
            UnsupportedSchema: the engine refused the schema (e.g. a regex feature it lacks).
        """
        try:
            with self._lock:
                grammar = self._xgr.Grammar.from_json_schema(fmt.key, any_whitespace=False, strict_mode=True)
                return self._compiler.compile_grammar(_json_strings_without_control_chars(str(grammar)))
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1]
            reason = reason.split(": ", 1)[-1] if "/cpp/" in reason else reason
            raise UnsupportedSchema(f"response_format: the grammar engine cannot compile this schema: {reason}",
                                    details={"field": "response_format", "reason": reason}) from None

    def matcher(self, fmt: ResponseFormat) -> GrammarMatcher:
        """A fresh per-sequence matcher for ``fmt``."""
        return GrammarMatcher(self.compile(fmt), self.vocab_size)


# xgrammar 0.2 writes the characters of a length-bounded string as [^"\\\r\n], which lets raw
# control characters (U+0000-U+001F) into a JSON string, where JSON forbids them (json.loads
# refuses the document). Its unbounded strings already exclude them; make the bounded ones agree.
_LOOSE_CHAR = r'[^\"\\\r\n]'
_JSON_CHAR = r'[^\0-\x1f\"\\\r\n]'


def _json_strings_without_control_chars(ebnf: str) -> str:
    return ebnf.replace(_LOOSE_CHAR, _JSON_CHAR)


class GrammarMatcher:
    """The grammar state of one sequence. Not thread-safe: one sequence, one thread at a time."""

    def __init__(self, compiled: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self.vocab_size = vocab_size
        self._matcher = xgr.GrammarMatcher(compiled)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def fill(self, bitmask: Any, row: int) -> None:
        """Write this sequence's allowed tokens into ``bitmask[row]`` (a batch's shared bitmask)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def mask(self, logits_row: Any) -> Any:
        """The row with every token the grammar forbids now at -inf (in place when it is float32)."""
        import torch

        if logits_row.dtype != torch.float32 or logits_row.device.type != "cpu":
            logits_row = logits_row.float().cpu()
        self.fill(self._bitmask, 0)
        apply_bitmask(logits_row.unsqueeze(0), self._bitmask, self.vocab_size)
        return logits_row

    def advance(self, token_id: int) -> None:
        """Feed the token that was sampled (one that :meth:`mask` allowed)."""
        if not self._matcher.accept_token(int(token_id)):
            raise RbeeError(f"The grammar rejected token {token_id}: the mask was not applied before sampling.",
                            code="GRAMMAR_VIOLATION")

    def is_done(self) -> bool:
        """True once the document is complete and nothing but a stop token could follow.

        (A complete document may still go on, e.g. the number ``12`` at the root: then the
        sequence continues until the model picks a stop token or a limit ends it.)
        """
        if self._matcher.is_terminated():
            return True
        if not self._matcher.is_completed():
            return False
        self.fill(self._bitmask, 0)
        allowed = self._bitmask[0].clone()
        for stop in self._matcher.stop_token_ids:
            if 0 <= stop < self.vocab_size:
                allowed[stop // 32] &= ~(1 << (stop % 32))
        return not bool(allowed.any())


def allocate_bitmask(rows: int, vocab_size: int) -> Any:
    """A bitmask for ``rows`` sequences (CPU int32, one bit per token), for :meth:`GrammarMatcher.fill`."""
    import xgrammar as xgr

    return xgr.allocate_token_bitmask(rows, vocab_size)


def apply_bitmask(logits: Any, bitmask: Any, vocab_size: int, rows: Sequence[int] | None = None) -> None:
    """Mask ``logits`` (batch × width) in place with ``bitmask``; only ``rows`` when given.

    Logits wider than the grammar's vocabulary (padded heads) get -inf beyond it.
    """
    import xgrammar as xgr

    width = logits.shape[-1]
    view = logits[..., :vocab_size] if width > vocab_size else logits
    mask = bitmask if bitmask.device == logits.device else bitmask.to(logits.device)
    xgr.apply_token_bitmask_inplace(view, mask, indices=list(rows) if rows is not None else None)
    if width > vocab_size:
        for r in rows if rows is not None else range(logits.shape[0]):
            logits[r, vocab_size:] = float("-inf")
