"""A real ``jupyter server`` process with the extension, for tests that need one.

pytest-jupyter runs the server inside the test process; restarts, kernels started by
the server, and crash behaviour need a separate process, which this gives, with its
own config, data and runtime folders so nothing leaks into the user's Jupyter setup.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from .sse import parse_frames


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(proc: subprocess.Popen, url: str, timeout: float, what: str, log: Callable[[], str], *,
                  headers: dict[str, str] | None = None) -> bool:
    """Whether ``url`` answered 200 within ``timeout`` while ``proc`` started; its exit raises, with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log()}")
        try:
            if httpx.get(url, headers=headers, timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # polling a starting process: nothing to wait on instead
    return False


class ServerProcess:
    """``with ServerProcess(folder, rbee={...}) as server: server.get("v1/models")``.

    The spare worker is off unless ``rbee`` turns it on (``{"spare_worker": True}``): it
    would import torch in one more process at every server start and after every load,
    CPU that tests and benches on a small machine cannot spare.
    """

    def __init__(self, folder: str | Path, *, rbee: dict[str, Any] | None = None, base_url: str = "/",
                 server: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                 startup_timeout: float = 180.0, module: str = "jupyter_server",
                 config: dict[str, dict[str, Any]] | None = None) -> None:
        self.folder = Path(folder)
        self.token = secrets.token_hex(16)
        self.port = free_port()
        self.base_url = "/" + base_url.strip("/") + "/" if base_url.strip("/") else "/"
        self.url = f"http://127.0.0.1:{self.port}{self.base_url}"
        self.rbee = dict(rbee or {})
        self.server = dict(server or {})
        self.config = dict(config or {})  # more sections, e.g. {"TokenUsersIdentityProvider": {...}}
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.module = module  # "jupyterlab" for a `jupyter lab` with the sidebar
        self.proc: subprocess.Popen | None = None
        self.log_path = self.folder / "server.log"
        self.client = httpx.Client(base_url=self.url + "rbee/", headers=self.auth_header, timeout=30)

    @property
    def auth_header(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def start(self) -> ServerProcess:
        config_dir = self.folder / "config"
        config_dir.mkdir(parents=True, exist_ok=True)
        (self.folder / "root").mkdir(exist_ok=True)
        config = {
            "ServerApp": {"jpserver_extensions": {"rbee_jupyter": True}, "open_browser": False,
                          "allow_root": True, "port": self.port, "port_retries": 0, "ip": "127.0.0.1",
                          "base_url": self.base_url, "root_dir": str(self.folder / "root"), **self.server},
            "IdentityProvider": {"token": self.token},
            "RbeeApp": {"spare_worker": False, **self.rbee},
            **self.config,
        }
        (config_dir / "jupyter_server_config.json").write_text(json.dumps(config))
        env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config_dir),
               "JUPYTER_DATA_DIR": str(self.folder / "data"), "JUPYTER_RUNTIME_DIR": str(self.folder / "runtime"),
               "JUPYTER_PLATFORM_DIRS": "0", **self.extra_env}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", self.module], env=env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        if not wait_for_http(self.proc, self.url + "api/status", self.startup_timeout, "jupyter server", self.log,
                             headers=self.auth_header):
            self.stop()
            raise TimeoutError(f"jupyter server did not answer within {self.startup_timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 120.0) -> None:
        """SIGTERM, then wait until the server has exited (its shutdown stops its workers first); kill
        only past ``timeout``, a bound a busy machine holds, since a kill leaves its workers to
        their lifelines."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.client.close()
        self.stop()

    # --- requests -----------------------------------------------------------------

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.get(path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        return self.client.post(path, json=body, **kw)

    def delete(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.delete(path, **kw)

    def events(self, url: str, *, timeout: float = 60.0, method: str = "GET", body: Any = None) -> list[Any]:
        """The JSON events of a whole SSE stream (``url`` absolute-path or relative to rbee/)."""
        if url.startswith("/"):
            url = f"http://127.0.0.1:{self.port}{url}"
        with self.client.stream(method, url, json=body, timeout=timeout) as r:
            r.raise_for_status()
            text = "".join(r.iter_text())
        return [f.data for f in parse_frames(text) if f.comment is None and f.data != "[DONE]"]
