"""Run one function on untrusted input in a child process with a memory limit.

Parsing a file another user published (a GGUF's metadata, its dequantization) must not be
able to take the server down: a header that claims a billion-entry array, or a model far
larger than the host's memory, would otherwise grow the server process until the kernel's
OOM killer picks it. In a child, with ``RLIMIT_AS`` set, such a file ends in a
``MemoryError`` (or the child's death) and an ``OUT_OF_MEMORY`` error for that one request.

The child also starts with a worker's minimal environment (no hub or server tokens, see
:mod:`rbee_jupyter.worker.environment`). Protocol: the parent writes one JSON object
``{"target": "module:function", "kwargs": {...}, "memory_bytes": N, "preload": [...]}`` to
the child's stdin; the child answers with JSON lines on its original stdout:
``{"message": ...}`` any number of times (``emit``), then ``{"result": ...}`` or
``{"error": {code, message, details}}``. Everything the libraries print goes to stderr.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import Cancelled, OutOfMemory, RbeeError

__all__ = ["run_isolated"]

_MIB = 1 << 20


def run_isolated(target: str, kwargs: dict[str, Any], *, memory_bytes: int,
                 on_message: Callable[[Any], None] | None = None, cancel: threading.Event | None = None,
                 preload: Sequence[str] = (), what: str = "The job", pass_fds: Sequence[int] = ()) -> Any:
    """``target(emit, **kwargs)`` in a child process whose address space may grow by ``memory_bytes``.

    Args:
        target: ``"package.module:function"``; the function takes ``emit`` (send a JSON
            value to ``on_message``) and ``kwargs`` (JSON values), and returns a JSON value.
        memory_bytes: how much the child may add to its address space after importing
            ``preload`` (the limit is set then, so imports such as torch are not counted).
        on_message: called in this thread with each emitted value, in order.
        cancel: set it to kill the child; :class:`Cancelled` is raised.
        preload: modules imported before the limit is set.
        what: how messages name the job ("The GGUF import of x.gguf").
        pass_fds: descriptors the child inherits under the same numbers (a checked file, opened here,
            that the child reads as ``/proc/self/fd/N`` rather than by a name that may change).

    Returns:
        What ``target`` returned.

    Raises:
        The child's :class:`RbeeError` as raised there; OutOfMemory past the limit or when the
        child was killed; Cancelled.
    """
    from ..worker.environment import worker_env
    from ..worker.protocol import describe_exit, error_from_json

    proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=worker_env({"PYTHONUNBUFFERED": "1"}),
                            start_new_session=True, pass_fds=tuple(pass_fds))
    done = threading.Event()
    tail: list[str] = []

    def watch_cancel() -> None:
        while cancel is not None and not done.is_set():
            if cancel.wait(0.2):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                return

    def drain_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line.decode(errors="replace"))
            del tail[:-40]
    threads = [threading.Thread(target=watch_cancel, daemon=True), threading.Thread(target=drain_stderr, daemon=True)]
    for t in threads:
        t.start()
    answer: dict[str, Any] | None = None
    try:
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(json.dumps({"target": target, "kwargs": kwargs, "memory_bytes": int(memory_bytes),
                                         "preload": list(preload)}).encode() + b"\n")
            proc.stdin.close()
        for line in proc.stdout:
            data = json.loads(line)
            if "message" in data:
                if on_message is not None:
                    on_message(data["message"])
            else:
                answer = data
        returncode = proc.wait()
    finally:
        done.set()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        threads[1].join(5)
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{what} was cancelled; nothing was kept.")
    if answer is not None and "result" in answer:
        return answer["result"]
    if answer is not None and "error" in answer:
        raise error_from_json(answer["error"])
    if returncode == -signal.SIGKILL:  # the OOM killer, the usual reason for a silent SIGKILL
        raise OutOfMemory(f"{what} was killed ({describe_exit(returncode)}), most likely out of memory.",
                          details={"limit_mb": memory_bytes // _MIB})
    raise RbeeError(f"{what} failed in its helper process ({describe_exit(returncode)}): "
                    f"{''.join(tail[-5:]).strip()[-800:]}", details={"exit": describe_exit(returncode)})


# --- the child ------------------------------------------------------------------------------

def _vm_size() -> int:
    """This process's address space in bytes (``VmSize``), 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _child() -> int:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    request = json.loads(sys.stdin.readline())
    limit = 0
    try:
        for name in request.get("preload", ()):
            importlib.import_module(name)
        module, _, func = request["target"].partition(":")
        fn = getattr(importlib.import_module(module), func)
        limit = _vm_size() + int(request["memory_bytes"])
        if limit > int(request["memory_bytes"]):
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        result = fn(lambda value: out.write(json.dumps({"message": value}) + "\n"), **request["kwargs"])
        out.write(json.dumps({"result": result}) + "\n")
    except RbeeError as exc:
        out.write(json.dumps({"error": exc.to_dict()["error"]}) + "\n")
    except MemoryError:
        budget = int(request["memory_bytes"]) // _MIB
        err = OutOfMemory(f"It needed more than the {budget} MB it may use (its input may be hostile or too large "
                          "for this host).", details={"limit_mb": budget})
        out.write(json.dumps({"error": err.to_dict()["error"]}) + "\n")
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it there
        err = RbeeError(f"{type(exc).__name__}: {exc}")
        out.write(json.dumps({"error": err.to_dict()["error"]}) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child())
