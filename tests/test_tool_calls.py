"""Tool calls: parsing fixed model outputs ("auto"), whole and streamed, then through the server."""

import json

import pytest

from rbee_jupyter.engine.tool_calls import (
    Arguments,
    CallStart,
    Content,
    ParsedOutput,
    ToolCallParser,
    assemble,
    parse_tool_calls,
)

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
    "<tool_call>not json</tool_call>",
    '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',  # arguments must be an object
    'Use {"name": "add"} like this.',
])
def test_text_that_is_not_a_call_stays_text(text):
    parsed = parse_tool_calls(text, NAMES)
    assert parsed.content == text and parsed.tool_calls == ()


def test_prose_after_a_complete_json_call_is_content_beside_the_call():
    # A stream has announced the call before the prose arrives; it cannot take it back.
    parsed = parse_tool_calls('{"name": "add", "parameters": {"a": 1}} and then some prose', NAMES)
    assert calls(parsed) == [("add", {"a": 1})] and parsed.content == " and then some prose"


# --- the same outputs streamed: pieces in, content and call deltas out ---------------------------

def feed(text: str, cuts) -> list:
    """Everything the parser says for ``text`` fed in pieces cut at ``cuts``, then finished."""
    parser, out = ToolCallParser(NAMES), []
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        out += parser.feed(text[a:b])
    return out + parser.finish()


def shape(parsed: ParsedOutput) -> tuple:
    return parsed.content, [(c.name, c.arguments) for c in parsed.tool_calls]


STREAMS = {
    "hermes text then a call": (
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "C"}}\n'
        "</tool_call>",
        "Let me look.", [("get_weather", '{"city": "Zürich", "unit": "C"}')]),
    "hermes two calls, braces in strings": (
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": {"x": "}{\\"]"}}}\n</tool_call>\n'
        '<tool_call>{"name":"get_weather","arguments":{"city":"Oslo"}}</tool_call>',
        None, [("add", '{"a": 1, "b": {"x": "}{\\"]"}}'), ("get_weather", '{"city":"Oslo"}')]),
    "hermes arguments as a JSON string, unclosed": (
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}',
        None, [("get_weather", '{"city": "Oslo"}')]),
    "llama3 one call": (
        '{"name": "get_weather", "parameters": {"city": "Lima"}}',
        None, [("get_weather", '{"city": "Lima"}')]),
    "llama3 python tag, two calls": (
        '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "add", "arguments": {"a": 3}}',
        None, [("add", '{"a": 1, "b": 2}'), ("add", '{"a": 3}')]),
    "text only, near-markers": (
        '{"answer": 42} I <3 <tool_calls> and {"name": "add"} <|python_tag|> <tool_call',
        '{"answer": 42} I <3 <tool_calls> and {"name": "add"} <|python_tag|> <tool_call', []),
    "text only, a call to a function not offered": (
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>  ',
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>  ', []),
}


@pytest.mark.parametrize("text, content, expected", STREAMS.values(), ids=STREAMS)
def test_a_stream_cut_at_any_character_joins_to_the_whole_answer(text, content, expected):
    assert shape(parse_tool_calls(text, NAMES)) == (content, expected)
    for k in range(len(text) + 1):  # one cut anywhere: inside a tag, a name, a string, an escape
        assert shape(assemble(feed(text, [k]))) == (content, expected), text[:k]
    one_by_one = feed(text, range(1, len(text)))
    assert shape(assemble(one_by_one)) == (content, expected)
    starts = [p for p in one_by_one if isinstance(p, CallStart)]
    assert [s.index for s in starts] == list(range(len(expected)))
    for piece in one_by_one:  # a call's arguments only ever follow its start
        if isinstance(piece, Arguments):
            assert piece.index < len(starts) and one_by_one.index(starts[piece.index]) < one_by_one.index(piece)


def test_text_streams_at_once_and_waits_only_while_it_could_open_a_call():
    parser = ToolCallParser(NAMES)
    assert parser.feed("Let me look") == [Content("Let me look")]
    assert parser.feed(". <tool_") == [Content(".")]  # " <tool_" could still open a call
    assert parser.feed("calls> are fun") == [Content(" <tool_calls> are fun")]
    assert parser.feed(" <tool_call>") == []
    assert parser.feed("oops") == [Content(" <tool_call>oops")]
    assert parser.finish() == []


def test_a_call_is_announced_once_named_and_its_arguments_stream_as_they_arrive():
    parser = ToolCallParser(NAMES)
    assert parser.feed('Sure.\n<tool_call>\n{"name": "get_wea') == [Content("Sure.")]
    assert parser.feed('ther", "arguments": ') == []
    [start, args] = parser.feed('{"city": "Be')
    assert isinstance(start, CallStart) and start.index == 0 and start.call.name == "get_weather"
    assert start.call.id.startswith("call_") and args == Arguments(0, '{"city": "Be')
    assert parser.feed('rn"}') == [Arguments(0, 'rn"}')]
    assert parser.feed("}\n</tool_call>\n") == []
    assert parser.finish() == []


def test_a_json_answer_is_decided_by_its_first_key():
    parser = ToolCallParser(NAMES)
    assert parser.feed('{"na') == []
    assert [type(p) for p in parser.feed('me": "add", "parameters": {"a"')] == [CallStart, Arguments]
    assert ToolCallParser(NAMES).feed('{"an') == [Content('{"an')]  # not "name": text at once
    assert ToolCallParser(NAMES).feed('{"name": "rm_rf"') == [Content('{"name": "rm_rf"')]  # not offered


def test_a_forced_call_is_read_whatever_its_key_order():
    # "required": the grammar writes the envelope's keys sorted, so the arguments come first.
    text = '{"arguments": {"a": 1, "b": 2}, "name": "add"}'
    forced = ToolCallParser(NAMES, forced=True)
    assert shape(assemble(forced.feed(text) + forced.finish())) == (None, [("add", '{"a": 1, "b": 2}')])
    assert shape(parse_tool_calls(text, NAMES)) == (text, [])  # "auto": an answer not opening with a name is text


def test_a_call_cut_by_max_tokens_stays_a_call():
    parser = ToolCallParser(NAMES)
    pieces = parser.feed('<tool_call>{"name": "add", "arguments": {"a": 1') + parser.finish()
    assert shape(assemble(pieces)) == (None, [("add", '{"a": 1')])


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


def joined(chunks) -> dict[int, dict]:
    """A stream's deltas joined per choice: content, calls (id, name, arguments) and finish reason."""
    out: dict[int, dict] = {}
    for chunk in chunks:
        for c in chunk.choices:
            choice = out.setdefault(c.index, {"content": "", "calls": {}, "finish": None})
            choice["content"] += c.delta.content or ""
            choice["finish"] = c.finish_reason or choice["finish"]
            for d in c.delta.tool_calls or []:
                if d.id:  # the first delta of a call: its id and name, once
                    assert d.index not in choice["calls"]
                    choice["calls"][d.index] = [d.id, d.function.name, ""]
                choice["calls"][d.index][2] += d.function.arguments or ""
    return out


def test_auto_streams_a_json_call_as_deltas_for_each_of_two_choices(client):
    """"auto" with the Llama 3.x JSON call: a grammar makes the random model write one, so the
    answer is a call every time; the parser must find it both streamed and whole, per choice."""
    import jsonschema

    from rbee_jupyter.testing.pytest_plugin import TINY_REPO

    llama3_call = {"type": "object", "properties": {"name": {"const": "get_weather"},
                                                    "parameters": WEATHER["function"]["parameters"]},
                   "required": ["name", "parameters"], "additionalProperties": False}
    ask = dict(model=TINY_REPO, messages=ASK, tools=[WEATHER, ADD], tool_choice="auto", max_tokens=100,
               temperature=1.0, seed=11, n=2,
               response_format={"type": "json_schema", "json_schema": {"name": "call", "schema": llama3_call}})
    # When
    whole = client.chat.completions.create(**ask)
    streamed = joined(client.chat.completions.create(**ask, stream=True))
    # Then
    assert sorted(streamed) == [0, 1] and [c.index for c in whole.choices] == [0, 1]
    for choice in whole.choices:
        [call] = choice.message.tool_calls
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        got = streamed[choice.index]
        assert got["finish"] == "tool_calls" and got["content"] == ""
        [(call_id, name, arguments)] = got["calls"].values()
        assert call_id.startswith("call_") and name == "get_weather"
        assert arguments == call.function.arguments  # same seed: the joined deltas are the answer
    assert whole.choices[0].message.tool_calls[0].id != whole.choices[1].message.tool_calls[0].id


def test_auto_text_that_is_no_call_streams_as_content(client):
    from rbee_jupyter.testing.pytest_plugin import TINY_REPO

    ask = dict(model=TINY_REPO, messages=ASK, tools=[WEATHER], max_tokens=12, temperature=1.0, seed=3)
    whole = client.chat.completions.create(**ask)
    streamed = joined(client.chat.completions.create(**ask, stream=True))
    assert whole.choices[0].message.tool_calls is None and whole.choices[0].message.content
    assert streamed[0]["content"] == whole.choices[0].message.content and streamed[0]["calls"] == {}


def test_a_named_call_with_n_2_gives_each_choice_its_own_call(client):
    import jsonschema

    from rbee_jupyter.testing.pytest_plugin import TINY_REPO

    ask = dict(model=TINY_REPO, messages=ASK, tools=[WEATHER, ADD], max_tokens=100, temperature=1.0, seed=21,
               n=2, tool_choice={"type": "function", "function": {"name": "add"}})
    whole = client.chat.completions.create(**ask)
    streamed = joined(client.chat.completions.create(**ask, stream=True))
    assert [c.index for c in whole.choices] == [0, 1] and sorted(streamed) == [0, 1]
    for choice in whole.choices:
        [call] = choice.message.tool_calls
        assert choice.finish_reason == "tool_calls" and call.function.name == "add"
        jsonschema.validate(json.loads(call.function.arguments), ADD["function"]["parameters"])
        [(_, name, arguments)] = streamed[choice.index]["calls"].values()
        assert name == "add" and arguments == call.function.arguments
