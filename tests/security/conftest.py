"""A shared hive under attack: one real service-mode ``jupyter server`` for the whole package.

Three people reach it with their own tokens (``TokenUsersIdentityProvider``): alice and bob,
ordinary users, and ``admin`` (an admin by ``c.RbeeApp.admin_users``). The local hub knows one
account token, alice's, which opens the gated repo ``sec/gated``; the server has a hub token of its
own that must never serve users' requests. ``allowed/`` is the one folder file:// refs may read.

Tests get a :class:`Team` (``team``) and make their hostile repos with ``team.publish(...)``, a
repo name of their own on the package's hub. Every model a test loads is unloaded by that test.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from rbee_jupyter.testing.hub import HubServer
from rbee_jupyter.testing.server import ServerProcess
from rbee_jupyter.testing.sse import Stream, read_stream

ALICE_HF = "hf_alice_" + secrets.token_hex(8)
SERVER_HF = "hf_server_" + secrets.token_hex(8)
PUBLIC = "sec/public"
GATED = "sec/gated"
SERVER_SECRETS = {"HF_TOKEN": SERVER_HF, "JPY_API_TOKEN": "jpy_" + secrets.token_hex(8),
                  "OPENAI_API_KEY": "sk-" + secrets.token_hex(8), "AWS_SECRET_ACCESS_KEY": secrets.token_hex(12)}
"""What the server's environment holds and no worker or kernel may see."""
USERS = {"alice": False, "bob": False, "admin": False}  # admin is one by admin_users
PROMPT = "Once upon a time"


@dataclass
class Team:
    """The running service, its people and its folders."""

    server: ServerProcess
    hub: HubServer
    folder: Path
    tokens: dict[str, str]
    model: Path  # the tiny model's folder (safetensors + tokenizer), for making repos from
    _published: set[str] = field(default_factory=set)

    @property
    def cache(self) -> Path:
        return self.folder / "cache"

    @property
    def allowed(self) -> Path:
        return self.folder / "allowed"

    def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"token {self.tokens[user]}"}

    def http(self, user: str, *, root: bool = False) -> httpx.Client:
        """A blocking client of ``user`` rooted at ``…/rbee/`` (``root``: at the server's base URL)."""
        return httpx.Client(base_url=self.server.url + ("" if root else "rbee/"), headers=self.headers(user),
                            timeout=60)

    @contextlib.asynccontextmanager
    async def clients(self) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
        """One async API client per user, by name."""
        made = {name: httpx.AsyncClient(base_url=self.server.url + "rbee/", timeout=60, headers=self.headers(name))
                for name in self.tokens}
        try:
            yield made
        finally:
            for c in made.values():
                await c.aclose()

    def publish(self, repo_id: str, *, files: dict[str, bytes] | None = None, base: Path | None = None,
                drop: tuple[str, ...] = ()) -> str:
        """Publish ``base`` (default: the tiny model) minus ``drop``, plus ``files``, as public ``repo_id``."""
        assert repo_id not in self._published, f"{repo_id} is published already: use a name per test"
        self._published.add(repo_id)
        source = base or self.model
        contents = {p.relative_to(source).as_posix(): p.read_bytes() for p in sorted(source.rglob("*"))
                    if p.is_file() and p.relative_to(source).as_posix() not in drop}
        contents.update(files or {})
        return self.hub.add_repo(repo_id, extra_files=contents)

    def snapshot(self, repo_id: str) -> Path:
        """The one snapshot folder of ``repo_id`` in the service's cache."""
        (snap,) = (self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots").iterdir()
        return snap


def error_of(r: httpx.Response, status: int, code: str) -> dict:
    """The JSON error of ``r``, asserted to have ``status`` and ``code``."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code, error
    return error


async def load_events(client: httpx.AsyncClient, ref: str, **body) -> tuple[httpx.Response, Stream | None]:
    """POST v1/workers for ``ref`` on the CPU, and the loading stream when it was accepted."""
    r = await client.post("v1/workers", json={"model_ref": ref, "device": "cpu", **body})
    if r.status_code != 202:
        return r, None
    stream = await read_stream(client, "GET", f"v1/loading/progress?id={r.json()['worker_id']}&last_event_id=0",
                               timeout=180)
    return r, stream


async def download(client: httpx.AsyncClient, ref: str) -> Stream:
    """Download ``ref`` to the end and return its whole stream."""
    r = await client.post("v1/models/download", json={"model_ref": ref})
    assert r.status_code == 202, r.text
    return await read_stream(client, "GET", f"v1/models/download/progress?id={r.json()['download_id']}",
                             headers={"Last-Event-ID": "0"}, timeout=120)


@pytest.fixture(scope="package")
def security_hub(rbee_hub_session: HubServer, rbee_tiny_model: Path) -> Iterator[HubServer]:
    """The session's hub with a public and a gated repo; only alice's account token opens the gated one."""
    saved = rbee_hub_session.token
    rbee_hub_session.token = ALICE_HF
    rbee_hub_session.add_repo(PUBLIC, rbee_tiny_model)
    rbee_hub_session.add_repo(GATED, rbee_tiny_model, gated=True)
    yield rbee_hub_session
    rbee_hub_session.token = saved


def start_team(folder: Path, hub: HubServer, model: Path, *, env: dict[str, str] | None = None,
               **rbee) -> tuple[ServerProcess, Team]:
    """A service-mode server for alice, bob and admin in ``folder`` (not started: use it in ``with``).

    ``rbee`` adds or overrides ``c.RbeeApp`` settings (e.g. small per-user caps for one module).
    """
    (folder / "allowed").mkdir(parents=True, exist_ok=True)
    if not (folder / "allowed" / "tiny").exists():
        shutil.copytree(model, folder / "allowed" / "tiny")
    tokens = {name: secrets.token_hex(16) for name in USERS}
    users = {tokens[n]: {"name": n, "admin": admin} for n, admin in USERS.items()}
    settings = {"cache_dir": str(folder / "cache"), "catalog_path": str(folder / "catalog.sqlite"),
                "hub_endpoint": hub.url, "sse_keepalive_s": 0.5, "download_retries": 2,
                "download_backoff_s": 0.05, "hf_token": SERVER_HF, "service_mode": True,
                "admin_users": ["admin"], "allowed_local_dirs": [str(folder / "allowed")], **rbee}
    server = ServerProcess(folder, rbee=settings, env={**SERVER_SECRETS, **(env or {})},
                           config={"TokenUsersIdentityProvider": {"users": users}},
                           server={"identity_provider_class":
                                   "rbee_jupyter.testing.identity.TokenUsersIdentityProvider"})
    return server, Team(server, hub, folder, tokens, model)


@pytest.fixture(scope="package")
def team(security_hub: HubServer, rbee_tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Team]:
    """The service-mode server shared by the package (see the module docstring)."""
    server, made = start_team(tmp_path_factory.mktemp("security"), security_hub, rbee_tiny_model)
    with server:
        yield made
