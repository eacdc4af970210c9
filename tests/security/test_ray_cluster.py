"""Finding 8: the private Ray cluster the hive starts is closed to everyone else."""

from __future__ import annotations

import os
import stat

import pytest

pytest.importorskip("ray")

from rbee_jupyter.pools.ray import private_cluster_options  # noqa: E402


def test_the_private_cluster_needs_a_token_and_listens_on_loopback(monkeypatch, tmp_path):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "an operator's old token")

    # When the hive prepares the cluster it starts itself, twice
    options = private_cluster_options(token_dir=str(tmp_path))
    first = os.environ["RAY_AUTH_TOKEN_PATH"]
    private_cluster_options(token_dir=str(tmp_path))
    second = os.environ["RAY_AUTH_TOKEN_PATH"]

    # Then ray.init gets no dashboard and the loopback address, and Ray is told to demand a token
    assert options == {"include_dashboard": False, "_node_ip_address": "127.0.0.1"}
    assert os.environ["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in os.environ
    # a fresh, long random token each time, readable by this user only, in a folder only it can enter
    tokens = {open(p).read() for p in (first, second)}
    assert len(tokens) == 2 and all(len(t) == 64 for t in tokens)
    for path in (first, second):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
