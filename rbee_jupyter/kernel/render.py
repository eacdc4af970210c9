"""One-line text for progress events, shared by the CLI and the widgets' text fallback.

Terminals, ``nbconvert --to text`` and nbval all see these lines, so they are stable:
no timestamps, numbers rounded the same way every time.
"""

from __future__ import annotations

from typing import Any


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def bar(fraction: float, width: int = 24) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    full = int(round(fraction * width))
    return "█" * full + "░" * (width - full)


def eta_seconds(event: dict[str, Any]) -> float | None:
    """Seconds left for a download event, from its windowed speed (None when unknown)."""
    speed = event.get("speed_mbps") or 0
    left = event.get("bytes_total", 0) - event.get("bytes_downloaded", 0)
    return left * 8 / (speed * 1e6) if speed > 0 and left > 0 else None


def describe(event: dict[str, Any]) -> str:
    """A short line for any download, loading or inference event."""
    stage = event.get("stage") or event.get("type")
    if stage == "downloading":
        done, total = event["bytes_downloaded"], event["bytes_total"]
        frac = done / total if total else 1.0
        eta = eta_seconds(event)
        tail = f", ETA {eta:.0f} s" if eta is not None else ""
        files = f", {event['files_done']}/{event['files_total']} files" if event.get("files_total") else ""
        return (f"downloading {bar(frac)} {frac:6.1%}  {human_bytes(done)} / {human_bytes(total)}"
                f"  {event.get('speed_mbps', 0) / 8:.1f} MB/s{files}{tail}")
    if stage == "complete":
        return f"downloaded {event.get('model_ref', '')} → {event['local_path']}".replace("  ", " ")
    if stage == "importing":
        return f"importing {bar(event.get('fraction', 0))} {event.get('step', '')}"
    if stage == "loading_to_vram":
        n, total = event["layers_loaded"], event["layers_total"]
        return (f"loading     {bar(n / total if total else 1)} {n:>3}/{total} blocks  "
                f"{event.get('block') or ''} on {event['device']} ({event['vram_mb']} MB)")
    if stage == "ready":
        memory = ", ".join(f"{d}: {mb} MB" for d, mb in (event.get("memory_mb") or {}).items())
        return f"ready {event.get('worker_id') or ''} {memory}".rstrip()
    if stage == "error":
        return f"error {event['code']}: {event['message']}"
    if stage == "started":
        return "generating…"
    if stage == "token":
        return event["t"]
    if stage == "end":
        return (f"{event['total_tokens']} tokens in {event['duration_ms'] / 1000:.2f} s"
                f" ({event.get('tokens_per_second') or 0:.1f} tok/s, stop: {event['stop_reason']})")
    return str(event)
