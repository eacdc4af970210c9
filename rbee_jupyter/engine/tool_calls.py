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
