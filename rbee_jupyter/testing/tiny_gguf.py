"""Tiny GGUF files made on the spot, so GGUF import tests never need a download.

:func:`make_tiny_gguf` writes a tiny Llama (from :func:`make_tiny_model`) as a GGUF file the
way llama.cpp's ``convert_hf_to_gguf.py`` does: llama.cpp tensor names, the q/k rows
permuted for its rotary layout, the hyper-parameters under ``llama.*`` and the byte-level
BPE tokenizer (vocabulary, merges, special ids, chat template) under ``tokenizer.*``.
transformers reads it back with ``from_pretrained(..., gguf_file=...)``: model, config and
tokenizer alike.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Literal

from .tiny_model import make_tiny_model

__all__ = ["make_tiny_gguf"]

QuantType = Literal["F32", "F16", "Q8_0"]

# llama.cpp's token types (gguf.TokenType): 1 normal, 3 control.
_NORMAL, _CONTROL = 1, 3


def _permute(w, n_head: int):
    """llama.cpp's q/k row permutation (``LlamaModel.permute``); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_tiny_gguf(
    path: str | Path,
    *,
    source: str | Path | None = None,
    quant: QuantType = "Q8_0",
    name: str = "tiny-llama",
    **tiny_kwargs,
) -> Path:
    """Write a tiny Llama as a GGUF file at ``path`` (a file name ending in ``.gguf``).

    Args:
        path: the file to write (parent folders are created).
        source: a Llama folder (config.json, safetensors, tokenizer) to convert; by default a
            fresh :func:`make_tiny_model` with ``tiny_kwargs`` (``hidden``, ``layers``, ``seed``,
            ``tie_word_embeddings``...), made in a temporary folder and removed afterwards.
        quant: type of the 2-D weights: ``"F32"`` (the values exactly), ``"F16"`` or ``"Q8_0"``
            (blocks of 32, so hidden sizes must be multiples of 32). Norms stay F32, as in llama.cpp.
        name: ``general.name``.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if source is None:
        with tempfile.TemporaryDirectory(prefix="tiny-llama-") as tmp:
            make_tiny_model(tmp, arch="llama", **tiny_kwargs)
            return _write(path, Path(tmp), quant, name)
    return _write(path, Path(source), quant, name)


def _write(path: Path, source: Path, quant: QuantType, name: str) -> Path:
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    cfg = json.loads((source / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ValueError(f"make_tiny_gguf writes Llama models only, not {cfg.get('model_type')!r}")
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(file))
    n_layers, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    rope = cfg.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))

    tokenizer = AutoTokenizer.from_pretrained(source)
    vocab = tokenizer.get_vocab()
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError("the tokenizer's ids are not contiguous; a GGUF vocabulary cannot hold it")
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ValueError("make_tiny_gguf writes byte-level BPE tokenizers only")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    special = set(tokenizer.all_special_tokens)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                     "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([_CONTROL if t in special else _NORMAL for t in tokens])
    w.add_token_merges(merges)
    for key, token in (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token), ("pad", tokenizer.pad_token)):
        if token is not None:
            getattr(w, f"add_{key}_token_id")(vocab[token])
    w.add_add_bos_token(False)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    for hf_name, value in tensors.items():
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise ValueError(f"no llama.cpp name for tensor {hf_name!r}")
        value = value.astype(np.float32)
        if base.endswith("self_attn.q_proj"):
            value = _permute(value, n_head)
        elif base.endswith("self_attn.k_proj"):
            value = _permute(value, n_kv)
        if value.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(f"{gguf_name}.{suffix}", gguf.quants.quantize(value, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(f"{gguf_name}.{suffix}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
