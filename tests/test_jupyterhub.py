"""Behind a real JupyterHub: users' servers through the hub's proxy, and the hive as a hub service.

One hub for the module (``rbee_jupyter.testing.jupyterhub``): configurable-http-proxy,
the dummy authenticator, alice's and bob's single-user servers running the extension
(each with its own cache, all downloading from the local test hub), and the hive as the
managed service ``rbee`` that both may use (bob listed in its ``admin_users``). Every
request goes through the proxy, as a browser's or a kernel's would, except where a test
says it goes direct.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from jupyter_client import BlockingKernelClient

from rbee_jupyter.kernel.client import Client
from rbee_jupyter.testing.hub import CHUNK_SIZE
from rbee_jupyter.testing.jupyterhub import JupyterHubProcess, find_proxy
from rbee_jupyter.testing.pytest_plugin import TINY_REPO
from rbee_jupyter.testing.sse import Frame, parse_frames

pytest.importorskip("jupyterhub", reason="pip install 'jupyterhub>=5' (the test extra has it)")
pytestmark = [
    pytest.mark.jupyterhub,
    pytest.mark.skipif(find_proxy() is None, reason="npm install -g configurable-http-proxy"),
]

KEEPALIVE_S = 0.3
WAIT_S = 120.0  # bound on waiting for what will happen (a kernel starts, code runs, a stream ends) on a busy machine


@pytest.fixture(scope="module")
def hub(rbee_hub_session, tmp_path_factory):
    settings = {"hub_endpoint": rbee_hub_session.url, "sse_keepalive_s": KEEPALIVE_S}
    hub = JupyterHubProcess(tmp_path_factory.mktemp("jupyterhub"), rbee=settings,
                            service={**settings, "admin_users": ["bob"]})
    hub.start()
    try:
        hub.start_server("alice", "bob")
        yield hub
    finally:
        left = hub.stop()
    assert left == [], f"processes the hub left behind (killed now): {left}"


@pytest.fixture(scope="module")
def tokens(hub):
    return {user: hub.token(user) for user in ("alice", "bob", "admin")}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"token {token}"}


def read_sse(http: httpx.Client, method: str, url: str, *, timeout: float = WAIT_S, on_frame=None,
             **kw) -> list[Frame]:
    """Every frame of an SSE response as it arrives (``on_frame`` sees each one then), within ``timeout``."""
    deadline = time.monotonic() + timeout
    frames: list[Frame] = []
    with http.stream(method, url, timeout=httpx.Timeout(60.0), **kw) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        buf = ""
        for chunk in r.iter_text():
            buf += chunk
            while "\n\n" in buf:
                block, buf = buf.split("\n\n", 1)
                for frame in parse_frames(block + "\n\n"):
                    frames.append(frame)
                    if on_frame is not None:
                        on_frame(frame)
            assert time.monotonic() < deadline, f"the stream did not end within {timeout} s: {frames}"
    return frames


def events(frames: list[Frame]) -> list:
    return [f.data for f in frames if f.comment is None]


# --- single-user servers through the proxy -------------------------------------------------------------


def test_the_api_works_through_the_proxy_with_the_users_token(hub, tokens):
    api = httpx.Client(base_url=hub.server_url("alice") + "rbee/", headers=auth(tokens["alice"]), timeout=30)

    assert api.get("v1/models").json()["models"] == []
    r = api.post("v1/models/download", json={"model_ref": f"hf:{TINY_REPO}"})
    assert r.status_code == 202, r.text
    progress_url = r.json()["progress_url"]
    assert progress_url.startswith("/user/alice/rbee/")  # a path the proxy routes back to this server
    frames = read_sse(api, "GET", hub.url + progress_url.lstrip("/"))

    assert events(frames)[-2]["stage"] == "complete" and events(frames)[-1] == "[DONE]"
    assert [m["ref"] for m in api.get("v1/models").json()["models"]] == [f"hf:{TINY_REPO}"]
    bob = httpx.get(hub.server_url("bob") + "rbee/v1/models", headers=auth(tokens["bob"]))
    assert bob.json()["models"] == []  # bob's server has its own catalog


def test_events_pass_the_proxy_as_they_happen_and_so_do_keepalives(hub, tokens, rbee_hub, rbee_tiny_model):
    repo = "rbee-test/through-the-proxy"
    rbee_hub.add_repo(repo, rbee_tiny_model)
    size = (rbee_tiny_model / "model.safetensors").stat().st_size
    rbee_hub.faults.chunk_delay_s = 0.5  # ~13 chunks of the weights: the transfer lasts > 6 s, however busy ...
    rbee_hub.faults.stall_after_bytes = CHUNK_SIZE  # ... with a silent stretch in it, filled by keep-alives
    rbee_hub.faults.stall_s = 1.5
    api = httpx.Client(base_url=hub.server_url("alice") + "rbee/", headers=auth(tokens["alice"]), timeout=30)
    served_at_arrival: list[tuple[dict, int]] = []  # each event, with the weights' bytes served when it arrived

    def on_frame(frame: Frame) -> None:
        if frame.comment is None and isinstance(frame.data, dict):
            served_at_arrival.append((frame.data, rbee_hub.bytes_served(repo, "model.safetensors")))

    # When
    job = api.post("v1/models/download", json={"model_ref": f"hf:{repo}"}).json()
    frames = read_sse(api, "GET", hub.url + job["progress_url"].lstrip("/"), on_frame=on_frame)

    # Then: progress from the middle of the transfer reached us while the weights were still being served
    assert rbee_hub.bytes_served(repo, "model.safetensors") == size
    assert any(e["stage"] == "downloading" and 0 < e["bytes_downloaded"] < e["bytes_total"] and served < size
               for e, served in served_at_arrival), served_at_arrival
    stages = [e["stage"] for e in events(frames)[:-1]]
    assert stages[-1] == "complete" and set(stages[:-1]) <= {"queued", "downloading"}, stages
    assert events(frames)[-1] == "[DONE]"
    # and the keep-alives of the silent stretch passed too, before the end
    end = next(i for i, f in enumerate(frames) if isinstance(f.data, dict) and f.data["stage"] == "complete")
    assert "keep-alive" in [f.comment for f in frames[:end]]
    assert all(f.comment in (None, "keep-alive") for f in frames)


def test_a_user_cannot_reach_another_users_server(hub, tokens):
    for owner, other in (("alice", "bob"), ("bob", "alice")):
        api = hub.server_url(owner) + "rbee/"
        r = httpx.get(api + "v1/models", headers=auth(tokens[other]))
        assert r.status_code == 403 and r.json()["error"]["code"] == "FORBIDDEN", r.text
        r = httpx.post(api + "v1/models/download", json={"model_ref": f"hf:{TINY_REPO}"},
                       headers=auth(tokens[other]))
        assert r.status_code == 403, r.text
        r = httpx.get(api + "v1/models")  # no credentials at all: 403, never a redirect to a login page
        assert r.status_code == 403 and "location" not in r.headers and r.json()["error"]["code"] == "FORBIDDEN"


def test_cookie_sessions_need_xsrf_to_post(hub):
    http = hub.login("alice")
    hub.open(http, hub.server_url("alice"))  # the hub's OAuth: the server's session cookie and _xsrf
    api = hub.server_url("alice") + "rbee/"
    body = {"model_ref": f"hf:{TINY_REPO}"}

    assert http.get(api + "v1/models").status_code == 200  # reading needs no _xsrf
    r = http.post(api + "v1/models/download", json=body)
    assert r.status_code == 403 and "_xsrf" in r.json()["error"]["message"], r.text
    r = http.post(api + "v1/models/download", json=body, headers={"X-XSRFToken": "not-the-cookie"})
    assert r.status_code == 403, r.text
    xsrf = hub.cookie(http, "_xsrf", "/user/alice/")
    r = http.post(api + "v1/models/download", json=body, headers={"X-XSRFToken": xsrf})
    assert r.status_code == 202, r.text


def test_a_kernel_of_alices_server_finds_it_and_the_magics_work_through_the_proxy(hub, tokens):
    r = httpx.post(hub.server_url("alice") + "api/kernels", json={"name": "python3"}, headers=auth(tokens["alice"]))
    assert r.status_code == 201, r.text
    kernel_id = r.json()["id"]
    kc = BlockingKernelClient()
    kc.load_connection_file(str(hub.runtime_dir("alice") / f"kernel-{kernel_id}.json"))
    kc.start_channels(hb=False)
    try:
        kc.wait_for_ready(timeout=WAIT_S)

        # When: discovery as the kernel has it, then without the extension's variable (the hub's only)
        found = run(kc, "import json, os\nfrom rbee_jupyter.kernel.client import Client\n"
                        "published = Client()\n"
                        "saved = os.environ.pop('RBEE_SERVER_URL')\n"
                        "hub_only = Client()\n"
                        "os.environ['RBEE_SERVER_URL'] = saved\n"
                        "print(json.dumps({'bind': os.environ['JUPYTERHUB_SERVICE_URL'], 'found': "
                        "[[c.mode, c.discovered_by, c.url, [m.to_dict() for m in c.models()]] "
                        "for c in (published, hub_only)]}))")
        # Then: both reach alice's server at the address it binds (no detour through the proxy)
        found = json.loads(found)
        assert found["bind"].endswith("/user/alice/")
        assert [c[:3] for c in found["found"]] == [["server", "environment", found["bind"]],
                                                  ["server", "jupyterhub", found["bind"]]]
        models = httpx.get(hub.server_url("alice") + "rbee/v1/models", headers=auth(tokens["alice"])).json()["models"]
        assert found["found"][0][3] == found["found"][1][3] == models  # alice's catalog, not bob's or the service's

        # When: the magics, pointed at alice's server through the proxy with the kernel's own hub token
        run(kc, "%load_ext rbee_jupyter.kernel.magics")
        status = result(kc, f"tok = os.environ['JUPYTERHUB_API_TOKEN']\n"
                            f"%rbee connect {hub.server_url('alice')} --token $tok\n%rbee status")
        assert status.startswith(f"rbee: server mode — {hub.server_url('alice')} (connected explicitly)")
        assert f"models: {len(models)}" in status

        # When: an administrator points kernels at the node's rbee service instead (RBEE_SERVER_URL,
        # no RBEE_TOKEN): the server's own hub token reaches it (c.Spawner.server_token_scopes)
        service = run(kc, f"os.environ['RBEE_SERVER_URL'] = {hub.service_url!r}\nos.environ.pop('RBEE_TOKEN')\n"
                          "c = Client()\nprint(json.dumps([c.mode, c.discovered_by, c.url]))")
        assert json.loads(service) == ["server", "environment", hub.service_url]
    finally:
        kc.stop_channels()
        httpx.delete(hub.server_url("alice") + f"api/kernels/{kernel_id}", headers=auth(tokens["alice"]))


def run(kc: BlockingKernelClient, code: str, *, timeout: float = WAIT_S) -> str:
    """Execute ``code``; its stdout (the reply must be ok)."""
    msgs: list[dict] = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=msgs.append)
    assert reply["content"]["status"] == "ok", (reply["content"], msgs)
    return "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")


def result(kc: BlockingKernelClient, code: str, *, timeout: float = WAIT_S) -> str:
    """Execute ``code``; the text/plain of its result."""
    msgs: list[dict] = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=msgs.append)
    assert reply["content"]["status"] == "ok", (reply["content"], msgs)
    return "".join(m["content"]["data"]["text/plain"] for m in msgs if m["msg_type"] == "execute_result")


# --- the hive as a hub service ---------------------------------------------------------------------------


def test_the_service_serves_every_user_one_catalog(hub, tokens):
    alice = httpx.Client(base_url=hub.service_url + "rbee/", headers=auth(tokens["alice"]), timeout=30)
    bob = httpx.Client(base_url=hub.service_url + "rbee/", headers=auth(tokens["bob"]), timeout=30)

    r = alice.post("v1/models/download", json={"model_ref": f"hf:{TINY_REPO}"})
    assert r.status_code == 202, r.text
    assert r.json()["progress_url"].startswith("/services/rbee/rbee/")
    frames = read_sse(alice, "GET", hub.url + r.json()["progress_url"].lstrip("/"))
    assert events(frames)[-2]["stage"] == "complete"

    # Then: bob sees what alice downloaded, through the API and through the client (`%rbee connect`)
    assert [m["ref"] for m in bob.get("v1/models").json()["models"]] == [f"hf:{TINY_REPO}"]
    client = Client(hub.service_url, token=tokens["bob"])
    assert (client.mode, client.discovered_by) == ("server", "explicit")
    assert [m["ref"] for m in client.models()] == [f"hf:{TINY_REPO}"]
    client.close()


def test_the_service_refuses_requests_without_a_hub_token(hub, tokens):
    for method, path in (("GET", "v1/models"), ("POST", "v1/models/download"), ("GET", "v1/workers")):
        r = httpx.request(method, hub.service_url + "rbee/" + path, json={"model_ref": f"hf:{TINY_REPO}"})
        assert r.status_code == 403 and "location" not in r.headers, (path, r.status_code, r.headers)
        assert r.json()["error"]["code"] == "FORBIDDEN"
    r = httpx.get(hub.service_url + "rbee/v1/models", headers=auth("not-a-token"))
    assert r.status_code == 403


def test_a_browser_logs_into_the_service_through_the_hubs_oauth(hub):
    http = hub.login("bob")

    # When: the service's login page, followed through the hub's OAuth
    r = hub.open(http, hub.service_url + "login")

    # Then: back on the service with its own session cookie, which reads, and posts with _xsrf only
    assert str(r.url) == hub.service_url + "rbee/v1/models" and "models" in r.json()
    assert hub.cookie(http, "service-rbee", "/services/rbee/")
    body = {"model_ref": f"hf:{TINY_REPO}"}
    r = http.post(hub.service_url + "rbee/v1/models/download", json=body)
    assert r.status_code == 403 and "_xsrf" in r.json()["error"]["message"], r.text
    xsrf = hub.cookie(http, "_xsrf", "/services/rbee/")
    r = http.post(hub.service_url + "rbee/v1/models/download", json=body, headers={"X-XSRFToken": xsrf})
    assert r.status_code == 202, r.text
    r = http.get(hub.service_url + "login", params={"next": "https://elsewhere.example/"}, follow_redirects=False)
    assert r.status_code == 302 and r.headers["location"] == "/services/rbee/rbee/v1/models"


def test_the_service_offers_the_hive_only(hub, tokens):
    """Every hub user can reach the service: it must not hand them kernels, files or terminals."""
    for path in ("api/kernels", "api/contents", "api/sessions", "api/terminals"):
        r = httpx.get(hub.service_url + path, headers=auth(tokens["alice"]))
        assert r.status_code in (403, 404), (path, r.status_code, r.text)
    r = httpx.post(hub.service_url + "api/kernels", json={"name": "python3"}, headers=auth(tokens["admin"]))
    assert r.status_code == 403, r.text


@pytest.mark.parametrize(("user", "admin"), [("alice", False), ("bob", True), ("admin", True)])
def test_service_users_carry_their_admin_flag(hub, tokens, user, admin):
    """bob: named in c.RbeeApp.admin_users; admin: a hub admin; alice: neither."""
    r = httpx.get(hub.service_url + "api/me", params={"permissions": json.dumps({"rbee": ["read", "write"],
                                                                                  "kernels": ["read"]})},
                  headers=auth(tokens[user]))
    assert r.status_code == 200, r.text
    assert r.json()["identity"]["username"] == user and r.json()["identity"]["admin"] is admin
    assert r.json()["permissions"]["rbee"] == ["read", "write"] and r.json()["permissions"]["kernels"] == []


# --- configuration ----------------------------------------------------------------------------------------


def test_service_mode_is_on_when_the_hub_started_the_process(monkeypatch):
    from traitlets.config import Config

    from rbee_jupyter.server.app import RbeeApp

    monkeypatch.delenv("JUPYTERHUB_SERVICE_NAME", raising=False)
    assert RbeeApp().service_mode is False and RbeeApp().admin_users == set()
    monkeypatch.setenv("JUPYTERHUB_SERVICE_NAME", "rbee")
    assert RbeeApp().service_mode is True
    app = RbeeApp(config=Config({"RbeeApp": {"service_mode": False, "admin_users": ["ann", "ann", "ben"]}}))
    assert app.service_mode is False and app.admin_users == {"ann", "ben"}


def test_service_mode_outside_a_hub_says_what_is_missing():
    from rbee_jupyter.server.hub_auth import service_server_config

    with pytest.raises(RuntimeError, match="JUPYTERHUB_SERVICE_URL.*c.RbeeApp.service_mode = False"):
        service_server_config({})
    config = service_server_config({"JUPYTERHUB_SERVICE_URL": "http://10.0.0.5:9999",
                                    "JUPYTERHUB_API_TOKEN": "t", "JUPYTERHUB_SERVICE_PREFIX": "/services/rbee/"},
                                   tornado_settings={"headers": {"X-A": "1"}, "xsrf_cookies": True})
    assert (config["ip"], config["port"], config["base_url"]) == ("10.0.0.5", 9999, "/services/rbee/")
    assert config["tornado_settings"] == {"headers": {"X-A": "1"}, "xsrf_cookies": False}
