"""The pool's HTTP client for one worker: its routes as methods, its errors as RbeeErrors.

Transport failures (the worker died, the socket broke) surface as ``httpx.TransportError``
on purpose: only the pool, which watches the process, can tell a death from a hiccup.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx

from ..sse_client import aiter_json
from .protocol import error_from_json

__all__ = ["WorkerClient"]


class WorkerClient:
    """Talks to ``http://127.0.0.1:{port}`` with the worker's bearer secret."""

    def __init__(self, port: int, secret: str, *, timeout_s: float = 10.0) -> None:
        # trust_env=False: an HTTP(S)_PROXY in the server's environment must never see
        # loopback traffic (or the secret). Streams have no read timeout: a token may take
        # long on a big model, and deaths are detected from the process, not the socket.
        self._http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {secret}"},
            trust_env=False, timeout=httpx.Timeout(timeout_s, read=None))
        self._timeout_s = timeout_s

    async def aclose(self) -> None:
        await self._http.aclose()

    async def health(self) -> dict[str, Any]:
        r = await self._http.get("/health", timeout=self._timeout_s)
        return _json_or_raise(r)

    async def load_events(self, last_event_id: int = 0) -> AsyncIterator[tuple[int | None, dict]]:
        """The load stream from after ``last_event_id`` (0: from the start), until ``[DONE]``."""
        async with self._http.stream("GET", "/load", headers={"Last-Event-ID": str(last_event_id)}) as r:
            if r.status_code != 200:
                await r.aread()
                _json_or_raise(r)
            async for item in aiter_json(r.aiter_lines()):
                yield item

    @contextlib.asynccontextmanager
    async def generate(self, body: dict[str, Any]) -> AsyncIterator[GenerationStream]:
        """Open a generation; a refusal (400/409/503...) raises the matching RbeeError before any event."""
        async with self._http.stream("POST", "/generate", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                _json_or_raise(r)
            yield GenerationStream(r)

    async def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /embed``: base64 float32 vectors, their dimension and the token count."""
        return _json_or_raise(await self._http.post("/embed", json=body))

    async def cancel_generation(self, request_id: str) -> None:
        r = await self._http.delete(f"/generate/{request_id}", timeout=self._timeout_s)
        _check(r)

    async def cancel_load(self) -> None:
        r = await self._http.delete("/load", timeout=self._timeout_s)
        _check(r)

    async def shutdown(self) -> None:
        r = await self._http.post("/shutdown", timeout=self._timeout_s)
        _check(r)


class GenerationStream:
    """The events of one accepted generation; ``aclose`` drops the connection (the worker then cancels)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    def __aiter__(self) -> AsyncIterator[tuple[int | None, dict]]:
        return aiter_json(self.response.aiter_lines())

    async def aclose(self) -> None:
        await self.response.aclose()


def _check(r: httpx.Response) -> None:
    if r.status_code >= 400:
        _json_or_raise(r)


def _json_or_raise(r: httpx.Response) -> Any:
    try:
        data = r.json()
    except ValueError:
        data = r.text[:500]
    if r.status_code >= 400:
        raise error_from_json(data, r.status_code)
    return data
