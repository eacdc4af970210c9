"""Progress views for downloads, loads and generations: one family, one look, three surfaces.

Every view is a row ``[description] [bar] [details]`` like ``tqdm.notebook``, with four
states: *running* (bar blue), *done* (bar green), *error* (bar red, the message shown in
the details) and *cancelled* (bar orange). Where it is drawn depends on the frontend
(:func:`progress_mode`):

``widget``
    ipywidgets in a kernel (JupyterLab, Notebook 7, VS Code). The display bundle carries
    a constant ``text/plain`` (``"download hf:org/repo"``): frontends without a widget
    manager show that, and nbval (which ignores display updates) compares it stably.
``text``
    a kernel without ipywidgets (or ``RBEE_PROGRESS=text``): one display output that is
    updated in place with :func:`rbee_jupyter.kernel.render.describe` lines.
``terminal``
    IPython in a terminal, or plain Python: one line rewritten with ``\\r``.

A generation's text goes to the cell's stdout as it streams (so it is in every
frontend's output, nbval's included); its view shows tokens and tokens/s. A generation
followed in the background writes its text into the widget instead, because a
background thread's stdout would land in whatever cell runs later.

``ps``/``models``/``devices`` are :class:`Table` objects: HTML in notebooks, aligned
text elsewhere.
"""

from __future__ import annotations

import html
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, Literal

from ..errors import RbeeError
from .render import describe, eta_seconds, human_bytes

__all__ = ["progress_mode", "ProgressView", "DownloadView", "LoadingView", "GenerationView", "follow",
           "view_for", "show_handle", "Table", "workers_table", "models_table", "devices_table"]

Mode = Literal["widget", "text", "terminal"]
State = Literal["running", "done", "error", "cancelled"]

BAR_STYLES: dict[str, str] = {"running": "", "done": "success", "error": "danger", "cancelled": "warning"}


# --- where are we -------------------------------------------------------------------------

def _shell() -> Any:
    if "IPython" not in sys.modules:
        return None
    from IPython import get_ipython

    return get_ipython()


def progress_mode() -> Mode:
    """``widget``, ``text`` or ``terminal`` for this process (``RBEE_PROGRESS`` overrides).

    A kernel with a comm manager and ipywidgets gets widgets; a kernel without them gets
    an updating text output; anything else (terminal IPython, scripts) a ``\\r`` line.
    """
    forced = os.environ.get("RBEE_PROGRESS", "").strip().lower()
    if forced in ("widget", "text", "terminal"):
        return forced  # type: ignore[return-value]
    shell = _shell()
    kernel = getattr(shell, "kernel", None) if shell is not None else None
    if kernel is None:
        return "terminal"
    if getattr(kernel, "comm_manager", None) is None:
        return "text"
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return "text"
    return "widget"


class _Line:
    """A text-only display output (``text`` mode)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(self.text)


# --- the family ---------------------------------------------------------------------------

class ProgressView:
    """Base of the views: state, the ``[description][bar][details]`` row, and the surfaces.

    Feed it events (rbee_jupyter.events formats) with :meth:`update`; a terminal event (complete,
    ready, end, error) fixes the final state. ``description`` and ``details`` are the texts
    shown; in widget mode ``label``, ``bar`` and ``info`` are the ipywidgets.
    """

    kind: ClassVar[str] = "job"
    verbs: ClassVar[tuple[str, str, str]] = ("running", "done", "job")  # -ing, past, noun

    def __init__(self, title: str, *, mode: Mode | None = None, throttle_s: float = 0.1) -> None:
        self.title = title
        self.mode: Mode = mode or progress_mode()
        self.throttle_s = throttle_s if self.mode == "widget" else max(throttle_s, 0.25)
        self.state: State = "running"
        self.message = ""
        self.details = ""
        self.last_event: dict[str, Any] | None = None
        self.started = time.monotonic()
        self.fraction = 0.0
        self._drawn_at = 0.0
        self._drawn_description = ""
        self._shown = False
        self._handle: Any = None
        self._line_len = 0
        self._lock = threading.RLock()
        self.label = self.bar = self.info = self.box = None
        if self.mode == "widget":
            self._build()

    # --- texts ----------------------------------------------------------------------------

    @property
    def description(self) -> str:
        """``downloading hf:x``, ``✔ downloaded hf:x``, ``✘ download failed: hf:x``, ``⊘ download cancelled: hf:x``."""
        ing, past, noun = self.verbs
        if self.state == "running":
            stage = (self.last_event or {}).get("stage")
            phase = stage if stage in ("downloading", "importing") else ing  # a load's first phases
            return f"{phase} {self.title}"
        if self.state == "done":
            return f"✔ {past} {self.title}"
        if self.state == "error":
            return f"✘ {noun} failed: {self.title}"
        return f"⊘ {noun} cancelled: {self.title}"

    @property
    def plain(self) -> str:
        """The constant ``text/plain`` of the display (stable for nbval)."""
        return f"{self.kind} {self.title}"

    def line(self) -> str:
        """The one-line text for ``text``/``terminal`` surfaces."""
        if self.state == "running" and self.last_event is not None:
            return describe(self.last_event)
        return f"{self.description}" + (f" — {self.details}" if self.details else "")

    # --- widgets --------------------------------------------------------------------------

    def _build(self) -> None:
        import ipywidgets as w

        self.label = w.HTML(value=html.escape(self.description), layout=w.Layout(min_width="16em"))
        self.bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, bar_style="",
                                   layout=w.Layout(width="30%", min_width="10em"))
        self.info = w.HTML(value="")
        row = w.HBox([self.label, self.bar, self.info], layout=w.Layout(align_items="center", flex_flow="row wrap"))
        self.box = w.VBox([row, *self._extra_widgets()])

    def _extra_widgets(self) -> list[Any]:
        return []

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        data: dict[str, Any] = {"text/plain": self.plain}
        if self.box is not None:
            data["application/vnd.jupyter.widget-view+json"] = {
                "version_major": 2, "version_minor": 0, "model_id": self.box.model_id}
        return data

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.title!r} {self.state}>"

    # --- life -----------------------------------------------------------------------------

    def show(self) -> ProgressView:
        """Put the view on screen once (idempotent)."""
        with self._lock:
            if self._shown:
                return self
            self._shown = True
            if self.mode == "widget":
                from IPython.display import display

                display(self)
            elif self.mode == "text":
                from IPython.display import display

                self._handle = display(_Line(self.plain), display_id=True)
            else:
                self._write_line(self.description)
        return self

    def update(self, event: dict[str, Any]) -> None:
        """Take one event; terminal events (complete/ready/end/error) finish the view."""
        with self._lock:
            if self.state != "running":  # finished views keep their final texts
                return
            self.last_event = event
            stage = event.get("stage") or event.get("type")
            if stage == "error":
                cancelled = event.get("code") == "CANCELLED"
                self._finish("cancelled" if cancelled else "error",
                             event.get("message", "") if cancelled else f"{event.get('code')}: {event.get('message')}")
                return
            self._apply(stage, event)
            if stage in ("complete", "ready", "end"):
                self._finish("done")
            else:
                self._draw()

    def fail(self, error: BaseException) -> None:
        """Finish as error (or cancelled, for ``Cancelled``) from an exception."""
        if isinstance(error, RbeeError):
            if error.code == "CANCELLED":
                self._finish("cancelled", error.message)
            else:
                self._finish("error", f"{error.code}: {error.message}")
        else:
            self._finish("error", f"{type(error).__name__}: {error}")

    def cancel(self, message: str = "cancelled") -> None:
        self._finish("cancelled", message)

    def _finish(self, state: State, message: str = "") -> None:
        with self._lock:
            if self.state != "running":
                return
            self.state, self.message = state, message
            if state == "done":
                self.fraction = 1.0
            else:
                self.details = message
            self._draw(force=True)
            if self.mode == "terminal":
                self._end_line()

    def _apply(self, stage: str | None, event: dict[str, Any]) -> None:
        """Subclasses: turn an event into ``fraction`` and ``details``."""

    # --- drawing --------------------------------------------------------------------------

    def _draw(self, force: bool = False) -> None:
        """Redraw, at most every ``throttle_s`` unless forced or the phase (description) changed."""
        now = time.monotonic()
        description = self.description
        if not force and description == self._drawn_description and now - self._drawn_at < self.throttle_s:
            return
        self._drawn_at, self._drawn_description = now, description
        if self.mode == "widget":
            self._draw_widgets()
        elif self.mode == "text":
            if self._handle is not None:
                self._handle.update(_Line(self.line()))
        else:
            self._write_line(self.line())

    def _draw_widgets(self) -> None:
        assert self.bar is not None and self.label is not None and self.info is not None
        self.bar.max = 1.0
        self.bar.value = min(max(self.fraction, 0.0), 1.0)
        self.bar.bar_style = BAR_STYLES[self.state]
        self.label.value = html.escape(self.description)
        style = ' style="color: var(--jp-error-color1, #d32f2f)"' if self.state == "error" else ""
        self.info.value = f"<span{style}>{html.escape(self.details)}</span>"

    def _write_line(self, text: str) -> None:
        out = sys.stdout
        pad = " " * max(0, self._line_len - len(text))
        out.write(("\r\x1b[K" if _isatty(out) else "\r") + text + ("" if _isatty(out) else pad))
        out.flush()
        self._line_len = len(text)

    def _end_line(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()
        self._line_len = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:  # noqa: BLE001 - captured streams may not implement it
        return False


def _download_details(event: dict[str, Any]) -> tuple[float, str]:
    done, total = event.get("bytes_downloaded", 0), event.get("bytes_total", 0)
    parts = [f"{human_bytes(done)} / {human_bytes(total)}", f"{event.get('speed_mbps', 0) / 8:.1f} MB/s"]
    eta = eta_seconds(event)
    if eta is not None:
        parts.append(f"ETA {eta:.0f} s")
    if event.get("files_total"):
        parts.append(f"{event.get('files_done', 0)}/{event['files_total']} files")
    return (done / total if total else 0.0), " · ".join(parts)


class DownloadView(ProgressView):
    """Bytes, total, MB/s, ETA and files of a download."""

    kind = "download"
    verbs = ("downloading", "downloaded", "download")

    def _apply(self, stage: str | None, event: dict[str, Any]) -> None:
        if stage == "downloading":
            self.fraction, self.details = _download_details(event)
            self._files = (event.get("files_done", 0), event.get("files_total", 0))
        elif stage == "importing":
            self.fraction = float(event.get("fraction", 0.0))
            self.details = f"importing: {event.get('step', '')}"
        elif stage == "complete":
            size = event.get("size_bytes")
            files = getattr(self, "_files", (0, 0))[1]
            self.details = " · ".join(p for p in (human_bytes(size) if size is not None else "",
                                                  f"{files} files" if files else "") if p)


class LoadingView(ProgressView):
    """Blocks loaded, a memory bar per device, and elapsed time (download events first, if any)."""

    kind = "load"
    verbs = ("loading", "loaded", "load")

    def __init__(self, title: str, *, device_totals_mb: dict[str, int] | None = None, **kw: Any) -> None:
        self.device_totals_mb = dict(device_totals_mb or {})
        self.memory_mb: dict[str, int] = {}
        self.blocks = (0, 0)
        self._device_rows: dict[str, tuple[Any, Any]] = {}
        super().__init__(title, **kw)

    def _extra_widgets(self) -> list[Any]:
        import ipywidgets as w

        self.memory_box = w.VBox([])
        return [self.memory_box]

    def _apply(self, stage: str | None, event: dict[str, Any]) -> None:
        if stage == "downloading":
            self.fraction, self.details = _download_details(event)
            return
        if stage == "importing":
            self.fraction, self.details = float(event.get("fraction", 0.0)), f"importing: {event.get('step', '')}"
            return
        if stage == "loading_to_vram":
            self.blocks = (event["layers_loaded"], event["layers_total"])
            self.memory_mb.update(event.get("memory_mb") or {event["device"]: event["vram_mb"]})
        elif stage == "ready":
            self.memory_mb.update(event.get("memory_mb") or {})
            self.blocks = (self.blocks[1], self.blocks[1])
        loaded, total = self.blocks
        self.fraction = loaded / total if total else (1.0 if stage == "ready" else 0.0)
        memory = ", ".join(f"{d} {mb} MB" for d, mb in self.memory_mb.items())
        self.details = " · ".join(p for p in (f"{loaded}/{total} blocks" if total else "", memory,
                                              f"{self.elapsed():.1f} s") if p)

    def _draw_widgets(self) -> None:
        super()._draw_widgets()
        import ipywidgets as w

        for device, mb in self.memory_mb.items():
            if device not in self._device_rows:
                bar = w.FloatProgress(min=0.0, max=1.0, bar_style="info", layout=w.Layout(width="30%"))
                text = w.HTML()
                name = w.HTML(value=f"&nbsp;&nbsp;{html.escape(device)}", layout=w.Layout(min_width="16em"))
                self._device_rows[device] = (bar, text)
                self.memory_box.children = [*self.memory_box.children, w.HBox([name, bar, text])]
            bar, text = self._device_rows[device]
            total = self.device_totals_mb.get(device) or max(mb, 1)
            bar.max = float(total)
            bar.value = float(min(mb, total))
            text.value = f"{mb} MB / {total} MB" if device in self.device_totals_mb else f"{mb} MB"


class GenerationView(ProgressView):
    """Streamed text (to stdout, or into the widget when in the background) and tokens/s."""

    kind = "generate"
    verbs = ("generating", "generated", "generation")

    def __init__(self, title: str, *, max_tokens: int | None = None, text_to_stdout: bool = True,
                 **kw: Any) -> None:
        self.max_tokens = max_tokens
        self.text_to_stdout = text_to_stdout
        self.tokens = 0
        self.text = ""
        self._first_token_at: float | None = None
        super().__init__(title, **kw)
        if self.mode == "widget" and not text_to_stdout:
            import ipywidgets as w

            self.text_area = w.HTML(value="")
            self.box.children = [*self.box.children, self.text_area]

    def line(self) -> str:
        if self.state == "running":
            return self.description
        if self.state == "done" and self.last_event is not None:
            return describe(self.last_event)
        return super().line()

    def show(self) -> ProgressView:
        if self.mode == "terminal":  # the text itself streams on stdout: no status line over it
            self._shown = True
            return self
        return super().show()

    def _write_line(self, text: str) -> None:
        if self.mode == "terminal" and self.state == "running":
            return
        super()._write_line(("\n" if self.text and not self.text.endswith("\n") else "") + text)

    def _apply(self, stage: str | None, event: dict[str, Any]) -> None:
        if stage == "token":
            piece = event.get("t", "")
            self.tokens += 1
            self.text += piece
            now = time.monotonic()
            if self._first_token_at is None:
                self._first_token_at = now
            if self.text_to_stdout or self.mode != "widget":
                sys.stdout.write(piece)
                sys.stdout.flush()
            elif self.mode == "widget":
                self.text_area.value = f'<pre style="white-space: pre-wrap">{html.escape(self.text)}</pre>'
            span = now - self._first_token_at
            rate = (self.tokens - 1) / span if span > 0 else 0.0
            self.fraction = self.tokens / self.max_tokens if self.max_tokens else 0.0
            self.details = f"{self.tokens} tokens · {rate:.1f} tok/s"
        elif stage == "end":
            self.tokens = event.get("total_tokens", self.tokens)
            self.details = (f"{self.tokens} tokens · {event.get('tokens_per_second') or 0:.1f} tok/s · "
                            f"stop: {event.get('stop_reason')}")


# --- following a job ----------------------------------------------------------------------

def view_for(handle: Any, *, title: str | None = None, mode: Mode | None = None, **kw: Any) -> ProgressView:
    """The view that fits a client handle (Download, LoadJob/Worker, Generation)."""
    kind = getattr(handle, "kind", "")
    name = title or getattr(handle, "model_ref", None) or getattr(handle, "model", None) or handle.id
    if kind == "download":
        return DownloadView(name, mode=mode, **kw)
    if kind == "load":
        return LoadingView(name, mode=mode, **kw)
    if kind == "inference":
        return GenerationView(name, mode=mode, **kw)
    raise TypeError(f"No progress view for {handle!r}.")


def _events(handle: Any) -> Iterator[dict[str, Any]]:
    if getattr(handle, "kind", "") == "inference":
        return handle.events()
    loading = getattr(handle, "loading", None)  # a Worker
    return (loading or handle).events(last_event_id=0)


def _pump(handle: Any, view: ProgressView) -> None:
    try:
        for event in _events(handle):
            view.update(event)
    except KeyboardInterrupt:
        try:
            handle.cancel()
        finally:
            view.cancel("interrupted: the job was cancelled")
        raise
    except BaseException as exc:
        view.fail(exc)
        raise
    if view.state == "running":
        view.fail(RbeeError("The event stream ended before the job did (the server may be shutting down)."))


def follow(handle: Any, view: ProgressView | None = None, *, background: bool = False,
           on_done: Callable[[ProgressView], None] | None = None) -> ProgressView:
    """Show ``handle``'s progress and follow it to the end.

    In the foreground an interrupt (``KeyboardInterrupt``) cancels the job in the hive,
    marks the view cancelled and propagates; errors of the stream propagate too. In the
    background the view keeps updating from a daemon thread and this returns at once.
    """
    if view is None:
        options = {"text_to_stdout": not background} if getattr(handle, "kind", "") == "inference" else {}
        view = view_for(handle, **options)
    view.show()
    if not background:
        _pump(handle, view)
        return view

    def run() -> None:
        try:
            _pump(handle, view)
        except BaseException:  # noqa: BLE001 - shown in the view; nobody to raise to
            pass
        if on_done is not None:
            on_done(view)

    threading.Thread(target=run, name=f"rbee-follow-{getattr(handle, 'id', '')}", daemon=True).start()
    return view


def show_handle(handle: Any, *, text: str | None = None) -> None:
    """How a job handle shows as a cell's result: a live view in a kernel, its repr in a terminal."""
    if progress_mode() == "terminal":
        print(text or repr(handle))
    else:
        follow(handle, background=True)


# --- tables -------------------------------------------------------------------------------

Column = tuple[str, str, Callable[[dict[str, Any]], Any]]


class Table(Sequence[dict[str, Any]]):
    """Rows (the API's dicts) shown as an HTML table in notebooks and aligned text elsewhere."""

    def __init__(self, rows: Sequence[dict[str, Any]], columns: Sequence[Column], *, title: str,
                 empty: str) -> None:
        self.rows = list(rows)
        self.columns = list(columns)
        self.title = title
        self.empty = empty

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> Any:
        return self.rows[index]

    def cells(self) -> list[list[str]]:
        return [["" if (v := get(row)) is None else str(v) for _, _, get in self.columns] for row in self.rows]

    def _repr_html_(self) -> str:
        if not self.rows:
            return f"<p><b>{html.escape(self.title)}</b>: {html.escape(self.empty)}</p>"
        head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for _, h, _ in self.columns)
        body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in cells)
                       + "</tr>" for cells in self.cells())
        return (f"<table class='rbee-table'><caption style='text-align:left'><b>{html.escape(self.title)}</b>"
                f"</caption><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def __repr__(self) -> str:
        if not self.rows:
            return f"{self.title}: {self.empty}"
        headers = [h for _, h, _ in self.columns]
        rows = self.cells()
        widths = [max(len(x) for x in col) for col in zip(headers, *rows, strict=True)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        return "\n".join([fmt.format(*headers).rstrip(), *(fmt.format(*r).rstrip() for r in rows)])

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


def workers_table(rows: Sequence[dict[str, Any]]) -> Table:
    return Table(rows, [
        ("id", "ID", lambda r: r.get("id")),
        ("model_ref", "MODEL", lambda r: r.get("model_ref")),
        ("state", "STATE", lambda r: r.get("state")),
        ("devices", "DEVICES", lambda r: ",".join(r.get("devices") or [])),
        ("memory_mb", "MEMORY", lambda r: ", ".join(f"{d} {mb} MB" for d, mb in (r.get("memory_mb") or {}).items())),
        ("quantization", "QUANT", lambda r: r.get("quantization") or "none"),
    ], title="workers", empty="no workers (load one with %rbee load REF)")


def models_table(rows: Sequence[dict[str, Any]]) -> Table:
    return Table(rows, [
        ("ref", "MODEL", lambda r: r.get("ref")),
        ("size_bytes", "SIZE", lambda r: human_bytes(r.get("size_bytes") or 0)),
        ("files", "FILES", lambda r: len(r.get("files") or [])),
        ("revision", "REVISION", lambda r: (r.get("revision") or "")[:10]),
        ("local_path", "PATH", lambda r: r.get("local_path")),
    ], title="models", empty="no models downloaded (download one with %rbee download REF)")


def devices_table(rows: Sequence[dict[str, Any]]) -> Table:
    return Table(rows, [
        ("name", "DEVICE", lambda r: r.get("name")),
        ("label", "LABEL", lambda r: r.get("label")),
        ("total_bytes", "TOTAL", lambda r: human_bytes(r.get("total_bytes") or 0)),
        ("free_bytes", "FREE", lambda r: human_bytes(r.get("free_bytes") or 0)),
    ], title="devices", empty="no devices")
