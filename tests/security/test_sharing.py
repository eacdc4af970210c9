"""Findings 2 to 5: no user reads, uses or spends what belongs to another, on a real service-mode server.

bob is the attacker. He registers engines of his own (``listener.Listener``, an OpenAI-compatible
server that records every request it gets) and probes alice's objects by id. alice has a real
worker of ``hf:sec/public``; ``admin`` is an admin by ``c.RbeeApp.admin_users``.
"""

from __future__ import annotations

import asyncio

import pytest

from rbee_jupyter.core.hive import Hive, HiveConfig
from rbee_jupyter.core.owners import Principal
from rbee_jupyter.errors import AccessDenied
from rbee_jupyter.testing.server import free_port
from rbee_jupyter.testing.sse import parse_frames, read_stream

from .conftest import ALICE_HF, PROMPT, PUBLIC, error_of
from .listener import TEXT, Listener

KEY = "sk-alice-own-key-3b1f9"
EVIL = "".join(TEXT)


@pytest.fixture(scope="module")
def alice_worker(team):
    """alice's real worker of hf:sec/public (not shared), unloaded at the end of the module."""
    with team.http("alice") as alice:
        r = alice.post("v1/workers", json={"model_ref": f"hf:{PUBLIC}", "device": "cpu"})
        assert r.status_code == 202, r.text
        worker_id = r.json()["worker_id"]
        events = events_of(team, "alice", f"v1/loading/progress?id={worker_id}")
        assert events[-1]["stage"] == "ready", events[-1]
        yield worker_id
        assert alice.delete(f"v1/workers/{worker_id}").status_code == 204


@pytest.fixture
def listener():
    """An engine on [::1] that claims to serve ``sec/public``: what bob would set up."""
    engine = Listener(model=PUBLIC)
    yield engine
    engine.close()


def events_of(team, user: str, path: str) -> list:
    """The JSON events of a whole SSE stream read as ``user`` (``path`` relative to rbee/)."""
    with team.http(user) as client, client.stream("GET", path, timeout=120) as r:
        assert r.status_code == 200, r.read()
        frames = parse_frames("".join(r.iter_text()))
    assert frames and frames[-1].data == "[DONE]", frames
    return [f.data for f in frames if f.comment is None and f.data != "[DONE]"]


def register(client, engine: Listener, **body):
    return client.post("v1/workers", json={"backend": "openai", "url": engine.url, "model": engine.model, **body})


def registered(team, user: str, engine: Listener, **body) -> str:
    """Register ``engine`` as ``user``; its worker id once it answered (ready)."""
    with team.http(user) as client:
        r = register(client, engine, **body)
        assert r.status_code == 202, r.text
    events = events_of(team, user, f"v1/loading/progress?id={r.json()['worker_id']}")
    assert events[-1]["stage"] == "ready", events
    return r.json()["worker_id"]


async def text_of(client, body) -> tuple[str, list]:
    stream = await read_stream(client, "POST", "v1/inference", json=body, timeout=120)
    assert stream.done, stream.frames
    return "".join(e.get("t", "") for e in stream.events if e.get("type") == "token"), stream.events


# --- finding 2: engine names, and whose worker a model name reaches ---------------------------------

@pytest.mark.parametrize("name", [f"hf:{PUBLIC}", PUBLIC, "file:///srv/models/tiny", "w-0123456789", "a b",
                                  "x" * 65, ""])
def test_an_engine_name_cannot_read_as_a_model_ref_or_a_worker_id(team, listener, name):
    with team.http("bob") as bob:
        before = bob.get("v1/workers").json()["workers"]
        error = error_of(register(bob, listener, name=name), 400, "INVALID_REQUEST")
        assert error["details"] == {"field": "name"} and "cannot be read as a model ref" in error["message"]
        assert bob.get("v1/workers").json()["workers"] == before
    assert listener.seen == []  # refused before the server sent anything anywhere


def test_an_engine_name_is_taken_once(team, listener):
    worker_id = registered(team, "admin", listener, name="team-engine")
    with team.http("bob") as bob:
        error = error_of(register(bob, listener, name="team-engine"), 409, "CONFLICT")
        assert error["details"] == {"field": "name"}
    with team.http("admin") as admin:
        assert admin.delete(f"v1/workers/{worker_id}").status_code == 204


async def test_alices_prompts_never_reach_an_engine_bob_registered_for_her_model(team, alice_worker, listener):
    # bob's engine says it serves sec/public, under a name of his
    bobs = registered(team, "bob", listener, name="bobs")
    async with team.clients() as c:
        # When alice asks for her model by ref (v1/inference) and by name (OpenAI routes), several times
        body = {"model_ref": f"hf:{PUBLIC}", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        for _ in range(3):
            text, events = await text_of(c["alice"], body)
            assert events[-1]["type"] == "end" and text and text != EVIL
            chat = await c["alice"].post("openai/v1/chat/completions", json={
                "model": PUBLIC, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4})
            assert chat.status_code == 200, chat.text
            assert chat.json()["choices"][0]["message"]["content"] != EVIL
        # Then her worker answered every time and bob's engine never saw her prompt
        assert listener.prompts() == []
        # bob's name means nothing to her, and his engine is not in her model list
        refused = await c["alice"].post("openai/v1/chat/completions", json={
            "model": "bobs", "messages": [{"role": "user", "content": PROMPT}]})
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
        assert "bobs" not in (await c["alice"].get("openai/v1/models")).text
        # bob reaches his own engine by its name, and not alice's worker by her model's ref
        text, _ = await text_of(c["bob"], {**body, "model_ref": "bobs"})
        assert text == EVIL and [p.get("prompt") for p in listener.prompts()] == [PROMPT]
        error_of(await c["bob"].post("v1/inference", json=body), 409, "MODEL_NOT_LOADED")
        assert (await c["bob"].delete(f"v1/workers/{bobs}")).status_code == 204


# --- finding 5: an engine (its key) belongs to whoever registered it --------------------------------

async def test_bob_cannot_use_or_see_alices_engine_unless_an_admin_shares_it(team, listener):
    paid = registered(team, "alice", listener, name="alices-paid", api_key=KEY)
    body = {"worker_id": paid, "prompt": PROMPT, "max_tokens": 4}
    async with team.clients() as c:
        bob, alice, admin = c["bob"], c["alice"], c["admin"]
        unknown = error_of(await bob.get("v1/workers/w-0000000000"), 404, "WORKER_NOT_FOUND")
        # When bob tries her engine by id, by name, or lists the workers
        error = error_of(await bob.get(f"v1/workers/{paid}"), 404, "WORKER_NOT_FOUND")
        assert error["message"] == unknown["message"].replace("w-0000000000", paid)  # nothing confirms the id
        error_of(await bob.post("v1/inference", json=body), 404, "WORKER_NOT_FOUND")
        error_of(await bob.delete(f"v1/workers/{paid}"), 404, "WORKER_NOT_FOUND")
        refused = await bob.post("openai/v1/completions", json={"model": "alices-paid", "prompt": PROMPT})
        assert refused.status_code == 404
        assert paid not in (await bob.get("v1/workers")).text and "alices-paid" not in (
            await bob.get("openai/v1/models")).text
        assert listener.prompts() == []  # her key was not spent

        # Only an admin shares an engine (it spends its owner's key and opens its URL for others)
        error = error_of(await alice.patch(f"v1/workers/{paid}", json={"shared": True}), 403, "ACCESS_DENIED")
        assert "Only an administrator may share an engine" in error["message"]
        error_of(await bob.patch(f"v1/workers/{paid}", json={"shared": True}), 404, "WORKER_NOT_FOUND")
        shared = await admin.patch(f"v1/workers/{paid}", json={"shared": True})
        assert shared.status_code == 200 and shared.json()["shared"] is True

        # Then bob may use it, and sees it without its URL or its owner
        text, _ = await text_of(bob, body)
        assert text == EVIL and listener.seen[-1].authorization == f"Bearer {KEY}"
        (seen,) = [w for w in (await bob.get("v1/workers")).json()["workers"] if w["id"] == paid]
        assert seen["model_ref"] == f"openai:{PUBLIC}" and seen["shared"] is True
        assert not {"url", "owner", "pid", "exit_reason"} & set(seen), seen
        detail = await bob.get(f"v1/workers/{paid}")
        assert listener.url not in detail.text and '"alice"' not in detail.text and "owner" not in detail.json()
        # but not stop it
        error_of(await bob.delete(f"v1/workers/{paid}"), 403, "NOT_OWNER")
        # Unshared, it is gone for him again
        assert (await admin.patch(f"v1/workers/{paid}", json={"shared": False})).status_code == 200
        error_of(await bob.post("v1/inference", json=body), 404, "WORKER_NOT_FOUND")
        assert (await alice.delete(f"v1/workers/{paid}")).status_code == 204


# --- finding 3: the server opens only URLs an admin allowed -------------------------------------------

@pytest.mark.parametrize("url, kind", [
    ("http://127.0.0.1:{port}/v1", "loopback"),
    ("http://[::ffff:127.0.0.1]:{port}/v1", "loopback"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://10.0.0.1:8000/v1", "private"),
    ("http://metadata.google.internal/v1", None),
])
def test_registering_an_internal_url_is_refused(team, url, kind):
    with team.http("bob") as bob:
        before = bob.get("v1/workers").json()["workers"]
        error = error_of(bob.post("v1/workers", json={"backend": "openai", "url": url.format(port=free_port()),
                                                      "model": "m"}), 403, "URL_NOT_ALLOWED")
        assert error["details"].get("kind") == kind
        assert bob.get("v1/workers").json()["workers"] == before


def test_a_name_that_resolves_to_loopback_is_refused_at_registration(team):
    inside = Listener(model="m", host="127.0.0.1")  # an internal service on the server's loopback
    try:
        with team.http("bob") as bob:
            # When bob registers it by a name that resolves to a loopback address (the service opens [::1] only)
            r = bob.post("v1/workers", json={"backend": "openai", "url": f"http://localhost:{inside.port}/v1",
                                             "model": "m"})
            # Then the registration itself is refused (not a 202 whose first connection fails), naming the
            # address and its kind, not anything the service would answer
            error = error_of(r, 403, "URL_NOT_ALLOWED")
            assert "localhost resolves to 127.0.0.1, which is a loopback address" in error["message"]
            assert error["details"] == {"field": "url", "host": "localhost", "address": "127.0.0.1",
                                        "kind": "loopback"}
            assert [w for w in bob.get("v1/workers").json()["workers"] if w["model_ref"].startswith("openai:m@")] == []
        assert inside.seen == []  # no connection was made
        # An admin may register it: admins open what they like
        worker_id = registered(team, "admin", inside)
        assert [s.path for s in inside.seen] == ["/v1/models"]
        with team.http("admin") as admin:
            assert admin.delete(f"v1/workers/{worker_id}").status_code == 204
    finally:
        inside.close()


async def test_what_an_engine_answers_is_never_quoted_to_users(team):
    secret = "INTERNAL-PAGE-7c1e: db password hunter2"
    engine = Listener(model="m", refuse_with=secret)
    try:
        worker_id = registered(team, "bob", engine)
        async with team.clients() as c:
            r = await c["bob"].post("v1/inference", json={"worker_id": worker_id, "prompt": PROMPT})
            error = error_of(r, 400, "INVALID_REQUEST")
            assert "HTTP 422" in error["message"] and "its answer is in the server's log" in error["message"]
            assert secret not in r.text and engine.prompts() == [{**engine.prompts()[0], "prompt": PROMPT}]
            assert engine.url not in r.text and f"The request was refused: the engine {worker_id} answered" in (
                error["message"])  # a shared engine's streams reach users who may not see its URL
            assert (await c["bob"].delete(f"v1/workers/{worker_id}")).status_code == 204
    finally:
        engine.close()


async def test_engine_registration_is_for_admins_unless_configured(tmp_path):
    from rbee_jupyter.server.app import RbeeApp

    assert RbeeApp().engine_registration == "admins"
    hive = Hive(HiveConfig(cache_dir=tmp_path / "cache", catalog_path=tmp_path / "catalog.sqlite", service_mode=True,
                           admin_users=frozenset({"admin"})))
    try:
        with pytest.raises(AccessDenied, match=r"Only administrators may register engines .*engine_registration"):
            hive.load({"backend": "openai", "url": "https://8.8.8.8/v1", "model": "m"}, principal=Principal("bob"))
        assert hive.workers() == []
    finally:
        await hive.stop()


# --- finding 4: everyone sees only what is theirs, or shared -------------------------------------------

async def test_bobs_feed_never_shows_alices_generations_or_gated_downloads(team, alice_worker, security_hub):
    gated = "sec/gated-feed"
    security_hub.add_repo(gated, team.model, gated=True)
    sentinel = "sec/feed-sentinel"
    team.publish(sentinel)

    def until_sentinel(frames):
        return any(isinstance(f.data, dict) and f.data.get("topic") == "catalog"
                   and f.data.get("model", {}).get("ref") == f"hf:{sentinel}" for f in frames)

    async with team.clients() as c:
        subscribed = {who: asyncio.Event() for who in ("bob", "admin")}

        def reader(who):
            async def on_frame(frame):
                subscribed[who].set()  # the snapshot: from now on every change reaches this reader
            return read_stream(c[who], "GET", "v1/events", until=until_sentinel, on_frame=on_frame, timeout=180)
        feeds = {who: asyncio.create_task(reader(who)) for who in subscribed}
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in subscribed.values())), 60)
        # When alice generates and downloads a gated repo with her own token
        text, _ = await text_of(c["alice"], {"worker_id": alice_worker, "prompt": PROMPT, "max_tokens": 6,
                                             "temperature": 0})
        r = await c["alice"].post("v1/models/download", json={"model_ref": f"hf:{gated}"},
                                  headers={"X-HF-Token": ALICE_HF})
        assert r.status_code == 202, r.text
        done = await read_stream(c["alice"], "GET", f"v1/models/download/progress?id={r.json()['download_id']}",
                                 headers={"Last-Event-ID": "0"}, timeout=120)
        assert done.events[-1]["stage"] == "complete"
        # and then something everyone may see happens (a public download)
        r = await c["alice"].post("v1/models/download", json={"model_ref": f"hf:{sentinel}"})
        assert r.status_code == 202
        bob_feed, admin_feed = [await asyncio.wait_for(feeds[w], 180) for w in ("bob", "admin")]

    # Then the admin saw her generation, her worker and her gated download ...
    admin_text = str(admin_feed.events)
    assert alice_worker in admin_text and gated in admin_text and "'kind': 'inference'" in admin_text
    # ... and bob saw none of it: not her jobs, not her worker, not her text, not the gated name
    bob_text = str(bob_feed.events)
    assert bob_feed.events[0]["topic"] == "snapshot"
    for leak in (alice_worker, gated, "'kind': 'inference'", repr(text)[1:-1]):
        assert leak not in bob_text, leak
    snapshot, *changes = bob_feed.events
    # (his own jobs and workers, from other tests of this package's shared server, he may see)
    assert [j for j in snapshot["jobs"] if j.get("owner") != "bob"] == []
    assert [w for w in snapshot["workers"] if w.get("owner") != "bob"] == []
    assert not [e for e in changes if e["topic"] in ("job", "worker")], changes
    assert f"hf:{sentinel}" in bob_text  # what everyone may see still reaches him


async def test_bob_cannot_read_alices_streams_or_workers_by_id(team, alice_worker, security_hub):
    async with team.clients() as c:
        bob, alice = c["bob"], c["alice"]
        # Her loading stream, her worker, its readiness: all unknown to him, as an id that never existed
        for path in (f"v1/workers/{alice_worker}", f"v1/workers/{alice_worker}/ready",
                     f"v1/loading/progress?id={alice_worker}"):
            error = error_of(await bob.get(path), 404, "WORKER_NOT_FOUND")
            assert "alice" not in error["message"]
        assert alice_worker not in (await bob.get("v1/workers")).text
        # Her download's progress stream, by id, is as unknown as a made-up id
        repo = "sec/progress-by-id"
        team.publish(repo)
        r = await alice.post("v1/models/download", json={"model_ref": f"hf:{repo}"})
        download_id = r.json()["download_id"]
        error = error_of(await bob.get(f"v1/models/download/progress?id={download_id}"), 404, "JOB_NOT_FOUND")
        made_up = error_of(await bob.get("v1/models/download/progress?id=0123456789ab"), 404, "JOB_NOT_FOUND")
        assert error["message"] == made_up["message"].replace("0123456789ab", download_id)
        error_of(await bob.delete(f"v1/models/download/{download_id}"), 404, "JOB_NOT_FOUND")
        await read_stream(alice, "GET", f"v1/models/download/progress?id={download_id}", timeout=120)
        # Her generation cannot be stopped by him (404: he does not learn it exists)
        answers = []

        async def on_frame(frame):
            if isinstance(frame.data, dict) and frame.data.get("type") == "started" and not answers:
                answers.append(await bob.delete(f"v1/inference/{frame.data['job_id']}"))
        stream = await read_stream(alice, "POST", "v1/inference", on_frame=on_frame, timeout=120,
                                   json={"worker_id": alice_worker, "prompt": PROMPT, "max_tokens": 8})
        error_of(answers[0], 404, "JOB_NOT_FOUND")
        assert stream.events[-1]["type"] == "end" and stream.events[-1]["total_tokens"] == 8

        # When alice shares her worker, bob sees it without her details, may use it, but not unload it
        assert (await bob.patch(f"v1/workers/{alice_worker}", json={"shared": True})).status_code == 404
        r = await alice.patch(f"v1/workers/{alice_worker}", json={"shared": True})
        assert r.status_code == 200 and r.json()["shared"] is True and r.json()["owner"] == "alice"
        try:
            seen = (await bob.get(f"v1/workers/{alice_worker}")).json()
            assert seen["shared"] is True and seen["state"] in ("idle", "busy")
            assert not {"owner", "pid", "url", "node", "exit_reason"} & set(seen), seen
            text, events = await text_of(bob, {"model_ref": f"hf:{PUBLIC}", "prompt": PROMPT, "max_tokens": 3})
            assert events[-1]["type"] == "end" and text
            error_of(await bob.delete(f"v1/workers/{alice_worker}"), 403, "NOT_OWNER")
            error_of(await bob.get(f"v1/loading/progress?id={alice_worker}"), 404, "WORKER_NOT_FOUND")
        finally:
            assert (await alice.patch(f"v1/workers/{alice_worker}", json={"shared": False})).status_code == 200
        error_of(await bob.get(f"v1/workers/{alice_worker}"), 404, "WORKER_NOT_FOUND")


def test_sharing_is_asked_for_explicitly_and_engines_only_by_admins(team, listener, alice_worker):
    with team.http("bob") as bob, team.http("alice") as alice:
        before = bob.get("v1/workers").json()["workers"]
        error = error_of(bob.post("v1/workers", json={"model_ref": f"hf:{PUBLIC}", "shared": "yes"}),
                         400, "INVALID_REQUEST")
        assert error["details"] == {"field": "shared"}
        error = error_of(register(bob, listener, shared=True), 403, "ACCESS_DENIED")
        assert "Only an administrator may share an engine" in error["message"]
        assert bob.get("v1/workers").json()["workers"] == before and listener.seen == []
        for body in ({"shared": 1}, {"shared": True, "owner": "bob"}, {}):
            error = error_of(alice.patch(f"v1/workers/{alice_worker}", json=body), 400, "INVALID_REQUEST")
            assert error["details"]["field"] in ("shared", "owner"), error
        assert alice.get(f"v1/workers/{alice_worker}").json()["shared"] is False


async def test_a_shared_engine_that_calls_its_model_like_a_hub_model_comes_after_real_workers(team, alice_worker,
                                                                                              listener):
    engine = registered(team, "admin", listener, shared=True)  # serves "sec/public", by the engine's word
    async with team.clients() as c:
        assert (await c["alice"].patch(f"v1/workers/{alice_worker}", json={"shared": True})).status_code == 200
        try:
            # When bob, who holds nothing himself, asks for sec/public by its OpenAI name
            for _ in range(3):
                r = await c["bob"].post("openai/v1/completions", json={"model": PUBLIC, "prompt": PROMPT,
                                                                       "max_tokens": 3})
                assert r.status_code == 200, r.text
                # Then the worker that really holds it answers, not the engine that only says so
                assert r.json()["choices"][0]["text"] != EVIL
            assert listener.prompts() == []
            # The engine still answers to its model's name where nothing else holds it (alice's unshared)
            assert (await c["alice"].patch(f"v1/workers/{alice_worker}", json={"shared": False})).status_code == 200
            r = await c["bob"].post("openai/v1/completions", json={"model": PUBLIC, "prompt": PROMPT})
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == EVIL
        finally:
            await c["alice"].patch(f"v1/workers/{alice_worker}", json={"shared": False})
            assert (await c["admin"].delete(f"v1/workers/{engine}")).status_code == 204
