"""Shared pieces of the fault suite: real servers on a private cache, the local hub, a tmpfs."""

from __future__ import annotations

import hashlib
import resource
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rbee_jupyter.testing.server import ServerProcess
from rbee_jupyter.testing.sse import parse_frames


@pytest.fixture(scope="session", autouse=True)
def _enough_file_descriptors() -> None:
    """1000 subscribers need 1000 sockets on each side; servers started later inherit the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 8192):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))


def settings_for(folder: Path, hub, **extra: Any) -> dict[str, Any]:
    """``c.RbeeApp`` for a server of this suite: its own cache and catalog, the local hub."""
    return {"cache_dir": str(folder / "cache"), "catalog_path": str(folder / "catalog.sqlite"),
            "hub_endpoint": hub.url, "sse_keepalive_s": 0.5, "download_backoff_s": 0.05, **extra}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def partial_files(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*") if p.name.endswith(".rbee-incomplete"))


def children_of(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def wait_for(predicate, timeout: float, what: str):
    """Poll a condition another process decides, with a bounded deadline."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)  # another process changes it: nothing to wait on instead
    return value


class StreamReader(threading.Thread):
    """Reads one SSE response in the background; ``frames`` grows as bytes arrive.

    ``ended`` is set when the response ended (cleanly or not) and ``ended_at`` says when,
    so a test can bound how long after a fault the stream was closed.
    """

    def __init__(self, server: ServerProcess, method: str, url: str, *, body: Any = None,
                 timeout: float = 120.0) -> None:
        super().__init__(daemon=True)
        self.server, self.method, self.url, self.body, self.timeout = server, method, url, body, timeout
        self.text = ""
        self.status: int | None = None
        self.error: BaseException | None = None
        self.ended = threading.Event()
        self.ended_at: float | None = None
        self.changed = threading.Condition()
        self.start()

    @property
    def frames(self):
        with self.changed:
            text = self.text
        return parse_frames(text[: text.rfind("\n\n") + 2])

    @property
    def events(self) -> list[Any]:
        return [f.data for f in self.frames if f.comment is None and f.data != "[DONE]"]

    @property
    def done(self) -> bool:
        data = [f for f in self.frames if f.comment is None]
        return bool(data) and data[-1].data == "[DONE]"

    def wait_until(self, predicate, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self) or self.ended.is_set(), timeout) and predicate(self)

    def run(self) -> None:
        url = self.url
        if url.startswith("/"):
            url = f"http://127.0.0.1:{self.server.port}{url}"
        try:
            with self.server.client.stream(self.method, url, json=self.body, timeout=self.timeout) as r:
                self.status = r.status_code
                for chunk in r.iter_text():
                    with self.changed:
                        self.text += chunk
                        self.changed.notify_all()
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            self.error = e
        finally:
            self.ended_at = time.monotonic()
            self.ended.set()
            with self.changed:
                self.changed.notify_all()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Any]:
    """``mount(size_bytes) -> Path``: a small tmpfs (a disk that can fill up), unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size_bytes: int) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(point)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)
