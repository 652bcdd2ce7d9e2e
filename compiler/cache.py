"""Where the compiler keeps state between runs: converted model weights, built kernels,
calibration results and host measurements.

One folder, `$COMPILER_CACHE_DIR` or `~/.cache/ml-compiler`, so CI and users can move or wipe it.
"""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any


def cache_dir(*parts: str) -> Path:
    """The cache folder (or a subfolder of it), created on first use."""
    root = Path(os.environ.get("COMPILER_CACHE_DIR", Path.home() / ".cache" / "ml-compiler"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


class Store:
    """An embedded SQLite table of JSON records under the cache folder, keyed by
    (namespace, key). Payloads are JSON, never pickle; a damaged database is moved aside and
    rebuilt rather than trusted."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "store.sqlite"

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path)
            db.execute("CREATE TABLE IF NOT EXISTS records (namespace TEXT, key TEXT, value TEXT, PRIMARY KEY (namespace, key))")
            db.execute("SELECT count(*) FROM records").fetchone()
            return db
        except sqlite3.DatabaseError:
            self.path.replace(self.path.with_suffix(".damaged"))
            return self._connect()

    def get(self, namespace: str, key: str) -> Any | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT value FROM records WHERE namespace = ? AND key = ?", (namespace, key)).fetchone()
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except json.JSONDecodeError:
            return None

    def put(self, namespace: str, key: str, value: Any) -> None:
        with closing(self._connect()) as db, db:
            db.execute("INSERT OR REPLACE INTO records VALUES (?, ?, ?)", (namespace, key, json.dumps(value)))
