"""Finding 7: one user cannot exhaust the service with what one request carries."""

from __future__ import annotations

import json
import socket
import struct

import httpx
import pytest

from rbee_jupyter.engine.loader import MAX_HEADER_BYTES, plan_blocks
from rbee_jupyter.errors import InvalidCheckpoint

from .conftest import PUBLIC, error_of, load_events

MIB = 1 << 20


def test_a_huge_body_is_refused_before_it_is_read(team):
    # When bob declares a 512 MiB body and sends only its first bytes
    with socket.create_connection(("127.0.0.1", team.server.port), timeout=30) as s:
        path = team.server.base_url + "rbee/v1/inference"
        s.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: token {team.tokens['bob']}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {512 * MIB}\r\n\r\n").encode() + b" " * 65536)
        # Then the answer is 413 at once, without waiting for (or buffering) the other 511.9 MiB
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(65536)
            assert chunk, f"connection closed without an answer: {answer!r}"
            answer += chunk
    head, _, _ = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"connection: close" in head.lower()


def test_a_chunked_body_is_cut_at_the_limit(team):
    # When bob streams 2.5 MiB without a Content-Length
    with team.http("bob") as bob:
        try:
            r = bob.post("v1/inference", content=iter([b" " * 65536] * 40),
                         headers={"Content-Type": "application/json"})
        except httpx.TransportError:
            r = None
        # Then the connection stops reading at max_body_bytes and closes: a client still sending sees it
        # dropped; one whose last bytes were already on their way reads Tornado's own bare "400 Bad
        # Request", its answer to any message it will not read (which of the two is a race on a busy
        # machine). Either way it is never taken as a request, and the service goes on answering
        assert r is None or (r.status_code == 400 and r.content == b""), r.text
        assert bob.get("v1/models").status_code == 200


@pytest.mark.parametrize("stop", [["x" * 257], ["a", "b", "c", "d", "e"], "y" * 100_000])
def test_stop_strings_are_capped(team, stop):
    with team.http("bob") as bob:
        r = bob.post("v1/inference", json={"model_ref": f"hf:{PUBLIC}", "prompt": "hi", "stop": stop})
    error = error_of(r, 400, "INVALID_REQUEST")
    assert "256 characters" in error["message"] and error["details"].get("field") == "stop"


def test_a_safetensors_header_over_100_mb_is_never_read(rbee_tiny_model, tmp_path):
    # Given a folder whose weights file declares a 120 MB header (a sparse file: no disk used)
    folder = tmp_path / "hostile"
    folder.mkdir()
    for f in rbee_tiny_model.iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    weights = folder / "model.safetensors"
    with weights.open("wb") as fh:
        fh.write(struct.pack("<Q", 120_000_000) + b"{" + b" " * 100)
        fh.truncate(130_000_000)

    # When the hive plans it, Then it is refused before the header is read, naming the cap
    with pytest.raises(InvalidCheckpoint) as refused:
        plan_blocks(folder)
    assert f"exceeds the limit of {MAX_HEADER_BYTES} bytes" in refused.value.message
    assert json.loads(json.dumps(refused.value.to_dict()))["error"]["code"] == "INVALID_CHECKPOINT"


async def test_a_hostile_header_through_the_service_is_refused_at_the_cap(team):
    # Given a folder bob may load whose weights declare a 120 MB header (sparse: no disk used)
    folder = team.allowed / "huge-header"
    folder.mkdir()
    for f in team.model.iterdir():
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    with (folder / "model.safetensors").open("wb") as fh:
        fh.write(struct.pack("<Q", 120_000_000) + b"{")
        fh.truncate(130_000_000)
    async with team.clients() as c:
        # When he loads it, Then the load fails before any worker starts, naming the cap
        r, stream = await load_events(c["bob"], f"file://{folder}")
        error = stream.events[-1]
        assert error["stage"] == "error" and error["code"] == "INVALID_CHECKPOINT", error
        assert f"exceeds the limit of {MAX_HEADER_BYTES} bytes" in error["message"] and stream.done
        assert not [w for w in (await c["admin"].get("v1/workers")).json()["workers"]
                    if w["id"] == r.json()["worker_id"] and w["state"] != "failed"]

