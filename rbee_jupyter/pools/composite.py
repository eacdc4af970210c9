"""One pool for the hive: the primary pool (local processes, Ray...) and external engines side by side.

Each call goes to the pool that owns the worker id; a load goes to the engine pool when
it is an engine registration (:class:`~.engines.EngineSpec`), else to the primary pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ..core.jobs import Job
from ..errors import WorkerNotFound
from ..protocol import GenerationRequest, WorkerInfo
from .base import Pool
from .engines import EngineSpec, OpenAIEnginePool

__all__ = ["CompositePool"]


class CompositePool(Pool):
    """The primary pool and the engine pool seen as one: each call goes to the pool that owns the id."""

    def __init__(self, primary: Pool, engines: OpenAIEnginePool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.primary = primary
        self.engines = engines
        self._pools: tuple[Pool, ...] = (primary, engines)

    def _owner(self, worker_id: str) -> Pool:
        for pool in self._pools:
            try:
                pool.get(worker_id)
                return pool
            except WorkerNotFound:
                continue
        return self.primary  # which raises the WorkerNotFound the caller expects

    def check_node(self, node: str) -> None:
        self.primary.check_node(node)  # engines are placed by their URL, never by node

    @property
    def keep_alive_s(self) -> float | None:
        """The primary pool's idle unload (engines are never unloaded for idling)."""
        return self.primary.keep_alive_s

    def warm_up(self) -> None:
        self.primary.warm_up()  # engines run elsewhere: nothing to prepare

    async def start(self, spec: Any, job: Job) -> WorkerInfo:
        pool = self.engines if isinstance(spec, EngineSpec) else self.primary
        return await pool.start(spec, job)

    async def stop(self, worker_id: str) -> None:
        await self._owner(worker_id).stop(worker_id)

    def get(self, worker_id: str) -> WorkerInfo:
        return self._owner(worker_id).get(worker_id)

    def list(self) -> list[WorkerInfo]:
        return [w for pool in self._pools for w in pool.list()]

    async def generate(self, worker_id: str, req: GenerationRequest, job: Job) -> None:
        await self._owner(worker_id).generate(worker_id, req, job)

    async def embed(self, worker_id: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._owner(worker_id).embed(worker_id, body)

    async def health(self, worker_id: str) -> dict[str, Any]:
        return await self._owner(worker_id).health(worker_id)

    def listen(self, callback: Callable[[str, WorkerInfo], None]) -> Callable[[], None]:
        unsubscribes = [pool.listen(callback) for pool in self._pools]

        def unsubscribe() -> None:
            for each in unsubscribes:
                each()
        return unsubscribe

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self._pools))
