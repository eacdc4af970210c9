"""A real JupyterHub on loopback, for tests of the extension behind a hub and of service mode.

What users of a shared node meet is the hub's proxy (configurable-http-proxy), the hub's
OAuth and per-user single-user servers, not a bare ``jupyter server``; the proxy can buffer
streams, the hub's auth decides who reaches which server, and kernels see the hub's
environment instead of ours. So this starts the real thing: ``jupyterhub`` (from PyPI)
with ``configurable-http-proxy`` (npm), the ``DummyAuthenticator`` (one shared password),
``SimpleLocalProcessSpawner`` (single-user servers as this OS user, homes under the test
folder), and optionally the hive as a managed hub service (``rbee``).

Every single-user server runs the extension with its own cache and catalog (overridable
per test through ``rbee``, where ``{username}`` and ``{home}`` are filled in), written as a
``jupyter_server_config.json`` into the user's ``JUPYTER_CONFIG_DIR``. Every process started
for the hub (proxy, servers, services, kernels, workers) carries a marker variable, so
:meth:`JupyterHubProcess.stop` can find and kill whatever the hub's own cleanup missed.

Needs ``pip install 'jupyterhub>=5'`` and ``npm install -g configurable-http-proxy``
(``RBEE_CHP`` may name the ``configurable-http-proxy`` executable instead).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from ..core.procs import wait_exited
from .server import free_port

__all__ = ["JupyterHubProcess", "find_proxy", "SERVICE_NAME", "MARKER_ENV"]

SERVICE_NAME = "rbee"
"""The name (and URL segment, ``/services/rbee/``) of the hive when it runs as a hub service."""

MARKER_ENV = "RBEE_TEST_JUPYTERHUB"
"""Set in every process the hub starts (value: the hub's id), to find stragglers after stop."""

_ADMIN_SERVICE = "rbee-test-admin"


def find_proxy() -> str | None:
    """The ``configurable-http-proxy`` executable: ``$RBEE_CHP``, else on ``PATH``; None when missing."""
    named = os.environ.get("RBEE_CHP")
    if named:
        return named if Path(named).exists() else None
    return shutil.which("configurable-http-proxy")


class JupyterHubProcess:
    """``with JupyterHubProcess(folder) as hub: hub.start_server("alice"); hub.token("alice")``.

    Args:
        folder: where the hub keeps its database, logs, config and the users' homes.
        users: hub users (allowed to log in with :attr:`password`).
        admin_users: hub admins (also allowed to log in).
        rbee: ``c.RbeeApp`` settings for every single-user server; string values may use
            ``{username}`` and ``{home}``. Default: cache and catalog in the user's home.
        service: ``c.RbeeApp`` settings for the hive as a managed hub service named
            ``rbee`` that every user may access; None: no service.
        env: extra environment for the single-user servers (and the service).
        startup_timeout: seconds the hub (and the service) may take to answer.
    """

    def __init__(self, folder: str | Path, *, users: tuple[str, ...] = ("alice", "bob"),
                 admin_users: tuple[str, ...] = ("admin",), rbee: dict[str, Any] | None = None,
                 service: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                 startup_timeout: float = 120.0) -> None:
        self.folder = Path(folder)
        self.users, self.admin_users = tuple(users), tuple(admin_users)
        self.rbee = dict(rbee or {})
        self.service = None if service is None else dict(service)
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.password = secrets.token_hex(8)
        self.admin_token = secrets.token_hex(32)
        self.id = secrets.token_hex(8)
        self.port, self.proxy_api_port, self.hub_port = free_port(), free_port(), free_port()
        self.service_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = self.folder / "jupyterhub.log"
        self.proc: subprocess.Popen | None = None
        self.api = httpx.Client(base_url=self.url + "hub/api/", timeout=30,
                                headers={"Authorization": f"token {self.admin_token}"})

    # --- where things are -----------------------------------------------------------------------

    def home(self, user: str) -> Path:
        return self.folder / "home" / user

    def server_url(self, user: str) -> str:
        """The user's server through the proxy, e.g. ``http://127.0.0.1:PORT/user/alice/``."""
        return f"{self.url}user/{user}/"

    @property
    def service_url(self) -> str:
        """The hive service through the proxy: ``http://127.0.0.1:PORT/services/rbee/``."""
        return f"{self.url}services/{SERVICE_NAME}/"

    def runtime_dir(self, user: str) -> Path:
        """Where the user's server writes kernel connection files."""
        return self.home(user) / ".local" / "share" / "jupyter" / "runtime"

    # --- lifetime ---------------------------------------------------------------------------------

    def start(self) -> JupyterHubProcess:
        proxy = find_proxy()
        if proxy is None:
            raise RuntimeError("configurable-http-proxy not found: `npm install -g configurable-http-proxy` "
                               "(or set RBEE_CHP to its path).")
        self.folder.mkdir(parents=True, exist_ok=True)
        for user in self.users + self.admin_users:
            self._write_user_config(user)
        if self.service is not None:
            self._write_service_config()
        config = self.folder / "jupyterhub_config.py"
        config.write_text(self._hub_config(proxy))
        for attempt in (1, 2):
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._launch(config)
            try:
                self._wait(lambda: self.api.get("").status_code == 200, "the hub to answer through its proxy")
                if self.service is not None:
                    self._wait(lambda: self.api.get(self.service_url + "rbee/v1/workers").status_code == 200,
                               f"the {SERVICE_NAME} service to answer")
                return self
            except BaseException as exc:
                self._terminate()
                # The hub gives a managed service ~10 s (not configurable) to answer, then exits. A machine
                # busy with other work can take longer just to import jupyter_server: one more try.
                slow = f"Cannot connect to {SERVICE_NAME} service" in self.log()[log_start:]
                if attempt == 2 or not slow or not isinstance(exc, RuntimeError):
                    self.api.close()
                    raise
        return self

    def _launch(self, config: Path) -> None:
        env = {**os.environ, MARKER_ENV: self.id}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(config)], cwd=self.folder,
                                         env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)

    def stop(self, timeout: float = 180.0) -> list[str]:
        """Stop the users' servers through the hub, then the hub (services, proxy); kill what is left.

        Each wait is for the event itself (the hub saying a server stopped, a process having
        exited), bounded by ``timeout`` so that a machine busy with other work has time: the
        hub's own shutdown gives servers a fixed few seconds, which such a machine overruns.

        Returns a line per straggler that had to be killed (empty when everything exited).
        """
        try:
            self._stop_servers(timeout)
        finally:
            self.api.close()
        return self._terminate(timeout)

    def _stop_servers(self, timeout: float) -> None:
        """Ask the hub to stop every server it runs, and wait until it reports each one gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        r = self.api.get("users")
        if r.status_code != 200:
            return
        running = [u["name"] for u in r.json() if (u.get("servers") or {}).get("") is not None]
        for user in running:
            self.api.delete(f"users/{user}/server")  # 202: stopping; 204: stopped; 400: not running
        for user in running:
            self._wait(lambda user=user: "" not in (self.api.get(f"users/{user}").json().get("servers") or {}),
                       f"{user}'s server to stop", timeout)

    def _terminate(self, timeout: float = 180.0) -> list[str]:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # What the hub stopped may still be exiting (a kernel, a worker after its server): wait for it.
        left = wait_exited((pid for pid, _ in self._marked_processes()), timeout)
        stragglers = [(pid, cmdline) for pid, cmdline in self._marked_processes() if pid in left]
        for pid, _ in stragglers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return [f"{pid} {cmdline}" for pid, cmdline in stragglers]

    def __enter__(self) -> JupyterHubProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _wait(self, ready, what: str, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"jupyterhub exited with {self.proc.returncode}:\n{self.log()[-6000:]}")
            try:
                if ready():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)  # polling starting processes: nothing to wait on instead
        raise TimeoutError(f"timed out after {timeout or self.startup_timeout} s waiting for {what}:\n"
                           f"{self.log()[-6000:]}")

    def _marked_processes(self) -> list[tuple[int, str]]:
        """Processes (other than this one) whose environment carries this hub's marker (Linux /proc)."""
        found, needle = [], f"{MARKER_ENV}={self.id}".encode()
        proc = Path("/proc")
        if not proc.is_dir():
            return found
        for entry in proc.iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    found.append((int(entry.name), cmdline.strip()))
            except OSError:  # gone meanwhile, or not ours to read
                continue
        return found

    # --- config ---------------------------------------------------------------------------------

    def _jupyter_env(self, root: Path) -> dict[str, str]:
        """Jupyter's folders under ``root``, so nothing of the test machine's own setup leaks in."""
        return {"JUPYTER_CONFIG_DIR": str(root / ".jupyter"),
                "JUPYTER_DATA_DIR": str(root / ".local" / "share" / "jupyter"),
                "JUPYTER_RUNTIME_DIR": str(root / ".local" / "share" / "jupyter" / "runtime"),
                "JUPYTER_PLATFORM_DIRS": "0", "IPYTHONDIR": str(root / ".ipython")}

    def _write_user_config(self, user: str) -> None:
        home = self.home(user)
        settings = {"cache_dir": str(home / "hf-cache"), "catalog_path": str(home / "catalog.sqlite"),
                    **self.rbee}
        settings = {k: v.format(username=user, home=home) if isinstance(v, str) else v for k, v in settings.items()}
        config = {"ServerApp": {"allow_root": True, "jpserver_extensions": {"rbee_jupyter": True}},
                  "RbeeApp": settings}
        folder = home / ".jupyter"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "jupyter_server_config.json").write_text(json.dumps(config, indent=1))

    def _write_service_config(self) -> None:
        root = self.folder / "service"
        settings = {"cache_dir": str(root / "hf-cache"), "catalog_path": str(root / "catalog.sqlite"),
                    **(self.service or {})}
        config = {"ServerApp": {"allow_root": True, "root_dir": str(root)}, "RbeeApp": settings}
        (root / ".jupyter").mkdir(parents=True, exist_ok=True)
        (root / ".jupyter" / "jupyter_server_config.json").write_text(json.dumps(config, indent=1))

    def _hub_config(self, proxy: str) -> str:
        homes = str(self.folder / "home")
        user_env = {MARKER_ENV: self.id, **self.extra_env}
        services: list[dict[str, Any]] = [{"name": _ADMIN_SERVICE, "api_token": self.admin_token}]
        server_scopes: list[str] | None = None
        roles: list[dict[str, Any]] = [
            {"name": _ADMIN_SERVICE, "services": [_ADMIN_SERVICE],
             "scopes": ["admin:users", "admin:servers", "tokens", "read:users", "access:servers", "access:services"]},
        ]
        if self.service is not None:
            root = self.folder / "service"
            services.append({
                "name": SERVICE_NAME, "url": f"http://127.0.0.1:{self.service_port}",
                "command": self._service_command(),
                "cwd": str(root), "oauth_no_confirm": True,
                "environment": {**self._jupyter_env(root), "HOME": str(root), MARKER_ENV: self.id,
                                **self.extra_env},
            })
            roles.append({"name": "user", "scopes": ["self", f"access:services!service={SERVICE_NAME}"]})
            # what an administrator adds so that kernels reach the service with their server's own token
            server_scopes = ["users:activity!user", "access:servers!server", f"access:services!service={SERVICE_NAME}"]
        lines = [
            "# Written by rbee_jupyter.testing.jupyterhub for one test run.",
            "import os",
            "c = get_config()  # noqa: F821",
            "c.JupyterHub.ip = '127.0.0.1'",
            f"c.JupyterHub.port = {self.port}",
            "c.JupyterHub.hub_ip = '127.0.0.1'",
            f"c.JupyterHub.hub_port = {self.hub_port}",
            f"c.ConfigurableHTTPProxy.api_url = 'http://127.0.0.1:{self.proxy_api_port}'",
            f"c.ConfigurableHTTPProxy.command = [{proxy!r}]",
            f"c.ConfigurableHTTPProxy.pid_file = {str(self.folder / 'proxy.pid')!r}",
            f"c.JupyterHub.db_url = {'sqlite:///' + str(self.folder / 'jupyterhub.sqlite')!r}",
            f"c.JupyterHub.cookie_secret_file = {str(self.folder / 'jupyterhub_cookie_secret')!r}",
            # answer a spawn request at once (202), so that several servers start side by side
            "c.JupyterHub.tornado_settings = {'slow_spawn_timeout': 0}",
            "c.JupyterHub.authenticator_class = 'dummy'",
            f"c.DummyAuthenticator.password = {self.password!r}",
            f"c.Authenticator.allowed_users = {set(self.users)!r}",
            f"c.Authenticator.admin_users = {set(self.admin_users)!r}",
            "c.JupyterHub.spawner_class = 'simple'",
            f"c.SimpleLocalProcessSpawner.home_dir_template = {homes + '/{username}'!r}",
            f"c.Spawner.cmd = [{sys.executable!r}, '-m', 'jupyterhub.singleuser']",
            "c.Spawner.start_timeout = 180",
            "c.Spawner.http_timeout = 180",
            # a server stopping on a busy machine may need more than the default 10 s to stop its
            # kernels and workers; killing it sooner leaves them behind
            "c.LocalProcessSpawner.interrupt_timeout = 60",
            "c.LocalProcessSpawner.term_timeout = 30",
            f"_env = {user_env!r}",
            "def _jupyter_dir(*parts):",
            f"    return lambda spawner: os.path.join({homes!r}, spawner.user.name, *parts)",
            "c.Spawner.environment = {**_env,",
            "    'JUPYTER_CONFIG_DIR': _jupyter_dir('.jupyter'),",
            "    'JUPYTER_DATA_DIR': _jupyter_dir('.local', 'share', 'jupyter'),",
            "    'JUPYTER_RUNTIME_DIR': _jupyter_dir('.local', 'share', 'jupyter', 'runtime'),",
            "    'IPYTHONDIR': _jupyter_dir('.ipython'),",
            "    'JUPYTER_PLATFORM_DIRS': '0'}",
            f"c.JupyterHub.services = {services!r}",
            f"c.JupyterHub.load_roles = {roles!r}",
        ]
        if server_scopes is not None:
            lines.append(f"c.Spawner.server_token_scopes = {server_scopes!r}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _service_command() -> list[str]:
        """``jupyter-rbee`` where the package is installed with its scripts, else the same ``main``."""
        script = shutil.which("jupyter-rbee")
        return [script] if script else [sys.executable, "-c", "from rbee_jupyter.server.app import main; main()"]

    # --- the hub's REST API ---------------------------------------------------------------------

    def token(self, user: str, *, note: str = "test") -> str:
        """A new API token of ``user`` (with all the user's permissions), made by the admin service."""
        r = self.api.post(f"users/{user}/tokens", json={"note": note, "expires_in": 3600})
        if r.status_code != 201:
            raise RuntimeError(f"creating a token for {user}: {r.status_code} {r.text}")
        return r.json()["token"]

    def start_server(self, *users: str, timeout: float = 180.0) -> list[str]:
        """Start the users' servers (at once) and wait, bounded, until the proxy routes to each; their URLs."""
        for user in users:
            r = self.api.post(f"users/{user}/server")
            if r.status_code not in (201, 202, 400):  # 400: already running
                raise RuntimeError(f"starting {user}'s server: {r.status_code} {r.text}\n{self.log()[-4000:]}")
        for user in users:
            def ready(user: str = user) -> bool:
                server = self.api.get(f"users/{user}").json().get("servers", {}).get("")
                if server is None:
                    raise RuntimeError(f"{user}'s server is gone (it failed to start?):\n{self.log()[-6000:]}")
                return bool(server.get("ready"))

            self._wait(ready, f"{user}'s server", timeout)
        return [self.server_url(user) for user in users]

    def stop_server(self, user: str, *, timeout: float = 180.0) -> None:
        r = self.api.delete(f"users/{user}/server")
        if r.status_code not in (202, 204):
            raise RuntimeError(f"stopping {user}'s server: {r.status_code} {r.text}")
        self._wait(lambda: "" not in self.api.get(f"users/{user}").json().get("servers", {}),
                   f"{user}'s server to stop", timeout)

    def login(self, user: str) -> httpx.Client:
        """A browser-like cookie session: logged into the hub (``POST /hub/login`` with ``_xsrf``).

        The hub's ``_xsrf`` cookie comes from the login page; visiting a server or a service
        then goes through the hub's OAuth (:meth:`open` follows it).
        """
        http = httpx.Client(base_url=self.url, timeout=30, follow_redirects=True)
        page = http.get("hub/login")
        page.raise_for_status()
        xsrf = self.cookie(http, "_xsrf", "/hub/")
        r = http.post("hub/login", data={"username": user, "password": self.password, "_xsrf": xsrf})
        if r.status_code != 200 or not any(c.name.startswith("jupyterhub-hub-login") for c in http.cookies.jar):
            raise RuntimeError(f"logging in as {user}: {r.status_code} {r.url}\n{r.text[:2000]}")
        return http

    @staticmethod
    def open(http: httpx.Client, url: str) -> httpx.Response:
        """Visit ``url`` like a browser page (OAuth redirects followed), so its cookies get set."""
        r = http.get(url, headers={"Sec-Fetch-Mode": "navigate", "Accept": "text/html"})
        r.raise_for_status()
        return r

    @staticmethod
    def cookie(http: httpx.Client, name: str, path: str) -> str:
        """The value of cookie ``name`` set for ``path`` (several ``_xsrf`` cookies coexist by path)."""
        for c in http.cookies.jar:
            if c.name == name and c.path == path and c.value:
                return c.value
        raise KeyError(f"no {name!r} cookie for path {path!r}: "
                       f"{[(c.name, c.path) for c in http.cookies.jar]}")
