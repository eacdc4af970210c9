"""Service mode: one hive shared by a team, through a real ``jupyter server`` process.

Four users reach the server with their own tokens (``TokenUsersIdentityProvider``):
alice and bob, carol (an admin by her identity provider) and dave (an admin by
``c.RbeeApp.admin_users``). The local hub knows one account token, alice's; the
server has a token of its own that must never be used for users' requests.
"""

import asyncio
import contextlib
import json
import secrets
import shutil
import sqlite3
from types import SimpleNamespace

import httpx
import pytest
from traitlets import TraitError

from rbee_jupyter.core.catalog import Catalog
from rbee_jupyter.core.hive import Hive, HiveConfig
from rbee_jupyter.core.jobs import JobState
from rbee_jupyter.core.owners import Principal, principal_of
from rbee_jupyter.testing.server import ServerProcess
from rbee_jupyter.testing.sse import read_stream

ALICE_HF = "hf_alice_" + secrets.token_hex(8)
SERVER_HF = "hf_server_" + secrets.token_hex(8)
GATED = "owners/gated"
PUBLIC = ["owners/public-a", "owners/public-b", "owners/public-c", "owners/shared", "owners/shared-2",
          "owners/plain"]
USERS = {"alice": False, "bob": False, "carol": True, "dave": False}
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def hub(rbee_hub_session, rbee_tiny_model):
    """The session's hub with our repos, accepting alice's token for gated ones (restored afterwards)."""
    saved = rbee_hub_session.token
    rbee_hub_session.token = ALICE_HF
    for repo in PUBLIC:
        rbee_hub_session.add_repo(repo, rbee_tiny_model)
    rbee_hub_session.add_repo(GATED, rbee_tiny_model, gated=True)
    yield rbee_hub_session
    rbee_hub_session.token = saved


def start_server(folder, hub, *, service_mode):
    tokens = {name: secrets.token_hex(12) for name in USERS}
    users = {tokens[n]: {"name": n, "admin": admin} for n, admin in USERS.items()}
    settings = {"cache_dir": str(folder / "cache"), "catalog_path": str(folder / "catalog.sqlite"),
                "hub_endpoint": hub.url, "sse_keepalive_s": 0.5, "download_retries": 2,
                "download_backoff_s": 0.05, "hf_token": SERVER_HF, "service_mode": service_mode,
                "admin_users": ["dave"], "allowed_local_dirs": [str(folder / "allowed")]}
    server = ServerProcess(folder, rbee=settings, config={"TokenUsersIdentityProvider": {"users": users}},
                           server={"identity_provider_class":
                                   "rbee_jupyter.testing.identity.TokenUsersIdentityProvider"})
    server.tokens = tokens
    return server


@pytest.fixture(scope="module")
def team(hub, rbee_tiny_model, tmp_path_factory):
    """The shared server; ``allowed/tiny`` is a model inside the allowed folder, ``allowed/escape`` a
    symlink out of it."""
    folder = tmp_path_factory.mktemp("team")
    shutil.copytree(rbee_tiny_model, folder / "allowed" / "tiny")
    shutil.copytree(rbee_tiny_model, folder / "allowed" / "tiny-b")
    (folder / "allowed" / "escape").symlink_to(rbee_tiny_model, target_is_directory=True)
    with start_server(folder, hub, service_mode=True) as server:
        server.allowed = folder / "allowed"
        yield server


@contextlib.asynccontextmanager
async def clients(server):
    """One API client per user, by name."""
    made = {name: httpx.AsyncClient(base_url=server.url + "rbee/", timeout=60,
                                    headers={"Authorization": f"token {token}"})
            for name, token in server.tokens.items()}
    try:
        yield made
    finally:
        for c in made.values():
            await c.aclose()


async def start_download(client, ref, *, body=None, headers=None):
    r = await client.post("v1/models/download", json=body or {"model_ref": ref}, headers=headers)
    assert r.status_code == 202, r.text
    return r


async def watch_download(client, download_id, *, on_first_bytes=None, timeout=60):
    """The whole stream; ``on_first_bytes()`` is awaited once bytes arrived (the download is running)."""
    answers = []

    async def on_frame(frame):
        data = frame.data if isinstance(frame.data, dict) else {}
        if on_first_bytes is not None and not answers and data.get("bytes_downloaded", 0) > 0:
            answers.append(await on_first_bytes())
    stream = await read_stream(client, "GET", f"v1/models/download/progress?id={download_id}",
                               headers={"Last-Event-ID": "0"}, on_frame=on_frame, timeout=timeout)
    return stream, (answers[0] if answers else None)


async def generate(client, body, *, on_first_token=None):
    """An inference stream; ``on_first_token(request_id)`` is awaited at its first token."""
    seen = {}

    async def on_frame(frame):
        data = frame.data if isinstance(frame.data, dict) else {}
        if data.get("type") == "started":
            seen["id"] = data["job_id"]
        elif data.get("type") == "token" and on_first_token is not None and "answer" not in seen:
            seen["answer"] = await on_first_token(seen["id"])
    stream = await read_stream(client, "POST", "v1/inference", json=body, on_frame=on_frame, timeout=60)
    return stream, seen.get("answer")


def error_of(r, status, code):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code, error
    return error


async def load(client, ref, *, headers=None):
    r = await client.post("v1/workers", json={"model_ref": ref, "device": "cpu"}, headers=headers)
    assert r.status_code == 202, r.text
    worker_id = r.json()["worker_id"]
    stream = await read_stream(client, "GET", f"v1/loading/progress?id={worker_id}&last_event_id=0", timeout=120)
    assert stream.events[-1]["stage"] == "ready", stream.events[-1]
    return worker_id


# --- cancelling and unloading -----------------------------------------------------------

async def test_only_the_owner_or_an_admin_cancels_a_download(team, rbee_hub):
    rbee_hub.faults.chunk_delay_s = 0.25  # a few seconds per download: time to try to cancel it, however busy
    async with clients(team) as c:
        # When bob, who joined alice's download (one transfer, many watchers), tries to cancel it while it runs
        download_id = (await start_download(c["alice"], f"hf:{PUBLIC[0]}")).json()["download_id"]

        async def join_and_cancel():
            assert (await start_download(c["bob"], f"hf:{PUBLIC[0]}")).json()["download_id"] == download_id
            return await c["bob"].delete(f"v1/models/download/{download_id}")
        stream, refused = await watch_download(c["alice"], download_id, on_first_bytes=join_and_cancel)

        # Then he is told whose it is, and her download goes on to the end
        error = error_of(refused, 403, "NOT_OWNER")
        assert f"download {download_id} belongs to alice" in error["message"] and "admin" in error["message"]
        assert error["details"] == {"owner": "alice", "user": "bob"}
        assert stream.events[-1]["stage"] == "complete" and stream.done
        (entry,) = [m for m in (await c["bob"].get("v1/models")).json()["models"] if m["ref"] == f"hf:{PUBLIC[0]}"]
        assert entry["owner"] == "alice" and entry["restricted"] is False

        # An admin (carol, by her identity provider) and the owner herself may cancel
        for canceller, repo in (("carol", PUBLIC[1]), ("alice", PUBLIC[2])):
            download_id = (await start_download(c["alice"], f"hf:{repo}")).json()["download_id"]
            stream, answer = await watch_download(
                c["alice"], download_id,
                on_first_bytes=lambda who=canceller, i=download_id: c[who].delete(f"v1/models/download/{i}"))
            assert answer.status_code == 204, (canceller, answer.text)
            assert stream.events[-1]["stage"] == "error" and stream.events[-1]["code"] == "CANCELLED", canceller
            assert stream.done


async def test_workers_and_generations_belong_to_who_started_them(team):
    async with clients(team) as c:
        worker_id = await load(c["alice"], f"file://{team.allowed}/tiny")
        (listed,) = [w for w in (await c["alice"].get("v1/workers")).json()["workers"] if w["id"] == worker_id]
        assert listed["owner"] == "alice" and listed["shared"] is False
        assert worker_id not in (await c["bob"].get("v1/workers")).text  # not shared: not his to see

        # Once alice shares it, bob sees it (without its owner) and may use it ...
        assert (await c["alice"].patch(f"v1/workers/{worker_id}", json={"shared": True})).status_code == 200
        (listed,) = [w for w in (await c["bob"].get("v1/workers")).json()["workers"] if w["id"] == worker_id]
        assert listed["shared"] is True and "owner" not in listed
        short = {"worker_id": worker_id, "prompt": PROMPT, "max_tokens": 3, "temperature": 0}
        stream, _ = await generate(c["bob"], short)
        assert stream.events[-1]["type"] == "end" and stream.done

        # ... but not stop alice's generation (nor learn that it exists): it runs to its end
        long = {**short, "max_tokens": 300}
        stream, refused = await generate(c["alice"], long,
                                         on_first_token=lambda i: c["bob"].delete(f"v1/inference/{i}"))
        error_of(refused, 404, "JOB_NOT_FOUND")
        end = stream.events[-1]
        assert end["type"] == "end" and end["stop_reason"] == "length" and end["total_tokens"] == 300
        assert stream.done

        # alice may stop her own
        stream, answer = await generate(c["alice"], {**long, "max_tokens": 1000},
                                        on_first_token=lambda i: c["alice"].delete(f"v1/inference/{i}"))
        assert answer.status_code == 204
        last = stream.events[-1]
        assert last.get("stop_reason") == "cancelled" or last.get("code") == "CANCELLED", last

        # bob cannot unload her worker; it stays and keeps serving
        error = error_of(await c["bob"].delete(f"v1/workers/{worker_id}"), 403, "NOT_OWNER")
        assert f"worker {worker_id} belongs to alice" in error["message"]
        assert (await c["alice"].get(f"v1/workers/{worker_id}")).json()["state"] == "idle"
        stream, _ = await generate(c["alice"], short)
        assert stream.events[-1]["type"] == "end"

        # dave, an admin by c.RbeeApp.admin_users, may
        assert (await c["dave"].delete(f"v1/workers/{worker_id}")).status_code == 204
        assert worker_id not in [w["id"] for w in (await c["alice"].get("v1/workers")).json()["workers"]]


async def test_models_on_disk_are_deleted_by_their_owner_or_an_admin(team):
    async with clients(team) as c:
        ref = f"file://{team.allowed}/tiny-b"
        stream, _ = await watch_download(c["bob"], (await start_download(c["bob"], ref)).json()["download_id"])
        assert stream.events[-1]["stage"] == "complete"
        error = error_of(await c["alice"].delete("v1/models", params={"ref": ref}), 403, "NOT_OWNER")
        assert f"model {ref} belongs to bob" in error["message"]
        assert ref in [m["ref"] for m in (await c["alice"].get("v1/models")).json()["models"]]
        assert (await c["carol"].delete("v1/models", params={"ref": ref})).status_code == 204
        assert ref not in [m["ref"] for m in (await c["alice"].get("v1/models")).json()["models"]]
        assert (team.allowed / "tiny-b" / "config.json").exists()  # a file:// model is only forgotten


# --- local folders ----------------------------------------------------------------------

async def test_file_refs_reach_only_the_allowed_folders(team, rbee_tiny_model):
    async with clients(team) as c:
        inside = f"file://{team.allowed}/tiny"
        stream, _ = await watch_download(c["bob"], (await start_download(c["bob"], inside)).json()["download_id"])
        assert stream.events[-1]["stage"] == "complete"

        workers = (await c["bob"].get("v1/workers")).json()["workers"]
        for ref in (f"file://{rbee_tiny_model}", f"file://{team.allowed}/escape"):
            for route, body in (("v1/models/download", {"model_ref": ref}),
                                ("v1/workers", {"model_ref": ref, "device": "cpu"})):
                error = error_of(await c["bob"].post(route, json=body), 403, "ACCESS_DENIED")
                assert "c.RbeeApp.allowed_local_dirs" in error["message"], error
                assert error["details"]["allowed_local_dirs"] == [str(team.allowed.resolve())]
        # the model cache is no local folder: gated files there are handed out only after the hub said yes
        error = error_of(await c["carol"].post("v1/models/download", json={"model_ref": f"file://{team.folder}/cache"}),
                         403, "ACCESS_DENIED")
        assert "inside the model cache" in error["message"]
        # '..' never gets that far: the ref itself is malformed
        r = await c["bob"].post("v1/models/download", json={"model_ref": f"file://{team.allowed}/../escape"})
        error_of(r, 400, "INVALID_MODEL_REF")
        assert (await c["bob"].get("v1/workers")).json()["workers"] == workers  # nothing was started
        listed = (await c["carol"].get("v1/models")).json()["models"]
        assert f"file://{rbee_tiny_model}" not in [m["ref"] for m in listed]


# --- hub tokens -------------------------------------------------------------------------

async def test_a_users_hub_token_serves_only_that_user(team, rbee_hub):
    ref = f"hf:{GATED}"
    seen = []  # every response body any user got, to search for the token afterwards
    rbee_hub.faults.chunk_delay_s = 0.05
    async with clients(team) as c:
        # When alice downloads the gated repo with her token while bob asks for it without one
        r = await start_download(c["alice"], ref, headers={"X-HF-Token": ALICE_HF})
        r_bob = await start_download(c["bob"], ref)
        seen += [r.text, r_bob.text]
        assert r_bob.json()["download_id"] != r.json()["download_id"]  # he does not ride on her transfer
        (alice, _), (bob, _) = await asyncio.gather(watch_download(c["alice"], r.json()["download_id"]),
                                                    watch_download(c["bob"], r_bob.json()["download_id"]))

        # Then hers completes, his is refused by the hub
        assert alice.events[-1]["stage"] == "complete" and alice.done
        assert bob.events[-1]["stage"] == "error" and bob.events[-1]["code"] == "ACCESS_DENIED"
        assert "X-HF-Token" in bob.events[-1]["message"] and bob.done
        seen += [json.dumps(alice.events), json.dumps(bob.events)]

        # ... and stays refused once the files are on disk: without a token, with a wrong one
        for headers in ({}, {"X-HF-Token": "hf_wrong"}):
            r = await start_download(c["bob"], ref, headers=headers)
            again, _ = await watch_download(c["bob"], r.json()["download_id"])
            assert again.events[-1]["code"] == "ACCESS_DENIED", (headers, again.events)
        error = error_of(await c["bob"].post("v1/workers", json={"model_ref": ref, "device": "cpu"}),
                         403, "ACCESS_DENIED")
        assert "X-HF-Token" in error["message"]
        assert ref not in [m["ref"] for m in (await c["bob"].get("v1/models")).json()["models"]]
        error_of(await c["bob"].delete("v1/models", params={"ref": ref}), 404, "MODEL_NOT_FOUND")

        # alice (the owner) and admins see it, with its owner
        for who in ("alice", "carol"):
            models = (await c[who].get("v1/models")).json()["models"]
            seen.append(json.dumps(models))
            (entry,) = [m for m in models if m["ref"] == ref]
            assert entry["owner"] == "alice" and entry["restricted"] is True

        # A user whose own token has access proves it (here in the body) and gets it, no bytes fetched
        gets = [x for x in rbee_hub.requests if x.method == "GET" and "/resolve/" in x.path]
        r = await start_download(c["bob"], ref, body={"model_ref": ref, "hf_token": ALICE_HF})
        proved, _ = await watch_download(c["bob"], r.json()["download_id"])
        assert proved.events[-1]["stage"] == "complete", proved.events
        assert [x for x in rbee_hub.requests if x.method == "GET" and "/resolve/" in x.path] == gets
        seen += [r.text, json.dumps(proved.events)]

        # alice loads it without sending her token again (she owns it); bob may not use her worker,
        # not even once she shared it
        worker_id = await load(c["alice"], ref)
        r = await c["bob"].post("v1/inference", json={"worker_id": worker_id, "prompt": PROMPT, "max_tokens": 2})
        error_of(r, 404, "WORKER_NOT_FOUND")
        assert (await c["alice"].patch(f"v1/workers/{worker_id}", json={"shared": True})).status_code == 200
        r = await c["bob"].post("v1/inference", json={"worker_id": worker_id, "prompt": PROMPT, "max_tokens": 2})
        assert "gated or private" in error_of(r, 403, "ACCESS_DENIED")["message"]
        r = await c["bob"].post("v1/inference", json={"model_ref": ref, "prompt": PROMPT, "max_tokens": 2})
        error_of(r, 403, "ACCESS_DENIED")
        assert GATED not in [m["id"] for m in (await c["bob"].get("openai/v1/models")).json()["data"]]
        assert GATED in [m["id"] for m in (await c["alice"].get("openai/v1/models")).json()["data"]]

        # bob loads it himself only with a token the hub accepts; then that worker is his to use
        r = await c["bob"].post("v1/workers", json={"model_ref": ref, "device": "cpu", "hf_token": "hf_wrong"})
        assert r.status_code == 202, r.text
        refused = await read_stream(c["bob"], "GET", r.json()["progress_url"].split("/rbee/", 1)[1])
        assert refused.events[-1]["code"] == "ACCESS_DENIED" and refused.done
        bobs = await load(c["bob"], ref, headers={"X-HF-Token": ALICE_HF})
        stream, _ = await generate(c["bob"], {"worker_id": bobs, "prompt": PROMPT, "max_tokens": 2})
        assert stream.events[-1]["type"] == "end"
        for who in ("alice", "bob"):
            seen.append((await c[who].get("v1/workers")).text)
        assert (await c["bob"].delete(f"v1/workers/{bobs}")).status_code == 204
        feed = await read_stream(c["bob"], "GET", "v1/events", stop_after=1)  # the server-wide feed
        assert feed.events[0]["topic"] == "snapshot", feed.events[0]
        assert ref not in [m["ref"] for m in feed.events[0]["models"]]
        seen.append(json.dumps(feed.events))
        assert (await c["alice"].delete(f"v1/workers/{worker_id}")).status_code == 204

    # The token is in no response, no event and no log line; the server's own token was never sent
    assert all(ALICE_HF not in text for text in seen)
    assert ALICE_HF not in team.log() and SERVER_HF not in team.log()
    sent = [x.headers.get("authorization") for x in rbee_hub.requests]
    assert f"Bearer {ALICE_HF}" in sent
    assert not any(SERVER_HF in (a or "") for a in sent)


async def test_one_transfer_for_users_downloading_the_same_public_repo(team, rbee_hub, rbee_tiny_model):
    files = [p.name for p in rbee_tiny_model.iterdir() if p.is_file()]
    rbee_hub.faults.chunk_delay_s = 0.15  # ~2 s per download: the second ask comes before its end, however busy
    async with clients(team) as c:
        # Without tokens: one job, one transfer
        ref = f"hf:{PUBLIC[3]}"
        a, b = await asyncio.gather(start_download(c["alice"], ref), start_download(c["bob"], ref))
        assert a.json()["download_id"] == b.json()["download_id"]
        for stream, _ in await asyncio.gather(watch_download(c["alice"], a.json()["download_id"]),
                                              watch_download(c["bob"], b.json()["download_id"])):
            assert stream.events[-1]["stage"] == "complete"
        # With alice's token: two jobs (his does not use her token), still one transfer per file
        ref = f"hf:{PUBLIC[4]}"
        a, b = await asyncio.gather(start_download(c["alice"], ref, headers={"X-HF-Token": ALICE_HF}),
                                    start_download(c["bob"], ref))
        assert a.json()["download_id"] != b.json()["download_id"]
        for stream, _ in await asyncio.gather(watch_download(c["alice"], a.json()["download_id"]),
                                              watch_download(c["bob"], b.json()["download_id"])):
            assert stream.events[-1]["stage"] == "complete"
    for repo in PUBLIC[3:5]:
        for name in files:
            assert len(rbee_hub.file_gets(repo, name)) == 1, (repo, name)
    tokens_on = {x.headers.get("authorization") for x in rbee_hub.requests if x.repo_id == PUBLIC[4]}
    assert tokens_on == {None, f"Bearer {ALICE_HF}"}


async def test_a_malformed_token_is_refused(team):
    async with clients(team) as c:
        for body, headers in (({"model_ref": f"hf:{GATED}", "hf_token": 5}, None),
                              ({"model_ref": f"hf:{GATED}", "hf_token": ""}, None),
                              ({"model_ref": f"hf:{GATED}", "hf_token": "hf_a"}, {"X-HF-Token": "hf_b"})):
            r = await c["bob"].post("v1/models/download", json=body, headers=headers)
            assert error_of(r, 400, "INVALID_REQUEST")["details"] == {"field": "hf_token"}, body


async def test_share_server_token_lends_the_servers_access_to_everyone(hub, rbee_hub, tmp_path):
    # an in-process hive whose own token (here: the one the hub accepts) is shared on purpose
    hive = Hive(HiveConfig(cache_dir=tmp_path / "cache", catalog_path=tmp_path / "catalog.sqlite",
                           hub_endpoint=hub.url, hf_token=ALICE_HF, service_mode=True, share_server_token=True,
                           download_retries=1))
    try:
        job = hive.download(f"hf:{GATED}", principal=Principal("bob"))
        assert await job.wait(60) is JobState.COMPLETE, job.records[-1].data
        entry = hive.catalog.get(f"hf:{GATED}")
        assert (entry.owner, entry.restricted) == ("bob", True)
        assert {x.headers.get("authorization") for x in rbee_hub.requests if x.repo_id == GATED} == {
            f"Bearer {ALICE_HF}"}
    finally:
        await hive.stop()


# --- outside service mode ---------------------------------------------------------------

async def test_without_service_mode_everyone_may_do_everything(hub, rbee_hub, rbee_tiny_model, tmp_path):
    rbee_hub.faults.chunk_delay_s = 0.25  # ~3 s: the cancel comes before the end, however busy the machine
    with start_server(tmp_path, hub, service_mode=False) as server:
        async with clients(server) as c:
            download_id = (await start_download(c["alice"], f"hf:{PUBLIC[5]}")).json()["download_id"]
            stream, answer = await watch_download(
                c["alice"], download_id, on_first_bytes=lambda: c["bob"].delete(f"v1/models/download/{download_id}"))
            assert answer.status_code == 204 and stream.events[-1]["code"] == "CANCELLED"

            ref = f"file://{rbee_tiny_model}"  # no folder is allowed, and any folder is fine
            stream, _ = await watch_download(c["bob"], (await start_download(c["bob"], ref)).json()["download_id"])
            assert stream.events[-1]["stage"] == "complete"
            (entry,) = (await c["alice"].get("v1/models")).json()["models"]
            assert entry["owner"] is None and entry["restricted"] is False
            assert (await c["alice"].delete("v1/models", params={"ref": ref})).status_code == 204


# --- configuration and storage ----------------------------------------------------------

def test_admins_are_named_by_the_identity_provider_or_the_config():
    assert principal_of(SimpleNamespace(username="eve")) == Principal("eve", admin=False)
    assert principal_of(SimpleNamespace(username="eve", admin=True)).admin
    assert principal_of(SimpleNamespace(username="eve", hub_user={"name": "eve", "admin": True})).admin  # JupyterHub
    assert principal_of(SimpleNamespace(username="eve"), admin_users={"eve"}).admin
    assert principal_of(None) is None


def test_allowed_local_dirs_must_be_absolute():
    from rbee_jupyter.server.app import RbeeApp

    with pytest.raises(TraitError, match="absolute"):
        RbeeApp(allowed_local_dirs=["models"])
    assert RbeeApp(allowed_local_dirs=["/srv/models"]).allowed_local_dirs == ["/srv/models"]


def test_a_catalog_from_before_owners_is_upgraded_in_place(tmp_path):
    path = tmp_path / "catalog.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE models (ref TEXT PRIMARY KEY, repo_id TEXT, revision TEXT, local_path TEXT NOT NULL,"
                   " size_bytes INTEGER NOT NULL, files TEXT NOT NULL, downloaded_at REAL NOT NULL,"
                   " source TEXT NOT NULL)")
        db.execute("INSERT INTO models VALUES ('hf:a/b', 'a/b', 'abc', ?, 1, '[]', 1.0, 'hub')", (str(tmp_path),))
    db.close()
    catalog = Catalog(path)
    (old,) = catalog.list()
    assert (old.ref, old.owner, old.restricted) == ("hf:a/b", None, False)
    old.owner, old.restricted = "alice", True
    catalog.add(old)
    catalog.close()
    again = Catalog(path)  # a second open finds the columns already there
    assert (again.get("hf:a/b").owner, again.get("hf:a/b").restricted) == ("alice", True)
    again.close()


def test_the_python_client_sends_the_users_hub_token_only_when_given(team):
    """``Client(hf_token=...)``: the gated repo arrives with a token the hub accepts, and without
    one the same user gets ACCESS_DENIED (whether or not someone downloaded it before)."""
    from rbee_jupyter.kernel.client import Client
    from rbee_jupyter.errors import AccessDenied

    with_token = Client(team.url, token=team.tokens["bob"], hf_token=ALICE_HF)
    assert with_token.download(f"hf:{GATED}").wait(timeout=60)["stage"] == "complete"
    without = Client(team.url, token=team.tokens["bob"])
    with pytest.raises(AccessDenied, match="X-HF-Token"):
        without.download(f"hf:{GATED}").wait(timeout=60)
