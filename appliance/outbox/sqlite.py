"""The durable outbox: every message bound upstream, in one SQLite file, until the broker acks it.

The outbox is a transaction API (like Telegraf's ``models/buffer.go``): producers ``append``
envelopes; the uplink ``take``s a batch, publishes it and ``settle``s each record as accepted or
rejected. Anything not settled stays, across reconnects and process restarts.

This module is the storage; the disk budget (coarsening, eviction) is
:mod:`appliance.outbox.budget`, the id layout shared by both :mod:`appliance.outbox.layout`, and
the payload format :mod:`appliance.payload`. Producers and the uplink see it as
:class:`appliance.contracts.Outbox`.

Durability window
-----------------
The file is opened in WAL mode (``PRAGMA journal_mode=WAL``) with an explicit ``synchronous``
level. "Returned" below means ``append`` (or ``settle``) returned without raising.

- ``FULL`` (default): SQLite fsyncs the WAL at every commit, before ``append`` returns. An
  appended record survives a process crash (SIGKILL, OOM kill), a kernel panic and a power loss,
  provided the storage honours flush requests (cheap SD cards and some eMMC do not: use an
  industrial-grade medium). Loss window: none. Cost: one fsync per ``append`` call, so batch
  appends. ``settle`` commits are not fsync'ed at either level: a power loss can only undo a
  deletion, which means a duplicate, never a loss.
- ``NORMAL``: commits go to the WAL in the OS page cache without an fsync; the WAL is fsync'ed
  only when a checkpoint copies it into the database (when the WAL reaches its share of the
  disk budget, at most 4 MiB, see "Disk budget", and at ``close``). A process crash loses
  nothing (the page cache belongs to the kernel). A power loss or kernel panic may lose the
  transactions committed since the last checkpoint that the kernel had not yet written back on
  its own: at most ~4 MiB of records, in time at most the kernel's write-back delay
  (``vm.dirty_expire_centisecs``, 30 s by default on Linux). The file is never corrupted. A
  lost ``settle`` only means duplicates.

Loss is otherwise explicit: records are deleted only when the broker acknowledged them
(``accepted``), when the broker refused them (``rejected``: dropped, counted and logged, not
retried forever), or by the disk-budget eviction below (counted as ``evicted``).

Delivery is at-least-once: a record published but not settled before a crash is published again
after the restart. Every payload carries ``id`` (``{appliance}/{stream}/{epoch}/{seq}``) so
subscribers can deduplicate.

On-disk format (``PRAGMA user_version = 2``)
-------------------------------------------
``records(id, stream, seq, priority, topic, payload, created, crc)``, 4 KiB pages (a file made
before keeps its 16 KiB pages). ``id`` is
``priority << 48 | n`` with ``n`` a counter of appends, so the rowid order *is* the drain order
(alerts, status, telemetry; oldest first) and draining or evicting a class is a rowid range scan:
no secondary index to maintain. Ids are never reused within a process (so an id in flight never
names a newer record); after a restart ``n`` continues from the largest stored one. ``payload``
is the final MQTT payload (UTF-8 JSON in the format of :mod:`appliance.payload`, encoded once
at append time); ``created`` is the append time in seconds (epoch). ``streams(stream, seq)``
holds the last sequence number handed out per stream, so ``seq`` stays monotonic across
restarts even when all of the stream's records were delivered. ``meta(key, value)`` holds
``epoch`` (below) and, in files recovered by older versions, ``seq_floor`` (the streams'
starting point; absent means 0). ``quarantine`` holds the records that failed their checksum.

Version 1 files (no ``crc`` column, no ``quarantine`` table, no ``epoch``) are migrated on open:
the column and the table are added, the file gets a new epoch, and the rows stored before carry
``crc`` NULL: they are **verified by nothing** (computing a checksum at migration would only
certify whatever the disk holds by then) and published as they are.

Epoch
-----
Every file has an ``epoch``: the wall-clock time in milliseconds when it was created (or
migrated), at least one more than the epoch of the file it replaces while running. Every
payload carries it (``"epoch"``, and inside ``id``), and a new file's streams start at ``seq`` 1.
So message ids are unique across outbox files, with one behaviour for every way a file can be
new: first start, removed or replaced by hand, found corrupt at start or while running.
Subscribers de-duplicate by ``id`` and reset a stream's expected ``seq`` when its ``epoch``
changes (docs/mqtt.md). This holds as long as no two outbox files are created in the same
millisecond and the wall clock does not go back past an earlier file's creation time.

Integrity
---------
Each record stores ``crc``, the CRC32 (``zlib.crc32``) of its payload, computed by SQLite as the
row is inserted (``crc32(payload)``, a function the connection registers), coarsened records
included. ``take`` verifies it before handing a record out: a record that fails (damaged on the
medium; ``quick_check`` at open checks only the file's structure) is moved to the
``quarantine`` table in its own transaction (kept for inspection with the time it was found),
counted (``quarantined``), logged once per episode (an ERROR; the episode ends when the outbox
has drained), and never published; ``take`` returns the next good records instead.

Flash wear: ``PRAGMA secure_delete`` is turned off (Debian builds SQLite with it on, which
rewrote every deleted record and freed page), pages are 4 KiB, appends are batched by the
supervisor (one transaction per window close) and settles by the uplink (every 2 s): ~3.8 bytes
written per payload byte at 16 machines, ~2.4 at 100 (``benchmarks/write_amplification.py``,
docs/benchmarks.md).

Batched appends (1000 per call, ``synchronous=FULL``) run at ~1.2-2.2e5 records/s for
alert-sized records (~0.37 KB) and ~0.6-1.05e5 records/s for demo telemetry (~1 KB, 40 values:
up to ~4e6 values/s) on the 2-core x86 development VMs (``benchmarks/uplink.py``,
docs/benchmarks.md; the range is two hosts). For 1 KB records SQLite alone (pre-built rows, no
Python per record) takes ~4.5-9 us per row there; encoding the body (~2 us, mostly float
formatting) and the per-record Python (~2.5 us) take the rest.

Unusable file at start
----------------------
``open()`` checks the file before trusting it: readable, a SQLite database, ``PRAGMA
quick_check`` clean (O(file size): ~1 s per 100 MiB), ``user_version`` 0 (new) or 1, and the
expected tables and columns. A file that fails (not a database, truncated, malformed, another
application's schema or version, permission denied, not a regular file) is **moved aside, never
deleted or overwritten**, to ``<path>.corrupt-<UTC timestamp>`` (``-1``, ``-2``... appended if
that exists), together with its ``-wal`` and ``-shm`` files; an ERROR names both paths; a new,
empty outbox takes its place and ``recovered_corrupt`` counts it. The records in the old file are
not sent (they stay there for inspection). If the file cannot be moved aside, ``open()`` raises
:class:`OutboxError` instead (the CLI exits 1) rather than touch it.

The new file is a new epoch (see "Epoch"): its streams start at ``seq`` 1 with ids that differ
from the old file's, so subscribers neither drop them as duplicates nor mix them up. Other
errors at open (a locked file, an I/O error, a full disk)
propagate unchanged: they are not evidence of a bad file.

Damage while running
--------------------
When SQLite reports the open file damaged (SQLITE_CORRUPT "database disk image is malformed" or
SQLITE_NOTADB) during ``append``, ``take`` or ``settle``, the outbox does what ``open()`` does
with such a file: closes it, moves it aside (with its -wal and -shm) to a ``.corrupt-<UTC
timestamp>`` name, logs an ERROR naming both paths and how many unsent records stayed in it,
counts ``recovered_corrupt``, continues in a new file and retries the call there once (an
``append`` stores its batch in the new file). The new file is a new epoch, as at start, and its
streams start at ``seq`` 1; record ids (the rowids) continue, so a late ack of an old record
never settles a new one. I/O errors, a locked file and a full disk are not
damage (they raise, or follow "Disk full" below).

Disk full
---------
When SQLite reports ``database or disk is full`` during an ``append``, the transaction is rolled
back, the oldest records are evicted as for the disk budget (telemetry first, alerts last) until
at least twice the batch's payload bytes are freed, and the append is retried once. If it fails
again, :class:`OutboxFullError` is raised and nothing of the batch is stored. Both are counted
(``disk_full``: appends that hit a full disk; ``disk_full_failed``: of those, the ones that
failed after the retry) and logged: a warning on the first hit of an episode (it ends with the
next append that fits without eviction), an error on the first failed append; the counters carry
the rest.

Disk budget
-----------
``disk_budget_mb`` covers the database and its WAL file. The WAL's share
(:func:`appliance.config.outbox_wal_bytes`: 1/8 of the budget, 64 KiB to 4 MiB, plus one append
batch of 64 KiB) sets ``wal_autocheckpoint`` (the threshold in pages, without the batch) and
``journal_size_limit`` (what the WAL is truncated back to after a checkpoint); a commit can
carry the WAL past the threshold by one transaction before the checkpoint that follows it,
which the batch allowance absorbs for appends of up to ~60 machines' windows. After each
append the used size of the database, ``(page_count - freelist_count) * page_size`` bytes, is
compared with the rest of the budget (free pages are reused by later inserts, so the file
itself stays near it). A budget that cannot hold the empty outbox, the WAL's share and one
batch is refused (``ValueError``; at config load, a ``ConfigError`` naming the key).
Over budget, space is made in the same transaction, down to 95 % of the budget:

1. **Coarsening** (unless ``coarsen_windows`` is 0): runs of consecutive telemetry records of a
   stream, oldest first, are merged into one record covering up to ``coarsen_windows`` windows
   (:mod:`appliance.outbox.coarsen`: statistics over all their samples, the newest window's
   ``seq``/``id``/``ts``, ``"coarsened": {"windows", "first_seq"}``). The merged record takes the
   oldest one's id (its place in the drain order) and ``created``. Records handed out by
   ``take`` and not settled yet (possibly in flight: they may be delivered as they are) and
   anything not shaped like a telemetry window are never merged, and a run never spans a gap in
   ``seq``, so a window reaches subscribers either alone or inside one merged message, never
   both. Merged-away records are counted (``coarsened``). Telemetry ids below the first record
   that could still merge are remembered, so a scan does not decode the same records again
   (except behind the newest record of a stream that stopped publishing).
2. **Eviction**, when nothing is left to merge: the oldest records of the least important class
   are deleted first: telemetry, then status, and alerts only when nothing else is left (logged
   as an error). A full disk (see above) evicts without merging: it needs room at once.

Both are counted; the first of an episode logs one warning (so does the first eviction after
coarsening, and the first alert eviction one error); the episode ends when a ``settle`` brings
the used size below half the budget.

Delivered telemetry kept for backfill
-------------------------------------
With ``keep_delivered_s`` > 0, ``settle`` copies the acknowledged *telemetry* records into the
``delivered`` table (same columns as ``records``, indexed by ``created``) in the same transaction
that deletes them from ``records``, and every 10 s deletes those older than the retention
(by ``created``). ``take`` reads ``records`` only, so a delivered record is never published
again, except through :meth:`SqliteOutbox.requeue_delivered` (the ``backfill`` command): it
inserts copies of the delivered records of a ``ts`` range as ``Priority.BACKFILL`` records (the
class after telemetry: drained after every live record, evicted first), with the stored payload
bytes, so the same ``id``. Over the disk budget, delivered records go first (oldest first), then
queued backfill copies, and only then does coarsening or eviction touch undelivered records; a
full disk deletes delivered records first as well. With ``keep_delivered_s`` 0 the table is not
created (and one left by an earlier configuration is dropped at ``open``), and ``settle`` is
unchanged. The table is optional in the format (``user_version`` stays 2).

Threading: one process. The connection opened by ``open()`` is used from that thread (the event
loop) for everything but :meth:`SqliteOutbox.append_off_loop`, whose transaction (insert,
commit, fsync, and the WAL checkpoint a commit may trigger) runs in the outbox's one writer
thread on a second connection, so that an fsync (8-30 ms on the development VM's disk under
load) does not stall polling (issue 11). The records of such an append are numbered and encoded
on the loop and count as stored only once its commit has returned in the thread, as for
``append``; the loop's connection does not see them before (``take`` returns only committed
records). One such append runs at a time; an append that would go over the disk budget, meet a
full disk or fail in any other way is rolled back in the thread and done again by ``append`` on
the loop. The outbox caches the next id and per-stream sequence numbers (assigned on the loop
only), so this object must be the file's only writer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
import time
import urllib.parse
import zlib
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import msgspec

from appliance.config import (
    OUTBOX_BATCH_BYTES,
    OUTBOX_PAGE_BYTES,
    OUTBOX_WAL_FRAME_BYTES,
    OutboxSection,
    outbox_min_budget_bytes,
    outbox_wal_bytes,
)
from appliance.contracts import Envelope, OutboxRecord, Priority
from appliance.errors import ApplianceError
from appliance.outbox.budget import MAX_COARSEN_WINDOWS, DiskBudget, Freed
from appliance.outbox.layout import CLASS_SHIFT, CLASSES, INSERT, class_range
from appliance.payload import PayloadEncoder, decode_payload

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SCHEMA_VERSION = 2
_KNOWN_VERSIONS = (1, 2)  # version 1 files are migrated on open (see "On-disk format")
_EPISODE_END = 0.5  # an eviction episode ends below this fraction of the budget

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS streams (
    stream TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    crc INTEGER
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    crc INTEGER,
    found REAL NOT NULL
);
"""

_DELIVERED_SCHEMA = """
CREATE TABLE IF NOT EXISTS delivered (
    id INTEGER PRIMARY KEY,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    crc INTEGER
);
CREATE INDEX IF NOT EXISTS delivered_created ON delivered (created);
"""
_KEEP_DELIVERED = (
    "INSERT OR REPLACE INTO delivered "
    "SELECT id, stream, seq, priority, topic, payload, created, crc FROM records WHERE id = ?"
)
_PRUNE_EVERY_S = 10.0  # delivered telemetry older than the retention is pruned this often
BACKFILL_LATE_S = 900.0
BACKFILL_EARLY_S = 60.0
"""``requeue_delivered`` looks for a window of event time ``ts`` among the records appended
(``created``, indexed) from :data:`BACKFILL_EARLY_S` before it to :data:`BACKFILL_LATE_S` after
it (a window is appended when it closes, or with the next one while its scores are awaited,
or at the end of its ``telemetry.interval_s``); the payload's ``ts`` decides."""
BACKFILL_CHUNK = 1000
"""Records one ``requeue_delivered`` call queues at most by default, in one transaction: ~25 ms
of CPU for 1.6 KB records on the 2-core development VM (20 000 records in 0.5 s CPU, load
average 5, timing ``requeue_delivered`` over 20 chunks), so the event loop is held briefly."""

_UPSERT_STREAM = (
    "INSERT INTO streams (stream, seq) VALUES (?, ?) "
    "ON CONFLICT (stream) DO UPDATE SET seq = excluded.seq"
)
_SELECT_ROWS = "SELECT id, stream, seq, topic, priority, payload, created, crc FROM records"
_SELECT_DRAIN_LIMIT = f"{_SELECT_ROWS} ORDER BY id LIMIT ?"
_SELECT_IDS = "SELECT id FROM records ORDER BY id"
_V1_RECORDS = ["id", "stream", "seq", "priority", "topic", "payload", "created"]
_COLUMNS = {
    "records": [*_V1_RECORDS, "crc"],
    "streams": ["stream", "seq"],
    "meta": ["key", "value"],
    "quarantine": [*_V1_RECORDS, "crc", "found"],
}
_OPTIONAL_TABLES = frozenset({"meta", "quarantine"})  # may be missing from version 1 files
_EPOCH_PER_S = 1000  # an epoch is the creation time of its file in milliseconds
_QUARANTINE = (
    "INSERT OR REPLACE INTO quarantine "
    "SELECT id, stream, seq, priority, topic, payload, created, crc, ? FROM records WHERE id = ?"
)
_DISK_FULL_HEADROOM = 2  # on a full disk, evict this many times the batch's payload bytes
_DISK_FULL_MIN_BYTES = 64 * 1024
_MAX_EXCLUDE_RUNS = 16  # take(): up to this many runs of excluded ids are skipped in SQL
_make_record = OutboxRecord._make


class OutboxError(ApplianceError):
    """The outbox file cannot be used and cannot safely be replaced (the CLI exits 1)."""


class OutboxFullError(OutboxError):
    """The disk is full: evicting older records did not free room for an append."""


class _Unusable(Exception):
    """The outbox file at ``open()`` is unreadable or not an intact outbox (why: ``str()``)."""


def _is_disk_full(err: sqlite3.Error) -> bool:
    """Whether ``err`` is SQLITE_FULL (error code 13; the message on Python < 3.11)."""
    code = getattr(err, "sqlite_errorcode", None)
    if code is not None:
        return (int(code) & 0xFF) == 13
    return "database or disk is full" in str(err)


def _is_corrupt(err: sqlite3.Error) -> bool:
    """Whether ``err`` says the file is damaged: SQLITE_CORRUPT (11) or SQLITE_NOTADB (26).

    Those are raised as plain ``sqlite3.DatabaseError``; I/O errors, a locked file or a full
    disk are ``OperationalError`` and say nothing about the file's content."""
    if isinstance(err, sqlite3.OperationalError) or not isinstance(err, sqlite3.DatabaseError):
        return False
    code = getattr(err, "sqlite_errorcode", None)
    if code is not None:
        return (int(code) & 0xFF) in (11, 26)
    text = str(err)
    return "malformed" in text or "not a database" in text


_HEADER_TS = re.compile(rb'"id":"(?:[^"\\]|\\.)*","ts":(-?[0-9][0-9.eE+-]*)[,}]')


def _payload_ts(payload: bytes) -> float | None:
    """The ``ts`` of a stored payload (None when it has none or is not JSON): read from the
    header (``..."id":"...","ts":<number>``, :mod:`appliance.payload`) without decoding the
    body, else by decoding the whole payload."""
    m = _HEADER_TS.search(payload, 0, 512)
    if m is not None:
        try:
            return float(m.group(1))
        except ValueError:
            pass
    try:
        msg = decode_payload(payload)
    except msgspec.DecodeError:
        return None
    ts = msg.get("ts") if isinstance(msg, dict) else None
    return float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else None


def _runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted ``ids`` as inclusive ``(first, last)`` runs of consecutive integers."""
    runs: list[tuple[int, int]] = []
    if not ids:
        return runs
    first = last = ids[0]
    for i in ids[1:]:
        if i != last + 1:
            runs.append((first, last))
            if len(runs) > _MAX_EXCLUDE_RUNS:
                return runs  # too fragmented for the SQL form anyway
            first = i
        last = i
    runs.append((first, last))
    return runs


class _Batch(NamedTuple):
    """Envelopes numbered and encoded for one transaction (:meth:`SqliteOutbox._prepare`)."""

    rows: list[OutboxRecord]
    seqs: dict[str, int]
    next_n: int
    gen: int  # the file generation they were numbered for


class _Statements(NamedTuple):
    """A batch as a few multi-row statements for the writer thread."""

    steps: list[tuple[str, list[Any]]]
    gen: int


#: Rows per multi-row statement of the writer thread (x 8 parameters: far below SQLite's limit
#: of 32766); the statements of every size up to it stay in the connection's statement cache.
_ROWS_PER_STATEMENT = 64
_INSERT_ROWS = (
    "INSERT INTO records (id, stream, seq, topic, priority, payload, created, crc) VALUES "
)
_UPSERT_TAIL = " ON CONFLICT (stream) DO UPDATE SET seq = excluded.seq"


def _multirow_statements(batch: _Batch) -> _Statements:
    """The batch's INSERTs (with each payload's CRC32 computed here, as ``crc32(payload)`` does
    in :data:`~appliance.outbox.layout.INSERT`) and stream upserts as multi-row statements."""
    steps: list[tuple[str, list[Any]]] = []
    crc32 = zlib.crc32
    rows = batch.rows
    for i in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[i : i + _ROWS_PER_STATEMENT]
        params: list[Any] = []
        for r in chunk:
            params.extend(r)
            params.append(crc32(r.payload))
        steps.append((_INSERT_ROWS + ",".join(["(?,?,?,?,?,?,?,?)"] * len(chunk)), params))
    seqs = list(batch.seqs.items())
    for i in range(0, len(seqs), _ROWS_PER_STATEMENT):
        chunk_s = seqs[i : i + _ROWS_PER_STATEMENT]
        params = [v for pair in chunk_s for v in pair]
        sql = "INSERT INTO streams (stream, seq) VALUES " + ",".join(["(?,?)"] * len(chunk_s))
        steps.append((sql + _UPSERT_TAIL, params))
    return _Statements(steps, batch.gen)


class SqliteOutbox(DiskBudget):
    """Durable, ordered, budgeted store of outgoing messages (see the module docstring).

    ``append`` is called on the event loop by the producers (alerts, downsample, status);
    ``take``/``settle`` by the uplink, also on the event loop. Construction does no I/O;
    ``open()`` creates the directory and the file.

    :param path: the SQLite file (its directory is created on ``open()``).
    :param appliance_id: written into every payload and its ``id``.
    :param synchronous: ``"FULL"`` or ``"NORMAL"``, the loss window on power failure.
    :param disk_budget_mb: upper bound of the used database size, MiB (2**20 bytes).
    :param coarsen_windows: over budget, merge runs of consecutive telemetry messages of a
        stream into one covering up to this many windows before evicting any; 0: never.
    :param clock: wall-clock seconds (epoch) for ``created`` and ``oldest_age_s``; a seam for
        tests.
    """

    def __init__(
        self,
        path: str,
        *,
        appliance_id: str,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        disk_budget_mb: float = 256.0,
        coarsen_windows: int = 10,
        keep_delivered_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not keep_delivered_s >= 0:  # also refuses NaN
            raise ValueError(f"keep_delivered_s must be >= 0, not {keep_delivered_s!r}")
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', not {synchronous!r}")
        if not disk_budget_mb * 2**20 >= outbox_min_budget_bytes():
            raise ValueError(
                f"disk_budget_mb = {disk_budget_mb!r} cannot hold the empty outbox, its WAL and "
                f"one append batch (at least {outbox_min_budget_bytes() / 2**20:.2f} MiB)"
            )
        if coarsen_windows == 1 or not 0 <= coarsen_windows <= MAX_COARSEN_WINDOWS:
            raise ValueError(
                f"coarsen_windows must be 0 (off) or 2..{MAX_COARSEN_WINDOWS}, "
                f"not {coarsen_windows!r}"
            )
        if not appliance_id:
            raise ValueError("appliance_id must not be empty")
        self.path = path
        self.appliance_id = appliance_id
        self.synchronous = synchronous
        budget = int(disk_budget_mb * 1024 * 1024)
        self.wal_bytes = outbox_wal_bytes(budget)
        self.disk_budget_bytes = budget - self.wal_bytes  # the database's share
        self.coarsen_windows = coarsen_windows
        self.keep_delivered_s = keep_delivered_s
        self._delivered = 0  # rows in the delivered table (kept for backfill)
        self._backfill_n = 0  # the next n of a BACKFILL record id is at least this
        self._prune_due = 0.0
        self._clock = clock
        self._payloads = PayloadEncoder(appliance_id)
        self._db: sqlite3.Connection | None = None
        self._file_gen = 0  # +1 whenever the file is (re)opened: the writer thread reconnects
        self._writer: ThreadPoolExecutor | None = None
        self._writer_db: sqlite3.Connection | None = None
        self._writer_gen = -1
        self._next_n = 1
        self._take_sql: dict[int, str] = {}
        self._seqs: dict[str, int] = {}
        self._pending = 0
        self._taken: set[int] = set()  # ids handed out by take() and not settled: never merged
        self._coarse_from = 0  # telemetry ids below this are known not to be mergeable
        self._evicting = False
        self._evict_warned = False
        self._alerts_lost = False
        self._disk_full = False
        self._seq_floor = 0
        self._epoch = 0
        self._quarantining = False
        self._counters = {
            "appended": 0,
            "published": 0,
            "rejected": 0,
            "evicted": 0,
            "evicted_alerts": 0,
            "coarsened": 0,
            "evicted_windows": 0,
            "coarsened_windows": 0,
            "quarantined": 0,
            "recovered_corrupt": 0,
            "disk_full": 0,
            "disk_full_failed": 0,
            "delivered_kept": 0,
            "delivered_pruned": 0,
            "delivered_evicted": 0,
            "backfill_queued": 0,
            "backfill_evicted": 0,
        }

    @classmethod
    def from_config(
        cls,
        cfg: OutboxSection,
        *,
        appliance_id: str,
        clock: Callable[[], float] = time.time,
    ) -> SqliteOutbox:
        """The outbox described by the ``[outbox]`` config section."""
        return cls(
            cfg.path,
            appliance_id=appliance_id,
            synchronous=cfg.synchronous,
            disk_budget_mb=cfg.disk_budget_mb,
            coarsen_windows=cfg.coarsen_windows,
            keep_delivered_s=cfg.keep_delivered_s,
            clock=clock,
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Create or open the file, check it, switch it to WAL, load the counters.

        An unusable file is moved aside and replaced by a new, empty outbox (see "Unusable file
        at start" in the module docstring); :class:`OutboxError` when that is impossible.
        """
        if self._db is not None:
            return
        try:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutboxError(f"outbox {self.path}: cannot create its directory: {err}") from None
        try:
            db = self._connect()
        except _Unusable as why:
            aside = self._move_aside()
            self._counters["recovered_corrupt"] += 1
            try:
                db = self._connect()
            except _Unusable as again:
                raise OutboxError(
                    f"outbox {self.path}: a new outbox is unusable too ({again})"
                ) from None
            log.error(
                "outbox %s is unusable (%s): moved it aside to %s, untouched, and started a new, "
                "empty outbox (epoch %d); its unsent records will not be published",
                self.path,
                why,
                aside,
                self._epoch,
            )
        self._db = db
        self._file_gen += 1
        log.info(
            "outbox %s open (synchronous=%s, budget %.1f MiB): %d pending record(s)",
            self.path,
            self.synchronous,
            self.disk_budget_bytes / 2**20,
            self._pending,
        )

    def _connect(self, min_epoch: int = 0) -> sqlite3.Connection:
        """Open and check the file, create or migrate the schema, load the epoch, ids and seqs;
        ``_Unusable`` if bad. A new file's epoch is at least ``min_epoch``."""
        path = Path(self.path)
        if path.exists() or path.is_symlink():
            if not path.is_file():
                raise _Unusable("not a regular file")
            try:
                with open(path, "r+b"):
                    pass
            except OSError as err:
                raise _Unusable(f"cannot open it for reading and writing: {err.strerror}") from None
            self._check_read_only()
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            self._init(db, min_epoch)
        except BaseException:
            db.close()
            raise
        return db

    def _check_read_only(self) -> None:
        """Check the existing file through a read-only connection (``_Unusable`` if bad).

        Read-only, so that SQLite neither checkpoints a WAL into a damaged file nor deletes the
        WAL when the connection closes: a bad file is moved aside exactly as it was found.
        """
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
        try:
            ro = sqlite3.connect(uri, uri=True, isolation_level=None)
        except sqlite3.OperationalError as err:
            raise _Unusable(str(err)) from None
        try:
            self._check(ro)
        except sqlite3.OperationalError as err:
            if any(word in str(err) for word in ("locked", "busy", "I/O")):
                raise  # not evidence of a bad file
            raise _Unusable(str(err)) from None
        except sqlite3.DatabaseError as err:  # not a database, malformed, ...
            raise _Unusable(str(err)) from None
        finally:
            ro.close()

    @staticmethod
    def _check(db: sqlite3.Connection) -> None:
        """Raise ``_Unusable`` unless ``db`` is empty or an intact outbox of a known version."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = {
            name: [c[1] for c in db.execute(f"PRAGMA table_info({name})")]
            for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            ).fetchall()
        }
        if version == 0 and not tables:
            return  # a new file
        if "delivered" in tables and tables["delivered"] != _COLUMNS["records"]:
            raise _Unusable(f"table 'delivered' has columns {tables['delivered']}")
        if version == 0:
            raise _Unusable(f"not an outbox: user_version 0 and table(s) {sorted(tables)}")
        if version not in _KNOWN_VERSIONS:
            raise _Unusable(f"user_version {version}, expected one of {list(_KNOWN_VERSIONS)}")
        for name, columns in _COLUMNS.items():
            if name not in tables and (name in _OPTIONAL_TABLES and version == 1):
                continue
            if name == "records" and version == 1 and tables.get(name) == _V1_RECORDS:
                continue  # migrated on open (an interrupted migration may have added crc)
            if tables.get(name) != columns:
                raise _Unusable(
                    f"table {name!r} has columns {tables.get(name)}, expected {columns}"
                )
        problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise _Unusable("integrity check failed: " + "; ".join(map(str, problems)))

    def _init(self, db: sqlite3.Connection, min_epoch: int) -> None:
        db.execute(f"PRAGMA page_size={OUTBOX_PAGE_BYTES}")  # before WAL: a new file only
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"{self.path}: cannot switch to WAL mode (got {mode!r})")
        self._configure(db)
        db.executescript(_SCHEMA)
        if "crc" not in [c[1] for c in db.execute("PRAGMA table_info(records)")]:
            db.execute("ALTER TABLE records ADD COLUMN crc INTEGER")  # version 1: NULL, unchecked
        row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
        if row is None:  # a new file (or a version 1 file): a new epoch
            epoch = max(int(self._clock() * _EPOCH_PER_S), min_epoch, 1)
            db.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?)", (epoch,))
        else:
            epoch = int(row[0])
        kept = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'delivered'"
        ).fetchone()
        if self.keep_delivered_s > 0:
            db.executescript(_DELIVERED_SCHEMA)
            self._delivered = db.execute("SELECT count(*) FROM delivered").fetchone()[0]
        elif kept:  # retention turned off: nothing is kept any more
            db.execute("DROP TABLE delivered")
            self._delivered = 0
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._epoch = epoch
        self._payloads = PayloadEncoder(self.appliance_id, epoch)
        row = db.execute("SELECT value FROM meta WHERE key = 'seq_floor'").fetchone()
        self._seq_floor = int(row[0]) if row else 0  # left by version 1 after a recovery
        self._seqs = dict(db.execute("SELECT stream, seq FROM streams").fetchall())
        last_n = 0
        for priority in CLASSES:
            lo, hi = class_range(priority)
            top = db.execute(
                "SELECT max(id) FROM records WHERE id >= ? AND id < ?", (lo, hi)
            ).fetchone()[0]
            if top is not None:
                last_n = max(last_n, top - lo)
        self._next_n = last_n + 1
        self._pending = db.execute("SELECT count(*) FROM records").fetchone()[0]

    def _configure(self, db: sqlite3.Connection) -> None:
        """The per-connection settings (the loop's connection and the writer thread's)."""
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.execute("PRAGMA busy_timeout=5000")
        # Debian/Ubuntu build SQLite with SECURE_DELETE on: every deleted record would be
        # zeroed and every freed page written again (flash wear; the records deleted are
        # messages already delivered, nothing secret).
        db.execute("PRAGMA secure_delete=OFF")
        page = int(db.execute("PRAGMA page_size").fetchone()[0])
        frame = page + OUTBOX_WAL_FRAME_BYTES
        threshold = max(1, (self.wal_bytes - OUTBOX_BATCH_BYTES) // frame)
        db.execute(f"PRAGMA wal_autocheckpoint={threshold}")
        db.execute(f"PRAGMA journal_size_limit={self.wal_bytes}")
        db.execute("PRAGMA cache_size=-16384")
        db.create_function("crc32", 1, zlib.crc32, deterministic=True)

    def _move_aside(self) -> str:
        """Rename the file (and its -wal/-shm) to a fresh ``.corrupt-<timestamp>`` name.

        Never overwrites: a suffix is added until the name is free. ``OutboxError`` if the
        rename fails (the file is then left exactly where it was).
        """
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        base = f"{self.path}.corrupt-{stamp}"
        aside, i = base, 0
        while any(os.path.lexists(aside + sfx) for sfx in ("", "-wal", "-shm")):
            i += 1
            aside = f"{base}-{i}"
        try:
            os.rename(self.path, aside)
        except OSError as err:
            raise OutboxError(
                f"outbox {self.path} is unusable and cannot be moved aside to {aside}: {err}; "
                "move or repair it by hand"
            ) from None
        for sfx in ("-wal", "-shm"):
            if os.path.lexists(self.path + sfx):
                try:
                    os.rename(self.path + sfx, aside + sfx)
                except OSError as err:
                    raise OutboxError(
                        f"outbox {self.path} moved aside to {aside}, but its {sfx} file cannot "
                        f"follow: {err}; move it by hand"
                    ) from None
        return aside

    def close(self) -> None:
        """Close the file (checkpointing the WAL) and stop the writer thread. Idempotent.

        Must not be called while an :meth:`append_off_loop` is under way (await it first)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.submit(self._close_writer_db)
            writer.shutdown(wait=True)
        db, self._db = self._db, None
        if db is not None:
            db.close()

    def __enter__(self) -> SqliteOutbox:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"outbox {self.path} is not open")
        return self._db

    # -- the transaction API -----------------------------------------------------------------

    def append(self, envelopes: Sequence[Envelope]) -> list[OutboxRecord]:
        """Store ``envelopes`` in one transaction; durable per ``synchronous`` once it returns.

        Gives each envelope the next ``seq`` of its stream and encodes its final payload
        (``{"v", "kind", "appliance", "stream", "seq", "id", "ts", **body}``). May evict older
        records to stay within the disk budget. Raises ``ValueError`` when a body uses a header
        key (:data:`appliance.payload.RESERVED_KEYS`) and ``sqlite3.Error`` when the disk fails;
        nothing of the batch is stored then. A file found damaged is replaced first (see "Damage
        while running" in the module docstring) and the batch goes into the new one.
        """
        try:
            return self._append(envelopes)
        except sqlite3.DatabaseError as err:
            if not _is_corrupt(err):
                raise
            self._recover_while_running("append", err)
            return self._append(envelopes)  # into the new file; a second failure propagates

    def _append(self, envelopes: Sequence[Envelope]) -> list[OutboxRecord]:
        if not envelopes:
            return []
        db = self._conn
        batch = self._prepare(envelopes)
        rows, seqs = batch.rows, batch.seqs
        try:
            freed = self._write(db, rows, seqs)
        except sqlite3.OperationalError as err:
            if not _is_disk_full(err):
                raise
            freed = self._write_on_full_disk(db, rows, seqs, err)
        else:
            self._fits_again()
        return self._stored(batch, freed)

    def _prepare(self, envelopes: Sequence[Envelope]) -> _Batch:
        """Number and encode ``envelopes`` (on the event loop); nothing is stored yet and no
        counter moves until :meth:`_stored`."""
        created = self._clock()
        seqs: dict[str, int] = {}
        known = self._seqs
        floor = self._seq_floor
        encode = self._payloads.encode
        n = self._next_n
        rows: list[OutboxRecord] = []
        for env in envelopes:
            stream = env.stream
            seq = seqs.get(stream)
            seq = (known.get(stream, floor) if seq is None else seq) + 1
            seqs[stream] = seq
            payload = encode(env, seq)
            priority = int(env.priority)
            rows.append(
                OutboxRecord(
                    priority << CLASS_SHIFT | n, stream, seq, env.topic, priority, payload, created
                )
            )
            n += 1
        return _Batch(rows, seqs, n, self._file_gen)

    def _fits_again(self) -> None:
        if self._disk_full:
            self._disk_full = False
            log.info("outbox %s: appends fit on the disk again", self.path)

    def _stored(self, batch: _Batch, freed: Freed) -> list[OutboxRecord]:
        """Account for a committed batch (on the event loop)."""
        rows = batch.rows
        self._next_n = batch.next_n
        self._seqs.update(batch.seqs)
        self._pending += len(rows)
        self._counters["appended"] += len(rows)
        self._account_freed(freed)
        return rows

    async def append_off_loop(self, envelopes: Sequence[Envelope]) -> list[OutboxRecord]:
        """:meth:`append` with the transaction, its commit and (``synchronous = FULL``) its
        fsync in the outbox's writer thread, so the event loop keeps polling meanwhile.

        Called on the event loop, one call at a time (the caller awaits one before starting the
        next). The envelopes are numbered and encoded on the loop, then written by the writer
        thread on its own connection to the same file; they count as stored when the awaitable
        returns, exactly as when :meth:`append` returns: durable per ``synchronous``. Until the
        commit returns, the loop's connection (``take``) does not see them, so the uplink takes
        only committed records. Whatever the thread cannot do simply (an append that would go
        over the disk budget, a full disk, any SQLite error, the file replaced meanwhile) is
        rolled back there and done again by :meth:`append` on the loop, with its eviction,
        disk-full and damaged-file handling; its exceptions propagate as :meth:`append`'s.
        """
        if not envelopes:
            return []
        _ = self._conn  # raises when not open
        batch = self._prepare(envelopes)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="outbox-writer")
        loop = asyncio.get_running_loop()
        statements = _multirow_statements(batch)  # built on the loop: the thread runs C only
        try:
            done = await loop.run_in_executor(self._writer, self._write_in_thread, statements)
        except sqlite3.Error as err:
            log.debug("outbox %s: writer thread failed (%s), appending on the loop", self.path, err)
            done = False
        if not done or statements.gen != self._file_gen:
            return self.append(envelopes)
        self._fits_again()
        return self._stored(batch, Freed({}))

    def _write_in_thread(self, statements: _Statements) -> bool:
        """In the writer thread: run the batch's inserts and commit; False (rolled back) when it
        would take the database over its budget or the file was replaced since it was prepared.

        Few statements, each over many rows: the sqlite3 module releases the GIL around every
        step and takes it back after, so ``executemany`` of 100 rows (and a Python ``crc32``
        called per row) would hand the GIL back and forth with the event loop 100-200 times
        per commit."""
        gen = statements.gen
        if gen != self._file_gen:
            return False
        db = self._writer_db
        if db is None or self._writer_gen != gen:
            self._close_writer_db()
            db = sqlite3.connect(self.path, isolation_level=None)
            self._configure(db)
            self._writer_db, self._writer_gen = db, gen
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements.steps:
                db.execute(sql, params)
            if self._used_bytes(db) > self.disk_budget_bytes:
                db.execute("ROLLBACK")
                return False
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return True

    def _close_writer_db(self) -> None:
        """In the writer thread: close its connection."""
        db, self._writer_db = self._writer_db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                log.debug("closing the outbox writer connection failed", exc_info=True)

    def _write(
        self,
        db: sqlite3.Connection,
        rows: list[OutboxRecord],
        seqs: dict[str, int],
    ) -> Freed:
        """Insert ``rows`` and their streams' seqs in one transaction, evicting over budget."""
        freed = Freed({})
        coarse_from = self._coarse_from
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(INSERT, rows)
            db.executemany(_UPSERT_STREAM, seqs.items())
            if self._used_bytes(db) > self.disk_budget_bytes:
                freed = self._evict(db, self._pending + len(rows))
            db.execute("COMMIT")
        except BaseException:
            self._coarse_from = coarse_from  # the merges it accounts for are rolled back too
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return freed

    def _write_on_full_disk(
        self,
        db: sqlite3.Connection,
        rows: list[OutboxRecord],
        seqs: dict[str, int],
        err: sqlite3.OperationalError,
    ) -> Freed:
        """The disk is full: evict per policy, retry the write once, else ``OutboxFullError``."""
        self._counters["disk_full"] += 1
        need = max(_DISK_FULL_MIN_BYTES, _DISK_FULL_HEADROOM * sum(len(r.payload) for r in rows))
        freed: dict[int, int] = {}
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                freed = self._evict_bytes(db, need)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as again:
            if not _is_disk_full(again):
                raise
        if freed:
            self._count_evictions(freed, budget=False)
        if not self._disk_full:  # an episode ends with the next append that needs no eviction
            self._disk_full = True
            log.warning(
                "outbox %s: %s; evicted %d of the oldest record(s), telemetry first, and retrying",
                self.path,
                err,
                sum(freed.values()),
            )
        else:
            log.debug("outbox %s: disk still full, evicted %d", self.path, sum(freed.values()))
        try:
            written = self._write(db, rows, seqs)
        except sqlite3.OperationalError as again:
            if not _is_disk_full(again):
                raise
            self._counters["disk_full_failed"] += 1
            (log.error if self._counters["disk_full_failed"] == 1 else log.debug)(
                "outbox %s: disk full even after evicting %d record(s): %d new record(s) "
                "NOT stored (%d such append(s) so far)",
                self.path,
                sum(freed.values()),
                len(rows),
                self._counters["disk_full_failed"],
            )
            raise OutboxFullError(
                f"outbox {self.path}: {again}; evicting older records did not free enough room "
                f"for {len(rows)} new record(s)"
            ) from again
        return written

    def take(self, limit: int, exclude: Collection[int] = ()) -> list[OutboxRecord]:
        records = self._guarded("take", self._take_verified, limit, exclude)
        if self.coarsen_windows:
            self._taken.update(r.id for r in records)  # possibly in flight: never merged
        return records

    def _take_verified(self, limit: int, exclude: Collection[int]) -> list[OutboxRecord]:
        """:meth:`_take`, with every record's payload checked against its CRC32: a record that
        fails is quarantined (see "Integrity" in the module docstring) and never returned."""
        crc32 = zlib.crc32
        while True:
            rows = self._take(limit, exclude)
            bad = [r for r in rows if r[7] is not None and crc32(r[5]) != r[7]]
            if not bad:
                return [_make_record(r[:7]) for r in rows]
            self._quarantine(bad)

    def _quarantine(self, rows: Sequence[Sequence[Any]]) -> None:
        """Move records whose payload fails its CRC32 to the ``quarantine`` table."""
        db = self._conn
        now = self._clock()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(_QUARANTINE, ((now, r[0]) for r in rows))
            n = self._delete(db, [r[0] for r in rows])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._pending -= n
        self._counters["quarantined"] += n
        if not self._quarantining:
            self._quarantining = True
            log.error(
                "outbox %s: %d record(s) failed their CRC32 check (damaged on disk), e.g. %s "
                "seq %s: kept aside in its quarantine table, NOT published (counted: "
                "quarantined)",
                self.path,
                n,
                rows[0][1],
                rows[0][2],
            )
        else:
            log.debug("outbox %s: %d more record(s) quarantined", self.path, n)

    def _take(self, limit: int, exclude: Collection[int] = ()) -> list[Any]:
        """Up to ``limit`` records to publish next, skipping the ids in ``exclude`` (in flight).

        Order: by priority class (alerts, then status, then telemetry), oldest first within a
        class, hence each stream in ``seq`` order. Reads only; the records stay until settled.
        ``exclude`` made of up to 16 runs of consecutive ids (an in-flight window) is skipped
        inside SQLite, in one query; a more fragmented one is scanned id by id in Python (cost
        grows with ``len(exclude)``) and the chosen rows fetched by id.
        """
        if limit <= 0:
            return []
        db = self._conn
        if not exclude:
            return db.execute(_SELECT_DRAIN_LIMIT, (limit,)).fetchall()
        runs = _runs(sorted(exclude))
        if len(runs) <= _MAX_EXCLUDE_RUNS:
            # The excluded ids are a few contiguous runs (the in-flight window): SQLite skips
            # them while it walks the rowid order, without a row reaching Python.
            sql = self._take_sql.get(len(runs))
            if sql is None:
                sql = self._take_sql[len(runs)] = (
                    f"{_SELECT_ROWS} WHERE "
                    + " AND ".join(["NOT (id BETWEEN ? AND ?)"] * len(runs))
                    + " ORDER BY id LIMIT ?"
                )
            params = [bound for run in runs for bound in run]
            params.append(limit)
            return db.execute(sql, params).fetchall()
        skip = exclude if isinstance(exclude, (set, frozenset)) else set(exclude)
        ids: list[int] = []
        cur = db.execute(_SELECT_IDS)
        try:
            for (rid,) in cur:
                if rid not in skip:
                    ids.append(rid)
                    if len(ids) >= limit:
                        break
        finally:
            cur.close()
        out: list[Any] = []
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            sql = f"{_SELECT_ROWS} WHERE id IN ({','.join('?' * len(chunk))}) ORDER BY id"
            out.extend(db.execute(sql, chunk))
        return out

    def settle(self, accepted: Sequence[int], rejected: Sequence[int] = ()) -> None:
        self._guarded("settle", self._settle, accepted, rejected)
        if self._taken:
            self._taken.difference_update(accepted)
            self._taken.difference_update(rejected)

    def _settle(self, accepted: Sequence[int], rejected: Sequence[int] = ()) -> None:
        """Delete records the broker acknowledged (``accepted``) or refused (``rejected``).

        Both go in one transaction. Rejected records are dropped, not retried (the broker's
        verdict would not change), counted and logged with their topics. Unknown ids (already
        evicted or settled) are ignored.

        The commit is never fsync'ed, even with ``synchronous=FULL`` (the WAL is synced by the
        next append's commit or checkpoint): a power loss can only undo deletions, so it costs
        duplicates, never a record, and settling stays cheap.
        """
        if not accepted and not rejected:
            return
        db = self._conn
        topics: list[str] = []
        kept = pruned = 0
        relaxed = self.synchronous != "NORMAL"
        if relaxed:
            db.execute("PRAGMA synchronous=NORMAL")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                if self.keep_delivered_s > 0:
                    kept, pruned = self._keep_delivered(db, accepted)
                n_accepted = self._delete(db, accepted)
                n_rejected = 0
                if rejected:
                    topics = self._topics(db, rejected)
                    n_rejected = self._delete(db, rejected)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        finally:
            if relaxed:
                db.execute(f"PRAGMA synchronous={self.synchronous}")
        self._pending -= n_accepted + n_rejected
        self._delivered += kept - pruned
        self._counters["delivered_kept"] += kept
        self._counters["delivered_pruned"] += pruned
        self._counters["published"] += n_accepted
        self._counters["rejected"] += n_rejected
        if n_rejected:
            log.warning(
                "%d record(s) rejected (refused by the broker or unsendable) on topic(s) %s: "
                "dropped",
                n_rejected,
                topics,
            )
        if self._quarantining and not self._pending:
            self._quarantining = False  # an episode of damaged records ends when all went out
        if self._evicting and self._used_bytes(db) < self.disk_budget_bytes * _EPISODE_END:
            self._evicting = False
            log.info("outbox back under half its disk budget; eviction episode over")

    def _keep_delivered(self, db: sqlite3.Connection, accepted: Sequence[int]) -> tuple[int, int]:
        """Copy the acknowledged telemetry records among ``accepted`` into ``delivered`` and,
        every :data:`_PRUNE_EVERY_S`, delete what is older than the retention. Inside the
        settle's transaction; returns (kept, pruned)."""
        lo, hi = class_range(int(Priority.TELEMETRY))
        ids = [(i,) for i in accepted if lo <= i < hi]
        kept = max(db.executemany(_KEEP_DELIVERED, ids).rowcount, 0) if ids else 0
        pruned = 0
        now = self._clock()
        if now >= self._prune_due:
            self._prune_due = now + _PRUNE_EVERY_S
            cur = db.execute(
                "DELETE FROM delivered WHERE created < ?", (now - self.keep_delivered_s,)
            )
            pruned = max(cur.rowcount, 0)
        return kept, pruned

    # -- backfill ----------------------------------------------------------------------------

    def delivered_summary(self) -> dict[str, Any]:
        """What delivered telemetry is held for backfill: ``records`` (count), ``oldest_ts`` and
        ``newest_ts`` (the event time ``ts`` of the oldest and newest record; None when empty)
        and ``keep_delivered_s``."""
        out: dict[str, Any] = {
            "records": self._delivered,
            "oldest_ts": None,
            "newest_ts": None,
            "keep_delivered_s": self.keep_delivered_s,
        }
        if self.keep_delivered_s <= 0 or not self._delivered:
            return out
        db = self._conn
        for key, order in (("oldest_ts", "ASC"), ("newest_ts", "DESC")):
            row = db.execute(
                f"SELECT payload FROM delivered ORDER BY created {order}, id {order} LIMIT 1"
            ).fetchone()
            if row is not None:
                out[key] = _payload_ts(row[0])
        return out

    def requeue_delivered(
        self,
        start_ts: float,
        end_ts: float,
        streams: Collection[str] | None = None,
        *,
        limit: int = BACKFILL_CHUNK,
        after: tuple[float, int] | None = None,
    ) -> tuple[int, tuple[float, int] | None]:
        """Queue the delivered telemetry records whose window ``ts`` lies in ``[start_ts,
        end_ts]`` (of ``streams`` when given) for publishing again, oldest first, as
        :attr:`~appliance.contracts.Priority.BACKFILL` records: same stream, ``seq``, topic and
        payload bytes (so the same ``id``), a new record id after every live record, ``created``
        now. At most ``limit`` records, in one transaction (the disk budget applies as to an
        append), so the event loop is held briefly. Returns the number queued and, when
        ``limit`` stopped it, the cursor to pass as ``after`` to continue (None: done)."""
        if self.keep_delivered_s <= 0 or limit <= 0:
            return 0, None
        return self._guarded(
            "requeue_delivered", self._requeue, start_ts, end_ts, streams, limit, after
        )

    def _requeue(
        self,
        start_ts: float,
        end_ts: float,
        streams: Collection[str] | None,
        limit: int,
        after: tuple[float, int] | None,
    ) -> tuple[int, tuple[float, int] | None]:
        db = self._conn
        wanted = set(streams) if streams is not None else None
        rows: list[OutboxRecord] = []
        created = self._clock()
        # Its own counter, never lowered within the process (a BACKFILL id is never reused
        # while one may be in flight); at open, _next_n is above every stored id of any class.
        n = max(self._next_n, self._backfill_n)
        shift = int(Priority.BACKFILL) << CLASS_SHIFT
        cursor: tuple[float, int] | None = None
        lo = start_ts - BACKFILL_EARLY_S
        after_created, after_id = after if after is not None else (lo, -1)
        cur = db.execute(
            "SELECT created, id, stream, seq, topic, payload FROM delivered "
            "WHERE created >= ? AND created <= ? AND (created > ? OR id > ?) "
            "ORDER BY created, id",
            (max(lo, after_created), end_ts + BACKFILL_LATE_S, after_created, after_id),
        )
        try:
            for when, rid, stream, seq, topic, payload in cur:
                if wanted is not None and stream not in wanted:
                    continue
                ts = _payload_ts(payload)
                if ts is None or not start_ts <= ts <= end_ts:
                    continue
                rows.append(
                    OutboxRecord(
                        shift | n, stream, seq, topic, int(Priority.BACKFILL), payload, created
                    )
                )
                n += 1
                if len(rows) >= limit:
                    cursor = (when, rid)
                    break
        finally:
            cur.close()
        if not rows:
            return 0, None
        freed = Freed({})
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(INSERT, rows)
            if self._used_bytes(db) > self.disk_budget_bytes:
                freed = self._evict(db, self._pending + len(rows))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._backfill_n = n
        self._pending += len(rows)
        self._counters["backfill_queued"] += len(rows)
        self._account_freed(freed)
        return len(rows), cursor

    def _account_freed(self, freed: Freed) -> None:
        """Account what a committed transaction's budget eviction removed: delivered records
        and backfill copies, then evicted and merged records."""
        if freed.delivered or freed.backfill:
            self._delivered -= freed.delivered
            self._pending -= freed.backfill
            self._counters["delivered_evicted"] += freed.delivered
            self._counters["backfill_evicted"] += freed.backfill
        if freed.evicted or freed.merged:
            self._count_evictions(
                freed.evicted,
                merged=freed.merged,
                windows=freed.evicted_windows,
                coarsened_windows=freed.coarsened_windows,
            )

    # -- observation -------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The open file's epoch (its creation time in ms), carried by every payload it numbers."""
        return self._epoch

    @property
    def pending(self) -> int:
        """Records stored and not yet settled (in flight included). O(1)."""
        return self._pending

    def stats(self) -> dict[str, float]:
        """Counters since ``open``/construction plus the backlog.

        ``appended``, ``published`` (settled as accepted), ``rejected``, ``evicted`` (all
        classes), ``evicted_alerts`` and ``coarsened`` (telemetry records merged into others)
        are counts of records; ``evicted_windows`` counts the telemetry windows the evicted
        records held (a merged record holds several) and ``coarsened_windows`` the windows
        merged into a coarser message for the first time; ``quarantined`` the records that
        failed their CRC32 (kept aside, not published); ``pending`` is the number of unsettled
        records; ``oldest_age_s`` the age of the oldest of them in seconds (0 when empty).
        ``recovered_corrupt`` counts unusable files moved aside at ``open``; ``disk_full`` appends
        that hit a full disk and ``disk_full_failed`` those of them that failed after the retry.
        Retention for backfill (see "Delivered telemetry kept for backfill"): ``delivered``
        (records held now), ``delivered_kept``, ``delivered_pruned`` (by age),
        ``delivered_evicted`` (by the budget), ``backfill_queued`` (copies queued by
        ``requeue_delivered``) and ``backfill_evicted``.
        """
        oldest = self._guarded("stats", self._oldest_age_s) if self._db is not None else 0.0
        out: dict[str, float] = dict(self._counters)
        out["pending"] = self._pending
        out["delivered"] = self._delivered
        out["oldest_age_s"] = oldest
        return out

    def _oldest_age_s(self) -> float:
        if not self._pending:
            return 0.0
        firsts = [
            row[0]
            for priority in CLASSES
            for row in self._conn.execute(
                "SELECT created FROM records WHERE id >= ? AND id < ? ORDER BY id LIMIT 1",
                class_range(priority),
            )
        ]
        return max(0.0, self._clock() - min(firsts)) if firsts else 0.0

    # -- internals ---------------------------------------------------------------------------

    def _guarded(self, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)``; if the file turns out damaged, replace it and call ``fn`` once more."""
        try:
            return fn(*args)
        except sqlite3.DatabaseError as err:
            if not _is_corrupt(err):
                raise
            self._recover_while_running(what, err)
            return fn(*args)

    def _recover_while_running(self, what: str, err: sqlite3.DatabaseError) -> None:
        """SQLite found the open file damaged: move it aside, continue in a new one.

        Unlike at start, the last sequence numbers are known: the new file continues every
        stream from them, so subscribers see a gap exactly where the old file's unsent records
        were. Record ids continue too (so an ack of an old in-flight record never settles a new
        one). :class:`OutboxError` if the file cannot be moved aside or the new one is unusable.
        """
        next_n, lost, epoch = self._next_n, self._pending, self._epoch
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                log.debug("closing the damaged outbox %s failed", self.path, exc_info=True)
        aside = self._move_aside()
        self._counters["recovered_corrupt"] += 1
        try:
            self._db = self._connect(min_epoch=epoch + 1)
        except _Unusable as again:
            raise OutboxError(
                f"outbox {self.path}: a new outbox is unusable too ({again})"
            ) from None
        self._file_gen += 1
        self._next_n = max(self._next_n, next_n)
        log.error(
            "outbox %s became unusable while running (%s, during %s): moved it aside to %s, "
            "untouched, and continued in a new, empty outbox (epoch %d); its %d unsent "
            "record(s) will not be published",
            self.path,
            err,
            what,
            aside,
            self._epoch,
            lost,
        )

    @staticmethod
    def _topics(db: sqlite3.Connection, ids: Sequence[int]) -> list[str]:
        """Distinct topics of the records ``ids`` (chunked under SQLite's variable limit)."""
        topics: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = tuple(ids[i : i + 500])
            sql = f"SELECT DISTINCT topic FROM records WHERE id IN ({','.join('?' * len(chunk))})"
            topics.update(t for (t,) in db.execute(sql, chunk))
        return sorted(topics)

    @staticmethod
    def _delete(db: sqlite3.Connection, ids: Sequence[int]) -> int:
        if not ids:
            return 0
        cur = db.executemany("DELETE FROM records WHERE id = ?", ((i,) for i in ids))
        return max(cur.rowcount, 0)
