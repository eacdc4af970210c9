"""The iteration-level scheduler with made-up requests: no model, no threads, no I/O."""

from __future__ import annotations

import pytest

from rbee_jupyter.engine.scheduler import QueueFull, Scheduler, SchedulerLimits, SequenceSpec


def seq(name: str, prompt: int = 10, max_tokens: int = 10) -> SequenceSpec:
    return SequenceSpec(name, prompt, max_tokens)


def test_admits_up_to_the_batch_size_then_queues_then_refuses():
    s = Scheduler(SchedulerLimits(max_batch_size=2, queue_depth=1))
    assert s.add(seq("a")) == ["a"]
    assert s.add(seq("b")) == ["b"]
    assert s.add(seq("c")) == []  # the batch is full: it waits
    with pytest.raises(QueueFull):
        s.add(seq("d"))  # and the queue too
    assert (s.running, s.waiting) == (["a", "b"], ["c"])
    assert "d" not in s  # a refusal leaves no trace


def test_a_leaving_sequence_frees_its_place_for_the_next_in_line():
    s = Scheduler(SchedulerLimits(max_batch_size=2, queue_depth=4))
    for name in "abcd":
        s.add(seq(name))
    assert s.remove("a") == "running"
    assert s.admit() == ["c"]  # FIFO
    assert s.remove("d") == "waiting"  # a cancel while queued
    assert s.remove("d") is None  # unknown now: idempotent
    assert s.admit() == [] and (s.running, s.waiting) == (["b", "c"], [])


def test_kv_budget_counts_the_padded_rectangle_and_makes_requests_wait():
    # rows × the longest reservation: 2 × 100 fits 200, a third row would need 3 × 100.
    s = Scheduler(SchedulerLimits(max_batch_size=8, kv_budget_tokens=200, queue_depth=8))
    assert s.add(seq("a", 50, 50)) == ["a"]
    assert s.add(seq("b", 10, 10)) == ["b"]  # 2 × 100 = 200
    assert s.kv_reserved() == 200
    assert s.add(seq("c", 1, 1)) == []  # 3 × 100 > 200: waits although it is tiny
    assert s.add(seq("d", 1, 1)) == []  # behind c, never ahead of it
    s.remove("a")  # 2 × 20 = 40, then 3 × 20 = 60: both join
    assert s.admit() == ["c", "d"] and s.kv_reserved() == 3 * 20


def test_a_request_larger_than_the_budget_runs_alone_rather_than_never():
    s = Scheduler(SchedulerLimits(max_batch_size=4, kv_budget_tokens=50, queue_depth=2))
    assert s.add(seq("big", 40, 60)) == ["big"]  # alone: admitted, as an unbatched worker would
    assert s.add(seq("small", 5, 5)) == []  # 2 × 100 > 50
    s.remove("big")
    assert s.admit() == ["small"]


def test_the_head_of_the_queue_is_not_overtaken():
    s = Scheduler(SchedulerLimits(max_batch_size=4, kv_budget_tokens=100, queue_depth=4))
    s.add(seq("a", 20, 20))  # 40
    assert s.add(seq("long", 30, 30)) == []  # 2 × 60 = 120 > 100
    assert s.add(seq("short", 1, 1)) == []  # would fit (2 × 40), but waits behind "long"
    assert s.waiting == ["long", "short"]


def test_queue_depth_zero_means_run_now_or_refuse():
    s = Scheduler(SchedulerLimits(max_batch_size=1, queue_depth=0))
    assert s.add(seq("a")) == ["a"]
    with pytest.raises(QueueFull):
        s.add(seq("b"))


def test_ids_are_unique_and_limits_are_checked():
    s = Scheduler(SchedulerLimits())
    s.add(seq("a"))
    with pytest.raises(ValueError):
        s.add(seq("a"))
    for bad in ({"max_batch_size": 0}, {"kv_budget_tokens": -1}, {"queue_depth": -1}):
        with pytest.raises(ValueError):
            SchedulerLimits(**bad)


# --- configuration: from the server's traits to the worker's spec -----------------------------------

def test_batching_traits_reach_the_hive_config_and_bad_values_are_refused():
    from traitlets import TraitError
    from traitlets.config import Config

    from rbee_jupyter.server.app import RbeeApp

    app = RbeeApp(config=Config({"RbeeApp": {"max_batch_size": 4, "kv_budget_mb": 64.0, "queue_depth": 3}}))
    assert (app.max_batch_size, app.kv_budget_mb, app.queue_depth) == (4, 64.0, 3)
    assert (RbeeApp().max_batch_size, RbeeApp().kv_budget_mb) == (None, None)  # the worker picks for its device
    for bad in ({"max_batch_size": 0}, {"kv_budget_mb": -1.0}):
        with pytest.raises(TraitError):
            RbeeApp(config=Config({"RbeeApp": bad}))


@pytest.mark.parametrize("spec", [{"max_batch_size": 0}, {"max_batch_size": "8"}, {"kv_budget_mb": -1},
                                  {"kv_budget_mb": "lots"}])
def test_the_worker_spec_refuses_bad_batching_values(spec):
    from rbee_jupyter.errors import InvalidRequest
    from rbee_jupyter.worker.protocol import WorkerConfig

    with pytest.raises(InvalidRequest):
        WorkerConfig.from_json({"model_path": "/m", **spec})


def test_default_limits_suit_the_device(tmp_path):
    from transformers import AutoModelForCausalLM

    from rbee_jupyter.testing.tiny_model import make_tiny_model
    from rbee_jupyter.worker.protocol import WorkerConfig
    from rbee_jupyter.worker.runtime import CPU_BATCH, batch_limits

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path / "m"))
    cpu = batch_limits(WorkerConfig(model_path="/m", queue_depth=5), model)
    assert cpu.max_batch_size == CPU_BATCH and cpu.queue_depth == 5 and cpu.kv_budget_tokens > 0
    set_ = batch_limits(WorkerConfig(model_path="/m", max_batch_size=3, kv_budget_mb=1), model)
    assert (set_.max_batch_size, set_.kv_budget_tokens) == (3, (1 << 20) // 1024)  # the tiny Llama: 1 KiB a token
    assert batch_limits(WorkerConfig(model_path="/m", kv_budget_mb=0), model).kv_budget_tokens == 0  # no limit
