import pytest

from rbee_jupyter.testing.pytest_plugin import TINY_REPO
from rbee_jupyter.testing.server import ServerProcess

pytest_plugins = ["pytest_jupyter.jupyter_server", "rbee_jupyter.testing.pytest_plugin"]


@pytest.fixture(scope="session")
def rbee_server(rbee_hub_session, tmp_path_factory):
    """A real `jupyter server` process with the extension, shared by the session's API tests."""
    folder = tmp_path_factory.mktemp("server")
    settings = {"cache_dir": str(folder / "cache"), "catalog_path": str(folder / "catalog.sqlite"),
                "hub_endpoint": rbee_hub_session.url, "sse_keepalive_s": 0.5, "queue_depth": 1}
    with ServerProcess(folder, rbee=settings, base_url="/user/alice/") as server:
        yield server


@pytest.fixture(scope="session")
def rbee_worker(rbee_server):
    """The id of a tiny Llama worker loaded on the CPU (downloaded first, in the same job)."""
    r = rbee_server.post("v1/workers", {"model_ref": f"hf:{TINY_REPO}", "device": "cpu"})
    assert r.status_code == 202, r.text
    events = rbee_server.events(r.json()["progress_url"])
    assert events[-1]["stage"] == "ready", events[-1]
    return r.json()["worker_id"]
