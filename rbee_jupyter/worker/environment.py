"""The environment a worker process starts with: what it needs to run, and no secret.

A worker parses files other people published (safetensors headers, tokenizer.json, a
config) and, through transformers, runs code paths no one here reviewed. Whatever it can
read from its environment is one bug away from leaking, so it does not inherit the
server's: no ``HF_TOKEN``, no ``JUPYTERHUB_API_TOKEN``/``JPY_API_TOKEN``/``JUPYTER_TOKEN``,
no ``RBEE_TOKEN``, no cloud credentials. It gets an allow-list (the interpreter, locale,
temporary folders, CUDA and thread settings, the caches' locations) and works offline:
it only ever reads a folder the hive already downloaded, and never needs the hub.

What a pool must pass on purpose (a test's delay, ``CUDA_VISIBLE_DEVICES`` for one worker)
it passes as ``extra``, which is added as given.

A Ray actor is not started by us but by a raylet, with the raylet's environment: the
server's own for the private cluster it starts (``ray.init`` copies ``os.environ`` into
every process it spawns, and changing the environment of a running, threaded server to
avoid that is not safe). So the Ray pool does two things instead: it starts each actor
with every secret-looking variable of the server blanked (:func:`blanked_secrets`, Ray's
``runtime_env``: the actor's process starts with empty values, so not even its
``/proc/<pid>/environ`` holds them), and the actor, first thing, cuts its ``os.environ``
down to what a local worker gets (:func:`scrub_environ`), keeping Ray's own ``RAY_*``
settings, which its runtime reads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

__all__ = ["SECRET_NAME", "blanked_secrets", "scrub_environ", "worker_env"]

_KEEP = re.compile(
    r"PATH|HOME|USER|LOGNAME|LANG|LANGUAGE|LC_\w+|TZ|TERM|TMPDIR|TEMP|TMP|SYSTEMROOT"
    r"|PYTHONPATH|PYTHONHOME|PYTHONHASHSEED|PYTHONDONTWRITEBYTECODE|VIRTUAL_ENV|CONDA_PREFIX"
    r"|LD_LIBRARY_PATH|LD_PRELOAD"
    r"|CUDA_\w+|NVIDIA_\w+|NCCL_\w+|ROCR_VISIBLE_DEVICES|HIP_VISIBLE_DEVICES|PYTORCH_\w+|TORCH_\w+"
    r"|OMP_\w+|MKL_\w+|OPENBLAS_\w+|KMP_\w+|BNB_\w+|TOKENIZERS_PARALLELISM"
    r"|HF_HOME|HF_HUB_CACHE|HF_HUB_DISABLE_\w+|TRANSFORMERS_CACHE|TRANSFORMERS_VERBOSITY|XDG_CACHE_HOME"
    r"|RBEE_WORKER_\w+")
SECRET_NAME = re.compile(r"TOKEN(?!IZERS|_DELAY_S$)|SECRET|PASSW|CREDENTIAL|(^|_)KEY($|_)|API_KEY|AUTH", re.IGNORECASE)
"""Names never passed on, even when the allow-list would match them."""

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
_RAY = re.compile(r"RAY_\w+")  # Ray's own settings (its address, its token's path): an actor's runtime needs them


def worker_env(extra: Mapping[str, str] | None = None, *, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a new worker: the allow-listed part of ``base`` (default ``os.environ``),
    offline switches, then ``extra`` as given.

    Args:
        extra: variables the pool passes on purpose (they win over everything else).
        base: the environment to filter; default this process's.
    """
    source = os.environ if base is None else base
    kept = {k: v for k, v in source.items() if _KEEP.fullmatch(k) and not SECRET_NAME.search(k)}
    return {**kept, **OFFLINE, **(extra or {})}


def scrub_environ(keep: Iterable[str] = ()) -> None:
    """Cut this process's ``os.environ`` down to what :func:`worker_env` gives a new worker.

    For a worker not started by us (a Ray actor): Ray's own ``RAY_*`` variables stay, as do
    the names in ``keep`` (what the pool forwarded on purpose); every other variable is
    removed (``os.environ`` unsets it in the C environment too), and the offline switches set.
    """
    allowed = worker_env(base=os.environ)
    kept = set(keep)
    for name in list(os.environ):
        if name not in allowed and name not in kept and not _RAY.fullmatch(name):
            del os.environ[name]
    os.environ.update(OFFLINE)


def blanked_secrets(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{name: ""}`` for every secret-looking variable of ``base`` (default ``os.environ``), Ray's own aside:
    given to a Ray actor at its start, so its process never holds the server's values."""
    source = os.environ if base is None else base
    return {name: "" for name in source if SECRET_NAME.search(name) and not _RAY.fullmatch(name)}
