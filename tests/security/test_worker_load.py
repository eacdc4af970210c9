"""A worker's load on a shared hive: its owner sees it in full, other users only once it is shared, in its public view.

Its own service-mode server (100 ms per decode step, so that four streams of 48 tokens last five
seconds or more, across several of the hive's once-a-second readings): alice
loads a worker, runs four streams on it, and bob looks at ``v1/workers`` and the feed.
"""

from __future__ import annotations

import threading

import pytest

from rbee_jupyter.testing.feed import FeedReader, stats_of, until
from rbee_jupyter.worker.protocol import TOKEN_DELAY_ENV

from .conftest import PROMPT, PUBLIC, start_team

WAIT_S = 120.0
COUNTERS = ("active_sequences", "queue_length", "batch_size", "max_batch_size", "tokens_per_second")


@pytest.fixture(scope="module")
def load_team(security_hub, rbee_tiny_model, tmp_path_factory):
    server, made = start_team(tmp_path_factory.mktemp("load"), security_hub, rbee_tiny_model,
                              env={TOKEN_DELAY_ENV: "0.1"}, max_batch_size=8)
    with server:
        yield made


def listed(client, worker_id: str) -> dict | None:
    return next((w for w in client.get("v1/workers").json()["workers"] if w["id"] == worker_id), None)


def run_streams(team, worker_id: str, n: int = 4) -> list[threading.Thread]:
    def one() -> None:
        with team.http("alice") as alice, alice.stream("POST", "v1/inference", timeout=300, json={
                "worker_id": worker_id, "prompt": PROMPT, "max_tokens": 48, "temperature": 0}) as r:
            assert r.status_code == 200
            for _ in r.iter_text():
                pass
    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def test_others_see_a_shared_workers_load_in_its_public_view_only(load_team):
    team = load_team
    with team.http("alice") as alice, team.http("bob") as bob:
        r = alice.post("v1/workers", json={"model_ref": f"hf:{PUBLIC}", "device": "cpu"})
        assert r.status_code == 202, r.text
        worker_id = r.json()["worker_id"]
        try:
            with alice.stream("GET", f"v1/loading/progress?id={worker_id}", timeout=300) as progress:
                assert '"stage":"ready"' in "".join(progress.iter_text()).replace(" ", "")
            # Given: bob follows the feed; the worker is alice's alone
            with FeedReader(bob) as bobs, FeedReader(alice) as alices:
                bobs.wait_for(lambda es: any(e["topic"] == "snapshot" for e in es), "bob's snapshot")
                alices.wait_for(lambda es: any(e["topic"] == "snapshot" for e in es), "alice's snapshot")
                threads = run_streams(team, worker_id)
                mine = until(lambda: (w := listed(alice, worker_id))["active_sequences"] == 4 and w,
                             "alice to see four active sequences")
                assert mine["owner"] == "alice" and mine["max_batch_size"] == 8
                alices.wait_for(lambda es: any(s["active_sequences"] == 4 for s in stats_of(es, worker_id)),
                                "the load on alice's feed")
                assert listed(bob, worker_id) is None  # not shared: bob learns nothing of it
                for t in threads:
                    t.join(WAIT_S)
                until(lambda: listed(alice, worker_id)["state"] == "idle", "the worker to be idle")
                assert stats_of(bobs.events(), worker_id) == []

                # When: alice shares it and runs four streams again
                assert alice.patch(f"v1/workers/{worker_id}", json={"shared": True}).status_code == 200
                threads = run_streams(team, worker_id)
                # Then: bob sees its load, in its public view (no owner, no process)
                theirs = until(lambda: (w := listed(bob, worker_id)) and w["active_sequences"] == 4 and w,
                               "bob to see four active sequences")
                assert "owner" not in theirs and "pid" not in theirs and theirs["shared"] is True
                assert set(COUNTERS) <= set(theirs) and theirs["max_batch_size"] == 8
                seen = bobs.wait_for(lambda es: [s for s in stats_of(es, worker_id) if s["active_sequences"] == 4],
                                     "the load on bob's feed")
                assert all("owner" not in s and "pid" not in s for s in seen)
                for t in threads:
                    t.join(WAIT_S)
                zero = until(lambda: (w := listed(bob, worker_id))["state"] == "idle" and w, "idle for bob")
                assert (zero["active_sequences"], zero["queue_length"], zero["tokens_per_second"]) == (0, 0, 0)

                # When: she takes it back, it leaves bob's list and his sidebar's (a "removed" on his feed)
                assert alice.patch(f"v1/workers/{worker_id}", json={"shared": False}).status_code == 200
                bobs.wait_for(lambda es: any(e["topic"] == "worker" and e["action"] == "removed"
                                             and e["worker"] == {"id": worker_id} for e in es), "removed for bob")
                assert listed(bob, worker_id) is None
                assert any(e["topic"] == "worker" and e["action"] == "unshared" and e["worker"]["owner"] == "alice"
                           for e in alices.wait_for(lambda es: es, "alice's feed"))
        finally:
            assert alice.delete(f"v1/workers/{worker_id}").status_code == 204
