"""The on-disk state of a file fetched as parallel ranged segments, and its running hash.

A big file is fetched into ``<blob>.rbee-incomplete`` (sized to the whole file up front,
sparse) by several connections at once, each writing its own byte range in place. Which
bytes are there is recorded in a small sidecar, ``<blob>.rbee-segments``: a fixed header
and one slot per segment (start, end, bytes done). A segment's slot is rewritten with one
``pwrite`` right after its bytes are written, so after a ``kill -9`` the sidecar never
claims a byte the file does not hold, and at most one chunk per segment is fetched again.
The final name only ever appears through the atomic rename after the whole-file hash check.
Data and table are fsync'd before that rename (the data's writeback starts as each segment
completes, :func:`start_writeback`, so that last fsync waits for the tail only); in between,
only a power loss (not a killed process) could leave the table ahead of the data, and then
the hash check fails and the file is fetched again.

Why one preallocated file and not one file per segment: joining parts costs a second write
of the whole file, and the hash can follow the contiguous prefix while it grows
(:class:`PrefixHasher`), so the check costs little more than the last segments' bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

_MAGIC = b"RBEESEG1"
_HEADER = struct.Struct("<8sQQ")  # magic, file size, number of segments
_SLOT = struct.Struct("<QQQ")  # start, end (exclusive), bytes done
_MAX_SEGMENTS = 4096


def _sync_file_range():
    """Linux's ``sync_file_range`` (Python's ``os`` has no binding), or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes at ``offset`` to disk now, without waiting for it.

    Why: the page cache holds a whole download (160 MB fits easily), so the fsync before the
    rename used to write all of it at the end: 60-70 ms of a 1.6 s download at 100 MB/s,
    measured here. Started per finished range, the writeback runs while later bytes arrive,
    and the fsync waits for the tail only. Durability still comes from that fsync; this is
    only a hint, so failures (or another OS) are ignored.
    """
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def sidecar_of(partial: Path) -> Path:
    """Where the segment table of a partial file lives (next to it, same stem)."""
    return partial.with_name(partial.name.removesuffix(".rbee-incomplete") + ".rbee-segments")


@dataclass
class Segment:
    """One byte range of the file; ``done`` bytes from ``start`` are on disk."""

    index: int
    start: int
    end: int
    done: int = 0

    @property
    def pos(self) -> int:
        """The next byte to fetch."""
        return self.start + self.done

    @property
    def remaining(self) -> int:
        return self.end - self.pos


def split(size: int, segment_bytes: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of about ``segment_bytes`` each (the last one takes the rest)."""
    n = max(1, min(_MAX_SEGMENTS, size // max(1, segment_bytes)))
    step = size // n
    return [(i * step, size if i == n - 1 else (i + 1) * step) for i in range(n)]


class SegmentTable:
    """The sidecar of one partial file: which bytes of each segment are on disk.

    Segments write their own slots, from their own threads, with ``pwrite``: no lock is
    needed for the file, and a reader in another process (a server waiting on the blob's
    lock) sees consistent slots.
    """

    def __init__(self, path: Path, size: int, segments: list[Segment], fd: int) -> None:
        self.path, self.size, self.segments, self._fd = path, size, segments, fd
        self.changed = threading.Condition()

    # -- opening -------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, size: int, segment_bytes: int) -> SegmentTable:
        """A fresh table (nothing done), written and fsync'd before any byte is fetched."""
        segments = [Segment(i, a, b) for i, (a, b) in enumerate(split(size, segment_bytes))]
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as out:
            out.write(_HEADER.pack(_MAGIC, size, len(segments)))
            out.write(b"".join(_SLOT.pack(s.start, s.end, 0) for s in segments))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        return cls(path, size, segments, os.open(path, os.O_RDWR))

    @classmethod
    def load(cls, path: Path, size: int) -> SegmentTable | None:
        """The table left by an earlier run (ours or a dead server's), or None if there is none
        or it does not describe a file of this size (then it is not trusted at all)."""
        segments = read(path, size)
        if segments is None:
            return None
        return cls(path, size, segments, os.open(path, os.O_RDWR))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    # -- progress --------------------------------------------------------------

    def advance(self, seg: Segment, nbytes: int) -> None:
        """``nbytes`` more of ``seg`` are written to the data file: record it."""
        seg.done += nbytes
        os.pwrite(self._fd, struct.pack("<Q", seg.done), _HEADER.size + seg.index * _SLOT.size + 16)
        with self.changed:
            self.changed.notify_all()

    @property
    def done_bytes(self) -> int:
        return sum(s.done for s in self.segments)

    def prefix(self) -> int:
        """Bytes from the start of the file with no gap: what can be hashed already."""
        for s in self.segments:
            if s.remaining:
                return s.pos
        return self.size

    def sync(self) -> None:
        os.fsync(self._fd)


def read(path: Path, size: int) -> list[Segment] | None:
    """The segments recorded in ``path``, or None if it is missing or not a table for ``size``."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if len(raw) < _HEADER.size:
        return None
    magic, recorded_size, n = _HEADER.unpack_from(raw)
    if (magic != _MAGIC or recorded_size != size or not 0 < n <= _MAX_SEGMENTS
            or len(raw) != _HEADER.size + n * _SLOT.size):
        return None
    segments, expected_start = [], 0
    for i in range(n):
        start, end, done = _SLOT.unpack_from(raw, _HEADER.size + i * _SLOT.size)
        if start != expected_start or end <= start or done > end - start:
            return None
        segments.append(Segment(i, start, end, done))
        expected_start = end
    return segments if expected_start == size else None


def done_bytes(path: Path, size: int | None = None) -> int | None:
    """Bytes a segmented partial file holds, read from its sidecar (another process's too)."""
    try:
        head = path.read_bytes()[:_HEADER.size]
        recorded = _HEADER.unpack(head)[1] if len(head) == _HEADER.size else None
    except OSError:
        return None
    segments = read(path, size if size is not None else recorded or 0)
    return None if segments is None else sum(s.done for s in segments)


class PrefixHasher(threading.Thread):
    """Hashes the file as its contiguous prefix grows, so the check is done when the bytes are.

    Segments are handed out in file order, so the prefix follows the download closely; what
    is left to hash once the last segment lands is at most about one round of segments.
    """

    def __init__(self, partial: Path, table: SegmentTable, hasher) -> None:
        super().__init__(name=f"rbee-hash-{partial.name[:12]}", daemon=True)
        self.partial, self.table, self.hasher = partial, table, hasher
        self.hashed = 0
        self.error: BaseException | None = None
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True
        with self.table.changed:
            self.table.changed.notify_all()

    def run(self) -> None:
        try:
            fd = os.open(self.partial, os.O_RDONLY)
        except OSError as e:
            self.error = e
            return
        try:
            size, changed = self.table.size, self.table.changed
            while self.hashed < size and not self._stopped:
                with changed:
                    changed.wait_for(lambda: self._stopped or self.table.prefix() > self.hashed)
                limit = self.table.prefix()
                while self.hashed < limit and not self._stopped:
                    block = os.pread(fd, min(8 << 20, limit - self.hashed), self.hashed)
                    if not block:
                        raise OSError(f"{self.partial} is shorter than its segment table says")
                    self.hasher.update(block)
                    self.hashed += len(block)
        except BaseException as e:  # noqa: BLE001 - reported by digest()
            self.error = e
        finally:
            os.close(fd)

    def digest(self) -> str | None:
        """The hex digest once the whole file is hashed; None if hashing stopped or failed."""
        self.join()
        if self.error is not None or self.hashed != self.table.size:
            return None
        return self.hasher.hexdigest()
