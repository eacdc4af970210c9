"""Tool calls in generated text: find them, in the formats of the model families we load.

With ``tool_choice: "auto"`` the model decides whether to call; the call comes back as
text in its family's own format, and this module turns it into OpenAI's ``tool_calls``.
Text that is not a well-formed call stays text (a model may talk *about* JSON).

Formats:

* **Hermes** (Qwen2.5/3, SmolLM3, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  one block per call, text may come before.
* **Llama 3.x**: the whole answer is one JSON object ``{"name": ..., "parameters": {...}}``
  (``"arguments"`` also seen), optionally after ``<|python_tag|>``; several calls are
  separated by ``;``.

Pure functions, no model: the OpenAI layer calls :func:`parse_tool_calls` on the finished text.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ToolCall", "ParsedOutput", "parse_tool_calls", "parse_hermes", "parse_llama3"]

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolCall:
    """One call: the function's name and its arguments as a JSON text (OpenAI's shape)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedOutput:
    """The text that is not a call (None when there is none) and the calls found, in order."""

    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()


def _call(obj: Any, names: Collection[str] | None, keys: tuple[str, ...]) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if names is not None and obj["name"] not in names:
        return None
    args = next((obj[k] for k in keys if k in obj), {})
    if isinstance(args, str):  # some models send the arguments already as JSON text
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_hermes(text: str, names: Collection[str] | None = None) -> ParsedOutput | None:
    """``<tool_call>`` blocks; None when there is no block or one is not a valid call."""
    blocks = list(_HERMES.finditer(text))
    if not blocks:
        return None
    calls = []
    for block in blocks:
        try:
            obj = json.loads(block.group(1))
        except ValueError:
            return None
        call = _call(obj, names, ("arguments", "parameters"))
        if call is None:
            return None
        calls.append(call)
    content = text[:blocks[0].start()].strip()
    return ParsedOutput(content or None, tuple(calls))


def parse_llama3(text: str, names: Collection[str] | None = None) -> ParsedOutput | None:
    """The whole text as JSON call(s) (``;``-separated); None when it is anything else."""
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG):].strip()
    if not body.startswith("{"):
        return None
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except ValueError:
            return None
        call = _call(obj, names, ("parameters", "arguments"))
        if call is None:
            return None
        calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in " \t\r\n;":
            pos += 1
    return ParsedOutput(None, tuple(calls)) if calls else None


def parse_tool_calls(text: str, names: Collection[str] | None = None) -> ParsedOutput:
    """The calls in ``text`` (Hermes blocks, else a Llama 3.x JSON answer), or the text itself.

    Args:
        names: the functions offered in ``tools``; a call to any other name is not a call.
    """
    for parse in (parse_hermes, parse_llama3):
        found = parse(text, names)
        if found is not None:
            return found
    return ParsedOutput(text)


# --- tools and tool_choice of a request --------------------------------------------------------

@dataclass(frozen=True)
class ToolPlan:
    """How a chat request uses its tools.

    ``mode``: ``none`` (no tools, or ``tool_choice: "none"``), ``auto`` (the model decides; its
    text is parsed afterwards), ``required`` (a call to one of the tools, grammar-constrained
    to ``{"name", "arguments"}``) or ``named`` (``function``'s arguments, grammar-constrained).
    ``response_format`` is the grammar for the last two; ``tools`` what the chat template renders.
    """

    mode: str
    names: tuple[str, ...] = ()
    function: str | None = None
    tools: tuple[dict[str, Any], ...] = ()
    response_format: dict[str, Any] | None = None


def tool_plan(tools: Any, tool_choice: Any) -> ToolPlan:
    """Validate OpenAI's ``tools`` and ``tool_choice``; each mistake is a 400 naming the field.

    Raises:
        InvalidRequest: a malformed tool, or a ``tool_choice`` naming no offered function.
        InvalidSchema, UnsupportedSchema: a function's ``parameters`` (for the grammar).
    """
    from ..errors import InvalidRequest
    from .grammar import check_schema

    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice needs tools: send the functions in 'tools'.",
                                 details={"field": "tool_choice"})
        return ToolPlan("none")
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list of {\"type\": \"function\", \"function\": {...}}.",
                             details={"field": "tools"})
    defs: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise InvalidRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", "
                                 "\"parameters\"}}} with a name of 1-64 letters, digits, _ . -.",
                                 details={"field": "tools", "index": i})
        params = fn.get("parameters") or {"type": "object"}
        if not isinstance(params, dict):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON Schema object.",
                                 details={"field": "tools", "index": i})
        check_schema(params, field="tools")
        defs[name] = {**fn, "parameters": params}
    names = tuple(defs)
    template = tuple({"type": "function", "function": d} for d in defs.values())
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return ToolPlan("none", names)
    if choice == "auto":
        return ToolPlan("auto", names, tools=template)
    if choice == "required":
        envelope = {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "arguments": d["parameters"]},
                               "required": ["name", "arguments"], "additionalProperties": False}
                              for n, d in defs.items()]}
        return ToolPlan("required", names, tools=template, response_format=_json_schema("tool_call", envelope))
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise InvalidRequest("tool_choice must be \"none\", \"auto\", \"required\" or "
                             "{\"type\": \"function\", \"function\": {\"name\": ...}}.",
                             details={"field": "tool_choice"})
    if name not in defs:
        raise InvalidRequest(f"tool_choice names the function {name!r}, which is not in tools ({', '.join(names)}).",
                             details={"field": "tool_choice", "accepted": list(names)})
    return ToolPlan("named", names, name, template, _json_schema(name, defs[name]["parameters"]))


def _json_schema(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def forced_calls(plan: ToolPlan, text: str) -> tuple[ToolCall, ...]:
    """The call a ``required`` or ``named`` plan produced (its text is grammar-constrained JSON)."""
    if plan.mode == "named":  # the text is the arguments, exactly as they were streamed
        return (ToolCall(plan.function or "", text),)
    obj = json.loads(text)
    return (ToolCall(obj["name"], json.dumps(obj["arguments"], ensure_ascii=False)),)
