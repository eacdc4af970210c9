"""The pool's handle on one worker process: spawn, handshake, stderr tail, exit watch, signals.

The exit watch is what makes "every stream ends with ``WORKER_DIED`` within 2 s" true:
instead of waiting for a socket to time out, the pool awaits the process itself, and
the kernel tells it the moment the process is gone (crash, OOM kill, SIGKILL).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

from ..errors import LoadingTimeout, RbeeError, WorkerDied
from .environment import worker_env
from .protocol import SECRET_ENV, SPARE_ENV, SPARE_READY, WorkerConfig, describe_exit

__all__ = ["WorkerProcess", "child_worker_pids"]


class WorkerProcess:
    """A spawned ``python -m rbee_jupyter.worker``; create it with :meth:`spawn`.

    A *spare* is spawned without a spec: it imports torch and the rest, then waits until
    :meth:`assign` hands it one. Until then it has no worker id and is named ``spare-<pid>``
    in messages and task names; from then on it is the assigned worker, like any other.
    """

    def __init__(self, proc: asyncio.subprocess.Process, config: WorkerConfig | None, secret: str,
                 stderr_lines: int, log_path: Path | None, spare: bool = False) -> None:
        self.proc = proc
        self.config = config
        self.secret = secret
        self.spare = spare
        self.port: int | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=stderr_lines)
        self.log_path = log_path
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = loop.create_future()
        #: A spare's imports are done: resolved with what it reported (its ``SPARE_READY`` line).
        self.warm: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._tasks = [loop.create_task(self._read_stderr(), name=f"rbee-stderr-{self.name}"),
                       loop.create_task(self._watch(), name=f"rbee-exit-{self.name}")]

    @classmethod
    async def spawn(cls, config: WorkerConfig | None = None, *, spare: bool = False, python: str = sys.executable,
                    env: dict[str, str] | None = None, stderr_lines: int = 200,
                    log_path: Path | None = None) -> WorkerProcess:
        """Start the process and, given ``config``, hand it its spec; returns at once (the handshake comes later).

        ``spare``: the process imports the heavy modules before it reads a spec; give it one
        later with :meth:`assign`. The worker gets its own session so a Ctrl-C at the
        server's terminal does not kill it half way; it still dies with the server, through
        the stdin lifeline (a spare: through EOF on stdin while it waits).
        """
        secret = secrets.token_urlsafe(32)
        full_env = {**worker_env(env), SECRET_ENV: secret, "PYTHONUNBUFFERED": "1"}  # no secret of the server
        if spare:
            full_env[SPARE_ENV] = "1"
        try:
            proc = await asyncio.create_subprocess_exec(
                python, "-m", "rbee_jupyter.worker", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=full_env,
                start_new_session=True)
        except OSError as exc:
            raise RbeeError(f"Cannot start a worker process with {python!r}: {exc}",
                            details={"python": python}) from None
        process = cls(proc, None, secret, stderr_lines, log_path, spare=spare)
        if config is not None:
            await process.assign(config)
        return process

    async def assign(self, config: WorkerConfig, *, log_path: Path | None = None) -> None:
        """Hand the process its spec (once); from now on it is worker ``config.worker_id``.

        A process that died meanwhile is not an error here: its handshake reports it.
        """
        if self.config is not None:
            raise RuntimeError(f"worker process {self.pid} already runs {self.config.worker_id}")
        self.config = config
        if log_path is not None:
            self.log_path = log_path
        for task, kind in zip(self._tasks, ("stderr", "exit"), strict=True):
            task.set_name(f"rbee-{kind}-{config.worker_id}")
        assert self.proc.stdin is not None
        with contextlib.suppress(ConnectionError):
            self.proc.stdin.write(config.to_json().encode() + b"\n")
            await self.proc.stdin.drain()

    @property
    def name(self) -> str:
        """The worker id, or ``spare-<pid>`` before a spare got its spec."""
        return self.config.worker_id if self.config is not None else f"spare-{self.pid}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.exited.result() if self.exited.done() else None

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    async def handshake(self, timeout: float) -> int:
        """Wait for the ``{"port", "pid"}`` line; a worker that dies or stays silent is an error.

        A spare announces only once its imports are done; ``timeout`` counts from then.

        Dying raises ``WorkerDied``; silence or garbage raises without killing: the caller
        decides how to stop it (and so knows its exit is expected, not a death).
        """
        assert self.proc.stdout is not None
        if self.spare and not self.warm.done():
            # Handed over while still importing: the imports are part of the load (bounded by the
            # pool's loading timeout), and ``timeout`` counts from the moment they are done.
            await asyncio.wait([self.warm, self.exited], return_when=asyncio.FIRST_COMPLETED)
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except asyncio.TimeoutError:
            raise LoadingTimeout(f"The worker process did not start within {timeout:g} s.",
                                 details={"timeout_s": timeout, "stage": "start"}) from None
        if not line:
            await self.wait_exit(5.0)
            raise self.death_error("before it started")
        try:
            self.port = int(json.loads(line)["port"])
        except (ValueError, KeyError, TypeError):
            raise RbeeError(f"The worker announced something unexpected: {line[:200]!r}") from None
        return self.port

    def death_error(self, when: str = "") -> WorkerDied:
        """``WORKER_DIED`` naming how it exited and what it last wrote to stderr."""
        how = describe_exit(self.returncode)
        tail = list(self.stderr_tail)[-8:]
        text = f" Last stderr lines:\n{chr(10).join(tail)}" if tail else ""
        when = f" {when}" if when else ""
        return WorkerDied(f"Worker {self.name} died{when}: {how}.{text}",
                          details={"worker_id": self.name, "pid": self.pid, "exit": how,
                                   "returncode": self.returncode, "stderr_tail": tail})

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float) -> bool:
        """True once the process is gone (within ``timeout``)."""
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def terminate(self, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``; returns once the process is gone."""
        if not self.alive:
            return
        self.kill(signal.SIGTERM)
        if not await self.wait_exit(grace_s):
            self.kill(signal.SIGKILL)
            await self.wait_exit(10.0)

    def close(self) -> None:
        """Drop the pipes and helper tasks (after exit)."""
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()
        for task in self._tasks:
            if not task.done() and task.get_name().startswith("rbee-stderr"):
                task.cancel()

    async def _read_stderr(self) -> None:
        """Keep the last lines for error messages (and the log file); always drain the pipe,
        so a chatty worker never blocks on a full pipe."""
        assert self.proc.stderr is not None
        log = None
        partial = ""
        try:
            while True:
                chunk = await self.proc.stderr.read(65536)
                if not chunk:
                    break
                if log is None and self.log_path is not None:  # a spare gets its log path with its spec
                    log = self.log_path.open("a", encoding="utf-8", errors="replace")
                    if self.stderr_tail:  # what it wrote as a spare
                        log.write("\n".join(self.stderr_tail) + "\n")
                text = partial + chunk.decode("utf-8", "replace")
                *lines, partial = re.split(r"\r\n|\r|\n", text)
                partial = partial[-4096:]
                for line in lines:
                    if line.strip():
                        self.stderr_tail.append(line[:2000])
                    if line.startswith(SPARE_READY) and not self.warm.done():
                        self._warmed(line[len(SPARE_READY):])
                if log is not None:
                    log.write(chunk.decode("utf-8", "replace"))
                    log.flush()
            if partial.strip():
                self.stderr_tail.append(partial[:2000])
        finally:
            if log is not None:
                log.close()

    def _warmed(self, facts: str) -> None:
        try:
            data = json.loads(facts)
        except ValueError:
            data = {}
        self.warm.set_result(data if isinstance(data, dict) else {})

    async def _watch(self) -> None:
        """Resolve ``exited`` when the kernel reports the exit (asyncio reaps it: no zombie)."""
        code = await self.proc.wait()
        # Give the stderr reader a moment to take the last lines (the pipe is at EOF already).
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._tasks[0]), 0.2)
        if not self.exited.done():
            self.exited.set_result(code)
        if self.proc.stdin is not None and not self.proc.stdin.is_closing():
            self.proc.stdin.close()


def child_worker_pids(parent: int | None = None, *, marker: bytes = b"rbee_jupyter.worker") -> set[int]:
    """Live worker processes whose parent is ``parent`` (default: this process); zombies count as gone.

    Linux only (reads /proc; elsewhere: empty). For shutdown checks and tests that assert no
    worker outlives its pool. ``marker``: what the command line holds (another kind of child,
    e.g. ``b"ipykernel"`` for a server's kernels).
    """
    parent = os.getpid() if parent is None else parent
    pids: set[int] = set()
    proc = Path("/proc")
    if not proc.is_dir():
        return pids
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
        if fields[0] != "Z" and int(fields[1]) == parent and marker in cmdline:
            pids.add(int(entry.name))
    return pids
