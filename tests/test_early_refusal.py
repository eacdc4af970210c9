"""A load is refused at POST, before any download, for everything that needs no checkpoint.

Each case asks for a model the server has never downloaded, then checks the answer (4xx and
its code) and that the local hub received no request for the repository: a user who
mistyped a device learns it at once, not after the download.
"""

from __future__ import annotations

import pytest

from rbee_jupyter.engine.devices import inventory
from rbee_jupyter.errors import DeviceNotAvailable
from rbee_jupyter.kernel.client import Client
from rbee_jupyter.testing.pytest_plugin import TINY_REPO

TINY = f"hf:{TINY_REPO}"
DEVICES = [d.name for d in inventory()]
MISSING_GPU = f"cuda:{len(DEVICES) + 6}"  # "cuda:7" on a CPU-only machine


def asked_for(hub, repo_id: str) -> list[str]:
    """Every request the hub received that names ``repo_id``."""
    return [f"{r.method} {r.path}" for r in hub.requests if repo_id in r.path]


CASES = [
    pytest.param({"device": MISSING_GPU}, 400, "DEVICE_NOT_AVAILABLE", id="device-missing"),
    pytest.param({"device": ["cpu", MISSING_GPU]}, 400, "DEVICE_NOT_AVAILABLE", id="device-list-missing"),
    pytest.param({"device": "tpu"}, 400, "DEVICE_NOT_AVAILABLE", id="device-kind"),
    pytest.param({"device": "cpu"}, 400, "DEVICE_NOT_AVAILABLE", id="device-not-allowed",
                 marks=pytest.mark.rbee_config(allowed_devices=["cuda:0"])),
    pytest.param({"device": ["cpu", "cuda:0"], "quantization": "nf4"}, 400, "INVALID_REQUEST",
                 id="quantized-cpu-gpu-split"),
    pytest.param({"device": "cpu", "quantization": "q8"}, 400, "INVALID_REQUEST", id="quantization-name"),
    pytest.param({"device": "cpu", "dtype": "float8"}, 400, "INVALID_REQUEST", id="dtype"),
    pytest.param({"device": "cpu", "max_memory": {"cpu": "lots"}}, 400, "INVALID_REQUEST",
                 id="max-memory-size"),
    pytest.param({"device": "cpu", "max_memory": ["cpu"]}, 400, "INVALID_REQUEST", id="max-memory-shape"),
    pytest.param({"device": "cpu", "max_memory": {"disk": "1GiB"}}, 400, "INVALID_REQUEST",
                 id="max-memory-key"),
    pytest.param({"device": "cpu", "max_memory": {MISSING_GPU: "1GiB"}}, 400, "DEVICE_NOT_AVAILABLE",
                 id="max-memory-device-missing"),
    pytest.param({"device": "cpu"}, 507, "QUOTA_EXCEEDED", id="quota-used-up",
                 marks=pytest.mark.rbee_config(device_quota_mb={"cpu": 0})),
    pytest.param({"device": "cpu", "node": "gpu-box-7"}, 400, "INVALID_REQUEST", id="unknown-node"),
]


@pytest.mark.parametrize("body, status, code", CASES)
async def test_refused_before_any_download(jp_serverapp, rbee_http, rbee_hub, rbee_cache_dir, body, status, code):
    app = next(iter(jp_serverapp.extension_manager.extension_apps["rbee_jupyter"]))

    # When
    r = await rbee_http.post("v1/workers", json={"model_ref": TINY, **body})

    # Then: the answer, at once
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    # ... and nothing started: no hub request, no job, no file
    assert asked_for(rbee_hub, TINY_REPO) == []
    assert app.hive.jobs.list() == []
    assert not rbee_cache_dir.exists() or not any(rbee_cache_dir.rglob("*"))


async def test_a_missing_device_lists_the_devices_there_are(rbee_http, rbee_hub):
    r = await rbee_http.post("v1/workers", json={"model_ref": TINY, "device": MISSING_GPU})
    error = r.json()["error"]
    assert (r.status_code, error["code"]) == (400, "DEVICE_NOT_AVAILABLE")
    assert error["details"] == {"device": MISSING_GPU, "available": DEVICES}
    assert error["message"] == (f"Device {MISSING_GPU} is not available on this machine; "
                                f"available: {', '.join(DEVICES)}.")
    assert asked_for(rbee_hub, TINY_REPO) == []


@pytest.mark.rbee_config(device_quota_mb={"cpu": 0})
async def test_a_used_up_quota_says_so_without_a_size(rbee_http, rbee_hub):
    r = await rbee_http.post("v1/workers", json={"model_ref": TINY, "device": "cpu"})
    error = r.json()["error"]
    assert (r.status_code, error["code"]) == (507, "QUOTA_EXCEEDED")
    assert error["message"].startswith("This server's device quota is used up: cpu: quota 0 MB, 0 MB in use.")
    assert error["details"]["need_mb"] is None and error["details"]["devices"] == ["cpu"]
    assert asked_for(rbee_hub, TINY_REPO) == []


async def test_engine_fields_are_refused_before_anything(rbee_http, rbee_hub):
    r = await rbee_http.post("v1/workers", json={"backend": "openai", "model_ref": TINY, "model": "m"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "INVALID_REQUEST"), r.text
    assert r.json()["error"]["details"]["field"] == "model_ref"  # not an engine field
    r = await rbee_http.post("v1/workers", json={"backend": "openai", "url": "ftp://x", "model": "m"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "INVALID_REQUEST"), r.text
    assert asked_for(rbee_hub, TINY_REPO) == []


# --- the same through the client and the magics, against a real server process ----------------

@pytest.fixture
def fresh_repo(rbee_hub, rbee_tiny_model):
    """A repository the session's server has never seen, so nothing of it is on disk."""
    repo = f"rbee-test/early-{len(rbee_hub.requests)}-{id(object())}"
    rbee_hub.add_repo(repo, rbee_tiny_model)
    return repo


def test_the_client_raises_at_once(rbee_server, rbee_hub, fresh_repo):
    client = Client(rbee_server.url, token=rbee_server.token)
    try:
        with pytest.raises(DeviceNotAvailable) as err:
            client.load(f"hf:{fresh_repo}", device=MISSING_GPU)
    finally:
        client.close()
    assert err.value.details["available"] == DEVICES
    assert asked_for(rbee_hub, fresh_repo) == []


def test_the_magic_prints_the_error_at_once(rbee_server, rbee_hub, fresh_repo, capsys):
    from IPython.core.interactiveshell import InteractiveShell

    from rbee_jupyter.kernel.client import set_default_client

    shell = InteractiveShell.instance()
    try:
        shell.run_line_magic("load_ext", "rbee_jupyter.kernel.magics")
        shell.run_line_magic("rbee", f"connect {rbee_server.url} --token {rbee_server.token}")
        capsys.readouterr()
        result = shell.run_cell(f"%rbee load hf:{fresh_repo} --device {MISSING_GPU} --quant nf4")
        out = "".join(capsys.readouterr())
    finally:
        set_default_client(None)
        InteractiveShell.clear_instance()
    assert result.result is None
    assert f"DEVICE_NOT_AVAILABLE: Device {MISSING_GPU} is not available on this machine" in out, out
    assert "downloading" not in out
    assert asked_for(rbee_hub, fresh_repo) == []
