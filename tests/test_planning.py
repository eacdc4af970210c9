"""Planning a load off the event loop: ``Hive.load_async`` (what ``POST v1/workers`` uses).

The first load of a server imports transformers and builds the model's skeleton to size
its blocks: seconds in which a server that planned on its event loop answered nothing
(not even other users' streams). The slow step here is made to wait on a gate, because a
first import cannot be repeated in a process that already did it; everything else is the
real hive, a real worker process and a real model.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from rbee_jupyter.core import hive as hive_module
from rbee_jupyter.errors import QuotaExceeded
from rbee_jupyter.core.hive import Hive, HiveConfig
from rbee_jupyter.core.jobs import JobState
from rbee_jupyter.engine.loader import plan_blocks


WAIT_S = 60.0  # bound on waiting for what will happen (a thread reaches the gate, a plan) on a busy machine


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch):
    """Every checkpoint read waits until the test opens the gate; ``entered`` says one is waiting."""
    opened, entered = threading.Event(), threading.Event()
    real = hive_module.Hive._blocks

    def gated(self, req, path):
        entered.set()
        assert opened.wait(WAIT_S), "the test never opened the gate"
        return real(self, req, path)

    monkeypatch.setattr(hive_module.Hive, "_blocks", gated)
    return opened, entered


async def make_hive(tmp_path: Path, model: Path, **config) -> Hive:
    """A hive that already knows the model, so a load plans before it answers (no download first)."""
    hive = Hive(HiveConfig(cache_dir=tmp_path / "cache", catalog_path=tmp_path / "catalog.sqlite", **config))
    assert await hive.download(f"file://{model}").wait(WAIT_S) is JobState.COMPLETE
    return hive


async def wait_threadsafe(event: threading.Event, timeout: float) -> None:
    assert await asyncio.to_thread(event.wait, timeout), "nothing reached the gate"


async def test_the_loop_keeps_running_while_a_load_reads_its_checkpoint(tmp_path, gate, rbee_tiny_model):
    opened, entered = gate
    hive = await make_hive(tmp_path, rbee_tiny_model)
    try:
        load = asyncio.ensure_future(hive.load_async({"model_ref": f"file://{rbee_tiny_model}", "device": "cpu"}))
        await wait_threadsafe(entered, WAIT_S)
        # The read is stuck in its thread, and yet this coroutine runs: the loop serves other
        # requests meanwhile (planning on the loop would have blocked it until the gate opened).
        assert [d["name"] for d in hive.devices()][0] == "cpu"
        assert not load.done()
        opened.set()
        job = await asyncio.wait_for(load, WAIT_S)
        assert await job.wait(120) is JobState.COMPLETE, job.records[-1].data
        assert job.records[-1].event.to_dict()["stage"] == "ready"
        await hive.unload(job.id)
    finally:
        opened.set()
        await hive.stop()


async def test_two_loads_planned_at_once_cannot_both_take_the_same_room(tmp_path, gate, rbee_tiny_model):
    """The plan and its reservation stay one step on the loop, although the reads ran in threads."""
    opened, entered = gate
    need = sum(b.bytes for b in plan_blocks(str(rbee_tiny_model)))
    hive = await make_hive(tmp_path, rbee_tiny_model, device_quota_mb={"cpu": 1.5 * need / 2**20})
    body = {"model_ref": f"file://{rbee_tiny_model}", "device": "cpu"}
    try:
        loads = [asyncio.ensure_future(hive.load_async(body)) for _ in range(2)]
        await wait_threadsafe(entered, WAIT_S)
        opened.set()
        results = await asyncio.wait_for(asyncio.gather(*loads, return_exceptions=True), WAIT_S)
        refused = [r for r in results if isinstance(r, Exception)]
        (job,) = [r for r in results if not isinstance(r, Exception)]
        assert len(refused) == 1 and isinstance(refused[0], QuotaExceeded), results
        assert refused[0].code == "QUOTA_EXCEEDED"
        assert await job.wait(120) is JobState.COMPLETE, job.records[-1].data
        await hive.unload(job.id)
    finally:
        opened.set()
        await hive.stop()
