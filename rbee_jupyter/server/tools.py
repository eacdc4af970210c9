"""OpenAI's tool calls on chat completions: the request's fields, and the answer's shape.

The decisions live in ``engine/tool_calls.py`` (:func:`tool_plan`, :class:`ToolCallParser`);
this module only turns one choice's generated text into OpenAI's stream deltas and message:

* ``named``: every token is argument text (the grammar constrains it to the function's
  parameters), so it streams at once as ``tool_calls[0].function.arguments`` deltas.
* ``auto`` / ``required``: the text goes through the incremental parser, so content streams
  as ``content`` deltas, and a call as its id and name, then its arguments. ``required`` is
  grammar-constrained to a ``{"name", "arguments"}`` object; the grammar writes its keys
  sorted, arguments first, so that call is held until its object closes, then sent whole.

The non-streamed message is the fold of the very same pieces, so a stream's joined deltas
equal the message of the same generation.
"""

from __future__ import annotations

from typing import Any

from ..engine.tool_calls import Arguments, CallStart, Content, ToolCall, ToolCallParser, ToolPlan, assemble, tool_plan

__all__ = ["ToolAnswer", "tool_fields"]


def tool_fields(body: dict[str, Any]) -> tuple[ToolPlan, dict[str, Any]]:
    """The plan, and the fields it adds to the hive's request (``tools``, and the grammar)."""
    plan = tool_plan(body.get("tools"), body.get("tool_choice"))
    fields: dict[str, Any] = {}
    if plan.tools:
        fields["tools"] = list(plan.tools)
    if plan.response_format is not None:
        if body.get("response_format") not in (None, {"type": "text"}):
            from ..errors import InvalidRequest

            raise InvalidRequest("A forced tool call ('required' or a named function) and response_format cannot be "
                                 "combined: the call's arguments already follow the function's schema.",
                                 details={"field": "response_format"})
        fields["response_format"] = plan.response_format
    return plan, fields


class ToolAnswer:
    """One choice's text, shaped by its plan: deltas while it streams, the message at the end.

    One per choice (``n > 1`` gets ``n``): each has its own parser state and call ids.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._parser = (ToolCallParser(plan.names, forced=plan.mode == "required")
                        if plan.mode in ("auto", "required") else None)
        self._pieces: list[Any] = []

    @property
    def active(self) -> bool:
        return self.plan.mode != "none"

    def deltas(self, text: str) -> list[dict[str, Any]]:
        """What to stream for one piece of text (nothing while the parser holds it)."""
        if self._parser is not None:
            pieces = self._parser.feed(text)
        else:  # named: the text is the arguments
            pieces = [] if self._pieces else [CallStart(0, ToolCall(self.plan.function or "", ""))]
            pieces.append(Arguments(0, text))
        self._pieces += pieces
        return [_delta(p) for p in pieces]

    def final_deltas(self) -> tuple[list[dict[str, Any]], bool]:
        """What is left to stream at the end, and whether the answer is tool calls."""
        pieces = self._parser.finish() if self._parser is not None else []
        self._pieces += pieces
        return [_delta(p) for p in pieces], any(isinstance(p, CallStart) for p in self._pieces)

    def message(self, text: str) -> tuple[dict[str, Any], bool]:
        """The non-streamed assistant message for ``text``, and whether it is tool calls."""
        if not self.active:
            return {"role": "assistant", "content": text}, False
        if text:
            self.deltas(text)
        _, is_call = self.final_deltas()
        parsed = assemble(self._pieces)
        if not is_call:
            return {"role": "assistant", "content": parsed.content or ""}, False
        return {"role": "assistant", "content": parsed.content,
                "tool_calls": [c.to_openai() for c in parsed.tool_calls]}, True


def _delta(piece: Content | CallStart | Arguments) -> dict[str, Any]:
    """OpenAI's ``delta`` for one piece."""
    if isinstance(piece, Content):
        return {"content": piece.text}
    if isinstance(piece, CallStart):
        return {"tool_calls": [{"index": piece.index, "id": piece.call.id, "type": "function",
                                "function": {"name": piece.call.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": piece.index, "function": {"arguments": piece.text}}]}
