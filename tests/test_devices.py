"""Placement planning against made-up inventories, and the device_map it turns into."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from rbee_jupyter.engine.devices import (
    GiB, MiB, Device, Holder, Quota, allowed_inventory, check_allowed, default_margin, inventory, parse_bytes,
    parse_device_spec, plan_placement,
)
from rbee_jupyter.errors import DeviceNotAvailable, InsufficientRam, InsufficientVram, InvalidRequest, QuotaExceeded


@dataclass(frozen=True)
class Block:
    name: str
    bytes: int
    tied_to: str | None = None


def gpu(i: int, free_gib: float, total_gib: float = 80) -> Device:
    return Device(f"cuda:{i}", "cuda", int(total_gib * GiB), int(free_gib * GiB), f"GPU {i}")


CPU = Device("cpu", "cpu", 64 * GiB, 48 * GiB, "CPU")


def model(layers: int = 8, layer_gib: float = 1.0) -> list[Block]:
    """Embeddings, N equal layers, norm and an untied head: a typical decoder."""
    return [Block("embeddings", GiB // 2), *[Block(f"layers.{i}", int(layer_gib * GiB)) for i in range(layers)],
            Block("norm", 4096), Block("head", GiB // 2)]


def devices_in_order(plan) -> list[str]:
    return list(dict.fromkeys(plan.assignments.values()))


# --- filling --------------------------------------------------------------------------------------

def test_single_gpu_takes_everything_when_it_fits():
    plan = plan_placement(model(), "cuda:0", [CPU, gpu(0, 40)])
    assert set(plan.assignments.values()) == {"cuda:0"}
    assert plan.bytes_per_device == {"cuda:0": sum(b.bytes for b in model())}


def test_spills_over_in_order_and_keeps_layers_contiguous():
    # cuda:0 usable: 6 GiB free - 614 MiB margin (10% of its 6 GiB, more than 512 MiB) = 5.4 GiB
    inv = [CPU, gpu(0, 6, total_gib=6), gpu(1, 40), gpu(2, 40)]
    plan = plan_placement(model(), "auto", inv)
    a = plan.assignments
    assert [a[n] for n in ("embeddings", "layers.0", "layers.3", "layers.4")] == ["cuda:0"] * 2 + ["cuda:0", "cuda:1"]
    assert a["layers.7"] == a["norm"] == a["head"] == "cuda:1"
    assert devices_in_order(plan) == ["cuda:0", "cuda:1"]  # cuda:2 unused, the CPU never chosen by "auto"
    assert plan.bytes_per_device["cuda:0"] == GiB // 2 + 4 * GiB


def test_gpus_with_different_free_memory_fill_to_their_own_capacity():
    inv = [gpu(0, 3.6, total_gib=4), gpu(1, 2.6, total_gib=4), gpu(2, 20, total_gib=24)]  # margins 512 MiB
    plan = plan_placement(model(), ["cuda:0", "cuda:1", "cuda:2"], inv)
    per = {d: [b for b, dev in plan.assignments.items() if dev == d] for d in ("cuda:0", "cuda:1", "cuda:2")}
    assert per["cuda:0"] == ["embeddings", "layers.0", "layers.1"]  # 2.5 GiB of 3.1 usable
    assert per["cuda:1"] == ["layers.2", "layers.3"]  # 2 GiB of 2.1 usable
    assert per["cuda:2"][0] == "layers.4" and per["cuda:2"][-1] == "head"


def test_list_order_is_fill_order():
    plan = plan_placement(model(layers=2), ["cuda:1", "cuda:0"], [gpu(0, 40), gpu(1, 40)])
    assert set(plan.assignments.values()) == {"cuda:1"}


def test_max_memory_caps_a_device():
    plan = plan_placement(model(), "auto", [gpu(0, 70), gpu(1, 70)], max_memory={"cuda:0": "2GiB"})
    assert plan.bytes_per_device["cuda:0"] <= 2 * GiB
    assert plan.assignments["layers.1"] == "cuda:1"
    assert plan.assignments["layers.0"] == "cuda:0"


def test_max_memory_never_exceeds_free_memory():
    with pytest.raises(InsufficientVram):
        plan_placement(model(), "cuda:0", [gpu(0, 4)], max_memory={"cuda:0": 100 * GiB})


def test_exact_fit_is_accepted():
    blocks = model(layers=2)
    need = sum(b.bytes for b in blocks)
    plan = plan_placement(blocks, "cuda:0", [gpu(0, 10)], margin_bytes=10 * GiB - need)
    assert plan.bytes_per_device == {"cuda:0": need}
    with pytest.raises(InsufficientVram):
        plan_placement(blocks, "cuda:0", [gpu(0, 10)], margin_bytes=10 * GiB - need + 1)


def test_tied_head_follows_its_embeddings():
    blocks = [Block("embeddings", 2 * GiB), Block("layers.0", 3 * GiB), Block("layers.1", 3 * GiB),
              Block("head", 0, tied_to="embeddings")]
    plan = plan_placement(blocks, "auto", [gpu(0, 5.6, total_gib=6), gpu(1, 40)])
    assert plan.assignments["layers.1"] == "cuda:1"
    assert plan.assignments["head"] == "cuda:0"


# --- refusals ---------------------------------------------------------------------------------------

def test_does_not_fit_reports_need_and_have_in_mb():
    with pytest.raises(InsufficientVram) as info:
        plan_placement(model(), "auto", [gpu(0, 4, total_gib=4), gpu(1, 2.5, total_gib=4)])
    need_mb = -(-sum(b.bytes for b in model()) // MiB)
    have_mb = (3 * GiB + 512 * MiB + 2 * GiB) // MiB  # free minus the 512 MiB margins
    assert info.value.details["need_mb"] == need_mb and info.value.details["have_mb"] == have_mb
    assert str(need_mb) in info.value.message and str(have_mb) in info.value.message
    assert info.value.status == 507 and info.value.code == "INSUFFICIENT_VRAM"


def test_fragmentation_is_explained_even_when_the_total_fits():
    blocks = [Block("embeddings", 3 * GiB), Block("layers.0", 3 * GiB)]
    with pytest.raises(InsufficientVram, match="layers.0"):
        plan_placement(blocks, "auto", [gpu(0, 4.5, total_gib=5), gpu(1, 2.9, total_gib=3)], margin_bytes=0)


def test_cpu_plan_checks_host_ram():
    small_host = Device("cpu", "cpu", 16 * GiB, 6 * GiB, "CPU")
    with pytest.raises(InsufficientRam) as info:
        plan_placement(model(), "cpu", [small_host])
    assert info.value.details["need_mb"] > info.value.details["have_mb"]
    assert plan_placement(model(layers=2), "cpu", [small_host]).assignments["head"] == "cpu"


@pytest.mark.parametrize("spec", ["cuda:7", ["cuda:0", "cuda:7"]])
def test_unknown_gpu_lists_the_devices_that_exist(spec):
    with pytest.raises(DeviceNotAvailable) as info:
        plan_placement(model(), spec, [CPU, gpu(0, 40)])
    assert info.value.details["available"] == ["cpu", "cuda:0"]
    assert "cuda:7" in info.value.message and "cuda:0" in info.value.message
    assert info.value.status == 400


def test_auto_without_gpus_never_falls_back_to_cpu():
    with pytest.raises(DeviceNotAvailable, match="cpu"):
        plan_placement(model(layers=1), "auto", [CPU])


def test_max_memory_for_unknown_device_is_refused():
    with pytest.raises(DeviceNotAvailable):
        plan_placement(model(), "cuda:0", [gpu(0, 40)], max_memory={"cuda:3": GiB})


def test_default_margins():
    assert default_margin(gpu(0, 1, total_gib=80)) == 8 * GiB
    assert default_margin(gpu(0, 1, total_gib=4)) == 512 * MiB
    assert default_margin(CPU) == max(CPU.total_bytes // 20, GiB)


# --- parsing --------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, parsed", [("auto", "auto"), ("cpu", "cpu"), ("CUDA:1", "cuda:1"), ("cuda", "cuda:0"),
                                         (["cuda:1", "cuda:0"], ["cuda:1", "cuda:0"]),
                                         (["cuda:0", "cpu"], ["cuda:0", "cpu"])])
def test_parse_device_spec_accepts(raw, parsed):
    assert parse_device_spec(raw) == parsed


@pytest.mark.parametrize("raw", [None, 0, {"cuda": 0}, "", [], ["auto"], ["cuda:0", "cuda:0"], [1]])
def test_parse_device_spec_rejects_malformed(raw):
    with pytest.raises(InvalidRequest) as info:
        parse_device_spec(raw)
    assert not isinstance(info.value, DeviceNotAvailable)


@pytest.mark.parametrize("raw", ["tpu", "mps", "cuda:x"])
def test_parse_device_spec_unknown_kind_is_not_available(raw):
    with pytest.raises(DeviceNotAvailable) as info:
        parse_device_spec(raw)
    assert "cpu" in info.value.details["available"]


@pytest.mark.parametrize("raw, value", [(123, 123), ("2GiB", 2 * GiB), ("1.5 GB", 1_500_000_000), ("512MiB", 512 * MiB),
                                        ("100", 100), ("64kb", 64_000)])
def test_parse_bytes(raw, value):
    assert parse_bytes(raw) == value


@pytest.mark.parametrize("raw", ["lots", -1, True])
def test_parse_bytes_rejects(raw):
    with pytest.raises(InvalidRequest):
        parse_bytes(raw)


# --- the real machine ------------------------------------------------------------------------------

def test_inventory_always_has_the_cpu_first():
    devices = inventory()
    assert devices[0].name == "cpu" and devices[0].kind == "cpu"
    assert 0 < devices[0].free_bytes <= devices[0].total_bytes
    assert all(d.kind == "cuda" and d.name.startswith("cuda:") for d in devices[1:])


# --- device_map for a 2-GPU plan ---------------------------------------------------------------------

@pytest.mark.parametrize("arch, tied", [("llama", False), ("gpt2", True)])
def test_device_map_for_a_two_gpu_plan_covers_every_tensor(tmp_path, arch, tied):
    from accelerate import init_empty_weights
    from accelerate.utils import check_device_map
    from transformers import AutoConfig, AutoModelForCausalLM

    from rbee_jupyter.engine.loader import device_map_for, plan_blocks
    from rbee_jupyter.testing import make_tiny_model

    folder = make_tiny_model(tmp_path / arch, arch=arch, tie_word_embeddings=tied)
    blocks = plan_blocks(folder)
    half = sum(b.bytes for b in blocks) // 2
    inv = [CPU, Device("cuda:0", "cuda", 10 * GiB, half + 10 * GiB, "A"),
           Device("cuda:1", "cuda", 40 * GiB, 20 * GiB, "B")]
    plan = plan_placement(blocks, "auto", inv, margin_bytes=10 * GiB)  # cuda:0 holds about half the model
    device_map = device_map_for(blocks, plan.assignments)

    assert set(device_map.values()) == {"cuda:0", "cuda:1"}
    layers = [m for m in device_map if m.rsplit(".", 1)[-1].isdigit()]
    assert len(layers) == 4 and device_map[layers[0]] == "cuda:0" and device_map[layers[-1]] == "cuda:1"
    head = "lm_head"
    embeddings = "transformer.wte" if arch == "gpt2" else "model.embed_tokens"
    assert device_map[embeddings] == "cuda:0"
    assert device_map[head] == ("cuda:0" if tied else "cuda:1")
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    check_device_map(skeleton, device_map)  # raises if any parameter is left without a device


# --- allowed devices (a server's share of a shared node) -------------------------------------------

NODE = [CPU, gpu(0, 70), gpu(1, 70), gpu(2, 70)]


def test_auto_means_the_allowed_gpus_in_their_listed_order():
    plan = plan_placement(model(), "auto", NODE, allowed=["cuda:2", "cuda:1", "cpu"],
                          max_memory={"cuda:2": "3GiB"})
    assert devices_in_order(plan) == ["cuda:2", "cuda:1"]  # never cuda:0, never the CPU


@pytest.mark.parametrize("spec", ["cuda:0", ["cuda:1", "cuda:0"]])
def test_a_device_outside_allowed_is_refused_listing_the_allowed_ones(spec):
    with pytest.raises(DeviceNotAvailable) as info:
        plan_placement(model(), spec, NODE, allowed=["cuda:1", "cpu"])
    assert info.value.status == 400 and info.value.code == "DEVICE_NOT_AVAILABLE"
    assert info.value.details == {"device": "cuda:0", "available": ["cuda:1", "cpu"], "allowed": ["cuda:1", "cpu"]}
    assert "cuda:0" in info.value.message and "cuda:1, cpu" in info.value.message
    assert "c.RbeeApp.allowed_devices" in info.value.message


def test_auto_with_only_the_cpu_allowed_is_refused_not_moved_to_the_cpu():
    with pytest.raises(DeviceNotAvailable, match="allowed: cpu"):
        plan_placement(model(layers=1), "auto", NODE, allowed=["cpu"])
    assert plan_placement(model(layers=1), "cpu", NODE, allowed=["cpu"]).assignments["head"] == "cpu"


def test_max_memory_for_a_device_outside_allowed_is_refused():
    with pytest.raises(DeviceNotAvailable, match="cuda:2"):
        check_allowed("cuda:0", ["cuda:0"], {"cuda:2": "1GiB"})


def test_an_allowed_device_the_machine_lacks_is_not_available():
    with pytest.raises(DeviceNotAvailable) as info:
        plan_placement(model(), "cuda:5", NODE, allowed=["cuda:5", "cuda:1"])
    assert info.value.details["available"] == ["cuda:1"]


def test_allowed_inventory_keeps_the_allowed_order_and_drops_the_rest():
    assert [d.name for d in allowed_inventory(NODE, ["cuda:1", "cpu", "cuda:9"])] == ["cuda:1", "cpu"]
    assert allowed_inventory(NODE, None) == NODE


# --- per-server quota -------------------------------------------------------------------------------

def held(worker_id: str, device: str, mb: int, ref: str = "hf:org/other") -> Holder:
    return Holder(worker_id, ref, device, mb * MiB)


def test_quota_counts_what_the_workers_hold():
    quota = Quota({"cuda:0": 6000 * MiB}, (held("w-a", "cuda:0", 2500), held("w-b", "cuda:0", 1500),
                                           held("w-a", "cpu", 10)))
    assert quota.in_use("cuda:0") == 4000 * MiB and quota.left("cuda:0") == 2000 * MiB
    assert quota.left("cpu") is None  # no limit there
    assert Quota({"cuda:0": MiB}, (held("w-a", "cuda:0", 5),)).left("cuda:0") == 0


def test_the_quota_caps_a_device_and_the_plan_spills_to_the_next_allowed_one():
    # cuda:0 has 70 GiB free, but this server may hold 4 GiB there and already holds 1 GiB
    quota = Quota({"cuda:0": 4 * GiB}, (held("w-a", "cuda:0", 1024),))
    plan = plan_placement(model(), "auto", NODE, allowed=["cuda:0", "cuda:1"], quota=quota)
    assert plan.bytes_per_device["cuda:0"] == GiB // 2 + 2 * GiB  # embeddings + 2 layers: <= 3 GiB left
    assert plan.assignments["layers.2"] == "cuda:1" and plan.assignments["head"] == "cuda:1"


def test_the_quota_and_max_memory_both_cap_the_smaller_wins():
    quota = Quota({"cuda:0": 8 * GiB})
    plan = plan_placement(model(), "auto", NODE, max_memory={"cuda:0": "3GiB"}, quota=quota)
    assert plan.bytes_per_device["cuda:0"] <= 3 * GiB
    plan = plan_placement(model(), "auto", NODE, max_memory={"cuda:0": "30GiB"}, quota=quota)
    assert 7 * GiB < plan.bytes_per_device["cuda:0"] <= 8 * GiB


def test_over_quota_is_refused_with_need_quota_in_use_and_the_holders():
    quota = Quota({"cuda:0": 6000 * MiB}, (held("w-a", "cuda:0", 2500, "hf:org/big"),
                                           held("w-b", "cuda:0", 1500, "hf:org/small")))
    with pytest.raises(QuotaExceeded) as info:
        plan_placement(model(), "cuda:0", NODE, quota=quota)  # 9 GiB; the GPU has 70 GiB free
    e = info.value
    assert e.status == 507 and e.code == "QUOTA_EXCEEDED"
    assert e.details == {
        "need_mb": 9 * 1024 + 1, "quota_mb": {"cuda:0": 6000}, "in_use_mb": {"cuda:0": 4000},
        "workers": [{"id": "w-a", "model_ref": "hf:org/big", "device": "cuda:0", "mb": 2500},
                    {"id": "w-b", "model_ref": "hf:org/small", "device": "cuda:0", "mb": 1500}],
        "devices": ["cuda:0"]}
    for text in ("9217 MB", "quota 6000 MB", "4000 MB in use", "w-a (hf:org/big, 2500 MB)", "w-b",
                 "c.RbeeApp.device_quota_mb"):
        assert text in e.message


def test_over_quota_on_every_allowed_gpu_of_an_auto_plan():
    quota = Quota({"cuda:0": 4 * GiB, "cuda:1": 4 * GiB}, (held("w-a", "cuda:1", 1024),))
    with pytest.raises(QuotaExceeded) as info:
        plan_placement(model(), "auto", NODE, allowed=["cuda:0", "cuda:1"], quota=quota)
    assert info.value.details["quota_mb"] == {"cuda:0": 4096, "cuda:1": 4096}
    assert info.value.details["in_use_mb"] == {"cuda:0": 0, "cuda:1": 1024}


def test_a_model_too_big_for_the_device_itself_is_insufficient_vram_not_quota():
    quota = Quota({"cuda:0": 100 * GiB})
    with pytest.raises(InsufficientVram):
        plan_placement(model(), "cuda:0", [gpu(0, 4, total_gib=4)], quota=quota)
    with pytest.raises(InsufficientVram):  # the quota is not the reason, so it is not the answer
        plan_placement(model(), "cuda:0", [gpu(0, 4, total_gib=4)], quota=Quota({"cuda:0": GiB}))


def test_a_cpu_quota_is_quota_exceeded_not_insufficient_ram():
    with pytest.raises(QuotaExceeded) as info:
        plan_placement(model(layers=2), "cpu", NODE, quota=Quota({"cpu": 1000 * MiB}))
    assert info.value.details["need_mb"] == 3 * 1024 + 1 and info.value.details["workers"] == []


# --- dtypes the device cannot compute in ------------------------------------------------------------

def test_bf16_on_a_gpu_before_ampere_is_refused_at_post_and_fp16_is_not(tmp_path):
    """No GPU here: the inventory is made up, as everywhere in this file. The hive's check is the
    one POST v1/workers runs before any download (tests/test_early_refusal.py)."""
    from rbee_jupyter.core.hive import Hive, HiveConfig, LoadRequest
    from rbee_jupyter.errors import DtypeNotSupported

    hive = Hive(HiveConfig(cache_dir=tmp_path / "c", catalog_path=tmp_path / "catalog.sqlite"))
    inventory_ = [CPU, Device("cuda:0", "cuda", 16 * GiB, 15 * GiB, "Tesla T4", (7, 5)),
                  Device("cuda:1", "cuda", 80 * GiB, 79 * GiB, "A100", (8, 0))]
    body = {"model_ref": "hf:org/model", "device": "cuda:0", "dtype": "bf16"}

    def check(**change) -> None:
        hive.validate_load(LoadRequest.from_json({**body, **change}), devices=inventory_)

    for refused in ({}, {"device": "auto"}, {"device": ["cuda:1", "cuda:0"]}):
        with pytest.raises(DtypeNotSupported) as e:
            check(**refused)
        assert e.value.code == "DTYPE_NOT_SUPPORTED" and e.value.status == 400
        assert e.value.details["devices"] == ["cuda:0"] and "Tesla T4, compute capability 7.5" in str(e.value)
    for accepted in ({"device": "cuda:1"}, {"dtype": "fp16"}, {"dtype": None}, {"device": "cpu"}):
        check(**accepted)
