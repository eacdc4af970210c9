"""Constrained decoding: ``response_format`` → a grammar → a per-sequence token mask.

Why a grammar engine, not a prompt: with the mask applied before sampling, every token
the model can pick keeps the text a prefix of a JSON document that validates against the
schema, so the output parses on every run, even from a model with random weights.

The engine is xgrammar (chosen over llguidance and outlines-core: on this machine's CPU it
compiled the test schemas in 1-8 ms and masked SmolLM2's 49152-token vocabulary in
0.03-0.35 ms per token, against 2-300 ms per token for llguidance; both compiled the same
schema features. ``bench/RESULTS.md`` has the numbers).

Three layers, each usable alone:

* :class:`ResponseFormat` — parse and check the request's ``response_format`` without
  importing torch or the engine (the hive refuses a bad schema before a worker is asked).
  xgrammar silently *ignores* some keywords (``not``, ``uniqueItems``, ``multipleOf``...),
  which would let output through that the schema forbids; those are refused with
  ``UNSUPPORTED_SCHEMA`` naming the keyword and where it is.
* :class:`GrammarCompiler` — one per tokenizer (per worker); compiles (and caches) a format.
* :class:`GrammarMatcher` — one per sequence (per batch row): ``mask(logits_row)`` before
  sampling, ``advance(token_id)`` after, ``is_done()`` once the document is complete.
  For a batch, :meth:`GrammarMatcher.fill` writes each row's mask into one shared bitmask
  and :func:`apply_bitmask` masks every constrained row in one call.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequest, InvalidSchema, RbeeError, UnsupportedSchema

__all__ = ["ResponseFormat", "GrammarCompiler", "GrammarMatcher", "apply_bitmask", "allocate_bitmask",
           "SUPPORTED_KEYWORDS"]

#: Keywords the grammar enforces, or annotations that constrain nothing.
SUPPORTED_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "$ref", "$defs", "definitions", "minimum", "maximum", "exclusiveMinimum",
    "exclusiveMaximum", "minLength", "maxLength", "pattern", "format",
    # annotations
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
    "writeOnly",
})
_FORMATS = frozenset({"date", "time", "date-time", "duration", "email", "uuid", "ipv4", "ipv6", "hostname", "uri",
                      "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"})
_SCHEMA_MAPS = ("properties", "$defs", "definitions")  # name → subschema
_SCHEMA_LISTS = ("anyOf", "prefixItems")  # list of subschemas
_SCHEMA_ONE = ("items", "additionalProperties")  # a subschema (or a boolean)


@dataclass(frozen=True)
class ResponseFormat:
    """A checked ``response_format``: ``json_object`` (any object) or ``json_schema`` with its schema."""

    type: str
    schema: Mapping[str, Any] | None = None
    name: str | None = None

    @classmethod
    def from_json(cls, value: Any, *, field: str = "response_format") -> ResponseFormat | None:
        """Parse OpenAI's shape; ``None`` for ``{"type": "text"}`` or no value.

        Raises:
            InvalidRequest: not OpenAI's shape.
            InvalidSchema: ``json_schema.schema`` is not a valid JSON Schema.
            UnsupportedSchema: it uses a keyword the grammar cannot enforce.
        """
        if value is None:
            return None
        kind = value.get("type") if isinstance(value, Mapping) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return cls("json_object", {"type": "object"})
        if kind != "json_schema":
            raise InvalidRequest(f"{field} must be {{\"type\": \"text\"}}, {{\"type\": \"json_object\"}} or "
                                 f"{{\"type\": \"json_schema\", \"json_schema\": {{\"name\", \"schema\"}}}}.",
                                 details={"field": field})
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise InvalidSchema(f"{field}.json_schema.schema must be a JSON Schema object.",
                                details={"field": field})
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            raise InvalidRequest(f"{field}.json_schema.name must be a string.", details={"field": field})
        check_schema(schema, field=field)
        return cls("json_schema", schema, name)

    @property
    def key(self) -> str:
        """A stable text form, for caches."""
        return json.dumps(self.schema, sort_keys=True, separators=(",", ":"))


def check_schema(schema: Mapping[str, Any], *, field: str = "response_format") -> None:
    """Refuse a schema that is invalid, or valid but not fully enforceable by the grammar."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise InvalidSchema(f"{field}: the schema is not a valid JSON Schema at {where}: {exc.message}",
                            details={"field": field, "path": where}) from None
    for path, node in _subschemas(schema, ""):
        for key in node:
            if key not in SUPPORTED_KEYWORDS:
                raise _unsupported(field, path, key, f"the keyword {key!r}")
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            raise _unsupported(field, path, "$ref", f"the remote reference {ref!r} (only local '#/...' ones)")
        fmt = node.get("format")
        if fmt is not None and fmt not in _FORMATS:
            raise _unsupported(field, path, "format", f"the format {fmt!r}")


def _unsupported(field: str, path: str, keyword: str, what: str) -> UnsupportedSchema:
    return UnsupportedSchema(f"{field}: {what} at {path or '(root)'} cannot be enforced by constrained decoding; "
                             f"supported keywords: {', '.join(sorted(SUPPORTED_KEYWORDS))}.",
                             details={"field": field, "keyword": keyword, "path": path or "(root)"})


def _subschemas(node: Any, path: str) -> Iterable[tuple[str, Mapping[str, Any]]]:
    if not isinstance(node, Mapping):
        return
    yield path, node
    for key in _SCHEMA_MAPS:
        for name, sub in (node.get(key) or {}).items() if isinstance(node.get(key), Mapping) else ():
            yield from _subschemas(sub, f"{path}/{key}/{name}")
    for key in _SCHEMA_LISTS:
        for i, sub in enumerate(node.get(key) or []) if isinstance(node.get(key), list) else ():
            yield from _subschemas(sub, f"{path}/{key}/{i}")
    for key in _SCHEMA_ONE:
        yield from _subschemas(node.get(key), f"{path}/{key}")


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
