"""OpenAI's tool calls on chat completions: the request's fields, and the answer's shape.

The decisions live in ``engine/tool_calls.py`` (:func:`tool_plan`, the parsers); this
module only turns generated text into OpenAI's message and stream deltas:

* ``named``: every token is argument text (the grammar constrains it to the function's
  parameters), so it streams at once as ``tool_calls[0].function.arguments`` deltas.
* ``required`` / ``auto``: the text is held until the end (a call's name comes first in
  the envelope, and "auto" cannot know a call from prose before it is complete), then sent
  as calls (one delta with id and name, one with the arguments) or as content.
"""

from __future__ import annotations

from typing import Any

from ..engine.tool_calls import ToolCall, ToolPlan, forced_calls, parse_tool_calls, tool_plan

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
    """One answer's text, shaped by its plan: deltas while it streams, the message at the end."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._held: list[str] = []
        self._named_id: ToolCall | None = None

    @property
    def active(self) -> bool:
        return self.plan.mode != "none"

    def deltas(self, text: str) -> list[dict[str, Any]]:
        """What to stream for one piece of text (nothing while it is held)."""
        self._held.append(text)
        if self.plan.mode != "named":
            return []
        out = []
        if self._named_id is None:
            self._named_id = ToolCall(self.plan.function or "", "")
            out.append({"tool_calls": [{"index": 0, "id": self._named_id.id, "type": "function",
                                        "function": {"name": self._named_id.name, "arguments": ""}}]})
        out.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
        return out

    def calls(self) -> tuple[ToolCall, ...]:
        text = "".join(self._held)
        if self.plan.mode in ("named", "required"):
            try:
                calls = forced_calls(self.plan, text)
            except (ValueError, KeyError):  # cut by max_tokens: not a whole call
                return ()
            if self._named_id is not None:  # keep the id the stream already announced
                calls = (ToolCall(calls[0].name, calls[0].arguments, self._named_id.id),)
            return calls
        return parse_tool_calls(text, self.plan.names).tool_calls

    def final_deltas(self) -> tuple[list[dict[str, Any]], bool]:
        """What is left to stream at the end, and whether the answer is tool calls."""
        calls = self.calls()
        if self.plan.mode == "named":
            return [], True
        if not calls:
            text = "".join(self._held)
            return ([{"content": text}] if text else []), False
        out = []
        for i, call in enumerate(calls):
            out.append({"tool_calls": [{"index": i, "id": call.id, "type": "function",
                                        "function": {"name": call.name, "arguments": ""}}]})
            out.append({"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]})
        return out, True

    def message(self, text: str) -> tuple[dict[str, Any], bool]:
        """The non-streamed assistant message for ``text``, and whether it is tool calls."""
        self._held = [text]
        calls = self.calls()
        if not calls:
            return {"role": "assistant", "content": text}, False
        content = parse_tool_calls(text, self.plan.names).content if self.plan.mode == "auto" else None
        return {"role": "assistant", "content": content, "tool_calls": [c.to_openai() for c in calls]}, True
