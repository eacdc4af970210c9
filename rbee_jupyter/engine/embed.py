"""Sentence embeddings: the request an embedding worker takes, and the model that answers it.

The model is a sentence-transformers checkpoint: the library reads its ``modules.json``
and does the pooling and the normalisation the model was trained with, so our vectors
are exactly what ``SentenceTransformer(path).encode()`` gives in a notebook. This module
keeps torch out of its top level: the hive imports :class:`EmbeddingRequest` to refuse a
bad body before it reaches a worker.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ContextTooLong, InvalidCheckpoint, InvalidRequest

__all__ = ["EmbeddingRequest", "Embedder", "is_embedding_model", "EMBEDDING_FILES", "encode_base64"]

#: Files that make a folder a sentence-transformers model (either is enough).
EMBEDDING_FILES = ("modules.json", "sentence_bert_config.json")
ENCODING_FORMATS = ("float", "base64")
_MODULES_BYTES = 1 << 20  # modules.json lists a few modules: a few hundred bytes
_ROUTER_DEPTH = 3  # routers inside routers: real models nest one level
_MAX_MODULES = 256  # module folders one model may name; real ones have a handful


def is_embedding_model(path: str | Path) -> bool:
    """Whether a model folder is a sentence-transformers model (it then gets an embedding worker)."""
    return any((Path(path) / name).is_file() for name in EMBEDDING_FILES)


@dataclass(frozen=True)
class EmbeddingRequest:
    """A validated embeddings body: the texts, the output format, and an optional dimension."""

    texts: tuple[str, ...]
    encoding_format: str = "float"
    dimensions: int | None = None

    @classmethod
    def from_json(cls, body: Any, *, max_inputs: int = 2048) -> EmbeddingRequest:
        """Validate every field; each mistake is an ``InvalidRequest`` (400) naming the field.

        ``input`` is a string or a non-empty list of non-empty strings (token-id arrays,
        which OpenAI also accepts, are refused: the worker tokenizes with its own model).
        """
        if not isinstance(body, dict):
            raise InvalidRequest("The body must be a JSON object.", details={"field": "body"})
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not texts:
            raise InvalidRequest("input must be a string or a non-empty list of strings.", details={"field": "input"})
        if len(texts) > max_inputs:
            raise InvalidRequest(f"input has {len(texts)} items; at most {max_inputs} per request.",
                                 details={"field": "input", "limit": max_inputs})
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidRequest(f"input[{i}] is {type(text).__name__}, not a string (token arrays are not "
                                     "accepted: send text).", details={"field": "input", "index": i})
            if not text.strip():
                raise InvalidRequest(f"input[{i}] is empty; every input must hold some text.",
                                     details={"field": "input", "index": i})
        fmt = body.get("encoding_format", "float")
        if fmt is None:
            fmt = "float"
        if fmt not in ENCODING_FORMATS:
            raise InvalidRequest(f"encoding_format must be one of {', '.join(ENCODING_FORMATS)}, not {fmt!r}.",
                                 details={"field": "encoding_format", "accepted": list(ENCODING_FORMATS)})
        dims = body.get("dimensions")
        if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
            raise InvalidRequest("dimensions must be a positive integer.", details={"field": "dimensions"})
        return cls(tuple(texts), fmt, dims)

    def to_json(self) -> dict[str, Any]:
        return {"input": list(self.texts), "encoding_format": self.encoding_format, "dimensions": self.dimensions}


def encode_base64(vector: Sequence[float]) -> str:
    """OpenAI's base64 form: the float32 little-endian bytes of the vector."""
    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def _module_folders(where: Any) -> list[str]:
    """The module folders the model is made of, each read by its JSON through a checked descriptor.

    ``modules.json`` names the top modules (``1_Pooling``...). A ``Router`` (or its older name
    ``Asym``: a query and a document branch) keeps its own modules in sub-folders that its
    ``router_config.json`` (``config.json`` for ``Asym``) names, and a branch may be a router in
    turn: followed :data:`_ROUTER_DEPTH` levels down. Names that are not relative folder names
    are left to :func:`.confine.private_copy`, which refuses them.
    """
    if not (where.root / "modules.json").is_file():
        return []  # a bare transformers folder (or sentence_bert_config.json only): sentence-transformers pools it
    modules = _checked_json(where, "modules.json")
    if not isinstance(modules, list):
        raise InvalidCheckpoint(f"modules.json of {where.root} is not a list of modules.",
                                details={"path": str(where.root)})
    folders: list[str] = []
    pending = [(str(m.get("path") or ""), str(m.get("type") or ""), 0) for m in modules if isinstance(m, dict)]
    while pending:
        folder, kind, depth = pending.pop(0)
        if folder:
            folders.append(folder)
        if len(folders) > _MAX_MODULES:
            raise InvalidCheckpoint(f"{where.root} names more than {_MAX_MODULES} module folders.",
                                    details={"path": str(where.root)})
        router = kind.rsplit(".", 1)[-1] in ("Router", "Asym")
        if not router or depth >= _ROUTER_DEPTH:
            continue  # a router deeper than that fails to load: its branches are not in the copy
        name = "router_config.json" if kind.endswith("Router") else "config.json"
        config = _checked_json(where, f"{folder}/{name}" if folder else name)
        types = config.get("types") if isinstance(config, dict) else None
        if isinstance(types, dict):
            pending += [(f"{folder}/{sub}" if folder else str(sub), str(t), depth + 1) for sub, t in types.items()]
    return folders


def _checked_json(where: Any, name: str) -> Any:
    """A small JSON file of the model, read through a descriptor of the file that was checked."""
    import json
    import os

    from ..core.confine import open_resolved, resolve_inside

    fd = open_resolved(resolve_inside(where, name))
    try:
        with os.fdopen(fd, "rb") as fh:
            return json.loads(fh.read(_MODULES_BYTES))
    except ValueError:
        raise InvalidCheckpoint(f"{name} of {where.root} is not valid JSON.",
                                details={"path": str(where.root), "file": name}) from None


class Embedder:
    """A loaded sentence-transformers model; one ``encode`` at a time (the model is not re-entrant).

    Args:
        model: the ``SentenceTransformer``.
        batch_size: how many texts go through the model in one forward pass.
    """

    def __init__(self, model: Any, *, batch_size: int = 32) -> None:
        self.model = model
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self.dimension = int(model.get_embedding_dimension())
        self.max_seq_length = int(model.max_seq_length)
        self.normalizes = any(type(m).__name__ == "Normalize" for m in model)
        self.encode_calls = 0  # model.encode calls so far (the worker's /health shows how requests merged)

    @classmethod
    def load(cls, path: str, *, device: str = "cpu", batch_size: int = 32, confined: bool = True,
             on_loaded: Callable[[int], None] | None = None) -> Embedder:
        """Read the model from its folder onto ``device``; ``on_loaded(bytes)`` reports its size.

        sentence-transformers reads every file of the model by name (``modules.json``, each
        module's folder, the tokenizer, the weights), after the hive checked the folder: a folder
        of a shared cache swapped for a link in between would redirect those reads. So it reads
        a private copy made through descriptors of the checked files (:func:`.confine.private_copy`
        with the weights and the module folders; embedding models are small), removed once loaded.

        Args:
            confined: False for a single user's own ``file://`` folder, whose links may lead anywhere.

        Raises:
            InvalidCheckpoint: the folder is not a sentence-transformers model, or a file of it leads
                outside it (or changed since its check).
        """
        from sentence_transformers import SentenceTransformer

        from ..core.confine import check_folder, private_copy
        from ..quiet import transformers_bars_off

        where = check_folder(path, confined=confined)
        with private_copy(where, weights=True, folders=_module_folders(where)) as copy:
            try:
                with transformers_bars_off():  # its "Loading weights" bar is not ours to print
                    model = SentenceTransformer(str(copy), device=device, local_files_only=True)
            except Exception as exc:  # noqa: BLE001 - any failure is an unusable model folder
                raise InvalidCheckpoint(f"{path} cannot be loaded as a sentence-transformers model: "
                                        f"{str(exc).replace(str(copy), path)}", details={"path": path}) from None
        model.eval()
        if on_loaded is not None:
            on_loaded(sum(p.numel() * p.element_size() for p in model.parameters()))
        return cls(model, batch_size=batch_size)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text as the model sees it (special tokens included), before truncation."""
        return [len(ids) for ids in self.model.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]

    def check(self, req: EmbeddingRequest) -> list[int]:
        """Refuse what the model cannot embed whole; returns the token counts (for ``usage``).

        Raises:
            ContextTooLong: an input longer than the model's ``max_seq_length`` (it would be
                silently truncated otherwise, and its vector would not describe the text).
            InvalidRequest: ``dimensions`` above the model's dimension.
        """
        if req.dimensions is not None and req.dimensions > self.dimension:
            raise InvalidRequest(f"dimensions={req.dimensions} is more than this model's {self.dimension}.",
                                 details={"field": "dimensions", "limit": self.dimension})
        counts = self.count_tokens(req.texts)
        for i, n in enumerate(counts):
            if n > self.max_seq_length:
                raise ContextTooLong(f"input[{i}] is {n} tokens; this model embeds at most {self.max_seq_length}. "
                                     "Split the text into shorter chunks.",
                                     details={"field": "input", "index": i, "tokens": n,
                                              "limit": self.max_seq_length})
        return counts

    def encode(self, req: EmbeddingRequest) -> Any:
        """The vectors (a float32 numpy array, one row per text) in the model's own pooling.

        With ``dimensions``, the vectors are cut to that many leading components (the
        Matryoshka convention) and, for a model that normalises, normalised again.
        """
        return self.encode_many([req])[0]

    def encode_many(self, reqs: Sequence[EmbeddingRequest]) -> list[Any]:
        """The vectors of several requests from one ``model.encode`` over all their texts, split back.

        Why: requests that arrive together share forward passes (the embedding worker merges
        its queue), so many small requests cost about what one request of all their texts
        costs. Each request gets its own rows, in order, cut to its own ``dimensions``.
        """
        import numpy as np

        texts = [text for req in reqs for text in req.texts]
        with self._lock:
            vectors = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                        show_progress_bar=False)
            self.encode_calls += 1
        vectors = np.asarray(vectors, dtype=np.float32)
        out, start = [], 0
        for req in reqs:
            out.append(self._cut(vectors[start:start + len(req.texts)], req.dimensions))
            start += len(req.texts)
        return out

    def _cut(self, vectors: Any, dimensions: int | None) -> Any:
        import numpy as np

        if dimensions is not None and dimensions < self.dimension:
            vectors = vectors[:, :dimensions]
            if self.normalizes:
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors
