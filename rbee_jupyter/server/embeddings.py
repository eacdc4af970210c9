"""``POST openai/v1/embeddings``: OpenAI's embeddings shape over the hive's embedding workers.

The worker sends base64 float32 vectors; this layer only translates: numbers for
``encoding_format: "float"`` (float32 widened to JSON exactly), the bytes as they are for
``"base64"``, and OpenAI's ``usage``.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from jupyter_server.auth.decorator import authorized
from tornado import web

from ..protocol import EMBEDDING
from .openai import OpenAIHandler


def _floats(b64: str) -> list[float]:
    raw = base64.b64decode(b64)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def embeddings_response(result: dict[str, Any], *, model: str, encoding_format: str) -> dict[str, Any]:
    """The worker's answer in OpenAI's ``list`` of ``embedding`` objects."""
    decode = (lambda b: b) if encoding_format == "base64" else _floats
    tokens = int(result.get("prompt_tokens") or 0)
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": decode(v)}
                     for i, v in enumerate(result["embeddings"])],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


class EmbeddingsHandler(OpenAIHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.json_body()
        worker_id = self.resolve_worker(body.get("model"), kind=EMBEDDING)
        result = await self.hive.embed({**body, "worker_id": worker_id}, principal=self.principal)
        self.reply(200, embeddings_response(result, model=body["model"],
                                            encoding_format=body.get("encoding_format") or "float"))
