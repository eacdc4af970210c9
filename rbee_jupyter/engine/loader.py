"""Layer-by-layer model loading: meta skeleton, then one block at a time from safetensors.

Why not ``from_pretrained``: it gives no progress between layers, cannot be cancelled half
way, and decides placement itself. This loader reproduces its result exactly (same
logits, bit for bit, for fp32/bf16/fp16 and bitsandbytes nf4/fp4/int8) while it

* builds the model on the meta device, so no memory is spent before the weights arrive;
* reads, per block, exactly the tensors that block needs (opening shards lazily and
  closing them at the end of the block), so host memory stays at about one block
  beyond the loaded model;
* casts or quantizes each tensor on its way to the block's device, reports
  :class:`LoadProgress` after every block, and stops between blocks when cancelled.

Blocks are found generically: the decoder layers are the largest ``nn.ModuleList`` of
modules of one class; what is registered before it is ``"embeddings"``, what comes after
it is ``"norm"`` (final norm, rotary tables, ...) and the output embeddings are ``"head"``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..core.checkpoint import MAX_HEADER_BYTES, checkpoint_files, read_header
from ..core.confine import ModelFolder, check_folder, fd_path, open_resolved, private_copy
from ..errors import Cancelled, InvalidCheckpoint, InvalidRequest, ModelNotFound, OutOfMemory
from ..protocol import DTYPE_NAMES, QUANTIZATIONS

__all__ = ["MAX_HEADER_BYTES", "BlockInfo", "LoadProgress", "load_model", "plan_blocks", "device_map_for",
           "QUANTIZATIONS", "DTYPES"]

Quantization = Literal["nf4", "fp4", "int8"]
#: The protocol's dtype names as torch dtypes (the names and QUANTIZATIONS are the protocol's).
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}

# Suffixes bitsandbytes adds to a quantized ``.weight`` when transformers saves it.
_STATS_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map",
               "quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4")
_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


# --- public data ----------------------------------------------------------------------

@dataclass(frozen=True)
class LoadProgress:
    """What the loader reports after each block (the SSE ``loading_to_vram`` event is built from it).

    ``bytes_on_device`` is cumulative: the bytes the model holds on each device so far,
    counted from the tensors themselves (quantization statistics included).
    """

    layers_loaded: int
    layers_total: int
    block: str
    device: str
    bytes_on_device: dict[str, int]


@dataclass(frozen=True)
class BlockInfo:
    """One unit of loading and placement, as the placement planner sees it.

    ``param_names`` are the model's tensor names (parameters and buffers) this block
    materialises; ``modules`` are the module paths that make up the block (an accelerate
    ``device_map`` is built from them); ``tied_to`` names the block that owns this block's
    only weight when it is tied (a tied LM head lives wherever the embeddings live).
    """

    name: str
    param_names: tuple[str, ...]
    bytes_after_quant: int
    modules: tuple[str, ...] = ()
    tied_to: str | None = None

    @property
    def bytes(self) -> int:
        """Alias the planner uses, so it accepts any object with ``name`` and ``bytes``."""
        return self.bytes_after_quant


# --- options ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Options:
    """Validated load options; ``bnb`` is the transformers config we mirror (None: no quantization)."""

    dtype: torch.dtype
    bnb: Any | None  # transformers.BitsAndBytesConfig
    prequantized: bool

    @property
    def four_bit(self) -> bool:
        return self.bnb is not None and self.bnb.load_in_4bit


def _parse_dtype(value: str | torch.dtype | None, what: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise InvalidRequest(f"Unknown {what} {value!r}: use one of {', '.join(DTYPES)} (or null for the default).",
                         details={"field": what, "value": str(value), "accepted": list(DTYPES)})


def _resolve_options(config, quantization: str | None, dtype, compute_dtype, double_quant: bool) -> _Options:
    """Turn user options plus the checkpoint's own quantization into one ``_Options``.

    ``dtype=None`` follows ``from_pretrained``'s default (``dtype="auto"``): the dtype
    written in config.json, else torch's default (float32).
    """
    from transformers import BitsAndBytesConfig

    if quantization is not None and quantization not in QUANTIZATIONS:
        raise InvalidRequest(f"Unknown quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)} or null.",
                             details={"field": "quantization", "value": str(quantization),
                                      "accepted": list(QUANTIZATIONS)})
    torch_dtype = _parse_dtype(dtype, "dtype")
    torch_compute = _parse_dtype(compute_dtype, "compute_dtype")
    if torch_dtype is None:
        cfg_dtype = getattr(config, "dtype", None)
        if isinstance(cfg_dtype, str):
            cfg_dtype = getattr(torch, cfg_dtype, None)
        torch_dtype = cfg_dtype if isinstance(cfg_dtype, torch.dtype) and cfg_dtype.is_floating_point \
            else torch.get_default_dtype()

    saved = getattr(config, "quantization_config", None)
    if saved is not None:
        return _Options(torch_dtype, _prequantized_config(saved, quantization), prequantized=True)
    if quantization is None:
        return _Options(torch_dtype, None, prequantized=False)
    if quantization == "int8":
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    else:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                                 bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch_compute)
    return _Options(torch_dtype, bnb, prequantized=False)


def _prequantized_config(saved, asked: str | None):
    """The BitsAndBytesConfig a checkpoint was saved with; refuse a conflicting request."""
    from transformers import BitsAndBytesConfig

    data = saved if isinstance(saved, dict) else saved.to_dict()
    method = data.get("quant_method")
    if method != "bitsandbytes":
        raise InvalidCheckpoint(f"The checkpoint is quantized with {method!r}; only bitsandbytes checkpoints "
                                "(nf4, fp4, int8) can be loaded.", details={"quant_method": method})
    bnb = BitsAndBytesConfig.from_dict(dict(data))
    have = "int8" if bnb.load_in_8bit else bnb.bnb_4bit_quant_type
    if asked is not None and asked != have:
        raise InvalidRequest(f"The checkpoint is already quantized as {have}; ask for quantization={have!r} "
                             "or null, or load the unquantized model.",
                             details={"field": "quantization", "value": asked, "checkpoint": have})
    return bnb


# --- checkpoint files ---------------------------------------------------------------------

@dataclass(frozen=True)
class _TensorMeta:
    """Where one checkpoint tensor lives, from the safetensors header (no data read)."""

    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _SAFETENSORS_DTYPE_BYTES.get(self.dtype, 1)


def _checkpoint_tensors(files: list[Path]) -> dict[str, _TensorMeta]:
    """Every tensor of a single-file or sharded safetensors checkpoint, from headers only."""
    return {key: _TensorMeta(file, key, dtype, shape)
            for file in files for key, (dtype, shape) in read_header(file).items()}


def load_tokenizer(path: str | Path, *, confined: bool = True) -> Any:
    """The folder's tokenizer, read only from inside it (links checked) and never running its code.

    transformers reads a private copy of the folder's small files (:func:`.confine.private_copy`),
    made through descriptors of the checked paths, so nothing swapped in after the check is read.

    Args:
        confined: False for a single user's own ``file://`` folder, whose links may lead anywhere.

    Raises:
        InvalidCheckpoint: a file of the folder leads outside it, or the tokenizer cannot be loaded.
    """
    from transformers import AutoTokenizer

    with private_copy(path, confined=confined) as copy:
        try:
            tokenizer = AutoTokenizer.from_pretrained(copy, local_files_only=True, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - any failure is an unusable model folder
            raise InvalidCheckpoint(f"The tokenizer in {path} cannot be loaded: {exc}",
                                    details={"path": str(path)}) from None
    tokenizer.name_or_path = str(Path(path).expanduser().resolve())  # the model's folder, not the gone copy
    return tokenizer


def _check_model_folder(folder: Path, copy: Path | None = None) -> None:
    """404 for a missing folder, 400 for one without config.json (looked for in ``copy`` when given)."""
    if not folder.is_dir():
        raise ModelNotFound(f"Model folder {folder} does not exist.", details={"path": str(folder)})
    if not ((copy or folder) / "config.json").is_file():
        raise InvalidCheckpoint(f"{folder} has no config.json; is this a transformers model folder?",
                                details={"path": str(folder)})


def _load_config(folder: Path, copy: Path):
    """``config.json`` of ``folder``, read from its private copy ``copy``."""
    from transformers import AutoConfig

    _check_model_folder(folder, copy)
    try:
        return AutoConfig.from_pretrained(copy)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad checkpoint to the user
        raise InvalidCheckpoint(f"config.json in {folder} cannot be read: {exc}", details={"path": str(folder)}) \
            from None


def _load_generation_config(copy: Path) -> Any | None:
    """``generation_config.json`` from the private copy, or None (absent or unreadable: the model's defaults)."""
    if not (copy / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig

    with contextlib.suppress(Exception):
        return GenerationConfig.from_pretrained(copy)
    return None


# --- skeleton and blocks --------------------------------------------------------------------

@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create modules in ``dtype``, as transformers does while it builds and converts the skeleton."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _build_skeleton(config, opts: _Options) -> nn.Module:
    """The model with parameters on ``meta`` and buffers real (rotary tables are computed by __init__).

    ``include_buffers=False`` is deliberate: non-persistent buffers are never in the file,
    and creating them with the module is what gives them their correct values.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = _copy_config_without_quantization(config)
    try:
        with init_empty_weights(include_buffers=False), _no_init_weights(), _default_dtype(opts.dtype):
            model = AutoModelForCausalLM.from_config(config, dtype=opts.dtype)
            if opts.bnb is not None:
                _replace_linears(model, opts)
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidCheckpoint(f"Cannot build a causal LM from this config: {exc}") from None
    return model


def _no_init_weights():
    """Skip random initialisation (pointless on meta tensors, yet ~20 ms per layer); loading overwrites it."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        return contextlib.nullcontext()
    return no_init_weights()


def _copy_config_without_quantization(config):
    import copy

    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _modules_to_not_convert(model: nn.Module, bnb) -> list[str]:
    """The modules transformers keeps in full precision: LM head, tied weights, last module, fp32 keep-list."""
    from transformers.quantizers.base import get_keys_to_not_convert

    skip = list(bnb.llm_int8_skip_modules) if bnb.llm_int8_skip_modules is not None \
        else get_keys_to_not_convert(model)
    skip.extend(getattr(model, "_keep_in_fp32_modules", None) or [])
    return sorted(set(skip))


def _replace_linears(model: nn.Module, opts: _Options) -> None:
    """Swap ``nn.Linear``/``Conv1D`` for bitsandbytes layers exactly as transformers' bnb quantizers do."""
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    replace_with_bnb_linear(model, modules_to_not_convert=_modules_to_not_convert(model, opts.bnb),
                            quantization_config=opts.bnb, pre_quantized=opts.prequantized)
    model.is_quantized = True
    model.quantization_method = "bitsandbytes"


def _find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layers: the ``nn.ModuleList`` of one module class holding the most parameters.

    Found by structure, not attribute names, so ``model.layers``, ``transformer.h`` and
    ``gpt_neox.layers`` all work without a table of architectures.
    """
    best: tuple[tuple[int, int], str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        rank = (sum(p.numel() for p in module.parameters()), len(module))
        if best is None or rank > best[0]:
            best = (rank, name, module)
    if best is None:
        raise InvalidCheckpoint(f"{type(model).__name__} has no list of repeated decoder layers to load "
                                "layer by layer.")
    return best[1], best[2]


@dataclass
class _Block:
    """A block's tensors (model names) and modules, before sizes are known."""

    name: str
    tensors: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    tied_to: str | None = None


def _owner(tensor_name: str) -> str:
    return tensor_name.rpartition(".")[0]


def _split_blocks(model: nn.Module, tied_targets: set[str]) -> list[_Block]:
    """Cut the model into embeddings, each layer, norm and head, in execution order.

    Tensors outside the layer list go to "embeddings" when their module is registered
    before the list, to "head" when they belong to the output embeddings, else to "norm".
    """
    list_name, layers = _find_layer_list(model)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    list_pos = order[list_name]
    head_module = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head_module), None) if head_module is not None \
        else None

    embeddings, norm, head = _Block("embeddings"), _Block("norm"), _Block("head")
    per_layer = [_Block(f"layers.{i}", modules=[f"{list_name}.{i}"]) for i in range(len(layers))]
    for tensor in _tensor_names(model):
        owner = _owner(tensor)
        if owner == list_name or owner.startswith(list_name + "."):
            index = int(owner[len(list_name) + 1:].split(".")[0])
            per_layer[index].tensors.append(tensor)
            continue
        if head_name is not None and (owner == head_name or owner.startswith(head_name + ".")):
            block = head
        elif order.get(owner, 0) < list_pos:
            block = embeddings
        else:
            block = norm
        if tensor in tied_targets:
            _add_module(block, owner)
            continue
        block.tensors.append(tensor)
        _add_module(block, owner)
    blocks = [b for b in (embeddings, *per_layer, norm) if b.tensors]
    if head.modules:
        blocks.append(head)
    return blocks


def _add_module(block: _Block, module: str) -> None:
    if module not in block.modules:
        block.modules.append(module)


def _tensor_names(model: nn.Module) -> list[str]:
    """Parameters then buffers, each once, tied duplicates included (the skeleton is not tied yet)."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    return list(dict.fromkeys(names))


def _tied_targets(model: nn.Module) -> dict[str, str]:
    """``{target: source}`` for weights tied after loading (e.g. ``lm_head.weight`` → embeddings)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None and hasattr(model, "get_expanded_tied_weights_keys"):
        tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    return dict(tied or {})


# --- checkpoint key mapping -------------------------------------------------------------------

def _split_stat(key: str, prequantized: bool) -> tuple[str, str]:
    """Split a bitsandbytes statistic key into (the ``.weight`` it belongs to, the statistic name)."""
    if prequantized:
        for stat in _STATS_4BIT:
            if key.endswith(".weight." + stat):
                return key[: -len(stat) - 1], stat
        if key.endswith(".SCB"):
            return key[: -len("SCB")] + "weight", "SCB"
        if key.endswith(".weight_format"):
            return key[: -len("_format")], "weight_format"
    return key, ""


def _map_checkpoint(model: nn.Module, tensors: dict[str, _TensorMeta],
                    prequantized: bool) -> dict[str, dict[str, _TensorMeta]]:
    """Map checkpoint keys to model tensor names with transformers' own renaming rules.

    Uses the model's registered weight renamings (e.g. GPT-NeoX ``embed_out`` → ``lm_head``,
    legacy ``gamma``/``beta``) and adds or strips the base-model prefix (``transformer.``,
    ``model.``) as ``from_pretrained`` does. Returns ``{model_name: {stat: meta}}`` where stat
    ``""`` is the tensor itself and others are bitsandbytes statistics.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model, None, None)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    known = dict.fromkeys(_tensor_names(model), True)
    prefix = getattr(model, "base_model_prefix", None) or None
    sources: dict[str, dict[str, _TensorMeta]] = {}
    for key, meta in tensors.items():
        owner, stat = _split_stat(key, prequantized)
        renamed, converter = rename_source_key(owner, renamings, converters, prefix, known)
        if converter is not None:
            raise InvalidCheckpoint(f"Checkpoint tensor {key!r} needs a fused-weight conversion "
                                    f"({converter}) that the layer-by-layer loader does not support.",
                                    details={"key": key})
        if renamed not in known:
            renamed, _ = rename_source_key(owner, [], [], prefix, known)
        if renamed in known:
            sources.setdefault(renamed, {})[stat] = meta
    return sources


# --- the prepared load ----------------------------------------------------------------------

@dataclass
class _Prepared:
    """Everything known before the first weight is read."""

    folder: Path
    opts: _Options
    model: nn.Module
    blocks: list[_Block]
    sources: dict[str, dict[str, _TensorMeta]]
    tied: dict[str, str]
    fp32_patterns: re.Pattern | None
    copy_files: set[Path] = field(default_factory=set)
    generation_config: Any | None = None


def _prepare(path: str | Path, quantization, dtype, compute_dtype=None, double_quant: bool = False, *,
             confined: bool = True) -> _Prepared:
    # The folder is resolved and checked once; the weights' paths come from that resolution, and
    # are opened without following a link; transformers reads a private copy of the small files:
    # nothing swapped in after the check is read.
    where: ModelFolder = check_folder(path, confined=confined)
    folder = where.root
    _check_model_folder(folder)
    files = checkpoint_files(where)
    with private_copy(where) as copy:
        config = _load_config(folder, copy)
        generation_config = _load_generation_config(copy)
    opts = _resolve_options(config, quantization, dtype, compute_dtype, double_quant)
    tensors = _checkpoint_tensors(files)
    _require_bitsandbytes(opts)
    model = _build_skeleton(config, opts)
    tied = _tied_targets(model)
    blocks = _split_blocks(model, set(tied))
    sources = _map_checkpoint(model, tensors, opts.prequantized)
    _check_complete(model, sources, tied)
    _check_shapes(model, sources, opts)
    for block in blocks:
        block.tied_to = _tied_source_block(block, blocks, tied)
    plan = model._get_dtype_plan(opts.dtype) if hasattr(model, "_get_dtype_plan") else {}
    fp32 = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in plan)) if plan else None
    prep = _Prepared(folder, opts, model, blocks, sources, tied, fp32, generation_config=generation_config)
    prep.copy_files = _files_to_copy_from(prep)
    return prep


def _files_to_copy_from(prep: _Prepared) -> set[Path]:
    """Checkpoint files whose tensors must be copied, not kept as views of the file, on the CPU.

    safetensors hands out CPU tensors that are views of the file's memory map. Where every
    tensor of a file is loaded unchanged, keeping the views is free: nothing is copied, and
    pages are read when first used and shared between processes. But where some tensors of
    a file are cast or quantized, the views of the others pin the whole mapping, and every
    page read for the converted ones stays resident; there, copying bounds resident memory
    to the model plus about one block.
    """
    files = set()
    for name, src in prep.sources.items():
        meta = src.get("")
        if meta is None or meta.file in files:
            continue
        module, attr = _module_and_attr(prep.model, name)
        if prep.opts.bnb is not None and _is_bnb_weight(module, attr):
            if not prep.opts.prequantized:
                files.add(meta.file)
            continue
        tensor = getattr(module, attr)
        if tensor.is_floating_point() and _SAFETENSORS_FLOATS.get(meta.dtype) != _target_dtype(prep, name, tensor):
            files.add(meta.file)
    return files


def _require_bitsandbytes(opts: _Options) -> None:
    if opts.bnb is None:
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise InvalidRequest("Quantization needs the bitsandbytes package: pip install bitsandbytes.") from None


def _check_complete(model: nn.Module, sources: dict, tied: dict[str, str]) -> None:
    """Every parameter must come from the file (or a tie); say which are missing before loading starts."""
    missing = [n for n, _ in model.named_parameters(remove_duplicate=False)
               if "" not in sources.get(n, {}) and n not in tied]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise InvalidCheckpoint(f"The checkpoint lacks {len(missing)} weight(s) the model needs: {shown}.",
                                details={"missing_keys": missing[:50]})


def _check_shapes(model: nn.Module, sources: dict[str, dict[str, _TensorMeta]], opts: _Options) -> None:
    """Refuse a checkpoint whose tensors do not match config.json (from_pretrained refuses too)."""
    from transformers.pytorch_utils import Conv1D

    wrong = []
    for name, src in sources.items():
        module, attr = _module_and_attr(model, name)
        expected = tuple(getattr(module, attr).shape)
        if opts.bnb is not None and _is_bnb_weight(module, attr):
            if opts.prequantized:
                continue  # packed storage: its shape is not the matrix's
            if issubclass(getattr(module, "source_cls", nn.Linear), Conv1D):
                expected = expected[::-1]
        meta = src.get("")
        if meta is not None and meta.shape != expected:
            wrong.append(f"{name} is {list(meta.shape)} in the checkpoint, {list(expected)} in the model")
    if wrong:
        raise InvalidCheckpoint(f"The checkpoint does not match its config.json: {'; '.join(wrong[:5])}.",
                                details={"mismatched": wrong[:50]})


def _tied_source_block(block: _Block, blocks: list[_Block], tied: dict[str, str]) -> str | None:
    """For a block whose only weight is tied (a tied LM head), the block that holds the real tensor."""
    if block.tensors:
        return None
    sources = {src for tgt, src in tied.items() if _owner(tgt) in block.modules}
    for other in blocks:
        if sources & set(other.tensors):
            return other.name
    return None


# --- sizes ----------------------------------------------------------------------------------

def _planned_bytes(prep: _Prepared, name: str) -> int:
    """Bytes a tensor will occupy once loaded, from shapes and headers alone."""
    module, attr = _module_and_attr(prep.model, name)
    tensor = getattr(module, attr)
    src = prep.sources.get(name, {})
    if prep.opts.bnb is not None and _is_bnb_weight(module, attr):
        if prep.opts.prequantized:  # the saved tensors, less the packed JSON; plus the nested offset scalar
            return sum(m.nbytes for stat, m in src.items() if stat != "weight_format"
                       and not stat.startswith("quant_state.")) + (4 if "nested_absmax" in src else 0)
        if prep.opts.four_bit:
            return _four_bit_bytes(tensor.numel(), tensor.blocksize, prep.opts.bnb.bnb_4bit_use_double_quant)
        return tensor.numel() + tensor.shape[0] * 4  # int8 weight + one fp32 scale per row (SCB)
    return tensor.numel() * _target_dtype(prep, name, tensor).itemsize


def _four_bit_bytes(numel: int, blocksize: int, double_quant: bool) -> int:
    """Packed nibbles + absmax per block + the 16-entry code; nested statistics when double-quantized."""
    blocks = -(-numel // blocksize)
    size = (numel + 1) // 2 + 16 * 4
    if double_quant:
        return size + blocks + (-(-blocks // 256)) * 4 + 256 * 4 + 4
    return size + blocks * 4


def _loaded_bytes(tensor: torch.Tensor) -> int:
    """Bytes a loaded tensor holds, bitsandbytes statistics included."""
    size = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)
    if state is not None:
        size += state.absmax.nbytes + state.code.nbytes
        if state.nested:
            size += state.state2.absmax.nbytes + state.state2.code.nbytes + state.offset.nbytes
    scb = getattr(tensor, "SCB", None)
    if isinstance(scb, torch.Tensor):
        size += scb.nbytes
    return size


def _block_infos(prep: _Prepared) -> list[BlockInfo]:
    return [BlockInfo(name=b.name, param_names=tuple(b.tensors),
                      bytes_after_quant=sum(_planned_bytes(prep, t) for t in b.tensors),
                      modules=tuple(b.modules), tied_to=b.tied_to) for b in prep.blocks]


def plan_blocks(path: str | Path, *, quantization: Quantization | None = None, dtype: str | None = None,
                double_quant: bool = False, confined: bool = True) -> list[BlockInfo]:
    """The blocks ``load_model`` will load, in order, with their size after cast/quantization.

    Reads config.json and the safetensors headers only, so the placement planner can
    refuse a plan that does not fit before a single weight is read. ``confined``: as for
    :func:`load_model`.
    """
    return _block_infos(_prepare(path, quantization, dtype, double_quant=double_quant, confined=confined))


def device_map_for(blocks: list[BlockInfo], assignments: dict[str, str]) -> dict[str, str]:
    """An accelerate ``device_map`` (module path → device) from a block → device plan.

    A block tied to another follows it, so tied tensors never straddle devices.
    """
    device_map: dict[str, str] = {}
    for block in blocks:
        device = assignments[block.tied_to] if block.tied_to else assignments[block.name]
        for module in block.modules:
            device_map[module] = device
    return device_map


# --- materialisation ------------------------------------------------------------------------

def _module_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


def _is_bnb_weight(module: nn.Module, attr: str) -> bool:
    if attr != "weight":
        return False
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def _target_dtype(prep: _Prepared, name: str, tensor: torch.Tensor) -> torch.dtype:
    """transformers' rule: fp32 keep-list first, else the skeleton tensor's own dtype."""
    if prep.fp32_patterns is not None and prep.fp32_patterns.search(name):
        return torch.float32
    return tensor.dtype


class _ShardReader:
    """Reads single tensors, opening shard files on first use and closing them all on ``close``.

    Closing at the end of each block unmaps files no loaded tensor refers to. Files in
    ``copy_files`` (see :func:`_files_to_copy_from`) never stay referenced: a CPU tensor
    read from them is copied out of the mapping unless the cast already copied it.
    """

    def __init__(self, copy_files: set[Path]) -> None:
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}
        self._copy_files = copy_files

    def read(self, meta: _TensorMeta, device: torch.device, dtype: torch.dtype | None = None,
             transient: bool = False) -> torch.Tensor:
        """The tensor on ``device`` in ``dtype``; ``transient`` when the caller makes a new one from it."""
        raw = self._raw(meta)
        value = raw.to(device=device, dtype=dtype)
        if not transient and meta.file in self._copy_files and value.device.type == "cpu" \
                and value.data_ptr() == raw.data_ptr():
            value = value.clone()
        return value

    def _raw(self, meta: _TensorMeta) -> torch.Tensor:
        from safetensors import safe_open

        try:
            handle = self._handles.get(meta.file)
            if handle is None:  # opened as checked: no folder swapped for a link since is followed
                fd = open_resolved(meta.file)
                try:
                    handle = self._stack.enter_context(safe_open(fd_path(fd, meta.file), framework="pt",
                                                                 device="cpu"))
                finally:
                    os.close(fd)
                self._handles[meta.file] = handle
            return handle.get_tensor(meta.key)
        except InvalidCheckpoint:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise InvalidCheckpoint(f"Cannot read {meta.key!r} from {meta.file.name}: {exc}; download it again.",
                                    details={"file": str(meta.file), "key": meta.key}) from None

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()


def _materialize(prep: _Prepared, name: str, reader: _ShardReader, device: torch.device) -> None:
    """Read, cast or quantize, and place one tensor; mirrors transformers' loading ops."""
    module, attr = _module_and_attr(prep.model, name)
    old = getattr(module, attr)
    src = prep.sources.get(name)
    if src is None:  # a buffer the file does not carry: keep the value __init__ computed
        module._buffers[attr] = old.to(device)
        return
    if prep.opts.bnb is not None and _is_bnb_weight(module, attr):
        new = _bnb_weight(prep, module, old, src, reader, device)
    else:
        value = reader.read(src[""], device, _target_dtype(prep, name, old) if old.is_floating_point() else None)
        if attr in module._buffers:
            module._buffers[attr] = value
            return
        new = nn.Parameter(value, requires_grad=old.requires_grad)
    setattr(module, attr, new)


def _bnb_weight(prep: _Prepared, module: nn.Module, old: torch.Tensor, src: dict[str, _TensorMeta],
                reader: _ShardReader, device: torch.device) -> nn.Parameter:
    """A bitsandbytes weight, quantized now or rebuilt from saved statistics.

    ``Int8Params`` is built directly (accelerate's ``set_module_tensor_to_device`` cannot
    on a machine without CUDA); quantization runs on the target device, as in transformers.
    """
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    from .quantize import fast_cpu_quantization, quantize_params4bit

    if prep.opts.prequantized:
        weight = reader.read(src[""], device)
        stats = {stat: reader.read(meta, device) for stat, meta in src.items()
                 if stat not in ("", "weight_format")}
        try:
            if prep.opts.four_bit:
                return bnb.nn.Params4bit.from_prequantized(data=weight, quantized_stats=stats, requires_grad=False,
                                                           device=device, module=module)
            if "SCB" not in stats:
                raise KeyError("SCB")
        except (ValueError, AssertionError, KeyError) as exc:
            raise InvalidCheckpoint(f"The quantization statistics of {src[''].key} are missing or damaged "
                                    f"({type(exc).__name__}: {exc}).", details={"key": src[""].key}) from None
        return bnb.nn.Int8Params(weight, requires_grad=False, **dict(old.__dict__, SCB=stats["SCB"])).to(device)
    # Cast to the model dtype first, as transformers does; quantizing makes new tensors, so no copy is needed.
    value = reader.read(src[""], device, prep.opts.dtype, transient=True)
    if issubclass(getattr(module, "source_cls", nn.Linear), Conv1D):
        value = value.T  # Conv1D stores (in, out); bnb layers expect (out, in)
    if prep.opts.four_bit:
        if device.type == "cpu" and fast_cpu_quantization(old.quant_type, old.quant_storage):
            return quantize_params4bit(value, old)  # the same bits, faster (see rbee_jupyter.engine.quantize)
        return bnb.nn.Params4bit(value, requires_grad=False, **old.__dict__).to(device)
    kwargs = {k: v for k, v in old.__dict__.items() if k != "SCB"}
    return bnb.nn.Int8Params(value.to("cpu"), requires_grad=False, **kwargs).to(device)


# --- public entry point -------------------------------------------------------------------

def _resolve_plan(device_map: dict[str, str] | str | list[str], prep: _Prepared) -> dict[str, str]:
    """Block → device: an explicit plan is checked; "auto" or a list of devices is planned here."""
    from .devices import inventory, normalise_device_name, parse_device_spec, plan_placement

    names = [b.name for b in prep.blocks]
    if isinstance(device_map, torch.device):
        device_map = str(device_map)
    if not isinstance(device_map, dict):
        spec = parse_device_spec(device_map)
        if isinstance(spec, str) and spec != "auto":
            return dict.fromkeys(names, spec)
        return plan_placement(_block_infos(prep), spec, inventory()).assignments
    unknown = sorted(set(device_map) - set(names))
    missing = [n for n in names if n not in device_map]
    if unknown or missing:
        raise InvalidRequest(f"The placement plan does not match the model's blocks "
                             f"(unknown: {unknown or 'none'}; missing: {missing or 'none'}).",
                             details={"unknown": unknown, "missing": missing, "blocks": names})
    return {n: normalise_device_name(str(device_map[n])) for n in names}


def _check_devices(devices: set[str]) -> None:
    from .devices import check_devices_exist

    check_devices_exist(sorted(devices))


def _check_mixed_offload(opts: _Options, devices: set[str]) -> None:
    from .devices import check_quantized_split

    check_quantized_split(devices, opts.bnb is not None)


def _finish(prep: _Prepared) -> nn.Module:
    """Tie, verify nothing is left on meta, load the generation config, switch to eval."""
    model = prep.model
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise InvalidCheckpoint(f"These tensors were not in the checkpoint: {', '.join(left[:8])}.",
                                details={"missing_keys": left[:50]})
    if prep.generation_config is not None:
        model.generation_config = prep.generation_config
    model.config.name_or_path = str(prep.folder)
    if prep.opts.bnb is not None:
        setattr(model, "is_loaded_in_4bit" if prep.opts.four_bit else "is_loaded_in_8bit", True)
    return model.eval()


def _dispatch(model: nn.Module, blocks: list[BlockInfo], assignments: dict[str, str]) -> None:
    """Add accelerate hooks so hidden states follow the layers across devices."""
    from accelerate import dispatch_model

    dispatch_model(model, device_map=device_map_for(blocks, assignments),
                   skip_keys=getattr(model, "_skip_keys_device_placement", None))


def load_model(
    path: str | Path,
    *,
    quantization: Quantization | None = None,
    dtype: str | torch.dtype | None = None,
    double_quant: bool = False,
    compute_dtype: str | torch.dtype | None = None,
    device_map: dict[str, str] | str | list[str] = "cpu",
    on_progress: Callable[[LoadProgress], None] | None = None,
    cancel: threading.Event | None = None,
    confined: bool = True,
) -> nn.Module:
    """Load a causal LM block by block; the result equals ``from_pretrained`` with the same options.

    Args:
        path: local folder with config.json and safetensors (single file or sharded).
        quantization: ``"nf4"``, ``"fp4"``, ``"int8"`` (bitsandbytes) or None. A checkpoint
            saved already quantized loads as it was saved.
        dtype: dtype of unquantized tensors; None follows config.json like ``from_pretrained``.
        double_quant: nested 4-bit statistics (transformers' ``bnb_4bit_use_double_quant``).
        compute_dtype: 4-bit matmul dtype (``bnb_4bit_compute_dtype``; default float32).
        device_map: one device for everything ("cpu", "cuda:0"); ``{block name: device}``
            covering every block of :func:`plan_blocks` (``devices.plan_placement`` makes
            one); or "auto" / a list of devices, planned here against free memory.
        on_progress: called after each block with a :class:`LoadProgress`.
        cancel: set it to stop between blocks; :class:`Cancelled` is raised.
        confined: every file must stay inside ``path`` (links into its own hub repository's blobs
            aside). False only for a single user's own ``file://`` folder, whose links may lead
            anywhere (see :mod:`rbee_jupyter.core.confine`).

    Raises:
        InvalidRequest, InvalidCheckpoint, ModelNotFound, DeviceNotAvailable, OutOfMemory, Cancelled.
    """
    prep = _prepare(path, quantization, dtype, compute_dtype, double_quant, confined=confined)
    assignments = _resolve_plan(device_map, prep)
    _check_mixed_offload(prep.opts, set(assignments.values()))
    _check_devices(set(assignments.values()))
    infos = _block_infos(prep) if len(set(assignments.values())) > 1 else None
    held: dict[str, int] = {}
    total = len(prep.blocks)
    sizes = sorted(_source_bytes(prep, block) for block in prep.blocks)
    freed = _FreedHostMemory(budget=sizes[len(sizes) // 2])  # a decoder layer's worth: most blocks are layers
    for i, block in enumerate(prep.blocks):
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"Loading was cancelled after {i} of {total} blocks.",
                            details={"layers_loaded": i, "layers_total": total})
        device = assignments[block.tied_to] if block.tied_to else assignments[block.name]
        _load_block(prep, block, torch.device(device))
        if block.name == "head":
            prep.model.tie_weights()
        held[device] = held.get(device, 0) + sum(
            _loaded_bytes(prep.model.get_parameter_or_buffer(t)) for t in block.tensors)
        freed.after_block(held_on_host=held.get("cpu", 0))
        if on_progress is not None:
            on_progress(LoadProgress(i + 1, total, block.name, device, dict(held)))
    model = _finish(prep)
    if infos is not None:
        _dispatch(model, infos, assignments)
    return model


def _load_block(prep: _Prepared, block: _Block, device: torch.device) -> None:
    """Materialise one block; out-of-memory becomes ``OutOfMemory`` naming the block."""
    reader = _ShardReader(prep.copy_files)
    try:
        for name in block.tensors:
            _materialize(prep, name, reader, device)
    except torch.OutOfMemoryError as exc:
        _free_cuda()
        raise OutOfMemory(f"{device} ran out of memory while loading {block.name}: {exc}. Free memory, "
                          "choose a smaller quantization, or spread the model over more devices.",
                          details={"block": block.name, "device": str(device)}) from None
    except MemoryError:
        raise OutOfMemory(f"Host memory ran out while loading {block.name}.",
                          details={"block": block.name, "device": str(device)}) from None
    finally:
        reader.close()


def _source_bytes(prep: _Prepared, block: _Block) -> int:
    """Bytes of a block's tensors in the checkpoint."""
    return sum(meta.nbytes for name in block.tensors for meta in prep.sources.get(name, {}).values())


class _FreedHostMemory:
    """Gives memory freed while loading back to the OS once about a block's worth has piled up.

    Casting or quantizing frees one large temporary per tensor; glibc raises its mmap
    threshold after such frees and then keeps later ones on its heap, so without a trim
    resident memory grows by a few MB per layer although nothing is alive. Trimming after
    every block keeps it tight but costs ~10 % of an nf4 load on the CPU: the trim itself,
    then page faults to take the same memory back for the next block. So up to one block's
    worth of free memory may stay for the next block to reuse (host memory stays within one
    block beyond the model, as promised), and ``malloc_trim`` runs when more has piled up.

    "Piled up" is anonymous resident memory (``statm``: resident - file-backed) grown by more
    than the tensors kept on the host: file-backed pages are the checkpoint's own mapping.
    """

    def __init__(self, budget: int) -> None:
        self._trim = _malloc_trim()
        self._budget = budget
        self._base = _anonymous_rss() if self._trim is not None else None

    def after_block(self, held_on_host: int) -> None:
        if self._trim is None:
            return
        now = _anonymous_rss()
        if self._base is None or now is None or now - self._base - held_on_host > self._budget:
            self._trim(0)


def _anonymous_rss() -> int | None:
    """Resident memory not backed by a file (Linux ``/proc/self/statm``), or None."""
    try:
        with open("/proc/self/statm") as fh:
            fields = fh.read().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return None


def _free_cuda() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
