"""Device inventory, device-spec parsing and the placement plan.

The planner decides, before any weight is read, which block goes to which device, so
that a model that does not fit is refused with numbers (``INSUFFICIENT_VRAM``) instead of
failing half way with an out-of-memory error. It never falls back to the CPU on its own:
a GPU asked for and missing is ``DEVICE_NOT_AVAILABLE``.

On a node shared by several servers (JupyterHub) the administrator may limit each server
to some devices (``allowed``) and to a share of each (a :class:`Quota`). The quota is just
one more cap on a device's capacity, so a multi-device plan spills onto the next allowed
device before it is refused, and a refusal caused by the quota alone (the device has room)
is ``QUOTA_EXCEEDED`` with what this server's workers hold.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from ..errors import (DeviceNotAvailable, DtypeNotSupported, InsufficientRam, InsufficientVram, InvalidRequest,
                      QuotaExceeded)

__all__ = ["Device", "Plan", "Holder", "Quota", "inventory", "parse_device_spec", "plan_placement",
           "check_devices_exist", "check_allowed", "allowed_inventory", "default_margin", "parse_bytes",
           "normalise_device_name", "is_device_name", "select_devices", "check_quantized_split",
           "check_quota_room"]

MiB = 1 << 20
GiB = 1 << 30
DeviceSpec = str | list[str]
_CUDA = re.compile(r"^cuda:(\d+)$")


@dataclass(frozen=True)
class Device:
    """A place weights can live, with its memory in bytes; ``free_bytes`` is what others leave us."""

    name: str  # "cpu" or "cuda:N"
    kind: Literal["cpu", "cuda"]
    total_bytes: int
    free_bytes: int
    label: str = ""
    capability: tuple[int, int] | None = None  # CUDA compute capability; None: the CPU, or unknown


@dataclass(frozen=True)
class Plan:
    """Block → device, and the bytes that puts on each device used."""

    assignments: dict[str, str]
    bytes_per_device: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Holder:
    """Memory one worker of this server holds (or, while loading, will hold) on one device."""

    worker_id: str
    model_ref: str
    device: str
    bytes: int


@dataclass(frozen=True)
class Quota:
    """This server's share of each device (bytes) and what its workers hold there.

    Devices without a limit are not capped. Holders are counted whatever the limits, so the
    numbers can be shown (``GET v1/devices``) without a quota configured.
    """

    limits: dict[str, int] = field(default_factory=dict)
    holders: tuple[Holder, ...] = ()

    def in_use(self, device: str) -> int:
        return sum(h.bytes for h in self.holders if h.device == device)

    def left(self, device: str) -> int | None:
        """Bytes this server may still place on ``device``; None: no limit."""
        if device not in self.limits:
            return None
        return max(self.limits[device] - self.in_use(device), 0)


class BlockLike(Protocol):
    """What the planner needs from a block (``loader.BlockInfo`` fits)."""

    name: str

    @property
    def bytes(self) -> int: ...


# --- inventory -------------------------------------------------------------------------------

def inventory() -> list[Device]:
    """The CPU (always) then every visible CUDA device, with total and free memory."""
    return [_cpu_device(), *_cuda_devices()]


def _cpu_device() -> Device:
    total, free = _meminfo()
    return Device("cpu", "cpu", total, free, label=f"CPU ({os.cpu_count() or 1} cores)")


def _meminfo() -> tuple[int, int]:
    """(total, available) host memory: /proc/meminfo's MemAvailable counts reclaimable cache, unlike MemFree."""
    try:
        fields = {}
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024
        return fields["MemTotal"], fields.get("MemAvailable", fields["MemFree"])
    except (OSError, KeyError, ValueError, IndexError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page


def _cuda_devices() -> list[Device]:
    """NVML first: it does not create a CUDA context (hundreds of MB) in the calling process."""
    if "CUDA_VISIBLE_DEVICES" not in os.environ:  # NVML indices are physical; only then do they match torch's
        devices = _nvml_devices()
        if devices is not None:
            return devices
    return _torch_cuda_devices()


def _nvml_devices() -> list[Device] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver: let torch decide
        return None
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            label = name.decode() if isinstance(name, bytes) else str(name)
            try:
                capability = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle))
            except Exception:  # noqa: BLE001 - an old driver: unknown, not refused
                capability = None
            devices.append(Device(f"cuda:{i}", "cuda", int(mem.total), int(mem.free), label, capability))
        return devices
    finally:
        pynvml.nvmlShutdown()


def _torch_cuda_devices() -> list[Device]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    devices = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        devices.append(Device(f"cuda:{i}", "cuda", int(total), int(free), torch.cuda.get_device_name(i),
                              tuple(torch.cuda.get_device_capability(i))))
    return devices


#: bf16 arithmetic in hardware starts with Ampere; before it torch emulates some ops and fails others.
BF16_CAPABILITY = (8, 0)


def check_dtype_support(devices: Sequence[Device], dtype: str | None) -> None:
    """Refuse a dtype a chosen GPU cannot compute in, before anything is downloaded.

    Raises:
        DtypeNotSupported: ``bfloat16`` on a GPU older than compute capability 8.0.
    """
    if dtype != "bfloat16":
        return
    old = [d for d in devices if d.kind == "cuda" and d.capability is not None and d.capability < BF16_CAPABILITY]
    if old:
        names = ", ".join(f"{d.name} ({d.label}, compute capability {d.capability[0]}.{d.capability[1]})"
                          for d in old)
        raise DtypeNotSupported(f"{names} cannot compute in bf16 (it needs compute capability 8.0 or newer); ask "
                                "for fp16 on this GPU, or pick a newer one.",
                                details={"field": "dtype", "devices": [d.name for d in old],
                                         "accepted": ["float16", "float32"]})


# --- parsing -------------------------------------------------------------------------------

def normalise_device_name(value: str) -> str:
    """Lower-case and trim a device name; bare "cuda" means "cuda:0" as in torch."""
    name = value.strip().lower()
    return "cuda:0" if name == "cuda" else name


def parse_device_spec(value: object) -> DeviceSpec:
    """Validate a ``device`` field from an HTTP body: "auto", "cpu", "cuda:N" or a list of "cpu"/"cuda:N".

    Returns the normalised spec ("cuda" → "cuda:0"). Malformed values are ``InvalidRequest``;
    well-formed names of devices this build cannot use ("tpu", "mps") are ``DeviceNotAvailable``.
    Whether "cuda:7" exists is checked by :func:`plan_placement` against the inventory.
    """
    if isinstance(value, str):
        name = normalise_device_name(value)
        if name in ("auto", "cpu") or _CUDA.match(name):
            return name
        if not name:
            raise InvalidRequest("device is empty: use \"auto\", \"cpu\", \"cuda:N\" or a list of those.",
                                 details={"field": "device"})
        raise _not_available(name)
    if isinstance(value, (list, tuple)):
        if not value:
            raise InvalidRequest("device list is empty: name at least one device.", details={"field": "device"})
        names = []
        for item in value:
            if not isinstance(item, str):
                raise InvalidRequest(f"device list items must be strings, got {item!r}.", details={"field": "device"})
            name = parse_device_spec(item)
            if name == "auto":
                raise InvalidRequest("\"auto\" cannot be part of a device list.", details={"field": "device"})
            if name in names:
                raise InvalidRequest(f"device {name} is listed twice.", details={"field": "device"})
            names.append(name)
        return names
    raise InvalidRequest(f"device must be a string or a list of strings, got {type(value).__name__}.",
                         details={"field": "device"})


def parse_bytes(value: int | str) -> int:
    """Bytes from an int or a string like "20GiB", "512MB", "1.5 GB" (max_memory values)."""
    if isinstance(value, bool):
        raise InvalidRequest(f"not a memory size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidRequest(f"memory size must not be negative: {value}")
        return value
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?i?b?)\s*", str(value).lower())
    if not match:
        raise InvalidRequest(f"not a memory size: {value!r} (use bytes or e.g. \"20GiB\").")
    try:
        number, unit = float(match.group(1)), match.group(2)
    except ValueError:  # "1.2.3GB", ".."
        raise InvalidRequest(f"not a memory size: {value!r} (use bytes or e.g. \"20GiB\").") from None
    power = " kmgt".index(unit[0]) if unit and unit[0] in "kmgt" else 0
    base = 1024 if "i" in unit else 1000
    return int(number * base**power)


def is_device_name(name: str) -> bool:
    """"cpu" or "cuda:N" (after :func:`normalise_device_name`)."""
    return name == "cpu" or bool(_CUDA.match(name))


def _not_allowed(name: str, allowed: Sequence[str]) -> DeviceNotAvailable:
    shown = ", ".join(allowed) or "none"
    return DeviceNotAvailable(
        f"Device {name} is not one this server may use; allowed: {shown}. The administrator sets them "
        "with c.RbeeApp.allowed_devices.",
            details={"device": name, "available": list(allowed), "allowed": list(allowed)})


def check_allowed(spec: DeviceSpec, allowed: Sequence[str] | None,
                  max_memory: dict[str, object] | None = None) -> None:
    """Refuse (400) a device spec or ``max_memory`` key outside ``allowed``; cheap, no inventory.

    Done when a load is asked for, so that a model which must be downloaded first is not
    downloaded only to be refused. "auto" needs at least one allowed GPU.
    """
    if allowed is None:
        return
    spec = parse_device_spec(spec)
    if spec == "auto":
        if not any(_CUDA.match(a) for a in allowed):
            raise DeviceNotAvailable(
                f"device \"auto\" uses GPUs, and this server may use none; allowed: {', '.join(allowed) or 'none'}. "
                "Ask for one of those explicitly.", details={"device": "auto", "available": list(allowed),
                                                             "allowed": list(allowed)})
        names: list[str] = []
    else:
        names = [spec] if isinstance(spec, str) else list(spec)
    names += [normalise_device_name(str(k)) for k in (max_memory or {})]
    for name in names:
        if name not in allowed:
            raise _not_allowed(name, allowed)


def allowed_inventory(devices: Sequence[Device], allowed: Sequence[str] | None) -> list[Device]:
    """The devices this server may use, in the order ``allowed`` lists them (its preference)."""
    if allowed is None:
        return list(devices)
    by_name = {d.name: d for d in devices}
    return [by_name[name] for name in allowed if name in by_name]


def _not_available(name: str, devices: Iterable[Device] | None = None) -> DeviceNotAvailable:
    available = [d.name for d in (inventory() if devices is None else devices)]
    return DeviceNotAvailable(f"Device {name} is not available on this machine; available: {', '.join(available)}.",
                              details={"device": name, "available": available})


def check_devices_exist(names: Sequence[str]) -> None:
    """Raise ``DeviceNotAvailable`` for any name that is not "cpu" or a visible "cuda:N" (cheap: no inventory)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for name in names:
        match = _CUDA.match(name)
        if name == "cpu" or (match and int(match.group(1)) < count):
            continue
        raise _not_available(name)


def select_devices(spec: DeviceSpec, devices: Sequence[Device], max_memory: dict[str, object] | None = None, *,
                   allowed: Sequence[str] | None = None) -> tuple[list[Device], dict[str, int]]:
    """The devices a spec names, in fill order, and ``max_memory`` in bytes per device name.

    Needs the inventory but no checkpoint, so a load is refused with it before anything is
    downloaded; :func:`plan_placement` starts with the same call. "auto" means every
    (allowed) GPU and never the CPU.

    Raises:
        InvalidRequest: malformed spec, or a ``max_memory`` key or value that is not a device or a size.
        DeviceNotAvailable: a device (or ``max_memory`` key) that is not allowed or not on this
            machine, listing those that are; "auto" without a GPU.
    """
    check_allowed(spec, allowed, max_memory)
    usable = allowed_inventory(devices, allowed)
    by_name = {d.name: d for d in usable}
    spec = parse_device_spec(spec)
    if spec == "auto":
        chosen = [d for d in usable if d.kind == "cuda"]
        if not chosen:
            raise DeviceNotAvailable(
                "device \"auto\" uses GPUs, and this machine has none; ask for device \"cpu\" explicitly.",
                details={"device": "auto", "available": [d.name for d in usable]})
    else:
        names = [spec] if isinstance(spec, str) else spec
        for name in names:
            if name not in by_name:
                raise _not_available(name, usable)
        chosen = [by_name[n] for n in names]
    caps: dict[str, int] = {}
    for key, value in (max_memory or {}).items():
        name = normalise_device_name(str(key))
        if not is_device_name(name):
            raise InvalidRequest(f"max_memory key {key!r} is not a device; use \"cpu\" or \"cuda:N\".",
                                 details={"field": "max_memory", "key": str(key)})
        if name not in {d.name for d in devices}:
            raise _not_available(name, devices)
        caps[name] = parse_bytes(value)
    return chosen, caps


def check_quantized_split(devices: Iterable[str], quantized: bool) -> None:
    """accelerate runs CPU blocks of a GPU model as offloaded weights, which bitsandbytes layers cannot be.

    A request that names both is refused when it comes (400), and a plan that mixes them too.
    """
    names = set(devices)
    if quantized and "cpu" in names and len(names) > 1:
        raise InvalidRequest("A quantized model cannot be split between the CPU and GPUs; put it on GPUs only "
                             "(or only on the CPU), or load it unquantized.",
                             details={"field": "device", "devices": sorted(names)})


def check_quota_room(chosen: Sequence[Device], quota: Quota) -> None:
    """Refuse (``QUOTA_EXCEEDED``) a load when this server's quota leaves nothing on any device it may use.

    Asked before anything starts: a model that must be downloaded first would otherwise be
    downloaded only to be refused. A quota with room left is judged by the plan, with sizes.
    """
    if not chosen or any(quota.left(d.name) is None or quota.left(d.name) > 0 for d in chosen):
        return
    raise _over_quota(None, chosen, quota)


# --- planning -----------------------------------------------------------------------------

def default_margin(device: Device) -> int:
    """Memory left free on purpose: activations, the KV cache and the CUDA context need room.

    GPUs keep 10% or 512 MiB, whichever is larger; the CPU keeps 5% or 1 GiB (the worker
    process itself, Python and torch, lives there).
    """
    if device.kind == "cpu":
        return max(device.total_bytes // 20, GiB)
    return max(device.total_bytes // 10, 512 * MiB)


def _capacity(device: Device, max_memory: dict[str, int], margin_bytes: int | None) -> int:
    if device.name in max_memory:
        return min(max_memory[device.name], device.free_bytes)
    margin = default_margin(device) if margin_bytes is None else margin_bytes
    return max(device.free_bytes - margin, 0)


def _block_bytes(block: object) -> int:
    size = getattr(block, "bytes", None)
    if size is None:
        size = block.bytes_after_quant
    return int(size)


def plan_placement(
    blocks: Sequence[BlockLike],
    device_spec: DeviceSpec,
    inventory: Sequence[Device],
    max_memory: dict[str, int | str] | None = None,
    margin_bytes: int | None = None,
    *,
    allowed: Sequence[str] | None = None,
    quota: Quota | None = None,
) -> Plan:
    """Assign blocks, in order, to the chosen devices, filling each before moving to the next.

    Filling in order keeps consecutive layers together, so hidden states cross a device
    boundary once per device, not once per layer. A block tied to another (``tied_to``)
    goes wherever that block went. Capacity is ``max_memory[device]`` (capped by free
    memory) or free memory minus :func:`default_margin`, and at most what ``quota`` leaves.

    Args:
        allowed: the devices this server may use (None: all); "auto" means its GPUs.
        quota: this server's limits per device and what its workers already hold.

    Raises:
        InvalidRequest: malformed spec or max_memory.
        DeviceNotAvailable: unknown or not allowed device (details list those that may be used),
            "auto" without GPU.
        InsufficientVram / InsufficientRam: it does not fit (details: need_mb, have_mb).
        QuotaExceeded: it fits the devices but not this server's quota (details: need_mb,
            quota_mb, in_use_mb, workers).
    """
    chosen, caps_in = select_devices(device_spec, inventory, max_memory, allowed=allowed)
    capacity = {d.name: _capacity(d, caps_in, margin_bytes) for d in chosen}
    capped = dict(capacity)
    for name, cap in capacity.items():
        left = quota.left(name) if quota is not None else None
        if left is not None:
            capped[name] = min(cap, left)

    fitted = _fill(blocks, chosen, capped)
    if isinstance(fitted, Plan):
        return fitted
    if capped != capacity and isinstance(_fill(blocks, chosen, capacity), Plan):
        assert quota is not None
        raise _over_quota(sum(_block_bytes(b) for b in blocks), chosen, quota)
    block, size = fitted
    raise _does_not_fit(blocks, chosen, capacity, block, size)


def _fill(blocks: Sequence[BlockLike], chosen: list[Device], capacity: dict[str, int]) -> Plan | tuple[str, int]:
    """The plan, or the first block (name, bytes) that fits nowhere."""
    assignments: dict[str, str] = {}
    used: dict[str, int] = {}
    current = 0
    for block in blocks:
        tied_to = getattr(block, "tied_to", None)
        if tied_to and tied_to in assignments:
            assignments[block.name] = assignments[tied_to]
            continue
        size = _block_bytes(block)
        while current < len(chosen) and used.get(chosen[current].name, 0) + size > capacity[chosen[current].name]:
            current += 1
        if current == len(chosen):
            return block.name, size
        name = chosen[current].name
        assignments[block.name] = name
        used[name] = used.get(name, 0) + size
    return Plan(assignments, used)


def _over_quota(need_bytes: int | None, chosen: list[Device], quota: Quota) -> QuotaExceeded:
    """``need_bytes`` None: refused before the model's size is known, because nothing is left at all."""
    need_mb = None if need_bytes is None else -(-need_bytes // MiB)
    limited = [d.name for d in chosen if d.name in quota.limits]
    quota_mb = {n: quota.limits[n] // MiB for n in limited}
    in_use_mb = {n: -(-quota.in_use(n) // MiB) for n in limited}
    holders = [h for h in quota.holders if h.device in limited]
    workers = [{"id": h.worker_id, "model_ref": h.model_ref, "device": h.device, "mb": -(-h.bytes // MiB)}
               for h in holders]
    parts = []
    for n in limited:
        held = ", ".join(f"{w['id']} ({w['model_ref']}, {w['mb']} MB)" for w in workers if w["device"] == n)
        parts.append(f"{n}: quota {quota_mb[n]} MB, {in_use_mb[n]} MB in use" + (f" by {held}" if held else ""))
    unlimited = [d.name for d in chosen if d.name not in quota.limits]
    where = f" (and the free memory of {', '.join(unlimited)})" if unlimited else ""
    need = (f"Loading needs {need_mb} MB, more than this server's device quota leaves{where}" if need_mb is not None
            else "This server's device quota is used up")
    return QuotaExceeded(
        f"{need}: {'; '.join(parts)}. "
        "Unload a worker you no longer need (DELETE v1/workers/<id>, or %rbee unload), use a smaller "
        "quantization, or ask the administrator to raise c.RbeeApp.device_quota_mb.",
        details={"need_mb": need_mb, "quota_mb": quota_mb, "in_use_mb": in_use_mb, "workers": workers,
                 "devices": [d.name for d in chosen]})


def _does_not_fit(blocks: Sequence[BlockLike], chosen: list[Device], capacity: dict[str, int],
                  block: str, size: int) -> InsufficientVram | InsufficientRam:
    need = sum(_block_bytes(b) for b in blocks)
    have = sum(capacity.values())
    need_mb, have_mb = -(-need // MiB), have // MiB
    names = ", ".join(d.name for d in chosen)
    if need <= have:
        why = (f"it needs {need_mb} MB in total and {names} have {have_mb} MB usable, but block {block} "
               f"({-(-size // MiB)} MB) does not fit in what is left on any device")
    else:
        why = f"it needs {need_mb} MB and {names} have {have_mb} MB usable (free memory minus a safety margin)"
    hint = "use quantization (nf4 halves int8, quarters bfloat16), add devices, or free memory"
    details = {"need_mb": need_mb, "have_mb": have_mb, "devices": [d.name for d in chosen], "block": block}
    if all(d.kind == "cpu" for d in chosen):
        return InsufficientRam(f"The model does not fit in host memory: {why}; {hint}.", details=details)
    return InsufficientVram(f"The model does not fit: {why}; {hint}.", details=details)
