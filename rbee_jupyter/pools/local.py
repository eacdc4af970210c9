"""Workers as local processes: one ``python -m rbee_jupyter.worker`` process per loaded model.

Why separate processes: unloading must free every byte (the process exits), and a crash,
an OOM kill or a wedged kernel must cost one model, never the Jupyter server. The price is
that the pool must notice deaths itself: it awaits every process's exit, so a worker killed
with SIGKILL fails each stream it fed with ``WORKER_DIED`` at once instead of leaving
clients waiting on a dead socket.

This module is only the transport (spawn, the HTTP client of a worker, kill, the spare
process); the registry and the lifecycle are :class:`~.base.WorkerPool`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from traitlets import Bool, Dict, Float, Instance, Unicode, Union, default

from ..core.jobs import Job
from ..errors import Cancelled, RbeeError, WorkerDied
from ..protocol import ACTIVE_STATES, GenerationRequest, WorkerConfig, WorkerInfo, WorkerSpec
from ..worker.client import WorkerClient
from ..worker.process import WorkerProcess
from ..worker.protocol import describe_exit
from .base import ManagedEntry, Pool, WorkerPool, under_jupyterhub

__all__ = ["Pool", "LocalProcessPool", "WorkerSpec", "WorkerInfo"]

log = logging.getLogger(__name__)


@dataclass(eq=False, kw_only=True)
class _Worker(ManagedEntry):
    """The pool's bookkeeping for one process."""

    process: WorkerProcess
    client: WorkerClient | None = None
    exit_handled: bool = False


class LocalProcessPool(WorkerPool):
    """One worker process per loaded model, on this machine (``c.LocalProcessPool.*``)."""

    python = Unicode(
        sys.executable, config=True,
        help="Interpreter the worker processes run (an environment with torch). Default: the server's own.",
    )
    env = Dict(
        config=True,
        help="Extra environment for worker processes, e.g. {\"CUDA_VISIBLE_DEVICES\": \"0\"}. Default: none.",
    )
    startup_timeout_s = Float(
        60.0, config=True, help="Seconds a new worker process may take to announce its port. Default 60.",
    )
    stop_grace_s = Float(
        5.0, config=True,
        help="Seconds a worker asked to exit may take before it is killed. Default 5.",
    )
    log_dir = Union(
        [Unicode(), Instance(os.PathLike)], default_value=None, allow_none=True, config=True,
        help="Folder where each worker's stderr is also written ({worker_id}.log). Default None: memory only.",
    )
    spare_worker = Bool(
        config=True,
        help="Keep one worker process started ahead of need, with torch, transformers and the loader already "
             "imported, and hand it the next load: a load then skips those imports (seconds, most of a small "
             "model's load). It costs about 400 MB of host memory while it waits, and no GPU memory. Default: "
             "True in a server (False when it runs under JupyterHub, where many users' servers share one node's "
             "memory); False for a pool built without a parent (scripts, tests).",
    )

    @default("spare_worker")
    def _default_spare_worker(self) -> bool:
        return self.parent is not None and not under_jupyterhub()

    death_grace_s = 1.5  # after a broken connection, how long to wait for the process to exit
    unreachable_errors = (httpx.TransportError,)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._spare: WorkerProcess | None = None
        self._spare_starting: asyncio.Task | None = None
        self._closed = False

    # --- loading ---------------------------------------------------------------------------

    async def _launch(self, spec: WorkerSpec, worker_id: str, job: Job) -> _Worker:
        config = spec.worker_config(worker_id)
        log_path = None
        if self.log_dir is not None:
            Path(self.log_dir).mkdir(parents=True, exist_ok=True)
            log_path = Path(self.log_dir) / f"{worker_id}.log"
        process = await self._process_for(config, log_path)
        w = _Worker(info=self._new_info(spec, config, pid=process.pid), spec=spec, process=process, load_job=job)
        job.on_finish(lambda _: self._start_spare())  # ready or failed: the machine is free for imports again
        if not process.spare:  # a spare's exit is watched once it announced (see _handshake)
            self._spawn(w, self._watch_exit(w))
        return w

    async def _run_load(self, w: _Worker) -> None:
        """Handshake, then relay ``GET /load`` into the load job."""
        job = w.load_job
        try:
            port = await self._handshake(w)
        except WorkerDied:
            await self._relay_broke(w, job, None)
            return
        except RbeeError as exc:  # silent or garbled start: stop it, report why
            await self._load_failed(w, exc)
            return
        w.client = WorkerClient(port, w.process.secret)
        try:
            if not await self._relay_load(w, (event async for _, event in w.client.load_events())):
                raise httpx.RemoteProtocolError("the load stream ended without ready or error")
        except (httpx.HTTPError, RbeeError) as exc:
            await self._relay_broke(w, job, exc)

    async def _handshake(self, w: _Worker) -> int:
        """The worker's port; a handed-over spare that died before announcing it is replaced.

        A spare can die unnoticed just before it is handed a load (killed, OOM-killed): that
        must cost the load a fresh process, never an error. Its exit is only watched from its
        announcement on, so that such a death is not reported as the worker's.
        """
        process = w.process
        if not process.spare:
            return await process.handshake(self.startup_timeout_s)
        try:
            port = await process.handshake(self.startup_timeout_s)
        except WorkerDied:
            if w.expected_exit or w.load_job.state.finished:  # cancelled or timed out: those paths report
                raise
            log.warning("rbee: spare worker process %d died before it took worker %s (%s); starting a fresh one",
                        process.pid, w.info.id, describe_exit(process.returncode))
        else:
            self._spawn(w, self._watch_exit(w))
            return port
        process.close()
        assert process.config is not None
        fresh = await WorkerProcess.spawn(process.config, python=self.python, env=self.env,
                                          log_path=process.log_path)
        if w.expected_exit:  # cancelled or timed out while it started: stop it, the canceller reports
            await fresh.terminate(0.0)
            fresh.close()
            raise process.death_error("before it started")
        w.process, w.info.pid = fresh, fresh.pid
        self._spawn(w, self._watch_exit(w))
        return await fresh.handshake(self.startup_timeout_s)

    # --- the transport of the lifecycle ---------------------------------------------------------

    def _reachable(self, w: _Worker) -> bool:
        return w.client is not None and w.process.alive

    def _can_serve(self, w: _Worker) -> bool:
        return w.client is not None

    def _starting_where(self, w: _Worker) -> str | None:
        return "stuck while the worker process was starting" if w.client is None else None

    async def _call(self, w: _Worker, method: str, *args: Any) -> Any:
        return await getattr(w.client, method)(*args)  # its HTTP route (worker/client.py)

    async def _drop_stream(self, w: _Worker, job: Job) -> None:
        stream = w.streams.get(job)
        if stream is not None:
            await stream.aclose()  # dropping the connection cancels on the worker too

    async def _kill_now(self, w: _Worker) -> None:
        await w.process.terminate(0.0)
        await self._release(w)

    async def _terminate(self, w: _Worker) -> None:
        """Ask the process to exit, kill it if it does not within ``stop_grace_s``; wait until gone."""
        if w.process.alive and w.client is not None:
            with contextlib.suppress(httpx.HTTPError, RbeeError, asyncio.TimeoutError):
                await asyncio.wait_for(w.client.shutdown(), 2.0)
            await w.process.wait_exit(self.stop_grace_s)
        await w.process.terminate(grace_s=2.0)
        await self._release(w)

    @staticmethod
    async def _release(w: _Worker) -> None:
        """Close the HTTP client and pipes once the process is gone."""
        client, w.client = w.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()
        if not w.process.alive:
            w.process.close()

    # --- deaths ------------------------------------------------------------------------------

    async def _watch_exit(self, w: _Worker) -> None:
        await asyncio.shield(w.process.exited)
        self._on_exit(w)

    def _on_exit(self, w: _Worker) -> None:
        """The process is gone. Unless we stopped it, that is a death: fail all it fed, at once."""
        if w.exit_handled:
            return
        w.exit_handled = True
        self._spawn(w, self._release(w))
        if w.expected_exit:
            return
        stage = w.info.state
        error = w.process.death_error(f"while {stage}" if stage in ACTIVE_STATES else "")
        self._fail_all(w, error, describe_exit(w.process.returncode))

    async def _relay_broke(self, w: _Worker, job: Job, exc: BaseException | None) -> None:
        """A relay lost its worker connection: a death if the process is gone, else a failure.

        Whatever happened, ``job`` is finished when this returns (a load job we are stopping
        ourselves is left to the code that stops it, which reports why).
        """
        if job.state.finished:
            return
        is_load = job is w.load_job
        if w.expected_exit:
            if not is_load:
                job.fail(Cancelled(f"Worker {w.info.id} was stopped.", details={"worker_id": w.info.id}))
            return
        if await w.process.wait_exit(self.death_grace_s):
            self._on_exit(w)
            if not job.state.finished:  # e.g. a request the worker had not accepted yet
                job.fail(w.process.death_error())
            return
        if job.state.finished or (w.expected_exit and is_load):
            return
        error = exc if isinstance(exc, RbeeError) else RbeeError(
            f"Lost the connection to worker {w.info.id} ({exc}); it was stopped.",
            code="WORKER_UNREACHABLE", status=502, details={"worker_id": w.info.id})
        if is_load:
            await self._load_failed(w, error)
        else:
            job.fail(Cancelled("The generation was cancelled.") if job.cancel_event.is_set() else error)

    # --- the spare worker -----------------------------------------------------------------------

    def warm_up(self) -> None:
        """Start the spare now, if ``spare_worker`` is on: the server calls this once it runs.

        Why at server start and not at the first load: a spare started by a load would be
        that load's own process, so the first load, the one a user waits on right after
        opening a notebook, would pay the imports anyway, and the spare's imports would
        compete with it for the CPU. Started with the server, the imports run while the user
        opens a notebook or downloads a model. A process that never gets a load costs only
        its memory, which is why the server turns this off under JupyterHub.
        """
        self._start_spare()

    @property
    def spare(self) -> WorkerProcess | None:
        """The spare process waiting for a load (or still importing), if any; never a listed worker."""
        return self._spare

    async def wait_spare(self, timeout: float) -> WorkerProcess | None:
        """The spare once its imports are done (None: there is none, or it died); for benches and tests.

        Raises ``asyncio.TimeoutError`` if its imports take longer than ``timeout``.
        """
        if self._spare_starting is not None:
            await asyncio.shield(self._spare_starting)
        spare = self._spare
        if spare is None:
            return None
        await asyncio.wait_for(asyncio.wait([spare.warm, spare.exited], return_when=asyncio.FIRST_COMPLETED),
                               timeout)
        return spare if spare.warm.done() and spare.alive else None

    def _start_spare(self) -> None:
        """Start one spare, unless unwanted, present, closed, or a load is running.

        Not while a load runs: the spare's seconds of imports would take CPU and disk from
        it. The load's end (ready or failed) calls this again.
        """
        if not self.spare_worker or self._closed or self._spare is not None or self._spare_starting is not None:
            return
        if any(not w.load_job.state.finished for w in self._workers.values()):
            return
        self._spare_starting = asyncio.get_running_loop().create_task(self._spawn_spare(), name="rbee-spare-start")

    async def _spawn_spare(self) -> None:
        try:
            process = await WorkerProcess.spawn(spare=True, python=self.python, env=self.env)
        except RbeeError as exc:  # the next load starts its own process, and reports this error if it recurs
            log.warning("rbee: no spare worker: %s", exc.message)
            return
        finally:
            self._spare_starting = None
        if self._closed:  # closed while it started
            await process.terminate(0.0)
            process.close()
            return
        self._spare = process
        process.exited.add_done_callback(lambda _: self._spare_exited(process))

    def _spare_exited(self, process: WorkerProcess) -> None:
        """A spare died while waiting (killed, crashed): drop it; the next load starts a fresh process.

        It is not replaced at once: a spare that cannot start (a broken environment) would
        otherwise be restarted in a loop. The next load's end starts a new one.
        """
        if self._spare is not process:  # handed over meanwhile: the worker's own watch takes it from here
            return
        self._spare = None
        process.close()
        tail = "; ".join(list(process.stderr_tail)[-3:])
        log.warning("rbee: spare worker process %d exited (%s)%s", process.pid, describe_exit(process.returncode),
                    f": {tail}" if tail else "")

    async def _process_for(self, config: WorkerConfig, log_path: Path | None) -> WorkerProcess:
        """The spare, handed this load's spec, if one is alive; else a fresh process."""
        if self._spare_starting is not None:  # one is being started this very moment
            await asyncio.shield(self._spare_starting)
        spare, self._spare = self._spare, None
        if spare is not None and spare.alive:
            await spare.assign(config, log_path=log_path)
            return spare
        if spare is not None:
            spare.close()
        return await WorkerProcess.spawn(config, python=self.python, env=self.env, log_path=log_path)

    # --- generation ----------------------------------------------------------------------------

    async def embed(self, worker_id: str, body: dict[str, Any]) -> dict[str, Any]:
        w = self._get(worker_id)
        self._refuse_unless_ready(w, connected=self._can_serve(w))
        self._cancel_idle_timer(w)
        try:
            return await self._call(w, "embed", body)
        except httpx.TransportError:
            if await w.process.wait_exit(self.death_grace_s):
                raise WorkerDied(f"Worker {worker_id} died while embeddings were computed "
                                 f"({describe_exit(w.process.returncode)}).",
                                 details={"worker_id": worker_id}) from None
            raise
        finally:
            if w.info.ready:
                self._touch(w)

    async def _stream_generation(self, w: _Worker, req: GenerationRequest, job: Job) -> None:
        try:  # generate() checked _can_serve just before, with no await in between: w.client is set
            async with w.client.generate({**req.to_json(), "request_id": job.id}) as stream:
                w.streams[job] = stream  # accepted: from here a death must reach this job
                self._update_busy(w)
                await self._relay_generation(w, job, (event async for _, event in stream))
            if not job.state.finished:
                raise httpx.RemoteProtocolError("the generation stream ended without end or error")
        except httpx.HTTPError as exc:
            await self._relay_broke(w, job, exc)

    # --- closing ---------------------------------------------------------------------------------

    def _close_timeout_s(self) -> float:
        return self.stop_grace_s + 2 * self.cancel_grace_s + 5

    async def close(self) -> None:
        self._closed = True
        if self._spare_starting is not None:
            await asyncio.shield(self._spare_starting)  # it sees _closed and ends what it started
        spare, self._spare = self._spare, None
        if spare is not None:  # SIGTERM: it may be in the middle of its imports; wait until it is gone
            await spare.terminate(grace_s=2.0)
            spare.close()
        await super().close()

    async def _abandon(self, workers: list[_Worker]) -> None:
        for w in workers:  # whatever did not stop in time
            w.process.kill()
        for w in workers:
            await w.process.wait_exit(5.0)
            await self._release(w)
