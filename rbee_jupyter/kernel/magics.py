"""``%rbee`` and ``%%rbee``: download, load and talk to models from a notebook, one line each.

Every magic goes through :func:`rbee_jupyter.kernel.client.default_client` (a server found by
discovery, or the embedded hive) and returns an object, so ``_`` composes in Python:
a :class:`~rbee_jupyter.kernel.client.Download`, a :class:`~rbee_jupyter.kernel.client.Worker`, a
:class:`~rbee_jupyter.kernel.client.Generation`, or a :class:`~rbee_jupyter.kernel.widgets.Table`.

Usage mistakes raise IPython's ``UsageError`` (a one-paragraph message with the usage,
no traceback). The hive's errors keep their class (``except ModelNotFound`` works) but
print as one line. Interrupting the kernel during a magic cancels the job in the hive,
then the interrupt propagates as usual. ``--background`` returns at once and the view
keeps updating.
"""

from __future__ import annotations

import argparse
import json
import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from ..errors import RbeeError
from ..protocol import ACTIVE_STATES, DTYPES
from .client import Client, Generation, default_client, error_from_json, set_default_client
from .widgets import DownloadView, GenerationView, LoadingView, devices_table, follow, models_table, workers_table

__all__ = ["RbeeMagics", "load_ipython_extension", "USAGE"]

USAGE = """\
%rbee download REF [--background]             download a model (REF: hf:org/repo[@rev] or file:///path)
%rbee load REF [--device auto|cpu|cuda:0[,cuda:1]] [--quant nf4|fp4|int8|none] [--dtype bf16|fp16|fp32]
           [--embedding] [--background]       start a worker holding the model (downloads it first if needed);
                                              --embedding: a sentence-transformers model, for client.embed()
%rbee ps                                      the workers and their memory
%rbee models                                  the downloaded models
%rbee devices                                 devices with total and free memory
%rbee unload ID|REF                           stop a worker (or every worker of a model) and free its memory
%rbee cancel ID                               cancel a download, a load or a generation
%rbee connect URL [--token T] [--hf-token H] | embedded
                                              use another server (H: your own Hugging Face token,
                                              sent with downloads and loads), or the in-process hive
%rbee status                                  which hive this kernel uses (server or embedded) and how it was found
%rbee help                                    this text
%%rbee generate [--model REF|ID] [--max-tokens N] [--temperature T] [--seed S] [--background]
                                              the cell is the prompt; text appears as it streams
%%rbee chat [--model REF|ID] [--system TEXT] [--reset] [--json] [same options as generate]
                                              the cell is your turn; the conversation is kept per model;
                                              --json: the answer is a JSON object, shown pretty-printed
%rbee chat [--model REF|ID] --reset | --system TEXT   start over / set the system prompt, without a turn
%rbee batch EXPR --out NAME [--model REF|ID] [--max-tokens N] [--temperature T] [--seed S] [--stop S]
                                              run every prompt of a list or pandas Series (EXPR) at once;
                                              the answers go to NAME (a list, or a Series with EXPR's index)"""

_LINES: dict[str, str] = {}
for _line in USAGE.splitlines():
    if _line.startswith("%"):
        _LINES.setdefault(_line.split()[1], _line)
_DTYPES = tuple(DTYPES)  # every name a load accepts: bf16, bfloat16, fp16, half...
_QUANTS = ("nf4", "fp4", "int8", "none")
MiB = 1 << 20


class _Parser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` with the command's usage line instead of exiting."""

    def __init__(self, command: str) -> None:
        super().__init__(prog=f"%rbee {command}", add_help=False, allow_abbrev=False)
        self.command = command

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}\nusage: {_usage(self.command)}\n(%rbee help lists every command)")


def _usage(command: str) -> str:
    line = _LINES.get(command)
    if line is None:
        return "%rbee help"
    return " ".join(line.split("  ")[0].split())


def _parser(command: str) -> _Parser:
    p = _Parser(command)
    if command in ("download", "load", "unload", "cancel"):
        p.add_argument("target", metavar="ID|REF" if command in ("unload", "cancel") else "REF")
    if command in ("download", "load", "generate", "chat"):
        p.add_argument("--background", action="store_true")
    if command == "load":
        p.add_argument("--device")
        p.add_argument("--quant", choices=_QUANTS)
        p.add_argument("--dtype", choices=_DTYPES)
        p.add_argument("--embedding", action="store_true")
    if command == "connect":
        p.add_argument("url", metavar="URL")
        p.add_argument("--token")
        p.add_argument("--hf-token", dest="hf_token")
    if command == "batch":
        p.add_argument("--out", required=True)
    if command in ("generate", "chat", "batch"):
        p.add_argument("--model")
        p.add_argument("--max-tokens", type=int, dest="max_tokens")
        p.add_argument("--temperature", type=float)
        p.add_argument("--top-p", type=float, dest="top_p")
        p.add_argument("--seed", type=int)
        p.add_argument("--stop", action="append")
    if command == "chat":
        p.add_argument("--system")
        p.add_argument("--reset", action="store_true")
        p.add_argument("--json", action="store_true")
    return p


_COMMANDS = ("download", "load", "ps", "models", "devices", "unload", "cancel", "connect", "status", "help",
             "generate", "chat", "batch")


class _Text(str):
    """A str that shows as itself (no quotes) when it is a cell's result."""

    def __repr__(self) -> str:
        return str(self)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(str(self))


class Status(dict):
    """``%rbee status``: a dict (mode, discovered_by, url, notes, workers, ready, models) shown as text."""

    def text(self) -> str:
        how = {"explicit": "connected explicitly", "environment": "found via RBEE_SERVER_URL",
               "jupyterhub": "found via JupyterHub's JUPYTERHUB_SERVICE_URL and API token",
               "jpy_parent_pid": "found via JPY_PARENT_PID and the server's runtime file",
               "embedded": "no server found"}.get(self["discovered_by"], self["discovered_by"])
        if self["mode"] == "server":
            head = f"rbee: server mode — {self['url']} ({how})"
        else:
            head = f"rbee: embedded mode — in-process hive ({how})"
        lines = [head, f"workers: {self['workers']} ({self['ready']} ready) · models: {self['models']}"]
        if self["mode"] == "embedded" and self["notes"]:
            lines += [f"  · {note}" for note in self["notes"]]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.text()

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text())


def _one_line(error: RbeeError) -> RbeeError:
    """Keep the error's class, but let IPython show it as one line instead of a traceback."""
    error._render_traceback_ = lambda: [f"rbee: {error.code}: {error.message}"]  # type: ignore[attr-defined]
    return error


@magics_class
class RbeeMagics(Magics):
    """The ``%rbee`` line magics and ``%%rbee generate|chat`` cell magics."""

    def __init__(self, shell: Any = None) -> None:
        super().__init__(shell)
        self.conversations: dict[str, list[dict[str, str]]] = {}
        """Chat history per model ref (``%%rbee chat``), kept in the kernel."""
        self.current_worker: str | None = None
        """The worker ``%rbee load`` started last; the default ``--model``."""

    @property
    def client(self) -> Client:
        return default_client()

    @line_cell_magic
    def rbee(self, line: str, cell: str | None = None) -> Any:
        """Download, load and run local LLMs. ``%rbee help`` lists the commands."""
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"cannot parse the arguments ({exc})\n(%rbee help lists every command)") from None
        if not argv:
            raise UsageError(f"a command is missing\n{USAGE}")
        command, rest = argv[0], argv[1:]
        if command not in _COMMANDS:
            raise UsageError(f"unknown command {command!r}\n{USAGE}")
        if command in ("generate", "chat") and cell is None and not (
                command == "chat" and ("--reset" in rest or "--system" in rest)):
            raise UsageError(f"{command} is a cell magic: put %%rbee {command} on the first line of a cell and "
                             f"the prompt below it\nusage: {_usage(command)}")
        if command not in ("generate", "chat") and cell is not None:
            raise UsageError(f"%%rbee {command} is not a cell magic; use %rbee {command}")
        if "-h" in rest or "--help" in rest or command == "help":
            return _Text(USAGE if command == "help" else f"usage: {_usage(command)}")
        if command == "batch":  # EXPR is Python (df["q"]): take it verbatim, parse only the options
            if len(rest) < 2 or rest[0].startswith("--"):
                raise UsageError(f"batch needs an expression and --out NAME\nusage: {_usage('batch')}")
            expr, _, options = line.split(None, 1)[1].partition(" --")
            rest = [expr.strip(), *shlex.split("--" + options if options else "")]
        args = _parser(command).parse_args(rest[1:] if command == "batch" else rest)
        if command == "batch":
            args.expr = rest[0]
        try:
            return getattr(self, f"_{command}")(args, cell)
        except RbeeError as exc:
            raise _one_line(exc) from None

    # --- models ---------------------------------------------------------------------------

    def _download(self, args: argparse.Namespace, cell: str | None) -> Any:
        job = self.client.download(args.target)
        view = follow(job, DownloadView(job.model_ref or args.target), background=args.background)
        _raise_if_failed(view)
        _shown_already(job, view)
        return job

    def _models(self, args: argparse.Namespace, cell: str | None) -> Any:
        return models_table(self.client.models())

    def _devices(self, args: argparse.Namespace, cell: str | None) -> Any:
        return devices_table(self.client.devices())

    # --- workers --------------------------------------------------------------------------

    def _load(self, args: argparse.Namespace, cell: str | None) -> Any:
        device: Any = args.device
        if device and "," in device:
            device = [d.strip() for d in device.split(",") if d.strip()]
        quant = None if args.quant in (None, "none") else args.quant
        client = self.client
        worker = client.load(args.target, device=device, quantization=quant, dtype=args.dtype,
                             kind="embedding" if args.embedding else None)
        if not args.embedding:  # the default --model of generate and chat stays a generating worker
            self.current_worker = worker.id
        totals = {d["name"]: int(d["total_bytes"]) // MiB for d in client.devices()}
        view = LoadingView(worker.model_ref or args.target, device_totals_mb=totals)
        follow(worker.loading, view, background=args.background)
        _raise_if_failed(view)
        _shown_already(worker.loading, view)
        return worker

    def _ps(self, args: argparse.Namespace, cell: str | None) -> Any:
        return workers_table(self.client.workers())

    def _unload(self, args: argparse.Namespace, cell: str | None) -> Any:
        ids = self.client.unload(args.target)
        if self.current_worker in ids:
            self.current_worker = None
        return ids

    def _cancel(self, args: argparse.Namespace, cell: str | None) -> Any:
        kind = self.client.cancel(args.target)
        return _Text(f"cancelled {kind} {args.target}")

    # --- where ----------------------------------------------------------------------------

    def _connect(self, args: argparse.Namespace, cell: str | None) -> Any:
        if args.url == "embedded":
            if args.token or args.hf_token:
                raise UsageError("--token and --hf-token are for a server URL; the embedded hive needs neither.")
            client = Client.embedded()
        else:
            client = Client(args.url, token=args.token, hf_token=args.hf_token)
        client.workers()  # fails here (403, unreachable) rather than at the next magic
        previous = set_default_client(client)
        if previous is not None and previous is not client:
            previous.close()
        self.current_worker = None
        return client

    def _status(self, args: argparse.Namespace, cell: str | None) -> Any:
        return Status(self.client.status())

    def _help(self, args: argparse.Namespace, cell: str | None) -> Any:
        return _Text(USAGE)

    # --- inference ------------------------------------------------------------------------

    def _resolve_model(self, requested: str | None) -> tuple[str, str]:
        """``(model for the request, conversation key)``; the default is the last or only ready worker."""
        workers = self.client.workers()
        ready = [w for w in workers if w.state in ACTIVE_STATES]
        if requested:
            for w in workers:
                if w["id"] == requested:
                    return requested, w.get("model_ref") or requested
            return requested, requested
        mine = [w for w in ready if w["id"] == self.current_worker]
        if mine:
            return mine[0]["id"], mine[0].get("model_ref") or mine[0]["id"]
        if len(ready) == 1:
            return ready[0]["id"], ready[0].get("model_ref") or ready[0]["id"]
        if not ready:
            raise UsageError("no model is loaded: run %rbee load REF first, or pass --model REF")
        names = ", ".join(f"{w['id']} ({w.get('model_ref')})" for w in ready)
        raise UsageError(f"several workers are loaded ({names}): pick one with --model ID|REF")

    def _options(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.seed, "stop": args.stop}

    def _generate(self, args: argparse.Namespace, cell: str | None) -> Any:
        prompt = (cell or "").strip("\n")
        if not prompt.strip():
            raise UsageError(f"the cell is empty: write the prompt below %%rbee generate\nusage: {_usage('generate')}")
        model, key = self._resolve_model(args.model)
        gen = self.client.generate(prompt, model=model, **self._options(args))
        return self._follow_generation(gen, key, args)

    def _chat(self, args: argparse.Namespace, cell: str | None) -> Any:
        model, key = self._resolve_model(args.model)
        history = self.conversations.setdefault(key, [])
        if args.reset:
            history.clear()
        if args.system is not None:
            history[:] = [m for m in history if m["role"] != "system"]
            history.insert(0, {"role": "system", "content": args.system})
        text = (cell or "").strip()
        if not text:
            if args.reset or args.system is not None:
                return _Text(f"conversation with {key}: {len(history)} message(s)")
            raise UsageError(f"the cell is empty: write your message below %%rbee chat\nusage: {_usage('chat')}")
        turn = {"role": "user", "content": text}
        options = self._options(args)
        if args.json:  # decoding constrained to a JSON object (engine/grammar.py)
            options["response_format"] = {"type": "json_object"}
        gen = self.client.chat([*history, turn], model=model, **options)

        def remember(view: Any) -> None:
            if view.state == "done":
                history.extend([turn, {"role": "assistant", "content": gen.text}])

        gen = self._follow_generation(gen, key, args, on_done=remember)
        if args.json and not args.background:
            return _Text(json.dumps(json.loads(gen.text), indent=2, ensure_ascii=False))
        return gen

    def _batch(self, args: argparse.Namespace, cell: str | None) -> Any:
        if not args.out.isidentifier():
            raise UsageError(f"--out must be a Python name, got {args.out!r}\nusage: {_usage('batch')}")
        try:
            data = self.shell.ev(args.expr)
        except Exception as exc:  # noqa: BLE001 - the user's expression: say what failed, no traceback
            raise UsageError(f"cannot evaluate {args.expr!r}: {type(exc).__name__}: {exc}") from None
        series = type(data).__name__ == "Series" and hasattr(data, "index")
        items = list(data.tolist() if series else data) if not isinstance(data, str) else None
        if items is None:
            raise UsageError(f"{args.expr!r} is a single string; batch runs over a list or a pandas Series")
        model, _ = self._resolve_model(args.model)
        result = self.client.generate_batch(items, model=model, **self._options(args))
        answers = result.texts
        if series:
            import pandas as pd

            answers = pd.Series(answers, index=data.index, name=args.out)
        self.shell.user_ns[args.out] = answers
        return result

    def _follow_generation(self, gen: Generation, title: str, args: argparse.Namespace,
                           on_done: Any = None) -> Generation:
        view = GenerationView(title, max_tokens=args.max_tokens, text_to_stdout=not args.background)
        follow(gen, view, background=args.background, on_done=on_done)
        if not args.background:
            if on_done is not None:
                on_done(view)
            if view.state == "running":  # e.g. the stream broke without an event
                raise RbeeError("The generation stream ended early.")
            _raise_if_failed(view)
        _shown_already(gen, view)
        return gen


def _shown_already(handle: Any, view: Any) -> None:
    """The view is on screen: the returned handle (``Out``/``_``) must not draw a second one.

    In a terminal there is no live view to duplicate, so ``Out`` shows the handle's repr.
    """
    if view.mode != "terminal":
        handle.suppress_next_display()


def _raise_if_failed(view: Any) -> None:
    """A foreground job that ended in error raises it (so a notebook run in CI fails there)."""
    if view.state in ("error", "cancelled") and view.last_event is not None and \
            (view.last_event.get("stage") or view.last_event.get("type")) == "error":
        raise error_from_json(view.last_event)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext rbee_jupyter`` (or ``rbee_jupyter.kernel.magics``)."""
    ipython.register_magics(RbeeMagics)
