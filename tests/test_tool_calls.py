"""Tool-call parsing on fixed model outputs (the "auto" tool choice), one family format at a time."""

import json

import pytest

from rbee_jupyter.engine.tool_calls import ParsedOutput, parse_tool_calls

NAMES = {"get_weather", "add"}


def calls(parsed: ParsedOutput) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


def test_hermes_one_call_with_text_before():
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
    parsed = parse_tool_calls(text, NAMES)
    assert parsed.content == "Let me look."
    assert calls(parsed) == [("get_weather", {"city": "Zürich"})]
    call = parsed.tool_calls[0].to_openai()
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"city": "Zürich"}


def test_hermes_two_calls_and_an_unclosed_last_block():
    text = ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}')  # EOS before the close
    parsed = parse_tool_calls(text, NAMES)
    assert parsed.content is None
    assert calls(parsed) == [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Oslo"})]
    assert len({c.id for c in parsed.tool_calls}) == 2


def test_llama3_json_call_with_and_without_python_tag():
    for text in ('{"name": "get_weather", "parameters": {"city": "Lima"}}',
                 '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}'):
        parsed = parse_tool_calls(text, NAMES)
        assert parsed.content is None and calls(parsed) == [("get_weather", {"city": "Lima"})]


def test_llama3_several_calls_separated_by_semicolons():
    text = '{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "add", "arguments": {"a": 3, "b": 4}}'
    assert calls(parse_tool_calls(text, NAMES)) == [("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})]


@pytest.mark.parametrize("text", [
    "The weather is fine.",
    '{"answer": 42}',  # JSON, but not a call
    '{"name": "rm_rf", "parameters": {}}',  # a function that was not offered
    '{"name": "add", "parameters": {"a": 1}} and then some prose',
    "<tool_call>not json</tool_call>",
    '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',  # arguments must be an object
    'Use {"name": "add"} like this.',
])
def test_text_that_is_not_a_call_stays_text(text):
    parsed = parse_tool_calls(text, NAMES)
    assert parsed.content == text and parsed.tool_calls == ()
