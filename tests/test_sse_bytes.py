"""``SSEParser.feed_bytes``: the engine relay feeds the body as the transport cuts it, anywhere.

Whatever the cuts (inside a line ending, inside a UTF-8 character, between ``\\r`` and ``\\n``),
the messages must be the ones the line-by-line parser gives for the whole text, in order: a
relay that split differently would change token text or lose a ``[DONE]``.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rbee_jupyter.sse_client import SSEMessage, SSEParser

STREAM = ('id: 1\ndata: {"text": "héllo ✓ 日本"}\n\n: keep-alive\n\nid: 2\r\ndata: first\r\ndata: second\r\n\r\n'
          'event: ignored\ndata: [DONE]\r\rdata: after a lone CR\n\n')


def test_whole_stream_in_one_piece():
    assert SSEParser().feed_bytes(STREAM.encode()) == [
        SSEMessage(1, '{"text": "héllo ✓ 日本"}'), SSEMessage(None, None, "keep-alive"),
        SSEMessage(2, "first\nsecond"), SSEMessage(None, "[DONE]"), SSEMessage(None, "after a lone CR")]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM.encode())), max_size=12))
def test_any_cuts_give_the_same_messages_as_whole_lines(cuts):
    raw = STREAM.encode()
    parser, got, prev = SSEParser(), [], 0
    for cut in sorted(cuts) + [len(raw)]:
        got += parser.feed_bytes(raw[prev:cut])
        prev = cut
    assert got == SSEParser().feed(STREAM.splitlines())


def test_an_unfinished_message_waits_for_its_blank_line():
    parser = SSEParser()
    assert parser.feed_bytes(b"data: x\n") == []
    assert parser.feed_bytes(b"\r") == []  # a CR that may be the first half of CRLF
    assert parser.feed_bytes(b"\n") == [SSEMessage(None, "x")]
