"""1000 SSE subscribers, 10 downloads and 2 generations at once on one real server.

What is asserted is completeness: every subscriber gets its stream's terminal event and
``[DONE]``, in order, and both generations finish. How long deliveries took is measured
by ``bench/reliability_load.py`` (same driver), never asserted here.
"""

from __future__ import annotations

import asyncio

from rbee_jupyter.testing.server import ServerProcess

from .conftest import settings_for
from .load import add_load_repos, load_worker, run_load

SUBSCRIBERS, DOWNLOADS, GENERATIONS = 1000, 10, 2


def test_every_subscriber_gets_its_terminal_event_under_load(rbee_hub, rbee_tiny_model, tmp_path):
    refs = add_load_repos(rbee_hub, rbee_tiny_model, DOWNLOADS)
    settings = settings_for(tmp_path, rbee_hub, max_concurrent_downloads=DOWNLOADS, sse_keepalive_s=5.0)
    with ServerProcess(tmp_path, rbee=settings) as server:
        worker_id = load_worker(server, rbee_tiny_model)

        # When
        result = asyncio.run(run_load(server, rbee_hub, refs, worker_id, subscribers=SUBSCRIBERS,
                                      generations=GENERATIONS))

        # Then: every subscriber got the whole stream, in order, ending with complete + [DONE]
        assert len(result.subscribers) == SUBSCRIBERS
        assert result.incomplete() == []
        for sub in result.subscribers:
            ids = [i for i, _, _ in sub.frames if i is not None]
            assert ids == list(range(1, len(ids) + 1))
            assert sub.events[-1]["stage"] == "complete"
        # all ten downloads completed and are in the catalog
        assert sorted(m["ref"] for m in server.get("v1/models").json()["models"]) == sorted(
            refs + [f"file://{rbee_tiny_model}"])
        # both generations streamed to their end
        for frames in result.generations:
            assert frames[0]["type"] == "started" and frames[-2]["type"] == "end" and frames[-1] == "[DONE]"
            indexes = [f["i"] for f in frames if isinstance(f, dict) and f["type"] == "token"]
            assert indexes == list(range(len(indexes))) and 0 < len(indexes) <= frames[-2]["total_tokens"]
        # the downloads were still running once everyone was connected: they ended under the full load
        assert result.terminal_after_connect()
        assert len(result.delays()) >= SUBSCRIBERS
        assert server.proc.poll() is None
