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
