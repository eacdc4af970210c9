"""Property-based tests (hypothesis): the ref parser and SSE framing / parsing.

The ref parser meets every string a user (or an attacker) can send; the SSE framing meets
every string a model can generate. Examples cannot cover either, so these state what must
hold for all inputs and let hypothesis look for a counterexample.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path, PurePosixPath

from httpx._decoders import LineDecoder
from huggingface_hub.file_download import repo_folder_name
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rbee_jupyter.errors import InvalidModelRef
from rbee_jupyter.events import ErrorEvent, Token, dumps, sse_comment, sse_done, sse_event
from rbee_jupyter.core.refs import parse_ref
from rbee_jupyter.sse_client import SSEParser

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- model refs -------------------------------------------------------------------------

# Pieces refs are made of, weighted towards the characters that matter (separators,
# dots, percent escapes, odd unicode), so hypothesis reaches the parser's branches
# instead of failing at "no scheme" every time.
_PIECES = st.sampled_from(["hf:", "file:", "file://", "file:///", "/", "//", ".", "..", "@", "-", "--", "_",
                           "%2e", "%2E", "%2f", "%00", "%25", "%20", "org", "repo", "model.gguf", "x.GGUF",
                           "main", "v1.0", "\u202e", "\u200f", "\x00", "\ud800", " ", "\n", "é", "~", ":"])
_REF_LIKE = st.lists(st.one_of(_PIECES, st.text(max_size=4)), max_size=12).map("".join)
ANY_REF = st.one_of(_REF_LIKE, st.text(max_size=60), st.binary(max_size=30).map(lambda b: b.decode("latin-1")))


def parsed_or_none(value: str):
    try:
        return parse_ref(value)
    except InvalidModelRef:
        return None


@SETTINGS
@given(ANY_REF)
@example("hf:../../x")
@example("file:///a/%2e%2e/b")
@example("file:///a/%2541")
@example("file:///a%20b")
@example("hf:org/repo@feature/x")
def test_parse_only_ever_raises_invalid_model_ref_and_normalises_idempotently(value: str) -> None:
    ref = parsed_or_none(value)  # anything but InvalidModelRef propagates and fails the test
    if ref is None:
        return
    again = parse_ref(str(ref))
    assert again == ref and str(again) == str(ref)


@SETTINGS
@given(ANY_REF)
@example("hf:org/repo/sub/model.gguf@v1")
@example("file:///models/tiny")
def test_accepted_refs_never_escape_their_folders(value: str) -> None:
    ref = parsed_or_none(value)
    if ref is None:
        return
    if ref.scheme == "hf":
        parts = ref.repo_id.split("/")
        assert 1 <= len(parts) <= 2 and all(p and p not in (".", "..") and ".." not in p for p in parts)
        # the cache folder is one component below the cache, whatever the id
        cache = Path("/cache")
        assert (cache / repo_folder_name(repo_id=ref.repo_id, repo_type="model")).parent == cache
        for tail in filter(None, (ref.revision, ref.filename)):
            segments = tail.split("/")
            assert ".." not in segments and "." not in segments and "" not in segments
            assert not tail.startswith("/")
    else:
        path = ref.path
        assert path.startswith("/") and "\x00" not in path
        assert str(PurePosixPath(path)) == path  # no "//", no trailing "/", ...
        assert not {".", ".."} & set(path.split("/"))


# --- SSE framing and parsing -----------------------------------------------------------

# Text a model (or an error message) can hold: everything, with line breaks of every
# kind (those str.splitlines knows, too), quotes and backslashes over-represented.
_BREAKS = st.sampled_from(["\n", "\r", "\r\n", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1e",
                           "\n\n", "data: x", ": c", "id: 7", "\"", "\\", "[DONE]", "\ud800", "\udfff"])
TEXT = st.lists(st.one_of(st.text(), _BREAKS), max_size=8).map("".join)


@st.composite
def streams(draw):
    """Events of one stream, some comments between them, and the cut points of its bytes."""
    events = []
    for i in range(1, draw(st.integers(0, 12)) + 1):
        if draw(st.booleans()):
            events.append(Token(t=draw(TEXT), i=i))
        else:
            events.append(ErrorEvent(message=draw(TEXT), code=draw(st.text(max_size=8)),
                                     details={draw(TEXT): draw(TEXT)}, style=draw(st.sampled_from(["stage", "type"]))))
    comments = [draw(st.booleans()) for _ in range(len(events) + 1)]
    first_id = draw(st.integers(1, 10**9))
    return events, comments, first_id


def frame(events, comments, first_id) -> bytes:
    out = b""
    for n, event in enumerate(events):
        if comments[n]:
            out += sse_comment()
        out += sse_event(first_id + n, dumps(event))
    if comments[-1]:
        out += sse_comment()
    return out + sse_done()


def parse_in_chunks(body: bytes, cuts: list[int]) -> list:
    """What the relay does: bytes as they arrive → UTF-8 text → lines (httpx) → messages."""
    decoder, lines, parser, messages = codecs.getincrementaldecoder("utf-8")(), LineDecoder(), SSEParser(), []
    edges = [0, *sorted(c % (len(body) + 1) for c in cuts), len(body)]
    for a, b in zip(edges, edges[1:]):
        text = decoder.decode(body[a:b])
        if text:
            messages += parser.feed(lines.decode(text))
    messages += parser.feed(lines.decode(decoder.decode(b"", final=True)) + lines.flush())
    return messages


@SETTINGS
@given(streams(), st.lists(st.integers(0, 10**6), max_size=30))
@example(([Token(t="a\u2028b\x85c\u2029", i=1)], [False, False], 1), [3])
@example(([Token(t="\ud800", i=1)], [False, False], 1), [])
def test_framed_events_split_anywhere_parse_back_in_order(stream, cuts) -> None:
    events, comments, first_id = stream
    body = frame(events, comments, first_id)

    messages = parse_in_chunks(body, cuts)

    data = [m for m in messages if m.comment is None]
    assert [m.data for m in data][-1] == "[DONE]"
    assert [m.id for m in data[:-1]] == list(range(first_id, first_id + len(events)))
    # what any JSON parser makes of the event (it joins an escaped surrogate pair into one character)
    assert [m.json() for m in data[:-1]] == [json.loads(json.dumps(e.to_dict())) for e in events]
    assert [m.comment for m in messages if m.comment is not None] == ["keep-alive"] * sum(comments)


@SETTINGS
@given(st.dictionaries(TEXT, st.one_of(TEXT, st.integers(), st.floats(allow_nan=False), st.booleans(), st.none()),
                       max_size=5))
def test_every_frame_is_one_data_line_of_json(obj) -> None:
    body = sse_event(3, obj)
    text = body.decode("utf-8")  # encodable: no lone surrogate left raw
    assert text.endswith("\n\n") and text.count("\n") == 3
    head, data = text[:-2].split("\n")
    assert head == "id: 3" and data.startswith("data: ")
    assert len(data.splitlines()) == 1 and "\r" not in data
    assert json.loads(data[len("data: "):]) == json.loads(json.dumps(obj))
