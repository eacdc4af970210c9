"""``%rbee`` / ``%%rbee`` through a real IPython shell, a real nbclient kernel, and in embedded mode.

The in-process ``InteractiveShell`` has no kernel, so the views use the terminal line;
the nbclient notebook runs a real kernel (widgets, display updates, ``_``) against the
session's server, found through the variables the extension gives its kernels.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading

import nbformat
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from nbclient import NotebookClient

from rbee_jupyter.kernel.client import Client, Download, Generation, Worker, set_default_client
from rbee_jupyter.errors import Cancelled, InvalidModelRef
from rbee_jupyter.kernel.magics import RbeeMagics
from rbee_jupyter.testing.pytest_plugin import TINY_REPO
from rbee_jupyter.kernel.widgets import Table

TINY = f"hf:{TINY_REPO}"
_names = itertools.count()


@pytest.fixture(scope="module")
def shell():
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "rbee_jupyter.kernel.magics")
    yield shell
    set_default_client(None)
    InteractiveShell.clear_instance()


@pytest.fixture
def magics(shell) -> RbeeMagics:
    return shell.magics_manager.registry["RbeeMagics"]


@pytest.fixture
def on_server(shell, rbee_server):
    client = shell.run_line_magic("rbee", f"connect {rbee_server.url} --token {rbee_server.token}")
    yield client
    set_default_client(None)


@pytest.fixture
def new_repo(rbee_hub, rbee_tiny_model):
    def make() -> str:
        repo = f"rbee-test/magics-{next(_names)}"
        rbee_hub.add_repo(repo, rbee_tiny_model)
        return f"hf:{repo}"
    return make


def run(shell, capsys, code: str):
    result = shell.run_cell(code)
    captured = capsys.readouterr()
    return result, captured.out + captured.err


@pytest.mark.parametrize("code, expected", [
    ("%rbee", "a command is missing"),
    ("%rbee frobnicate", "unknown command 'frobnicate'"),
    ("%rbee load", "the following arguments are required: REF\nusage: %rbee load REF [--device"),
    ("%rbee load hf:a/b --quant q8", "argument --quant: invalid choice: 'q8'"),
    ("%rbee download hf:a/b extra", "unrecognized arguments: extra\nusage: %rbee download REF [--background]"),
    ("%rbee generate", "generate is a cell magic"),
    ("%%rbee ps\nwhatever", "%%rbee ps is not a cell magic"),
    ('%rbee load "hf:a', "cannot parse the arguments"),
    ("%%rbee generate --max-tokens many\nhi", "argument --max-tokens: invalid int value: 'many'"),
    ("%rbee connect embedded --hf-token hf_x", "--token and --hf-token are for a server URL"),
])
def test_bad_arguments_print_a_short_usage(shell, capsys, code, expected):
    result, out = run(shell, capsys, code)
    assert isinstance(result.error_in_exec, UsageError)
    assert expected in out and "Traceback" not in out and out.count("\n") < 30


def test_help(shell):
    assert "%rbee download REF" in repr(shell.run_line_magic("rbee", "help"))
    assert repr(shell.run_line_magic("rbee", "load -h")).startswith("usage: %rbee load REF [--device")


def test_connect_with_an_hf_token_sends_it_with_downloads(shell, rbee_server, rbee_hub, new_repo, capsys):
    """The user's own hub token (``--hf-token``) reaches the hub as theirs; no other request carries it."""
    ref = new_repo()
    try:
        shell.run_line_magic("rbee", f"connect {rbee_server.url} --token {rbee_server.token} --hf-token hf_mine")
        result, out = run(shell, capsys, f"%rbee download {ref}")
        assert result.error_in_exec is None and "✔" in out, out
        repo = ref.removeprefix("hf:")
        assert {r.headers.get("authorization") for r in rbee_hub.requests if r.repo_id == repo} == {"Bearer hf_mine"}
        assert "hf_mine" not in repr(shell.run_line_magic("rbee", "status"))
    finally:
        set_default_client(None)


def test_magics_against_a_server(shell, on_server, rbee_server, rbee_worker, capsys):
    assert isinstance(on_server, Client) and on_server.mode == "server"
    status = shell.run_line_magic("rbee", "status")
    assert str(status).startswith(f"rbee: server mode — {rbee_server.url} (connected explicitly)")
    assert status["mode"] == "server" and status["ready"] >= 1

    ps = shell.run_line_magic("rbee", "ps")
    assert isinstance(ps, Table) and rbee_worker in [w["id"] for w in ps]
    assert "<table" in ps._repr_html_() and rbee_worker in repr(ps) and repr(ps).startswith("ID")
    assert TINY in [m["ref"] for m in shell.run_line_magic("rbee", "models")]
    assert repr(shell.run_line_magic("rbee", "devices")).splitlines()[1].startswith("cpu")

    result, out = run(shell, capsys, f"%%rbee generate --model {rbee_worker} --max-tokens 6 --temperature 0\n"
                                     "Once upon a time")
    gen = result.result
    assert isinstance(gen, Generation) and shell.user_ns["_"] is gen and gen.state == "complete"
    assert out.startswith(gen.text) and f"{gen.end['total_tokens']} tokens in" in out  # streamed, then stats

    result, out = run(shell, capsys, "%rbee download hf:../x")
    assert isinstance(result.error_in_exec, InvalidModelRef)  # the class is kept, for `except`
    assert "rbee: INVALID_MODEL_REF: Invalid model reference" in out and "Traceback" not in out


def test_chat_keeps_a_conversation_per_model(shell, magics, on_server, rbee_worker):
    for turn in ("Hello!", "And then?"):
        gen = shell.run_cell(f"%%rbee chat --model {rbee_worker} --max-tokens 4\n{turn}").result
        assert isinstance(gen, Generation) and gen.state == "complete"
    history = magics.conversations[TINY]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[2]["content"] == "And then?" and history[3]["content"] == gen.text
    note = shell.run_line_magic("rbee", f"chat --model {rbee_worker} --reset --system 'Be brief.'")
    assert repr(note) == f"conversation with {TINY}: 1 message(s)"
    assert magics.conversations[TINY] == [{"role": "system", "content": "Be brief."}]


def test_interrupt_cancels_the_server_job(shell, on_server, rbee_server, rbee_hub, new_repo, capsys):
    """A real SIGINT while the magic follows a slow download: the server's job is cancelled."""
    ref = new_repo()
    repo = ref.removeprefix("hf:")
    rbee_hub.faults.chunk_delay_s = 0.5
    armed = threading.Event()
    joined: dict = {}

    def on_sigint(signum, frame):  # only while our cell runs: never into pytest itself
        if armed.is_set():
            raise KeyboardInterrupt

    def interrupt():
        if rbee_hub.wait_until(lambda: rbee_hub.bytes_served(repo, "model.safetensors") > 0, timeout=60):
            joined.update(rbee_server.post("v1/models/download", {"model_ref": ref}).json())
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, on_sigint)
    helper = threading.Thread(target=interrupt, daemon=True)
    try:
        armed.set()
        helper.start()
        result, out = run(shell, capsys, f"%rbee download {ref}")
    finally:
        armed.clear()
        signal.signal(signal.SIGINT, previous)
    helper.join(60)  # it ended when it sent the SIGINT; the bound is for a busy machine
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert f"⊘ download cancelled: {ref} — interrupted: the job was cancelled" in out
    events = rbee_server.events(joined["progress_url"] + "&last_event_id=0", timeout=30)
    assert events[-1]["stage"] == "error" and events[-1]["code"] == "CANCELLED"


def test_background_returns_at_once(shell, on_server, rbee_hub, new_repo):
    ref = new_repo()
    rbee_hub.faults.chunk_delay_s = 0.5
    job = shell.run_line_magic("rbee", f"download {ref} --background")
    assert isinstance(job, Download) and job.state == "running"
    rbee_hub.faults.chunk_delay_s = 0
    assert job.wait(timeout=60)["stage"] == "complete"


def test_cancel_by_id(shell, on_server, rbee_hub, new_repo):
    rbee_hub.faults.chunk_delay_s = 0.5
    job = shell.run_line_magic("rbee", f"download {new_repo()} --background")
    assert repr(shell.run_line_magic("rbee", f"cancel {job.id}")) == f"cancelled download {job.id}"
    with pytest.raises(Cancelled):
        job.wait(timeout=60)


def test_embedded_mode_from_nothing_to_text(shell, magics, rbee_hub, tmp_path, monkeypatch, capsys):
    """No server: `%rbee load` downloads and loads in the in-process hive, then text streams."""
    for name in ("RBEE_SERVER_URL", "JPY_PARENT_PID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RBEE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RBEE_CATALOG_PATH", str(tmp_path / "catalog.sqlite"))
    monkeypatch.setenv("HF_ENDPOINT", rbee_hub.url)
    set_default_client(None)
    magics.conversations.clear()
    from rbee_jupyter.kernel.embedded import shared_hive

    try:
        assert str(shell.run_line_magic("rbee", "status")).startswith("rbee: embedded mode")
        result, out = run(shell, capsys, f"%rbee load {TINY} --device cpu --quant nf4")
        worker = result.result
        assert isinstance(worker, Worker), out
        assert "✔ loaded" in out and worker.state == "idle"
        assert [w["id"] for w in shell.run_line_magic("rbee", "ps")] == [worker.id]
        result, out = run(shell, capsys, "%%rbee generate --max-tokens 5\nOnce upon a time")
        assert isinstance(result.result, Generation) and out.startswith(result.result.text)
        reply = shell.run_cell("%%rbee chat --max-tokens 3\nHi").result
        assert reply.state == "complete" and len(magics.conversations[TINY]) == 2
        assert shell.run_line_magic("rbee", f"unload {TINY}") == [worker.id]
        assert not [w for w in shell.run_line_magic("rbee", "ps") if w["state"] in ("idle", "busy")]
        assert shell.run_line_magic("rbee", "connect embedded").mode == "embedded"
    finally:
        set_default_client(None)
        shared_hive().close()


def test_a_notebook_kernel_uses_the_server(rbee_server, rbee_worker, monkeypatch, tmp_path):
    """nbclient runs a real kernel that finds the server through RBEE_SERVER_URL/RBEE_TOKEN."""
    monkeypatch.setenv("RBEE_SERVER_URL", rbee_server.url)
    monkeypatch.setenv("RBEE_TOKEN", rbee_server.token)
    for name in ("JPY_PARENT_PID", "RBEE_PROGRESS", "RBEE_SERVER_PID", "RBEE_SERVER_SOCK", "RBEE_SSL_VERIFY"):
        monkeypatch.delenv(name, raising=False)
    cells = ["%load_ext rbee_jupyter.kernel.magics",
             "%rbee status",
             f"%rbee download {TINY}",
             f"%%rbee generate --model {rbee_worker} --max-tokens 5 --temperature 0\nOnce upon a time",
             "print(type(_).__name__, _.state, repr(_.text))",
             f"import os\nos.environ['RBEE_PROGRESS'] = 'text'\n%rbee download {TINY}"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [cell.outputs for cell in nb.cells]

    assert outputs[1][0]["data"]["text/plain"].startswith(f"rbee: server mode — {rbee_server.url} "
                                                          "(found via RBEE_SERVER_URL)")
    [shown] = outputs[2]  # the view only: the returned handle does not draw it twice
    assert shown["output_type"] == "display_data" and shown["data"]["text/plain"] == f"download {TINY}"
    model_id = shown["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
    states = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    row = states[states[model_id]["state"]["children"][0].removeprefix("IPY_MODEL_")]["state"]
    label, bar, _ = (states[c.removeprefix("IPY_MODEL_")]["state"] for c in row["children"])
    assert label["value"] == f"✔ downloaded {TINY}"
    assert bar["bar_style"] == "success" and bar["value"] == 1.0

    streamed = "".join(o["text"] for o in outputs[3] if o["output_type"] == "stream")
    assert outputs[4][0]["text"] == f"Generation complete {streamed!r}\n"
    text_line = outputs[5][0]["data"]["text/plain"]  # text mode: one output, updated in place
    assert text_line.startswith(f"✔ downloaded {TINY} — 837.4 KB")
