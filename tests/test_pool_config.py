"""Pools are configured as traitlets configurables: ``c.Pool.*``, ``c.LocalProcessPool.*``, ``c.OpenAIEnginePool.*``.

An administrator's jupyter_server_config.py reaches each pool through its own section
(as ``c.SQLiteYStore.db_path`` reaches jupyter-server-ydoc's store); the hive-wide
``c.RbeeApp.keep_alive_s``/``loading_timeout_s``/``inference_stall_s`` apply to every pool
unless a pool's section says otherwise; and the names that moved off ``RbeeApp`` keep
working, with a warning, as long as the new name is not set.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest


@pytest.fixture
def pool_sections(request: pytest.FixtureRequest) -> dict[str, Any]:
    marker = request.node.get_closest_marker("pool_sections")
    return dict(marker.args[0]) if marker else {}


@pytest.fixture
def jp_server_config(rbee_config: dict[str, Any], pool_sections: dict[str, Any]) -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"rbee_jupyter": True}}, "RbeeApp": dict(rbee_config),
            **pool_sections}


def _app(jp_serverapp) -> Any:
    return next(iter(jp_serverapp.extension_manager.extension_apps["rbee_jupyter"]))


@pytest.mark.pool_sections({"Pool": {"inference_stall_s": 7.0}, "LocalProcessPool": {"keep_alive_s": 60.0,
                                                                                        "spare_worker": True},
                            "OpenAIEnginePool": {"timeout_s": 2.5, "health_interval_s": None}})
@pytest.mark.rbee_config(keep_alive_s=30.0, loading_timeout_s=90.0)
def test_each_pool_reads_its_own_section_then_pool_then_rbeeapp(jp_serverapp):
    pool = _app(jp_serverapp).hive.pool
    local, engines = pool.primary, pool.engines
    # When: the local pool's own section names keep_alive_s and spare_worker
    # Then: it wins over c.RbeeApp (keep_alive_s=30, and the test plugin's spare_worker=False)
    assert (local.keep_alive_s, local.spare_worker) == (60.0, True)
    # c.RbeeApp.keep_alive_s still reaches the pools that do not say otherwise
    assert engines.keep_alive_s == 30.0
    # c.Pool.* applies to every pool; c.RbeeApp.* fills in what c.Pool does not set
    assert local.inference_stall_s == engines.inference_stall_s == 7.0
    assert local.loading_timeout_s == engines.loading_timeout_s == 90.0
    assert (engines.timeout_s, engines.health_interval_s) == (2.5, None)
    # the pools are built under the server app: its log, its config
    assert local.parent is _app(jp_serverapp) and engines.parent is _app(jp_serverapp)


@pytest.mark.rbee_config(spare_worker=True, engine_timeout_s=1.5, engine_health_interval_s=0.0)
def test_the_old_rbeeapp_names_still_work_with_a_warning(jp_serverapp, caplog):
    app = _app(jp_serverapp)
    pool = app.hive.pool
    assert pool.primary.spare_worker is True
    assert (pool.engines.timeout_s, pool.engines.health_interval_s) == (1.5, 0.0)
    # When: the server configures its pools once more (as it did at start), with its log captured
    app.log.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING):
            app._pool_config()
    finally:
        app.log.removeHandler(caplog.handler)
    # Then: every moved name set on RbeeApp says where it lives now
    for old, new in (("spare_worker", "LocalProcessPool.spare_worker"), ("engine_timeout_s", "OpenAIEnginePool.timeout_s"),
                     ("engine_health_interval_s", "OpenAIEnginePool.health_interval_s")):
        assert f"c.RbeeApp.{old} is deprecated; use c.{new}" in caplog.text


@pytest.mark.pool_sections({"LocalProcessPool": {"spare_worker": False}})
@pytest.mark.rbee_config(spare_worker=True)
def test_a_new_name_wins_over_its_old_one(jp_serverapp):
    assert _app(jp_serverapp).hive.pool.primary.spare_worker is False


def test_a_pool_built_without_a_server_takes_keywords_and_keeps_no_spare():
    from rbee_jupyter.pools.local import LocalProcessPool

    RayPool = pytest.importorskip("rbee_jupyter.pools.ray").RayPool

    pool = LocalProcessPool(keep_alive_s=5.0, inference_stall_s=None)
    assert (pool.keep_alive_s, pool.inference_stall_s, pool.spare_worker) == (5.0, None, False)
    assert RayPool.class_traits()["address"].help.startswith("Ray cluster")  # c.RayPool.address is its name now
