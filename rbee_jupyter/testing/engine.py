"""``transformers serve`` on loopback: a real OpenAI-compatible engine for tests and benchmarks.

Offline and pinned to one local model folder, so an external-engine backend can be tested
against the real thing (its streaming quirks included) without a hub or a GPU.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .server import free_port, wait_for_http


class TransformersServe:
    """``transformers serve <folder>`` as a child process; ``url`` ends in ``/v1``."""

    def __init__(self, model_path: Path, log_path: Path, port: int | None = None, *, device: str = "cpu",
                 threads: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        """``extra_args``: more ``transformers serve`` options, e.g. ``("--continuous-batching",)``."""
        self.model = str(model_path)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        self.device, self.threads, self.extra_args = device, threads, tuple(extra_args)
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self, timeout: float = 180.0) -> TransformersServe:
        """Start it and wait (bounded) until it lists its model."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "TRANSFORMERS_OFFLINE": "1"}
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "transformers.cli.transformers", "serve", self.model, "--device", self.device,
                 "--host", "127.0.0.1", "--port", str(self.port), *self.extra_args],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if wait_for_http(self.proc, f"{self.url}/models", timeout, "transformers serve", self.log):
            return self
        self.stop()
        raise TimeoutError(f"transformers serve did not answer within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(60)  # ends at once; the bound is for a busy machine

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)  # a busy machine may take a while to run its shutdown
            except subprocess.TimeoutExpired:
                self.kill()
