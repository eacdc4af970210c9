"""Tiny sentence-transformers models made on the spot, for the embedding worker's tests.

A real checkpoint as the hub would serve it: a random BERT (``config.json``,
safetensors), a WordPiece tokenizer trained in a moment, and the sentence-transformers
files (``modules.json``, ``sentence_bert_config.json``, ``1_Pooling/config.json``,
``2_Normalize``) that make the library do the pooling and the normalisation, and that
make the hive pick the embedding worker kind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..quiet import transformers_bars_off
from .tiny_model import CORPUS


def _wordpiece(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS * 20, trainer=trainers.WordPieceTrainer(vocab_size=vocab_size,
                                                                          special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)


def make_tiny_embedder(path: str | Path, *, hidden: int = 32, layers: int = 2, heads: int = 4,
                       intermediate: int | None = None, vocab_size: int = 300, max_seq_length: int = 64,
                       seed: int = 0) -> Path:
    """Write a random BERT sentence-embedding model (mean pooling, then normalised) to ``path``.

    Args:
        path: folder to create (parents too).
        hidden: the embedding dimension; ``layers``: encoder blocks; ``heads``: attention heads;
            ``intermediate``: the feed-forward width (default ``2 * hidden``); ``vocab_size``: WordPiece size.
        max_seq_length: the longest input in tokens; longer inputs are refused by the worker.
        seed: weights are a pure function of the seed.

    Returns:
        The folder, loadable with ``SentenceTransformer(path)``.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    path = Path(path)
    base = path.parent / f".{path.name}-bert"
    tokenizer = _wordpiece(vocab_size)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate or hidden * 2,
                        max_position_embeddings=max_seq_length)
    torch.manual_seed(seed)
    with transformers_bars_off():  # "Writing model shards" is not ours to print
        BertModel(config).save_pretrained(base)
        tokenizer.save_pretrained(base)
    transformer = Transformer(str(base), max_seq_length=max_seq_length)
    model = SentenceTransformer(modules=[transformer, Pooling(hidden, pooling_mode="mean"), Normalize()],
                                device="cpu")
    model.save(str(path))
    shutil.rmtree(base)
    return path


def make_tiny_router_embedder(path: str | Path, embedder: str | Path) -> Path:
    """Write an asymmetric model: a ``Router`` whose query and document branches are two tiny BERTs
    (``embedder``'s and one of another seed), then mean pooling and normalisation.

    The branches live in sub-folders that only the router's ``router_config.json`` names, one level
    below the top modules, as sentence-transformers saves query/document models.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.router import Router
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    path = Path(path)
    other = make_tiny_embedder(path.parent / f".{path.name}-document", seed=1)
    with transformers_bars_off():
        query, document = (SentenceTransformer(str(p), device="cpu")[0] for p in (embedder, other))
        router = Router.for_query_document(query_modules=[query], document_modules=[document])
        SentenceTransformer(modules=[router, Pooling(query.get_embedding_dimension(), pooling_mode="mean"),
                                     Normalize()], device="cpu").save(str(path))
    shutil.rmtree(other)
    return path
