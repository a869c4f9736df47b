"""Request ids already answered, with their replies: the downlink's deduplication store.

A small SQLite file in the state directory (``<state dir>/downlink.sqlite``, beside the
outbox). A request is recorded with its reply once it has been executed; a request whose id is
found here is not executed again, its stored reply is published again (MQTT QoS 1 redelivers a
request whose PUBACK was lost; an operator may resend one). At most ``keep`` ids are kept; the
oldest are dropped when more are recorded. WAL, ``synchronous=FULL``: a reply stored is on disk
before it is published, so a crash after executing a command and before storing its reply is
the only window in which a redelivered request runs twice. Used on the event loop only.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    command TEXT NOT NULL,
    reply TEXT NOT NULL,
    at REAL NOT NULL
)
"""


class DedupStore:
    """``get(request_id)`` → the stored reply (a dict) or None; ``put`` records one."""

    def __init__(self, path: str | Path, keep: int) -> None:
        self.path = Path(path)
        self.keep = keep
        self._db: sqlite3.Connection | None = None
        self.recovered_corrupt = 0

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError:  # unreadable: moved aside, a new (empty) store
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            self.path.replace(aside)
            self.recovered_corrupt += 1
            self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute(_SCHEMA)
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("DedupStore used before open()")
        return self._db

    def get(self, request_id: str) -> dict[str, Any] | None:
        row = (
            self._conn()
            .execute("SELECT reply FROM replies WHERE request_id = ?", (request_id,))
            .fetchone()
        )
        if row is None:
            return None
        reply: dict[str, Any] = json.loads(row[0])
        return reply

    def put(self, request_id: str, command: str, reply: dict[str, Any]) -> None:
        db = self._conn()
        with db:
            db.execute("BEGIN")
            db.execute(
                "INSERT OR REPLACE INTO replies (request_id, command, reply, at) "
                "VALUES (?, ?, ?, ?)",
                (request_id, command, json.dumps(reply, allow_nan=False), time.time()),
            )
            db.execute(
                "DELETE FROM replies WHERE n <= (SELECT MAX(n) FROM replies) - ?", (self.keep,)
            )

    def __len__(self) -> int:
        (n,) = self._conn().execute("SELECT COUNT(*) FROM replies").fetchone()
        return int(n)
