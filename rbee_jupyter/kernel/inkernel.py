"""``load_model``: the model object itself, in this (the kernel's) process, loaded layer by layer.

For users who want ``model(...)``, hooks, or fine-tuning rather than a worker behind an
API. The reference is resolved and downloaded by the hive (server or embedded, through
the client: same cache, same catalog, same download progress), then
:func:`rbee_jupyter.engine.loader.load_model` runs here, block by block, with the same loading
view as ``%rbee load``. The loader runs in a helper thread so that an interrupt stops it
cleanly between blocks instead of leaving a half-built model.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Sequence
from typing import Any

from .client import Client, default_client
from ..errors import ModelNotFound
from .widgets import DownloadView, LoadingView, follow

__all__ = ["load_model"]

MiB = 1 << 20


def _local_path(client: Client, ref: str, *, progress: bool) -> str:
    """The model's folder: from the catalog if it is there (works offline), else downloaded now."""
    from ..core.refs import parse_ref

    canonical = str(parse_ref(ref))
    for entry in client.models():
        if entry.get("ref") == canonical and os.path.isdir(entry.get("local_path", "")):
            return entry["local_path"]
    job = client.download(canonical)
    if progress:
        follow(job, DownloadView(canonical))
    path = job.wait()["local_path"]
    if not os.path.isdir(path):
        raise ModelNotFound(f"The hive stored {canonical} at {path}, which this kernel cannot see (the server "
                            "runs on another machine). Use %rbee load to run it there instead.",
                            details={"model_ref": canonical, "local_path": path})
    return path


def _device_map(path: str, device: str | Sequence[str] | dict[str, str], quantization: str | None,
                dtype: str | None, confined: bool = True) -> dict[str, str] | str:
    """One device as is; "auto" or a list goes through the placement planner (fits or refuses first)."""
    if isinstance(device, dict):
        return device
    if isinstance(device, str) and device not in ("auto",) and "," not in device:
        return device
    from ..engine.devices import inventory, plan_placement
    from ..engine.loader import plan_blocks

    spec = device.split(",") if isinstance(device, str) and "," in device else device
    blocks = plan_blocks(path, quantization=quantization, dtype=dtype, confined=confined)
    return plan_placement(blocks, spec if isinstance(spec, str) else list(spec), inventory()).assignments


def load_model(ref: str, *, quantization: str | None = None, device: str | Sequence[str] | dict[str, str] = "cpu",
               dtype: str | None = None, client: Client | None = None, progress: bool = True) -> tuple[Any, Any]:
    """Load ``ref`` into this process; returns ``(model, tokenizer)``.

    Args:
        ref: ``hf:org/repo[@rev]`` or ``file:///path`` (a GGUF ref is imported by the hive first).
        quantization: "nf4", "fp4", "int8" or None (bitsandbytes, quantized block by block).
        device: "cpu", "cuda:0", "auto" (every GPU, planned), a list, or a ``{block: device}`` map.
        dtype: "bfloat16", "float16", "float32" or None (the checkpoint's).
        client: where to resolve and download ``ref``; default: the kernel's client.
        progress: show the download and loading views.

    Raises:
        RbeeError subclasses (``ModelNotFound``, ``InsufficientVram``, ``DeviceNotAvailable``...);
        ``KeyboardInterrupt`` after cancelling the load between blocks.
    """
    from ..engine.loader import load_model as load_layers
    from ..protocol import DTYPES

    if quantization in ("none", ""):
        quantization = None
    dtype = DTYPES.get(dtype, dtype) if dtype else None
    client = client or default_client()
    from ..core.refs import parse_ref

    path = _local_path(client, ref, progress=progress)
    # A file:// folder is read by the user's own process, with the user's own rights: its links may
    # lead anywhere. A hub snapshot's names come from the hub: they stay inside it (core/confine.py).
    confined = parse_ref(ref).scheme != "file"
    device_map = _device_map(path, device, quantization, dtype, confined)
    view = None
    if progress:
        from ..engine.devices import inventory

        totals = {d.name: d.total_bytes // MiB for d in inventory()}
        view = LoadingView(ref, device_totals_mb=totals).show()
    cancel = threading.Event()

    def on_progress(p: Any) -> None:
        if view is not None:
            memory = {d: b // MiB for d, b in p.bytes_on_device.items()}
            view.update({"stage": "loading_to_vram", "layers_loaded": p.layers_loaded,
                         "layers_total": p.layers_total, "vram_mb": memory.get(p.device, 0),
                         "device": p.device, "block": p.block, "memory_mb": memory})

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rbee-load")
    future = pool.submit(load_layers, path, quantization=quantization, dtype=dtype, device_map=device_map,
                         on_progress=on_progress, cancel=cancel, confined=confined)
    try:
        model = future.result()
        from ..engine.loader import load_tokenizer

        tokenizer = load_tokenizer(path, confined=confined)
    except KeyboardInterrupt:
        cancel.set()
        if view is not None:
            view.cancel("interrupted: loading stopped between blocks")
        concurrent.futures.wait([future], timeout=60)
        raise
    except BaseException as exc:
        if view is not None:
            view.fail(exc)
        raise
    finally:
        pool.shutdown(wait=False)
    if view is not None:
        view.update({"stage": "ready", "memory_mb": view.memory_mb})
    return model, tokenizer
