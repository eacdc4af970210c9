"""The contract between the server and its kernels: where the hive is and how to log in.

The server side (:func:`publish`) puts a few variables into the environment of the
kernels it starts; the kernel side (:func:`discover`) reads them, then falls back to the
variables JupyterHub gives every single-user server (and so its kernels and terminals),
then to ``JPY_PARENT_PID``, then to embedded mode.

Kernels started by a Jupyter server inherit the server's ``os.environ`` as it was when
the kernel started, so publishing is setting a few variables in the server process:

``RBEE_SERVER_URL``   the server's URL with its ``base_url`` (``http://127.0.0.1:8888/user/alice/``)
``RBEE_TOKEN``        the server's token (empty when it has none)
``RBEE_SERVER_PID``   the server's pid, so a kernel that outlived its server skips it at once
``RBEE_SERVER_SOCK``  the Unix socket, when the server listens on one instead of TCP
``RBEE_SSL_VERIFY``   ``0`` when the server uses TLS on the loopback address (its certificate
                      is usually self-signed for another name)

Why separate names rather than ``JUPYTER_TOKEN``: that one is an *input* of
``jupyter server`` (the token it should use), so a kernel inheriting it would make
every server started from that kernel reuse it. Terminals and worker processes of the
server inherit the variables too; they belong to the same user, who holds the token
already.

Call :func:`publish` once the server listens (its port is final only then), e.g. from
``RbeeApp._start_jupyter_server_extension``; this module is also a server extension of
its own (``jpserver_extensions = {"rbee_jupyter.kernel.kernel_env": True}``) for servers that
want the variables without the rest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..core.procs import pid_alive as _pid_alive

__all__ = ["publish", "unpublish", "server_env", "discover", "Connection", "VARIABLES"]

ENV_URL = "RBEE_SERVER_URL"
"""The server's base URL (``base_url`` included, ``rbee/`` not), published to kernels."""
ENV_TOKEN = "RBEE_TOKEN"
"""The token that authenticates to that server (empty when the server has no token)."""
ENV_PID = "RBEE_SERVER_PID"
"""The server's process id: a kernel that outlived its server skips a dead URL at once."""
ENV_SOCK = "RBEE_SERVER_SOCK"
"""A Unix socket the server listens on instead of TCP (``ServerApp.sock``)."""
ENV_VERIFY = "RBEE_SSL_VERIFY"
"""``0`` to skip TLS verification (a self-signed certificate on the loopback address)."""

VARIABLES = (ENV_URL, ENV_TOKEN, ENV_PID, ENV_SOCK, ENV_VERIFY)

HUB_URL = "JUPYTERHUB_SERVICE_URL"
"""Set by JupyterHub for a single-user server: where it listens, with its prefix (``/user/alice/``)."""
HUB_PREFIX = "JUPYTERHUB_SERVICE_PREFIX"
"""Set by JupyterHub: the server's URL prefix (``/user/alice/``)."""
HUB_TOKEN = "JUPYTERHUB_API_TOKEN"
"""Set by JupyterHub: the server's own token, which the server accepts from its user's processes."""
_WILDCARDS = {"", "0.0.0.0", "::", "*"}
_previous: dict[str, str | None] | None = None


def server_env(serverapp: Any) -> dict[str, str]:
    """The variables for ``serverapp`` (a ``jupyter_server.serverapp.ServerApp``)."""
    base_url = "/" + (serverapp.base_url or "/").strip("/") + "/"
    base_url = base_url.replace("//", "/")
    env = {ENV_PID: str(os.getpid()), ENV_TOKEN: _token(serverapp)}
    sock = getattr(serverapp, "sock", "") or ""
    if sock:
        env[ENV_URL] = f"http://localhost{base_url}"
        env[ENV_SOCK] = sock
        return env
    secure = bool(getattr(serverapp, "certfile", None))
    host = serverapp.ip or "localhost"
    if host in _WILDCARDS:  # the kernel runs on this machine: loopback always works
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    env[ENV_URL] = f"{'https' if secure else 'http'}://{host}:{serverapp.port}{base_url}"
    if secure and host in ("127.0.0.1", "localhost", "[::1]"):
        env[ENV_VERIFY] = "0"
    return env


def _token(serverapp: Any) -> str:
    provider = getattr(serverapp, "identity_provider", None)
    token = getattr(provider, "token", None) if provider is not None else None
    if token is None:  # jupyter_server < 2
        token = getattr(serverapp, "token", "")
    return token or os.environ.get("JUPYTERHUB_API_TOKEN", "")


def publish(serverapp: Any, *, with_token: bool = True) -> dict[str, str]:
    """Set the variables in this (the server's) process so kernels started from now on inherit them.

    Idempotent; returns what was set. :func:`unpublish` restores the previous values.

    Args:
        with_token: publish the server's token too. A shared hive (service mode) passes False:
            its token (or the hub API token it falls back to) would let any kernel's code act
            as the server; kernels there authenticate as their own user instead.
    """
    global _previous
    env = server_env(serverapp)
    if not with_token:
        del env[ENV_TOKEN]
    if _previous is None:
        _previous = {name: os.environ.get(name) for name in VARIABLES}
    for name in VARIABLES:
        if name in env:
            os.environ[name] = env[name]
        else:
            os.environ.pop(name, None)
    log = getattr(serverapp, "log", None)
    if log is not None:
        log.info("rbee: kernels will find the hive at %s", env[ENV_URL])
    return env


def unpublish() -> None:
    """Restore the variables as they were before :func:`publish` (for in-process test servers)."""
    global _previous
    if _previous is None:
        return
    for name, value in _previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _previous = None


# --- the kernel's side: discovery ----------------------------------------------------------------------------

@dataclass
class Connection:
    """Where the hive is: ``mode`` "server" (``url``, ``token``) or "embedded"; ``source`` says how it was found."""

    mode: str
    source: str  # "explicit" | "environment" | "jupyterhub" | "jpy_parent_pid" | "embedded"
    url: str | None = None
    token: str | None = None
    sock: str | None = None
    verify: bool = True
    notes: list[str] = field(default_factory=list)
    """Why the earlier ways did not apply, in order (shown by ``%rbee status``)."""


def _probe(url: str, token: str | None, *, sock: str | None = None, verify: bool = True,
           timeout: float = 3.0) -> str | None:
    """None when ``url`` answers the rbee API with this token, else why not (for the notes)."""
    headers = {"Authorization": f"token {token}"} if token else {}
    transport = httpx.HTTPTransport(uds=sock, verify=verify) if sock else None
    try:
        with httpx.Client(timeout=timeout, verify=verify, transport=transport) as http:
            r = http.get(url.rstrip("/") + "/rbee/v1/workers", headers=headers)
    except httpx.HTTPError as exc:
        return f"{url} does not answer ({type(exc).__name__})"
    if r.status_code == 200:
        return None
    if r.status_code == 403:
        return f"{url} refused the token (403)"
    if r.status_code == 404:
        return f"{url} has no rbee extension (404)"
    return f"{url} answered {r.status_code}"


def _from_environment(notes: list[str]) -> Connection | None:
    url = os.environ.get(ENV_URL)
    if not url:
        notes.append(f"{ENV_URL} is not set")
        return None
    pid = os.environ.get(ENV_PID, "")
    if pid.isdigit() and not _pid_alive(int(pid)):
        notes.append(f"{ENV_URL}={url}: that server (pid {pid}) has exited")
        return None
    # unset (not empty) RBEE_TOKEN: an administrator's RBEE_SERVER_URL (e.g. the node's rbee hub
    # service, via c.Spawner.environment), reached with the server's own hub token
    token = os.environ.get(ENV_TOKEN, os.environ.get(HUB_TOKEN)) or None
    sock = os.environ.get(ENV_SOCK) or None
    verify = os.environ.get(ENV_VERIFY, "1") not in ("0", "false", "no")
    why = _probe(url, token, sock=sock, verify=verify)
    if why is not None:
        notes.append(f"{ENV_URL}: {why}")
        return None
    return Connection("server", "environment", url=url, token=token, sock=sock, verify=verify)


def _from_jupyterhub(notes: list[str]) -> Connection | None:
    """A process of a JupyterHub single-user server: that server, at the address it binds, with its hub token.

    Kernels the server starts find it through ``RBEE_SERVER_URL`` already; this serves the
    ones that do not have it (started from a terminal, by nbclient, or by a server that
    predates the extension's variables). Not inside a hub: no note, nothing to explain.
    """
    url, token = os.environ.get(HUB_URL, ""), os.environ.get(HUB_TOKEN, "")
    if not url or not token:
        return None
    where = urlsplit(url)
    host = where.hostname or "127.0.0.1"
    if host in _WILDCARDS:  # the bind address (e.g. 0.0.0.0 in a container): the kernel runs beside it
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    port = f":{where.port}" if where.port else ""
    path = (where.path if where.path.strip("/") else os.environ.get(HUB_PREFIX, "")).strip("/")
    url = f"{where.scheme or 'http'}://{host}{port}/{path + '/' if path else ''}"
    why = _probe(url, token)
    if why is not None:
        notes.append(f"{HUB_URL}: {why}")
        return None
    return Connection("server", "jupyterhub", url=url, token=token)


def _from_parent_pid(notes: list[str]) -> Connection | None:
    raw = os.environ.get("JPY_PARENT_PID", "")
    if not raw.isdigit():
        notes.append("JPY_PARENT_PID is not set (not a kernel started by Jupyter)")
        return None
    try:
        from jupyter_server.serverapp import list_running_servers
    except ImportError:
        notes.append("jupyter_server is not installed, so running servers cannot be listed")
        return None
    servers = [s for s in list_running_servers() if str(s.get("pid")) == raw]
    if not servers:
        notes.append(f"no running Jupyter server has pid {raw} (JPY_PARENT_PID): the kernel was "
                     "started by something else (nbclient, VS Code, a console)")
        return None
    info = servers[0]
    url = info.get("url") or ""
    if not url.endswith(info.get("base_url") or "/"):
        url = url.rstrip("/") + (info.get("base_url") or "/")
    sock = info.get("sock") or None
    why = _probe(url, info.get("token") or None, sock=sock, verify=not info.get("secure"))
    if why is not None:
        notes.append(f"server pid {raw}: {why}")
        return None
    return Connection("server", "jpy_parent_pid", url=url, token=info.get("token") or None, sock=sock,
                      verify=not info.get("secure"))


def discover() -> Connection:
    """Find the hive: ``RBEE_SERVER_URL``, the JupyterHub server, ``JPY_PARENT_PID``, else embedded.

    ``notes`` of the result say why the earlier ways did not apply.
    """
    notes: list[str] = []
    for way in (_from_environment, _from_jupyterhub, _from_parent_pid):
        found = way(notes)
        if found is not None:
            found.notes = notes
            return found
    return Connection("embedded", "embedded", notes=notes)


# --- as a server extension of its own -----------------------------------------------------

def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "rbee_jupyter.kernel.kernel_env"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Publish at load time (the configured port) so nothing started early misses it."""
    publish(serverapp)


async def _start_jupyter_server_extension(serverapp: Any) -> None:
    """Publish again once the server listens: after port retries the bound port is the true one."""
    publish(serverapp)
