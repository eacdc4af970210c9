"""Structured output: response_format json_object / json_schema, enforced by a grammar, through the openai SDK."""

import json
from typing import Annotated, Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from rbee_jupyter.engine.grammar import ResponseFormat
from rbee_jupyter.errors import InvalidRequest, InvalidSchema, UnsupportedSchema
from rbee_jupyter.testing.pytest_plugin import TINY_REPO

MODEL = TINY_REPO

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object",  # nested objects in a bounded array, an enum
     "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 3,
                              "items": {"type": "object",
                                        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99},
                                                       "tags": {"type": "array", "maxItems": 2,
                                                                "items": {"enum": ["a", "b", "c"]}}},
                                        "required": ["id", "tags"], "additionalProperties": False}},
                    "color": {"enum": ["red", "green", "blue"]}},
     "required": ["items", "color"], "additionalProperties": False},
    {"type": "object",  # bounded numbers, booleans, nullable
     "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.5},
                    "ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 5}},
     "required": ["x", "ok", "note"], "additionalProperties": False},
    {"type": "object",  # $defs/$ref, a pattern, anyOf
     "$defs": {"point": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[a-z]{2,4}$"}},
                         "required": ["code"], "additionalProperties": False}},
     "properties": {"p": {"$ref": "#/$defs/point"},
                    "v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"const": "none"}]}},
     "required": ["p", "v"], "additionalProperties": False},
    {"type": "object", "properties": {"level": {"enum": [1, 2, 3]}, "label": {"const": "fixed"},
                                      "scores": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                            "maximum": 5}, "maxItems": 4}},
     "required": ["level", "label", "scores"], "additionalProperties": False},
]


@pytest.fixture
def client(openai_client, rbee_worker):
    return openai_client


def schema_format(schema, name="answer"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.mark.timeout(1200)  # 50 × ~40 tokens; a token of the tiny model takes ~0.1 s on a busy 2-core box
def test_fifty_json_schema_requests_parse_and_validate(client):
    # Random weights and sampling: whatever the model prefers, the grammar keeps the text valid.
    for i in range(50):
        schema = SCHEMAS[i % len(SCHEMAS)]
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Give me {i}"}],
                                           response_format=schema_format(schema), max_tokens=400,
                                           temperature=1.0, seed=i)
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop", (i, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_schema_streamed_joins_to_a_valid_document(client):
    schema = SCHEMAS[1]
    chunks = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "List"}],
                                            response_format=schema_format(schema), max_tokens=400, stream=True,
                                            temperature=1.0, seed=7)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), schema)


def test_properties_come_in_the_order_the_schema_lists_them(client):
    """As OpenAI's structured outputs do: code that reads the text (or a person) may rely on it."""
    schema = {"type": "object", "properties": {"zeta": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "alpha": {"type": "boolean"}, "mid": {"enum": ["a", "b"]}},
              "required": ["zeta", "alpha", "mid"], "additionalProperties": False}
    for seed in (1, 2):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Order"}],
                                           response_format=schema_format(schema), max_tokens=100,
                                           temperature=1.0, seed=seed)
        assert list(json.loads(r.choices[0].message.content)) == ["zeta", "alpha", "mid"]


def test_json_object_gives_an_object(client):
    # Greedy, so the run is the same every time: keys and strings are unbounded in json_object,
    # and a random model sampling freely may fill max_tokens before it closes them.
    for prompt in ("JSON please", "Give me an object"):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                           response_format={"type": "json_object"}, max_tokens=200, temperature=0)
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    free = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON please"}],
                                          max_tokens=20, temperature=0)
    with pytest.raises(ValueError):  # the same request unconstrained is not JSON: the grammar did it
        json.loads(free.choices[0].message.content)


@pytest.mark.parametrize("response_format, code, needle", [
    (schema_format({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3}}}),
     "unsupported_schema", "multipleOf"),
    (schema_format({"type": "string", "pattern": "(?<=a)b"}), "unsupported_schema", "Lookbehind"),
    (schema_format({"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}),
     "unsupported_schema", "remote reference"),
    (schema_format({"type": "strnig"}), "invalid_schema", "not a valid JSON Schema"),
    (schema_format({"type": "object", "required": "name"}), "invalid_schema", "required"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "invalid_schema", "schema"),
    ({"type": "xml"}, "invalid_request", "json_object"),
])
def test_bad_schemas_get_400_naming_the_part(rbee_server, rbee_worker, response_format, code, needle):
    r = rbee_server.post("openai/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": response_format})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["param"] == "response_format" and needle in error["message"]


def test_response_format_parsing_is_transport_free():
    assert ResponseFormat.from_json(None) is None and ResponseFormat.from_json({"type": "text"}) is None
    assert ResponseFormat.from_json({"type": "json_object"}).schema == {"type": "object"}
    with pytest.raises(UnsupportedSchema) as info:
        ResponseFormat.from_json(schema_format({"type": "object", "properties": {"t": {"not": {"type": "string"}}}}))
    assert info.value.details == {"field": "response_format", "keyword": "not", "path": "/properties/t"}
    with pytest.raises(InvalidSchema):
        ResponseFormat.from_json(schema_format(["not", "an", "object"]))
    with pytest.raises(InvalidRequest):
        ResponseFormat.from_json("json")


class Person(BaseModel):
    name: Annotated[str, Field(max_length=8)]
    age: Annotated[int, Field(ge=0, le=150)]
    color: Literal["red", "green", "blue"]
    tags: Annotated[list[Literal["x", "y"]], Field(max_length=2)]


def test_client_chat_with_a_pydantic_schema_returns_an_instance(rbee_server, rbee_worker):
    from rbee_jupyter.kernel.client import Client

    with Client(rbee_server.url, token=rbee_server.token) as client:
        people = [client.chat("Who?", model=rbee_worker, schema=Person, max_tokens=200, temperature=1.0, seed=s)
                  for s in range(3)]
        as_dict = client.chat("Who?", model=rbee_worker, schema=SCHEMAS[2], max_tokens=200, temperature=1.0, seed=3)
        with pytest.raises(UnsupportedSchema):
            client.chat("Who?", model=rbee_worker, schema={"type": "array", "uniqueItems": True})
    assert all(isinstance(p, Person) for p in people)
    jsonschema.validate(as_dict, SCHEMAS[2])


def test_rbee_chat_json_pretty_prints(rbee_server, rbee_worker):
    from IPython.core.interactiveshell import InteractiveShell

    from rbee_jupyter.kernel.client import set_default_client

    shell = InteractiveShell.instance()
    try:
        shell.run_line_magic("load_ext", "rbee_jupyter.kernel.magics")
        shell.run_line_magic("rbee", f"connect {rbee_server.url} --token {rbee_server.token}")
        result = shell.run_cell(f"%%rbee chat --json --model {rbee_worker} --temperature 0 --max-tokens 200\n"
                                "JSON please").result
    finally:
        set_default_client(None)
        InteractiveShell.clear_instance()
    assert repr(result) == json.dumps(json.loads(str(result)), indent=2)
    assert isinstance(json.loads(str(result)), dict)
