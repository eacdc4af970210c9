"""Tool calls in generated text: find them while the text streams, in the formats of the families we load.

With ``tool_choice: "auto"`` the model decides whether to call; the call comes back as
text in its family's own format, and this module turns it into OpenAI's ``tool_calls``.
Text that is not a well-formed call stays text (a model may talk *about* JSON).

Formats:

* **Hermes** (Qwen2.5/3, SmolLM3, Hermes): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  one block per call, anywhere in the answer.
* **Llama 3.x**: the answer is JSON call(s) ``{"name": ..., "parameters": {...}}`` (``"arguments"``
  also seen), optionally after ``<|python_tag|>``, several separated by ``;``.

:class:`ToolCallParser` reads the answer piece by piece, as tokens arrive, and says at once
what each piece is: content, the start of a call (its id and name), or a piece of the call's
arguments. Text is held back only while it could still open a call (a partial ``<tool_``, an
answer that starts ``{"na``); a call's arguments stream as their JSON arrives. The
non-streamed answer is the same parser fed the whole text (:func:`parse_tool_calls`), so the
joined deltas of a stream always equal the message of the same generation.

Rules both paths share: whitespace (and ``;`` between calls) right before a call or at the
end of an answer that has calls is dropped; the arguments are the model's own JSON text; a
call's start is announced only once its name is known and offered, and its arguments open
with ``{``; other shapes (arguments as a JSON string, keys in another order) are held until
their object closes and then parsed whole. A call cut short (``max_tokens``) stays a call
with the arguments streamed so far, as OpenAI's ``finish_reason: "length"`` does.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ToolCall", "ParsedOutput", "ToolCallParser", "Content", "CallStart", "Arguments", "parse_tool_calls",
           "assemble"]

_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_PYTHON_TAG = "<|python_tag|>"
_WS = " \t\r\n"


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


@dataclass(frozen=True)
class Content:
    """Answer text that is not a call."""

    text: str


@dataclass(frozen=True)
class CallStart:
    """Call number ``index`` begins: its id and name (``call.arguments`` is empty)."""

    index: int
    call: ToolCall


@dataclass(frozen=True)
class Arguments:
    """A piece of call ``index``'s arguments JSON."""

    index: int
    text: str


Piece = Content | CallStart | Arguments


class _JsonEnd:
    """Where a JSON object closes, fed in pieces: bracket depth, aware of strings and escapes."""

    def __init__(self, depth: int = 0) -> None:
        self.depth, self.in_string, self.escaped = depth, False, False

    def feed(self, text: str, start: int = 0) -> int:
        """The index just after the closing bracket in ``text``, or -1 while it is still open."""
        for k in range(start, len(text)):
            c = text[k]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return k + 1
        return -1


# What the head of a call (``{"name": "f", "arguments": ``) says so far.
_MORE, _FAIL, _OTHER, _OBJECT, _EMPTY = range(5)
_NEED, _MISMATCH = -1, -2


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def _literal(s: str, i: int, lit: str) -> int:
    """The index after ``lit`` at ``i``; ``_NEED`` when ``s`` ends inside it; ``_MISMATCH``."""
    part = s[i:i + len(lit)]
    if not lit.startswith(part):
        return _MISMATCH
    return i + len(lit) if len(part) == len(lit) else _NEED


def _value_after_colon(s: str, i: int) -> int:
    """The index of the value after the ``:`` that follows ``i`` (whitespace around it skipped);
    ``_NEED`` while ``s`` ends before the value, ``_MISMATCH`` when there is no colon."""
    r = _literal(s, _skip_ws(s, i), ":")
    if r < 0:
        return r
    i = _skip_ws(s, r)
    return i if i < len(s) else _NEED


def _string_end(s: str, i: int) -> int:
    """The index after the JSON string that opens at ``s[i]``, or -1 while it is open."""
    escaped = False
    for k in range(i + 1, len(s)):
        if escaped:
            escaped = False
        elif s[k] == "\\":
            escaped = True
        elif s[k] == '"':
            return k + 1
    return -1


def _match_head(s: str, names: Collection[str] | None) -> tuple[int, str | None, int]:
    """Match ``{"name": "NAME", "arguments"|"parameters": {`` (JSON whitespace anywhere) on ``s``.

    Returns ``(status, name, index)``: ``_OBJECT`` with the index of the arguments' ``{``,
    ``_EMPTY`` (``{"name": "f"}``) with the index after its ``}``, ``_MORE`` (undecided yet),
    ``_FAIL`` (not a call), or ``_OTHER`` (maybe a call in another shape: parse it whole).
    """
    i = _skip_ws(s, 0)
    if i == len(s):
        return _MORE, None, 0
    if s[i] != "{":
        return _FAIL, None, 0
    i = _skip_ws(s, i + 1)
    r = _literal(s, i, '"name"')
    if r < 0:
        return (_MORE if r == _NEED else _OTHER), None, 0
    i = _value_after_colon(s, r)
    if i < 0:
        return (_MORE if i == _NEED else _FAIL), None, 0
    if s[i] != '"':
        return _FAIL, None, 0
    end = _string_end(s, i)
    if end < 0:
        return _MORE, None, 0
    try:
        name = json.loads(s[i:end])
    except ValueError:
        return _FAIL, None, 0
    if names is not None and name not in names:
        return _FAIL, None, 0
    i = _skip_ws(s, end)
    if i == len(s):
        return _MORE, name, 0
    if s[i] == "}":
        return _EMPTY, name, i + 1
    if s[i] != ",":
        return _FAIL, name, 0
    i = _skip_ws(s, i + 1)
    keys = [_literal(s, i, '"arguments"'), _literal(s, i, '"parameters"')]
    if _NEED in keys:
        return _MORE, name, 0
    if max(keys) < 0:
        return _OTHER, name, 0
    i = _value_after_colon(s, max(keys))
    if i < 0:
        return (_MORE if i == _NEED else _FAIL), name, 0
    return (_OBJECT, name, i) if s[i] == "{" else (_OTHER, name, 0)


def _whole_call(text: str, names: Collection[str] | None) -> ToolCall | None:
    """A call object in a shape the streaming head does not follow, parsed whole (or None)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if names is not None and obj["name"] not in names:
        return None
    args = next((obj[k] for k in ("arguments", "parameters") if k in obj), {})
    if isinstance(args, str):  # some models send the arguments already as JSON text
        try:
            if isinstance(json.loads(args), dict):
                return ToolCall(obj["name"], args)
        except ValueError:
            pass
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False)) if isinstance(args, dict) else None


class ToolCallParser:
    """Incremental tool-call parser for one answer: :meth:`feed` each piece, then :meth:`finish`.

    Each call returns the pieces decided so far (:class:`Content`, :class:`CallStart`,
    :class:`Arguments`), in order. Not thread-safe; one parser per answer (per choice).

    Args:
        names: the functions offered in ``tools``; a call to any other name is text.
        forced: the answer is a grammar-constrained call object (``tool_choice: "required"``),
            whose keys may come in any order (the grammar sorts them: ``arguments`` before
            ``name``); one that does not open with its name is parsed whole once it closes.
    """

    def __init__(self, names: Collection[str] | None = None, *, forced: bool = False) -> None:
        self.names = frozenset(names) if names is not None else None
        self.forced = forced
        self._buf = ""  # received and not yet decided
        self._pending = ""  # whitespace, ';' or <|python_tag|>: dropped if a call follows, else text
        self._state = "text"  # text | head | whole | args | tail | extra | close
        self._boundary = True  # at the start or right after a call: a bare '{' may open a call
        self._marker = ""  # what opened the candidate call: '<tool_call>', or '' for a bare '{'
        self._scan = _JsonEnd()
        self._scanned = 0
        self._calls = 0
        self._out: list[Piece] = []

    def feed(self, text: str) -> list[Piece]:
        """The pieces that ``text`` (the next piece of the answer) decides."""
        self._buf += text
        while self._step(final=False):
            pass
        return self._take()

    def finish(self) -> list[Piece]:
        """The answer is complete: decide everything still held."""
        while self._step(final=True):
            pass
        if self._pending and not self._calls:
            self._out.append(Content(self._pending))
        self._pending = self._buf = ""
        return self._take()

    def _take(self) -> list[Piece]:
        """The pieces decided since the last call, neighbours of one kind joined (fewer deltas)."""
        out: list[Piece] = []
        for piece in self._out:
            last = out[-1] if out else None
            if isinstance(piece, Content) and isinstance(last, Content):
                out[-1] = Content(last.text + piece.text)
            elif isinstance(piece, Arguments) and isinstance(last, Arguments) and last.index == piece.index:
                out[-1] = Arguments(piece.index, last.text + piece.text)
            else:
                out.append(piece)
        self._out = []
        return out

    # --- states: each step returns whether it made progress --------------------------------

    def _step(self, final: bool) -> bool:
        return getattr(self, f"_{self._state}")(final)

    def _text(self, final: bool) -> bool:
        s = self._buf
        if self._boundary:
            i = 0
            while i < len(s) and (s[i] in _WS or (s[i] == ";" and self._calls)):
                i += 1
            if s.startswith(_PYTHON_TAG, i):
                i += len(_PYTHON_TAG)
            if i:
                self._pending += s[:i]
                self._buf = s[i:]
                return True
            if not s:
                return False
            if s[0] == "{":
                return self._open("")
            if _PYTHON_TAG.startswith(s) and not final:
                return False
        k = s.find(_HERMES_OPEN)
        if k >= 0:
            self._content(s[:k])
            self._buf = s[k:]
            return self._open(_HERMES_OPEN)
        keep = 0 if final else next((n for n in range(min(len(s), len(_HERMES_OPEN) - 1), 0, -1)
                                     if _HERMES_OPEN.startswith(s[-n:])), 0)
        self._content(s[:len(s) - keep])
        self._buf = s[len(s) - keep:]
        return False

    def _open(self, marker: str) -> bool:
        self._marker, self._buf, self._state = marker, self._buf[len(marker):], "head"
        return True

    def _head(self, final: bool) -> bool:
        status, name, i = _match_head(self._buf, self.names)
        if status == _MORE and not final:
            return False
        if status == _OBJECT:
            self._start(name or "")
            self._buf, self._scan, self._state = self._buf[i:], _JsonEnd(), "args"
        elif status == _EMPTY:
            self._start(name or "")
            self._out.append(Arguments(self._calls, "{}"))
            self._buf = self._buf[i:]
            self._ended()
        elif status == _OTHER and (self._marker or name is not None or self.forced):
            self._scan, self._scanned, self._state = _JsonEnd(), _skip_ws(self._buf, 0), "whole"
        else:
            self._not_a_call()
        return True

    def _whole(self, final: bool) -> bool:
        start = _skip_ws(self._buf, 0)
        end = self._scan.feed(self._buf, self._scanned)
        self._scanned = len(self._buf)
        if end < 0 and not final:
            return False
        call = _whole_call(self._buf[start:end], self.names) if end >= 0 else None
        if call is None:
            self._not_a_call()
            return True
        self._start(call.name, call.id)
        self._out.append(Arguments(self._calls, call.arguments))
        self._buf = self._buf[end:]
        self._ended()
        return True

    def _args(self, final: bool) -> bool:
        end = self._scan.feed(self._buf)
        piece = self._buf if end < 0 else self._buf[:end]
        if piece:
            self._out.append(Arguments(self._calls, piece))
        self._buf = self._buf[len(piece):]
        if end < 0:
            return False
        self._state = "tail"
        return True

    def _tail(self, final: bool) -> bool:
        """After the arguments: the envelope's ``}`` (or more keys, skipped), then the call is done."""
        i = _skip_ws(self._buf, 0)
        if i == len(self._buf):
            return False
        if self._buf[i] == ",":
            self._buf, self._scan, self._state = self._buf[i + 1:], _JsonEnd(depth=1), "extra"
            return True
        self._buf = self._buf[i + 1:] if self._buf[i] == "}" else self._buf[i:]
        self._ended()
        return True

    def _extra(self, final: bool) -> bool:
        end = self._scan.feed(self._buf)
        if end < 0:
            self._buf = ""
            return False
        self._buf = self._buf[end:]
        self._ended()
        return True

    def _close(self, final: bool) -> bool:
        """After a Hermes call: its ``</tool_call>`` is dropped (so is a partial one at the end)."""
        i = _skip_ws(self._buf, 0)
        r = _literal(self._buf, i, _HERMES_CLOSE)
        if r == _NEED or i == len(self._buf):
            if not final:
                return False
            r = len(self._buf)
        if r >= 0:
            self._buf = self._buf[r:]
        self._state, self._boundary = "text", True
        return True

    # --- transitions -----------------------------------------------------------------------

    def _content(self, text: str) -> None:
        """Text that is not a call; its trailing whitespace waits (a call may come next)."""
        body = text.rstrip(_WS)
        if body:
            self._out.append(Content(self._pending + body))
            self._pending, self._boundary = text[len(body):], False
        else:
            self._pending += text

    def _not_a_call(self) -> None:
        """The candidate was not a call: its opening is text, and the rest is read again as text."""
        opening = self._marker or self._buf[:1]
        self._buf = self._buf[len(opening):] if not self._marker else self._buf
        self._state = "text"
        self._content(opening)
        self._boundary = False

    def _start(self, name: str, call_id: str | None = None) -> None:
        self._pending = ""
        call = ToolCall(name, "") if call_id is None else ToolCall(name, "", call_id)
        self._out.append(CallStart(self._calls, call))

    def _ended(self) -> None:
        self._calls += 1
        self._state = "close" if self._marker else "text"
        self._boundary = True


def assemble(pieces: Iterable[Piece]) -> ParsedOutput:
    """The message the pieces make: content joined (None when empty and there are calls), calls in order."""
    text: list[str] = []
    calls: dict[int, list[Any]] = {}
    for piece in pieces:
        if isinstance(piece, Content):
            text.append(piece.text)
        elif isinstance(piece, CallStart):
            calls[piece.index] = [piece.call, []]
        else:
            calls[piece.index][1].append(piece.text)
    found = tuple(ToolCall(c.name, "".join(args), c.id) for c, args in calls.values())
    content = "".join(text)
    return ParsedOutput(content or None if found else content, found)


def parse_tool_calls(text: str, names: Collection[str] | None = None) -> ParsedOutput:
    """The calls in a finished answer, and its other text: :class:`ToolCallParser` fed it whole.

    Args:
        names: the functions offered in ``tools``; a call to any other name is not a call.
    """
    parser = ToolCallParser(names)
    return assemble([*parser.feed(text), *parser.finish()])


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
