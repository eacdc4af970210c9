"""The CPU 4-bit quantizer (rbee_jupyter.engine.quantize) gives bitsandbytes' exact bits, or is not used.

The loader's nf4/fp4 logits parity with ``from_pretrained`` (tests/test_loader.py) runs through
this path on the CPU; here every tensor-level detail is compared with bitsandbytes' own
``Params4bit(...).to("cpu")``, and the guard that sends loads back to bitsandbytes is shown to
trip on a quantizer that differs in a single bucket.
"""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from rbee_jupyter.engine import quantize  # noqa: E402
from rbee_jupyter.engine.loader import load_model  # noqa: E402


def bitsandbytes_own(value: torch.Tensor, **options) -> bnb.nn.Params4bit:
    return bnb.nn.Params4bit(value.clone(), requires_grad=False, **options).to("cpu")


def ours(value: torch.Tensor, **options) -> bnb.nn.Params4bit:
    like = bnb.nn.Params4bit(torch.empty(0), requires_grad=False, **options)
    return quantize.quantize_params4bit(value, like)


def assert_same(a: bnb.nn.Params4bit, b: bnb.nn.Params4bit) -> None:
    assert quantize._bitwise_equal(a.data, b.data)
    assert quantize._same_state(a.quant_state, b.quant_state)
    assert (a.blocksize, a.quant_type, a.compress_statistics, a.quant_storage, a.bnb_quantized) == \
        (b.blocksize, b.quant_type, b.compress_statistics, b.quant_storage, b.bnb_quantized)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(96, 64), (33, 17), (1, 4097), (2048,)])
def test_the_same_bits_as_bitsandbytes(quant_type, compress, dtype, shape):
    generator = torch.Generator().manual_seed(hash((quant_type, compress, shape)) % 2**31)
    value = (torch.randn(shape, generator=generator) * 0.05).to(dtype)
    options = {"blocksize": 64, "compress_statistics": compress, "quant_type": quant_type}
    assert_same(ours(value, **options), bitsandbytes_own(value, **options))


def test_edge_values_nan_inf_zeros_and_values_on_the_bounds():
    bounds, _ = quantize._bounds("nf4")
    value = torch.cat([torch.tensor(bounds), torch.tensor([1.0]), torch.zeros(64),
                       torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 1e-40, 3.0])])
    for quant_type in ("nf4", "fp4"):
        options = {"blocksize": 64, "compress_statistics": False, "quant_type": quant_type}
        assert_same(ours(value, **options), bitsandbytes_own(value, **options))


def test_a_transposed_conv1d_weight_quantizes_like_its_contiguous_copy():
    weight = torch.randn(48, 80).T  # GPT-2's Conv1D weights are transposed before quantizing
    options = {"blocksize": 64, "compress_statistics": True, "quant_type": "nf4"}
    assert_same(ours(weight, **options), bitsandbytes_own(weight.contiguous(), **options))


def test_a_differing_quantizer_is_refused_and_loads_go_through_bitsandbytes(monkeypatch, rbee_tiny_model):
    assert quantize.fast_cpu_quantization("nf4")  # the installed bitsandbytes: proven equal
    reference = load_model(rbee_tiny_model, quantization="nf4")

    def one_bucket_off(scaled, bounds):  # >= instead of >: differs only for values exactly on a bound
        q = torch.zeros(scaled.shape, dtype=torch.uint8)
        for bound in bounds:
            q += scaled >= bound
        return q

    calls = []
    monkeypatch.setattr(quantize, "_buckets", one_bucket_off)
    quantize._proven_equal.cache_clear()
    try:
        assert not quantize.fast_cpu_quantization("nf4")
        monkeypatch.setattr(quantize, "quantize_params4bit", lambda *a: calls.append(a) or pytest.fail("used"))
        model = load_model(rbee_tiny_model, quantization="nf4")  # falls back: still bitsandbytes' bits
        assert calls == []
        ids = torch.tensor([[1, 5, 9, 42, 7]])
        with torch.inference_mode():
            assert torch.equal(model(ids).logits, reference(ids).logits)
        for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
            assert quantize._bitwise_equal(a.data, b.data), name
    finally:
        quantize._proven_equal.cache_clear()
