"""Finding the hive: explicit, the kernel's environment, JPY_PARENT_PID, embedded — and interrupts.

One real ``jupyter server`` (base_url ``/hub/user/bob/``, like a JupyterHub single-user
server) with the extension and ``rbee_jupyter.kernel.kernel_env`` (which publishes the variables
the server's kernels inherit). The kernel tests start a real kernel through the server's
REST API and talk to it with jupyter_client over its connection file.
"""

from __future__ import annotations

import json
import os
import queue
import threading

import pytest
from jupyter_client import BlockingKernelClient

from rbee_jupyter.kernel.client import Client, discover
from rbee_jupyter.errors import AccessDenied
from rbee_jupyter.kernel.kernel_env import publish, server_env, unpublish
from rbee_jupyter.testing.server import ServerProcess, free_port

BASE_URL = "/hub/user/bob/"
DISCOVERY_VARS = ("RBEE_SERVER_URL", "RBEE_TOKEN", "RBEE_SERVER_PID", "RBEE_SERVER_SOCK", "RBEE_SSL_VERIFY",
                  "JPY_PARENT_PID", "JUPYTERHUB_SERVICE_URL", "JUPYTERHUB_SERVICE_PREFIX", "JUPYTERHUB_API_TOKEN")


@pytest.fixture(scope="module")
def server(rbee_hub_session, tmp_path_factory):
    folder = tmp_path_factory.mktemp("discovery-server")
    settings = {"cache_dir": str(folder / "cache"), "catalog_path": str(folder / "catalog.sqlite"),
                "hub_endpoint": rbee_hub_session.url, "sse_keepalive_s": 0.5}
    extensions = {"jpserver_extensions": {"rbee_jupyter": True, "rbee_jupyter.kernel.kernel_env": True}}
    env = {name: "" for name in DISCOVERY_VARS}  # nothing of the test process's own leaks in
    with ServerProcess(folder, rbee=settings, base_url=BASE_URL, server=extensions, env=env) as server:
        yield server


@pytest.fixture
def clean_env(monkeypatch):
    for name in DISCOVERY_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def kernel(server):
    """A kernel started by the server (so it inherits the server's environment), and a client on it."""
    r = server.client.post(server.url + "api/kernels", json={"name": "python3"})
    assert r.status_code == 201, r.text
    kernel_id = r.json()["id"]
    kc = BlockingKernelClient()
    kc.load_connection_file(str(server.folder / "runtime" / f"kernel-{kernel_id}.json"))
    kc.start_channels(hb=False)  # the heartbeat reads "dead" until the kernel is up: wait on kernel_info
    kc.wait_for_ready(timeout=60)
    yield kernel_id, kc
    kc.stop_channels()
    server.client.delete(server.url + f"api/kernels/{kernel_id}")


def run(kc: BlockingKernelClient, code: str, *, timeout: float = 60) -> tuple[dict, list[dict]]:
    """Execute ``code``; returns the reply content and the iopub messages of that execution."""
    msgs: list[dict] = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=msgs.append)
    return reply["content"], msgs


def stdout_of(msgs: list[dict]) -> str:
    return "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")


def test_explicit_url_and_token(server):
    client = Client(server.url, token=server.token)
    assert (client.mode, client.discovered_by, client.url) == ("server", "explicit", server.url)
    assert client.workers() == []
    with pytest.raises(AccessDenied):
        Client(server.url, token="wrong").models()


def test_environment_variables(server, clean_env):
    clean_env.setenv("RBEE_SERVER_URL", server.url)
    clean_env.setenv("RBEE_TOKEN", server.token)
    client = Client()
    assert (client.mode, client.discovered_by, client.url) == ("server", "environment", server.url)
    assert client.models() == []


def test_stale_environment_falls_through(server, clean_env):
    clean_env.setenv("RBEE_SERVER_URL", f"http://127.0.0.1:{free_port()}/")
    clean_env.setenv("RBEE_TOKEN", "x")
    found = discover()
    assert found.mode == "embedded"
    assert "does not answer" in found.notes[0] and "JPY_PARENT_PID is not set" in found.notes[1]
    clean_env.setenv("RBEE_SERVER_URL", server.url)
    clean_env.setenv("RBEE_SERVER_PID", "999999999")  # the server it names has exited
    assert "has exited" in discover().notes[0]


def test_jupyterhub_variables(server, clean_env):
    """A process of a hub's single-user server without RBEE_SERVER_URL: the address the server binds."""
    clean_env.setenv("JUPYTERHUB_SERVICE_URL", f"http://0.0.0.0:{server.port}/")  # a container's bind address
    clean_env.setenv("JUPYTERHUB_SERVICE_PREFIX", BASE_URL)
    clean_env.setenv("JUPYTERHUB_API_TOKEN", server.token)
    client = Client()
    assert (client.mode, client.discovered_by, client.url) == ("server", "jupyterhub", server.url)
    assert client.workers() == []
    clean_env.setenv("JUPYTERHUB_API_TOKEN", "wrong")
    found = discover()
    assert found.mode == "embedded" and found.notes[1] == f"JUPYTERHUB_SERVICE_URL: {server.url} refused the token (403)"
    clean_env.setenv("RBEE_SERVER_URL", server.url)  # an administrator's variable, without RBEE_TOKEN:
    clean_env.setenv("JUPYTERHUB_API_TOKEN", server.token)  # the hub token goes with it
    assert (Client().discovered_by, Client().url) == ("environment", server.url)


def test_jpy_parent_pid_with_a_base_url(server, clean_env):
    clean_env.setenv("JPY_PARENT_PID", str(server.proc.pid))
    clean_env.setenv("JUPYTER_RUNTIME_DIR", str(server.folder / "runtime"))
    client = Client()
    assert (client.mode, client.discovered_by) == ("server", "jpy_parent_pid")
    assert client.url == server.url and client.url.endswith(BASE_URL)
    assert client.workers() == []


def test_embedded_when_nothing_else(clean_env, tmp_path):
    clean_env.setenv("JPY_PARENT_PID", str(os.getpid()))  # started by something that is no server
    clean_env.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    found = discover()
    assert (found.mode, found.source) == ("embedded", "embedded")
    assert found.notes == ["RBEE_SERVER_URL is not set",
                           f"no running Jupyter server has pid {os.getpid()} (JPY_PARENT_PID): the kernel was "
                           "started by something else (nbclient, VS Code, a console)"]


def test_publish_and_unpublish(clean_env):
    class App:  # the ServerApp attributes publish reads
        ip, port, base_url, sock, certfile = "0.0.0.0", 8888, "/user/a/", "", ""

        class identity_provider:
            token = "tok"

    assert server_env(App) == {"RBEE_SERVER_PID": str(os.getpid()), "RBEE_TOKEN": "tok",
                               "RBEE_SERVER_URL": "http://127.0.0.1:8888/user/a/"}
    clean_env.setenv("RBEE_TOKEN", "before")
    publish(App)
    assert os.environ["RBEE_SERVER_URL"] == "http://127.0.0.1:8888/user/a/" and os.environ["RBEE_TOKEN"] == "tok"
    unpublish()
    assert "RBEE_SERVER_URL" not in os.environ and os.environ["RBEE_TOKEN"] == "before"


def test_a_kernel_started_by_the_server_finds_it(server, kernel):
    _, kc = kernel
    code = ("import json, os\nfrom rbee_jupyter.kernel.client import Client\n"
            "first = Client()\n"
            "url = os.environ.pop('RBEE_SERVER_URL')\n"
            "second = Client()\n"
            "os.environ['RBEE_SERVER_URL'] = url\n"
            "print(json.dumps([[c.mode, c.discovered_by, c.url] for c in (first, second)]))")
    reply, msgs = run(kc, code)
    assert reply["status"] == "ok", reply
    assert json.loads(stdout_of(msgs)) == [["server", "environment", server.url],
                                           ["server", "jpy_parent_pid", server.url]]


def test_interrupting_a_magic_cancels_the_server_job(server, kernel, rbee_hub, rbee_tiny_model):
    """The server interrupts its kernel (SIGINT) mid-download: the magic cancels the download job."""
    kernel_id, kc = kernel
    repo = "rbee-test/interrupted"
    rbee_hub.add_repo(repo, rbee_tiny_model)
    rbee_hub.faults.chunk_delay_s = 0.5  # ~6 s for the weights: the interrupt lands mid-transfer
    reply, _ = run(kc, "%load_ext rbee_jupyter.kernel.magics")
    assert reply["status"] == "ok", reply

    results: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: results.put(run(kc, f"%rbee download hf:{repo}", timeout=120)),
                     daemon=True).start()
    assert rbee_hub.wait_until(lambda: rbee_hub.bytes_served(repo, "model.safetensors") > 0, timeout=60)
    joined = server.post("v1/models/download", {"model_ref": f"hf:{repo}"}).json()  # same job: one download
    r = server.client.post(server.url + f"api/kernels/{kernel_id}/interrupt")
    assert r.status_code == 204, r.text
    reply, msgs = results.get(timeout=60)

    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
    events = server.events(joined["progress_url"] + "&last_event_id=0", timeout=30)
    assert events[-1]["stage"] == "error" and events[-1]["code"] == "CANCELLED"
    shown = [m["content"]["data"] for m in msgs if m["msg_type"] == "display_data"]
    assert shown[0]["text/plain"] == f"download hf:{repo}"  # the widget's stable text
    assert "application/vnd.jupyter.widget-view+json" in shown[0]
    updates = [m["content"]["data"]["state"] for m in msgs
               if m["msg_type"] == "comm_msg" and m["content"]["data"].get("method") == "update"]
    styles = [state["bar_style"] for state in updates if "bar_style" in state]
    assert styles and styles[-1] == "warning"  # the bar ends orange: cancelled

    reply, msgs = run(kc, "%rbee status")
    assert reply["status"] == "ok"
    text = "".join(m["content"]["data"]["text/plain"] for m in msgs if m["msg_type"] == "execute_result")
    assert text.startswith(f"rbee: server mode — {server.url} (found via RBEE_SERVER_URL)")
