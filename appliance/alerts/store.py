"""Alert state on disk: what survives a restart or a power cut.

A small SQLite file beside the outbox (``alerts.state_path``, default
``<outbox stem>.alerts.sqlite``), with the outbox's discipline: WAL journal and the outbox's
``synchronous`` level (``FULL`` in the shipped image: a committed transaction survives power
loss). Two tables: ``state`` (one row per (rule, machine): active or not, ``alert_id``,
severity, peak, transition count, last clear) and ``pending`` (alert messages decided but not
yet known to be in the outbox).

Why the state and its message cannot disagree after a crash: every transition is written in
ONE transaction together with its message in ``pending`` (:meth:`AlertStore.commit`), before
the message is appended to the outbox; once the outbox's append has returned, the ``pending``
rows are deleted (:meth:`AlertStore.done`). A crash before the commit loses the decision, and
the state on disk is the one before it: the condition is judged again after the restart, so
the alert is raised then (nothing was sent, nothing is duplicated). A crash between the commit
and the end of the outbox append leaves the message in ``pending``: at the next start the
engine looks for it among the outbox's stored alert records (by ``alert_id`` and
``transition``; it cannot have been published and deleted, because publishing happens on a
later turn of the event loop than the append, after ``done``) and appends it only when it is
not there. So each transition reaches the outbox exactly once.

Called on the event loop only (the engine's thread); no shared state.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, Literal

from appliance.contracts import Envelope, Priority

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (
    rule TEXT NOT NULL, machine TEXT NOT NULL, data TEXT NOT NULL,
    PRIMARY KEY (rule, machine)
);
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY AUTOINCREMENT, envelope TEXT NOT NULL
);
"""


def envelope_to_json(env: Envelope) -> str:
    return json.dumps(
        {
            "stream": env.stream,
            "kind": env.kind,
            "topic": env.topic,
            "priority": int(env.priority),
            "ts": env.ts,
            "body": env.body,
        },
        allow_nan=False,
    )


def envelope_from_json(text: str) -> Envelope:
    d = json.loads(text)
    return Envelope(d["stream"], d["kind"], d["topic"], Priority(d["priority"]), d["ts"], d["body"])


class AlertStore:
    """The alert state file. Construction does no I/O; ``open()`` creates or opens it."""

    def __init__(self, path: str | Path, synchronous: Literal["NORMAL", "FULL"] = "FULL") -> None:
        self.path = Path(path)
        self.synchronous = synchronous
        self._db: sqlite3.Connection | None = None
        self.recovered_corrupt = 0

    def open(self) -> None:
        """Open (or create) the file. One that SQLite cannot read is moved aside to
        ``<path>.corrupt-<unix time>`` (kept for inspection, counted in ``recovered_corrupt``)
        and a new one started: the alerts it held are forgotten, not the appliance's start."""
        if self._db is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._connect()
        except sqlite3.DatabaseError as err:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("alert state %s is unreadable (%s): moved to %s", self.path, err, aside)
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    src.replace(Path(f"{aside}{suffix}"))
            self.recovered_corrupt += 1
            self._db = self._connect()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            db.executescript(_SCHEMA)
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            db.execute("SELECT count(*) FROM state").fetchone()
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("AlertStore used before open()")
        return self._db

    def load(self) -> list[dict[str, Any]]:
        """Every stored (rule, machine) state, as written by ``AlertState.to_dict``."""
        rows = self.db.execute("SELECT data FROM state ORDER BY rule, machine").fetchall()
        return [json.loads(r[0]) for r in rows]

    def pending(self) -> list[tuple[int, Envelope]]:
        rows = self.db.execute("SELECT id, envelope FROM pending ORDER BY id").fetchall()
        return [(int(i), envelope_from_json(t)) for i, t in rows]

    def commit(self, states: list[dict[str, Any]], envelopes: list[Envelope]) -> list[int]:
        """Write ``states`` and queue ``envelopes`` in one transaction; the pending ids."""
        db = self.db
        ids: list[int] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT OR REPLACE INTO state (rule, machine, data) VALUES (?, ?, ?)",
                [(s["rule"], s["machine"], json.dumps(s, allow_nan=False)) for s in states],
            )
            for env in envelopes:
                cur = db.execute(
                    "INSERT INTO pending (envelope) VALUES (?)", (envelope_to_json(env),)
                )
                ids.append(int(cur.lastrowid or 0))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return ids

    def done(self, ids: list[int]) -> None:
        """The messages ``ids`` are in the outbox: forget them."""
        if ids:
            marks = ",".join("?" * len(ids))
            self.db.execute(f"DELETE FROM pending WHERE id IN ({marks})", ids)
