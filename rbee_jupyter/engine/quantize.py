"""4-bit quantization on the CPU: bitsandbytes' result, bit for bit, in about half the time.

bitsandbytes quantizes CPU tensors with its pure-torch kernel, in which one
``torch.bucketize`` over the 15 bounds between code values takes 60-70 % of an nf4 load.
A left bucket is the number of bounds below the value, so 15 vectorised comparisons give
the same indices about twice as fast. Everything else follows bitsandbytes step by step:
block absmax, scaling, clamping, packing two values per byte, and ``functional.quantize_4bit``'s
``QuantState`` (nested 8-bit statistics included, made by bitsandbytes itself).

The loader's promise is the exact result of ``from_pretrained``, so this path is taken only
where it is proven equal: the first time a quantization type is used, a probe tensor with
every edge case (a partial last block, an odd length, zeros, NaN, ±inf, values on the
bounds) is quantized both ways, and any difference — another bitsandbytes version, a native
CPU kernel — sends every load of that type through bitsandbytes' own ``Params4bit``. GPUs
always use bitsandbytes' CUDA kernels.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["fast_cpu_quantization", "quantize_params4bit"]


@functools.lru_cache(maxsize=None)
def _bounds(quant_type: str) -> tuple[list[float], torch.Tensor]:
    """The midpoints between sorted code values (as bitsandbytes computes them) and the sort order."""
    from bitsandbytes.functional import get_4bit_type

    code = get_4bit_type(quant_type, device="cpu")
    order = torch.argsort(code)
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    return midpoints.tolist(), order.to(torch.uint8)


def _buckets(scaled: torch.Tensor, bounds: list[float]) -> torch.Tensor:
    """``torch.bucketize(scaled, bounds)`` (left bins) as uint8: the count of bounds below each value."""
    q = torch.zeros(scaled.shape, dtype=torch.uint8)
    above = torch.empty(scaled.shape, dtype=torch.bool)
    for bound in bounds:
        torch.gt(scaled, bound, out=above)
        q += above
    return q


def _quantize(weight: torch.Tensor, blocksize: int, quant_type: str,
              quant_storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed, absmax) as ``torch.ops.bitsandbytes.quantize_4bit`` gives them on the CPU."""
    bounds, order = _bounds(quant_type)
    flat = weight.reshape(-1).float()
    n = flat.numel()
    rest = n % blocksize
    full = n - rest
    blocks = flat[:full].reshape(full // blocksize, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rest:
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = _buckets(scaled, bounds)
    if not bool(torch.isfinite(absmax).all()):  # a NaN or inf in a block: bucketize puts NaN last
        q[scaled.isnan()] = len(bounds)
    if quant_type != "nf4":
        q = order[q.long()]
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
    if quant_storage != torch.uint8:
        packed = packed.squeeze().view(quant_storage).unsqueeze(1)
    return packed, absmax


def quantize_params4bit(value: torch.Tensor, like: Any) -> Any:
    """``Params4bit(value, **like.__dict__).to("cpu")``, quantized here: ``like`` is the skeleton's
    (unquantized, meta) parameter carrying the options and the module."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState, get_4bit_type, quantize_blockwise

    options = dict(like.__dict__)
    blocksize, quant_type = options.get("blocksize") or 64, options["quant_type"]
    packed, absmax = _quantize(value, blocksize, quant_type, options["quant_storage"])
    code = get_4bit_type(quant_type, device=value.device)
    if options["compress_statistics"]:
        offset = absmax.mean()
        nested, state2 = quantize_blockwise(absmax - offset, blocksize=256)
        state = QuantState(absmax=nested, shape=value.shape, dtype=value.dtype, blocksize=blocksize, code=code,
                           quant_type=quant_type, offset=offset, state2=state2)
    else:
        state = QuantState(absmax=absmax, shape=value.shape, dtype=value.dtype, blocksize=blocksize, code=code,
                           quant_type=quant_type)
    options.update(quant_state=state, bnb_quantized=True)
    param = bnb.nn.Params4bit(packed, requires_grad=False, **options)
    if param.module is not None:
        param.module.quant_state = state
    return param


def fast_cpu_quantization(quant_type: str, quant_storage: torch.dtype = torch.uint8) -> bool:
    """Whether :func:`quantize_params4bit` gives bitsandbytes' exact result here (probed once per type)."""
    return _proven_equal(quant_type, quant_storage)


@functools.lru_cache(maxsize=None)
def _proven_equal(quant_type: str, quant_storage: torch.dtype) -> bool:
    try:
        import bitsandbytes as bnb

        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(64 * 37 + 21, generator=generator) * 3  # a partial last block, odd length
        bounds, _ = _bounds(quant_type)
        # block 0: absmax exactly 1, so its values are compared unscaled, 15 of them exactly on the bounds
        probe[:64] = torch.cat([torch.tensor(bounds), torch.tensor([1.0, -1.0]), torch.linspace(-0.99, 0.99, 47)])
        probe[64:128] = 0.0  # an all-zero block
        probe[130], probe[200], probe[300] = float("nan"), float("inf"), float("-inf")
        for compress in (False, True):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                value = probe.to(dtype).reshape(1, -1)
                theirs = bnb.nn.Params4bit(value.clone(), requires_grad=False, blocksize=64,
                                           compress_statistics=compress, quant_type=quant_type,
                                           quant_storage=quant_storage).to("cpu")
                like = bnb.nn.Params4bit(torch.empty(0), requires_grad=False, blocksize=64,
                                         compress_statistics=compress, quant_type=quant_type,
                                         quant_storage=quant_storage)
                ours = quantize_params4bit(value, like)
                if not (_bitwise_equal(ours.data, theirs.data) and _same_state(ours.quant_state, theirs.quant_state)):
                    return False
        return True
    except Exception:  # noqa: BLE001 - anything unexpected: bitsandbytes' own path
        return False


def _same_state(a: Any, b: Any) -> bool:
    """Bitwise equality of two ``QuantState`` (bitsandbytes' own ``==`` allows a tolerance)."""
    if (a is None) != (b is None):
        return False
    if a is None:
        return True
    for name in ("absmax", "code", "offset"):
        x, y = getattr(a, name, None), getattr(b, name, None)
        if (x is None) != (y is None) or (x is not None and not _bitwise_equal(x, y)):
            return False
    plain = ("shape", "dtype", "blocksize", "quant_type")
    return all(getattr(a, n) == getattr(b, n) for n in plain) and _same_state(a.state2, b.state2)


def _bitwise_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (``torch.equal`` calls two NaNs different)."""
    return (x.dtype == y.dtype and x.shape == y.shape
            and torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8)))
