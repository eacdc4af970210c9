"""Fixtures for testing rbee-jupyter, and projects built on it, against real parts.

Load after pytest-jupyter's server fixtures, whose ``jp_server_config`` it overrides so
that the server runs the extension against a local hub (``rbee_hub``) and a per-test
cache folder::

    pytest_plugins = ["pytest_jupyter.jupyter_server", "rbee_jupyter.testing.pytest_plugin"]
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# One CPU thread for torch here and in every worker and kernel the tests start (they inherit it),
# set before anything imports torch: the tests' tiny models gain nothing from a second thread, and
# on a machine that other work keeps busy an OpenMP team of two stalls at every op (a tiny worker
# made 3 tokens/s with two threads, 80 with one, while other processes kept both cores busy). An explicit setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from .hub import Faults, HubServer  # noqa: E402 - after the thread setting above
from .tiny_model import make_tiny_model  # noqa: E402

TINY_REPO = "rbee-test/tiny-llama"
SHARDED_REPO = "rbee-test/tiny-llama-sharded"
GATED_REPO = "rbee-test/gated"
EMBED_REPO = "rbee-test/tiny-embedder"


@pytest.fixture(scope="session")
def rbee_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (hidden 64, 4 layers) with its tokenizer, made once per session."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def rbee_tiny_model_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same family, sharded (several safetensors files plus the index) and tied."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-sharded",
                           max_shard_size="60KB", tie_word_embeddings=True, seed=1)


@pytest.fixture(scope="session")
def rbee_hub_session(rbee_tiny_model: Path, rbee_tiny_model_sharded: Path) -> Iterator[HubServer]:
    hub = HubServer()
    hub.add_repo(TINY_REPO, rbee_tiny_model)
    hub.add_repo(SHARDED_REPO, rbee_tiny_model_sharded)
    hub.add_repo(GATED_REPO, rbee_tiny_model, gated=True)
    with hub:
        yield hub


@pytest.fixture(scope="session")
def rbee_tiny_embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny sentence-transformers model (random BERT, hidden 32, mean pooling, normalised)."""
    from .tiny_embedder import make_tiny_embedder

    return make_tiny_embedder(tmp_path_factory.mktemp("models") / "tiny-embedder")


@pytest.fixture(scope="session")
def rbee_embed_repo(rbee_hub_session: HubServer, rbee_tiny_embedder: Path) -> str:
    """``EMBED_REPO`` published on the session's hub (only for the sessions that ask for it)."""
    rbee_hub_session.add_repo(EMBED_REPO, rbee_tiny_embedder)
    return EMBED_REPO


@pytest.fixture
def rbee_hub(rbee_hub_session: HubServer) -> Iterator[HubServer]:
    """The session's local hub with faults cleared and the request log emptied."""
    rbee_hub_session.faults = Faults()
    rbee_hub_session.requests.clear()
    yield rbee_hub_session
    rbee_hub_session.faults = Faults()


@pytest.fixture
def rbee_cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "hf-cache"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rbee_config(**traits): extra c.RbeeApp settings for this test's server")


@pytest.fixture
def rbee_config(rbee_hub: HubServer, rbee_cache_dir: Path, tmp_path: Path,
                request: pytest.FixtureRequest) -> dict[str, Any]:
    """``c.RbeeApp`` settings for tests: local hub, private cache, short stalls and backoff, no spare.

    A test changes some with ``@pytest.mark.rbee_config(download_stall_s=0.5)``. The spare
    worker is off: it would import torch in one more process after every load, which on a
    small CI machine slows the test that runs next; tests of the spare turn it on
    (``@pytest.mark.rbee_config(spare_worker=True)``).
    """
    marker = request.node.get_closest_marker("rbee_config")
    return {
        "cache_dir": str(rbee_cache_dir),
        "catalog_path": str(tmp_path / "catalog.sqlite"),
        "hub_endpoint": rbee_hub.url,
        "download_stall_s": 2.0,
        "download_retries": 3,
        "download_backoff_s": 0.05,
        "sse_keepalive_s": 0.5,
        "spare_worker": False,
        **(marker.kwargs if marker else {}),
    }


@pytest.fixture
def jp_server_config(rbee_config: dict[str, Any]) -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"rbee_jupyter": True}}, "RbeeApp": dict(rbee_config)}


@pytest.fixture
def rbee_url(jp_serverapp, jp_http_port: int, jp_base_url: str) -> str:
    """Base URL of the running server's rbee API, e.g. ``http://127.0.0.1:PORT/a%40b/rbee/``."""
    return f"http://127.0.0.1:{jp_http_port}{jp_base_url}rbee/"


@pytest.fixture
def rbee_http(rbee_url: str, jp_auth_header: dict[str, str], http_server, jp_asyncio_loop) -> Iterator[Any]:
    """An authenticated ``httpx.AsyncClient`` rooted at the rbee API (on the server's loop)."""
    import httpx

    client = httpx.AsyncClient(base_url=rbee_url, headers=jp_auth_header, timeout=30)
    yield client
    jp_asyncio_loop.run_until_complete(client.aclose())
