"""``response_format`` of a chat request: parsed and checked without torch or the grammar engine.

The hive refuses a bad schema before a worker is asked; the worker's grammar
(``engine/grammar.py``) then enforces what passed. xgrammar silently *ignores* some
keywords (``not``, ``uniqueItems``, ``multipleOf``...), which would let output through that
the schema forbids; those are refused here with ``UNSUPPORTED_SCHEMA`` naming the keyword
and where it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequest, InvalidSchema, UnsupportedSchema

__all__ = ["ResponseFormat", "check_schema", "SUPPORTED_KEYWORDS"]

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

    def to_json(self) -> dict[str, Any]:
        """OpenAI's shape again (what :meth:`from_json` reads back as this format)."""
        if self.type == "json_object":
            return {"type": "json_object"}
        return {"type": "json_schema",
                "json_schema": {"name": self.name or "answer", "schema": dict(self.schema or {})}}

    @property
    def key(self) -> str:
        """The schema's text, for the grammar and its cache.

        Not sorted: the grammar writes an object's properties in the order the schema lists them,
        as OpenAI's structured outputs do, and a caller's code (or eye) may rely on that order.
        """
        return json.dumps(self.schema, separators=(",", ":"))


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
