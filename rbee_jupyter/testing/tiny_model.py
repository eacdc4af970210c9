"""Tiny causal LMs made on the spot, so tests and demos never need the hub.

The models are real transformers checkpoints (config.json, safetensors, a tokenizer
trained in a second), so every code path that reads them is the production one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from ..quiet import transformers_bars_off

Arch = Literal["llama", "gpt2", "qwen2", "mistral", "gpt_neox", "phi"]

CORPUS = [
    "Once upon a time there was a tiny model that lived in a notebook.",
    "The quick brown fox jumps over the lazy dog.",
    "Jupyter notebooks run Python code in cells, one after another.",
    "Layers load one by one onto the GPU while the bar fills up.",
    "Hello world! Bonjour le monde. Hallo Welt. こんにちは世界 你好世界 🙂🚀",
]


def _config(arch: Arch, *, hidden: int, layers: int, vocab: int, tie: bool, context: int):
    import transformers as tf

    common = dict(vocab_size=vocab, tie_word_embeddings=tie)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=context, **common,
                             bos_token_id=1, eos_token_id=2)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                intermediate_size=hidden * 2, max_position_embeddings=context, **common,
                                bos_token_id=1, eos_token_id=2)
    if arch == "phi":
        return tf.PhiConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                            intermediate_size=hidden * 2, max_position_embeddings=context, **common,
                            bos_token_id=1, eos_token_id=2)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch]
    return cls(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
               bos_token_id=1, eos_token_id=2, **common)


def make_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a few sentences (about 0.1 s).

    Byte-level so that any text (emoji, CJK) round-trips, which the streaming
    detokenizer tests rely on. It carries a chat template so chat requests work.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bars print blank lines into our output when not on a TTY
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    return fast


def make_tiny_model(
    path: str | Path,
    *,
    arch: Arch = "llama",
    hidden: int = 64,
    layers: int = 4,
    vocab_size: int = 512,
    tie_word_embeddings: bool = False,
    max_shard_size: str | int | None = None,
    seed: int = 0,
    dtype: str = "float32",
    context: int = 1024,
) -> Path:
    """Write a randomly initialised causal LM with its tokenizer to ``path``.

    Args:
        path: folder to create (parents too).
        arch: model family; the loader must handle each generically.
        hidden: hidden size; ``layers``: decoder blocks; ``vocab_size``: tokenizer and embedding rows.
        tie_word_embeddings: share the embedding and the LM head (one tensor in the file).
        max_shard_size: e.g. ``"200KB"`` to force a sharded checkpoint with an index.
        seed: weights are a pure function of the seed.
        dtype: dtype the weights are saved in.
        context: the context window (position embeddings), in tokens.

    Returns:
        The folder, holding ``config.json``, ``*.safetensors`` and tokenizer files.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(vocab_size)
    config = _config(arch, hidden=hidden, layers=layers, vocab=len(tokenizer), tie=tie_word_embeddings,
                     context=context)
    torch.manual_seed(seed)
    with transformers_bars_off():  # "Writing model shards" is not ours to print
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    # Random init gives near-uniform logits; scale up so greedy decoding is decisive
    # and parity tests compare meaningful numbers, not ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    with transformers_bars_off():
        model.save_pretrained(path, **kwargs)
        tokenizer.save_pretrained(path)
    gen = path / "generation_config.json"
    if gen.exists():
        data = json.loads(gen.read_text())
        data.pop("transformers_version", None)
        gen.write_text(json.dumps(data, indent=2))
    return path
