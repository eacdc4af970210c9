"""A server's share of a shared node: allowed devices, a memory quota per device, keep_alive under a hub.

A real ``jupyter server`` process configured as an administrator would on JupyterHub
(only the CPU allowed, a small CPU quota, the hub's environment), real worker processes
loading a real (small) model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from traitlets import TraitError

from rbee_jupyter.engine.devices import MiB
from rbee_jupyter.engine.loader import plan_blocks
from rbee_jupyter.server.app import RbeeApp
from rbee_jupyter.testing.server import ServerProcess
from rbee_jupyter.testing.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model of about 11 MB, so that quotas are whole megabytes."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "small-llama", hidden=256, seed=3)


@pytest.fixture(scope="module")
def need_mb(small_model: Path) -> int:
    """What the planner reserves for one worker of it (fp32, no quantization), in MB (rounded up)."""
    return -(-sum(b.bytes for b in plan_blocks(str(small_model))) // MiB)


@pytest.fixture(scope="module")
def quota_mb(need_mb: int) -> int:
    return need_mb + need_mb // 2  # room for one worker, not for two


@pytest.fixture(scope="module")
def server(rbee_hub_session, tmp_path_factory, quota_mb) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("quota-server")
    settings = {"cache_dir": str(folder / "cache"), "catalog_path": str(folder / "catalog.sqlite"),
                "hub_endpoint": rbee_hub_session.url, "sse_keepalive_s": 0.5,
                "allowed_devices": ["cpu"], "device_quota_mb": {"cpu": quota_mb}}
    # spawned as JupyterHub spawns single-user servers (it sets these two, among others)
    env = {"JUPYTERHUB_SERVICE_PREFIX": "/user/dana/", "JUPYTERHUB_API_TOKEN": "not-a-real-token"}
    with ServerProcess(folder, rbee=settings, base_url="/user/dana/", env=env) as server:
        yield server


def load(server: ServerProcess, model: Path, **body: Any):
    return server.post("v1/workers", {"model_ref": f"file://{model}", "device": "cpu", **body})


def wait_ready(server: ServerProcess, started: dict[str, Any]) -> None:
    events = server.events(started["progress_url"], timeout=120)
    assert events[-1]["stage"] == "ready", events[-1]


def assert_quota_exceeded(r, *, need_mb: int, quota_mb: int, holder: str, held_mb: int, model: Path) -> None:
    assert r.status_code == 507, r.text
    error = r.json()["error"]
    assert error["code"] == "QUOTA_EXCEEDED"
    assert error["details"] == {
        "need_mb": need_mb, "quota_mb": {"cpu": quota_mb}, "in_use_mb": {"cpu": held_mb},
        "workers": [{"id": holder, "model_ref": f"file://{model}", "device": "cpu", "mb": held_mb}],
        "devices": ["cpu"]}
    for text in (f"{need_mb} MB", f"quota {quota_mb} MB", f"{held_mb} MB in use", holder, "c.RbeeApp.device_quota_mb"):
        assert text in error["message"], text


def test_a_load_over_the_quota_is_507_naming_the_worker_that_holds_it(server, small_model, need_mb, quota_mb):
    registered = server.post("v1/models/download", {"model_ref": f"file://{small_model}"})
    assert server.events(registered.json()["progress_url"])[-1]["stage"] == "complete"  # in the catalog: planned at POST

    # When: two loads are asked for at once; the first is still loading when the second comes
    first = load(server, small_model)
    second = load(server, small_model)

    # Then: the first goes ahead, the second is refused before anything starts: the first's plan counts
    assert first.status_code == 202, first.text
    first_id = first.json()["worker_id"]
    assert_quota_exceeded(second, need_mb=need_mb, quota_mb=quota_mb, holder=first_id, held_mb=need_mb,
                          model=small_model)

    # ... and once the first is loaded (the only worker), what it holds still counts
    wait_ready(server, first.json())
    assert [w["id"] for w in server.get("v1/workers").json()["workers"]] == [first_id]
    held = max(need_mb, server.get(f"v1/workers/{first_id}").json()["memory_mb"]["cpu"])
    assert_quota_exceeded(load(server, small_model), need_mb=need_mb, quota_mb=quota_mb, holder=first_id,
                          held_mb=held, model=small_model)
    (cpu,) = server.get("v1/devices").json()["devices"]
    assert cpu["name"] == "cpu" and cpu["quota_mb"] == quota_mb and cpu["in_use_mb"] == held

    # When: the first worker is unloaded, its share is free again
    assert server.delete(f"v1/workers/{first_id}").status_code == 204
    third = load(server, small_model)
    assert third.status_code == 202, third.text
    wait_ready(server, third.json())
    assert server.delete(f"v1/workers/{third.json()['worker_id']}").status_code == 204
    assert server.get("v1/devices").json()["devices"][0]["in_use_mb"] == 0


@pytest.mark.parametrize("device", ["cuda:0", "auto", ["cpu", "cuda:0"]])
def test_a_device_outside_allowed_devices_is_400_listing_the_allowed_ones(server, rbee_hub, device):
    # a model that is not downloaded yet: refused before the download, not after it
    r = server.post("v1/workers", {"model_ref": "hf:rbee-test/tiny-llama", "device": device})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "DEVICE_NOT_AVAILABLE"
    assert error["details"]["available"] == ["cpu"] and error["details"]["allowed"] == ["cpu"]
    assert "allowed: cpu" in error["message"]
    assert rbee_hub.requests == []
    assert server.get("v1/workers").json()["workers"] == []


def test_devices_lists_only_the_allowed_ones(server):
    devices = server.get("v1/devices").json()["devices"]
    assert [d["name"] for d in devices] == ["cpu"]
    assert set(devices[0]) >= {"total_bytes", "free_bytes", "quota_mb", "in_use_mb"}


# --- keep_alive under JupyterHub ----------------------------------------------------------------

def test_under_a_hub_idle_workers_are_unloaded_after_30_minutes_by_default(server):
    # the effective value, as the running server logged it when it configured the hive
    assert "keep_alive_s=1800.0 (under JupyterHub)" in server.log()


@pytest.fixture
def no_hub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    monkeypatch.delenv("JUPYTERHUB_SERVICE_PREFIX", raising=False)


def test_outside_a_hub_workers_stay_loaded_by_default(no_hub_env, jp_serverapp):
    app = next(iter(jp_serverapp.extension_manager.extension_apps["rbee_jupyter"]))
    assert app.keep_alive_s is None and app.hive.pool.keep_alive_s is None


@pytest.mark.parametrize("env", ["JUPYTERHUB_API_TOKEN", "JUPYTERHUB_SERVICE_PREFIX"])
def test_either_hub_variable_turns_keep_alive_on_and_a_setting_still_wins(monkeypatch, no_hub_env, env):
    monkeypatch.setenv(env, "x")
    assert RbeeApp().keep_alive_s == 1800.0
    assert RbeeApp(keep_alive_s=60.0).keep_alive_s == 60.0
    assert RbeeApp(keep_alive_s=None).keep_alive_s is None  # an administrator may turn it off


# --- settings ------------------------------------------------------------------------------------

def test_device_settings_are_normalised_and_checked():
    app = RbeeApp(allowed_devices=["CUDA", " cpu"], device_quota_mb={"cuda": 20000, "cpu": 8000.5})
    assert app.allowed_devices == ["cuda:0", "cpu"]
    assert app.device_quota_mb == {"cuda:0": 20000, "cpu": 8000.5}
    with pytest.raises(TraitError, match="tpu"):
        RbeeApp(allowed_devices=["tpu"])
    with pytest.raises(TraitError, match="must be a number of MB"):
        RbeeApp(device_quota_mb={"cpu": "lots"})
    with pytest.raises(TraitError, match="must be a number of MB"):
        RbeeApp(device_quota_mb={"cpu": -1})
