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


# --- through the server, with a random model: forced calls are grammar-constrained -----------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                                                         "maximum": 99},
                                                                   "b": {"type": "integer", "minimum": 0,
                                                                         "maximum": 99}},
                                  "required": ["a", "b"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Weather in Bern?"}]


@pytest.fixture
def client(openai_client, rbee_worker):
    return openai_client


def test_a_named_call_streams_argument_deltas_then_a_tool_message_round_trip(client):
    import jsonschema

    from rbee_jupyter.testing.pytest_plugin import TINY_REPO

    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=TINY_REPO, messages=ASK, tools=[WEATHER, ADD], tool_choice=named,
                                       max_tokens=100, temperature=1.0, seed=5)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    chunks = list(client.chat.completions.create(model=TINY_REPO, messages=ASK, tools=[WEATHER, ADD],
                                                 tool_choice=named, max_tokens=100, temperature=1.0, seed=5,
                                                 stream=True))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) > 2 and deltas[0].id and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 for d in deltas)
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments  # same seed, same call
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    follow_up = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    answer = client.chat.completions.create(model=TINY_REPO, messages=follow_up, tools=[WEATHER], max_tokens=8,
                                            temperature=0)
    assert answer.choices[0].message.role == "assistant" and answer.usage.prompt_tokens > r.usage.prompt_tokens


def test_required_calls_one_of_the_tools_with_valid_arguments(client):
    import jsonschema

    from rbee_jupyter.testing.pytest_plugin import TINY_REPO

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
    for seed in range(4):
        r = client.chat.completions.create(model=TINY_REPO, messages=ASK, tools=[WEATHER, ADD],
                                           tool_choice="required", max_tokens=100, temperature=1.0, seed=seed)
        [call] = r.choices[0].message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "rm_rf"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                              "not": {}}}}]}, "tools"),
])
def test_bad_tools_get_400(rbee_server, rbee_worker, extra, param):
    from rbee_jupyter.testing.pytest_plugin import TINY_REPO

    r = rbee_server.post("openai/v1/chat/completions", {"model": TINY_REPO, "messages": ASK, "tools": [WEATHER],
                                                        **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
