"""The catalog: which models are on disk, where, and from which revision.

SQLite in WAL mode so that it survives restarts, and so that several servers sharing
one cache (JupyterHub) can read while one writes. The disk is the truth: ``resync``
drops rows whose folder was deleted by hand.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from ..protocol import CatalogEntry

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    ref           TEXT PRIMARY KEY,
    repo_id       TEXT,
    revision      TEXT,
    local_path    TEXT NOT NULL,
    size_bytes    INTEGER NOT NULL,
    files         TEXT NOT NULL,
    downloaded_at REAL NOT NULL,
    source        TEXT NOT NULL,
    owner         TEXT,
    restricted    INTEGER NOT NULL DEFAULT 0
)
"""

# Columns added after the first release: (name, definition) for ALTER TABLE on older catalogs.
_ADDED_COLUMNS = [("owner", "TEXT"), ("restricted", "INTEGER NOT NULL DEFAULT 0")]
_COLUMNS = ("ref", "repo_id", "revision", "local_path", "size_bytes", "files", "downloaded_at", "source",
            "owner", "restricted")


class Catalog:
    """Thread-safe access to the catalog database at ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(_SCHEMA)
            have = {r["name"] for r in self._db.execute("PRAGMA table_info(models)")}
            for name, definition in _ADDED_COLUMNS:  # catalogs written by older versions
                if name not in have:
                    try:
                        self._db.execute(f"ALTER TABLE models ADD COLUMN {name} {definition}")
                    except sqlite3.OperationalError as e:  # another server sharing the catalog was first
                        if "duplicate column" not in str(e):
                            raise

    def add(self, entry: CatalogEntry) -> None:
        with self._lock, self._db:
            self._db.execute(
                f"INSERT OR REPLACE INTO models ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                (entry.ref, entry.repo_id, entry.revision, entry.local_path, entry.size_bytes,
                 json.dumps(entry.files), entry.downloaded_at, entry.source, entry.owner, int(entry.restricted)),
            )

    def get(self, ref: str) -> CatalogEntry | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM models WHERE ref = ?", (ref,)).fetchone()
        return _entry(row) if row else None

    def list(self) -> list[CatalogEntry]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM models ORDER BY downloaded_at").fetchall()
        return [_entry(r) for r in rows]

    def remove(self, ref: str) -> bool:
        with self._lock, self._db:
            return self._db.execute("DELETE FROM models WHERE ref = ?", (ref,)).rowcount > 0

    def resync(self) -> list[str]:
        """Drop rows whose folder or files are gone; returns the refs dropped."""
        gone = [e.ref for e in self.list()
                if not Path(e.local_path).exists()
                or any(not (Path(e.local_path) / f).exists() for f in e.files)]
        for ref in gone:
            self.remove(ref)
        return gone

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _entry(row: sqlite3.Row) -> CatalogEntry:
    return CatalogEntry(ref=row["ref"], repo_id=row["repo_id"], revision=row["revision"],
                        local_path=row["local_path"], size_bytes=row["size_bytes"],
                        files=json.loads(row["files"]), downloaded_at=row["downloaded_at"],
                        source=row["source"], owner=row["owner"], restricted=bool(row["restricted"]))
