"""Reading the server-wide feed (``GET v1/events``) from blocking tests, in a thread, and waiting on what it says."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from .sse import Frame, parse_frames

__all__ = ["FeedReader", "stats_of", "until"]


def until(predicate: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    """Poll ``predicate()`` until it is truthy and return its value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def stats_of(events: list[dict[str, Any]], worker_id: str) -> list[dict[str, Any]]:
    """The worker views of ``worker_id``'s ``stats`` events (its load changed) among feed ``events``."""
    return [e["worker"] for e in events if e.get("topic") == "worker" and e.get("action") == "stats"
            and e["worker"]["id"] == worker_id]


class FeedReader:
    """Follows ``v1/events`` with ``client`` (rooted at ``…/rbee/``) until closed; ``frames`` grows as they arrive.

    ``wait_for(predicate)`` blocks until ``predicate(frames)`` holds (each wait bounded), so a test
    waits on the event it expects instead of sleeping.
    """

    def __init__(self, client: httpx.Client, *, path: str = "v1/events") -> None:
        self.client, self.path = client, path
        self.frames: list[Frame] = []
        self.status: int | None = None
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._read, daemon=True, name="rbee-feed-reader")
        self._thread.start()

    def _read(self) -> None:
        try:
            with self.client.stream("GET", self.path, timeout=httpx.Timeout(30, read=None)) as r:
                self.status = r.status_code
                buf = ""
                for chunk in r.iter_text():
                    buf += chunk
                    while "\n\n" in buf:
                        block, buf = buf.split("\n\n", 1)
                        with self._changed:
                            self.frames.extend(f for f in parse_frames(block + "\n\n") if f.comment is None)
                            self._changed.notify_all()
                    if self._stop.is_set():
                        return
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting test
            if not self._stop.is_set():
                self._error = exc
        finally:
            with self._changed:
                self._changed.notify_all()

    def events(self) -> list[dict[str, Any]]:
        """The JSON events so far."""
        with self._changed:
            return [f.data for f in self.frames if isinstance(f.data, dict)]

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], Any], what: str, timeout: float = 60.0) -> Any:
        """Block until ``predicate(events)`` is truthy and return its value; fail after ``timeout`` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: bool(predicate([f.data for f in self.frames if isinstance(f.data, dict)]))
                                   or self._error is not None or not self._thread.is_alive(), timeout)
        if self._error is not None:
            raise AssertionError(f"the feed broke while waiting for {what}") from self._error
        value = predicate(self.events())
        assert value, f"timed out waiting for {what} on the feed"
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __enter__(self) -> FeedReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
