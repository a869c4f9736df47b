"""The outbox's disk budget: coarsening old telemetry, then evicting, to stay within
``disk_budget_mb``, and making room on a full disk (see "Disk budget" and "Disk full" in
:mod:`appliance.outbox.sqlite`).

:class:`DiskBudget` is a mixin of :class:`~appliance.outbox.sqlite.SqliteOutbox` (which sets
the attributes): its methods run inside the storage's write transaction, on the event loop.
Merging itself is :mod:`appliance.outbox.coarsen`; the payloads are read and written with
:mod:`appliance.payload`.
"""

from __future__ import annotations

import logging
import math
import re
import sqlite3
from typing import Any, NamedTuple

import msgspec

from appliance.contracts import Priority
from appliance.outbox import coarsen
from appliance.outbox.layout import CLASSES, INSERT, class_range
from appliance.payload import decode_payload, encode_message

log = logging.getLogger("appliance.outbox.sqlite")  # the outbox logs under one name

_EVICT_TARGET = 0.95  # evict down to this fraction of the budget (hysteresis)
_MIN_EVICT_ROWS = 16
_MAX_EVICT_ROUNDS = 64
_COARSEN_SCAN_ROWS = 512  # telemetry rows read per step of a coarsening scan
MAX_COARSEN_WINDOWS = 10_000  # a merge deletes as many rows in one statement (SQLite: 32766)
_COPY_EVICT_ROWS = 256  # delivered/backfill rows deleted per step before re-measuring
_COARSENED_WINDOWS = re.compile(rb'"coarsened":\{"windows":(\d+)')


def windows_of(payload: bytes) -> int:
    """Telemetry windows a stored telemetry payload covers: 1, or its ``coarsened.windows``."""
    if b'"coarsened"' not in payload:
        return 1
    m = _COARSENED_WINDOWS.search(payload)
    return int(m.group(1)) if m else 1


class Freed(NamedTuple):
    """What making room over the budget did in one transaction."""

    evicted: dict[int, int]  # records deleted, per priority class
    merged: int = 0  # telemetry records merged into others (coarsening)
    evicted_windows: int = 0  # telemetry windows in the deleted records
    coarsened_windows: int = 0  # windows merged for the first time (sent coarse from now on)
    delivered: int = 0  # delivered telemetry kept for backfill, deleted
    backfill: int = 0  # queued backfill copies (Priority.BACKFILL records), deleted


class _Run:
    """Consecutive telemetry records of one stream, oldest first, to be merged into one."""

    __slots__ = ("ids", "msgs", "extents", "windows", "topic", "priority", "created")

    def __init__(self, topic: str, priority: int, created: float) -> None:
        self.ids: list[int] = []
        self.msgs: list[dict[str, Any]] = []
        self.extents: list[tuple[int, int]] = []  # (first_seq, windows) of each
        self.windows = 0
        self.topic = topic
        self.priority = priority
        self.created = created


class DiskBudget:
    """Coarsening and eviction over the disk budget (see the module docstring); a mixin of
    :class:`~appliance.outbox.sqlite.SqliteOutbox`, which sets these attributes."""

    disk_budget_bytes: int
    coarsen_windows: int
    keep_delivered_s: float
    _delivered: int
    _taken: set[int]
    _coarse_from: int
    _pending: int
    _evicting: bool
    _evict_warned: bool
    _alerts_lost: bool
    _counters: dict[str, int]

    @staticmethod
    def _used_bytes(db: sqlite3.Connection) -> int:
        """Bytes of the database in use (free pages excluded, since inserts reuse them)."""
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    def _evict(self, db: sqlite3.Connection, pending: int) -> Freed:
        """Merge old telemetry, then delete oldest records, least important class first, to
        95 % of the budget (see "Disk budget" in the module docstring).

        Runs inside the caller's transaction. Returns the number deleted per priority class
        and the number merged away.
        """
        target = self.disk_budget_bytes * _EVICT_TARGET
        delivered, backfill = self._evict_copies(db, target)
        pending -= backfill
        evicted: dict[int, int] = {}
        merged = windows = coarse = 0
        can_coarsen = self.coarsen_windows > 0
        for _ in range(_MAX_EVICT_ROUNDS):
            used = self._used_bytes(db)
            if used <= target or pending <= 0:
                break
            per_row = used / pending  # over-estimates (schema pages count too): safe side
            want = max(_MIN_EVICT_ROWS, math.ceil((used - target) / per_row))
            if can_coarsen:
                n, w = self._coarsen(db, want)
                if n:
                    merged += n
                    coarse += w
                    pending -= n
                    continue  # re-measure: merging frees less than deleting as many rows
                can_coarsen = False  # nothing left to merge: evict
            for priority in reversed(CLASSES):
                if want <= 0:
                    break
                lo, hi = class_range(priority)
                if priority == Priority.TELEMETRY:  # count the windows they held, too
                    rows = db.execute(
                        "SELECT id, payload FROM records WHERE id >= ? AND id < ? "
                        "ORDER BY id LIMIT ?",
                        (lo, hi, want),
                    ).fetchall()
                    if not rows:
                        continue
                    windows += sum(windows_of(p) for _, p in rows)
                    cur = db.execute(
                        "DELETE FROM records WHERE id >= ? AND id <= ?", (lo, rows[-1][0])
                    )
                else:
                    cur = db.execute(
                        "DELETE FROM records WHERE id IN (SELECT id FROM records "
                        "WHERE id >= ? AND id < ? ORDER BY id LIMIT ?)",
                        (lo, hi, want),
                    )
                n = max(cur.rowcount, 0)
                if n:
                    evicted[priority] = evicted.get(priority, 0) + n
                    pending -= n
                    want -= n
                    if priority != Priority.ALERT:
                        break  # re-measure before touching a more important class
        return Freed(evicted, merged, windows, coarse, delivered, backfill)

    def _evict_copies(self, db: sqlite3.Connection, target: float) -> tuple[int, int]:
        """Delete the delivered telemetry kept for backfill, then the queued backfill copies,
        oldest first, until the used size is at most ``target`` bytes: copies of what was
        delivered go before anything undelivered. Inside the caller's transaction. Returns
        the number of each deleted."""
        deleted = [0, 0]
        steps = (
            (
                "DELETE FROM delivered WHERE id IN (SELECT id FROM delivered ORDER BY id LIMIT ?)",
                (),
            ),
            (
                "DELETE FROM records WHERE id IN (SELECT id FROM records "
                "WHERE id >= ? AND id < ? ORDER BY id LIMIT ?)",
                class_range(int(Priority.BACKFILL)),
            ),
        )
        for i, (sql, bounds) in enumerate(steps):
            if i == 0 and (self.keep_delivered_s <= 0 or not self._delivered):
                continue
            while True:
                used = self._used_bytes(db)
                if used <= target:
                    return deleted[0], deleted[1]
                cur = db.execute(sql, (*bounds, _COPY_EVICT_ROWS))
                n = max(cur.rowcount, 0)
                if not n:
                    break
                deleted[i] += n
        return deleted[0], deleted[1]

    def _coarsen(self, db: sqlite3.Connection, want: int) -> tuple[int, int]:
        """Merge runs of consecutive telemetry records of a stream, oldest first, until ``want``
        rows are gone (see :mod:`appliance.outbox.coarsen`). Inside the caller's transaction.

        A merged record takes the place (id, ``created``) of the oldest one it replaces and
        covers at most ``coarsen_windows`` windows. Records handed out by ``take`` and not
        settled (possibly in flight) and anything not shaped like a telemetry window are left
        alone and end a run. Returns the number of rows merged away and of windows merged for
        the first time (sent inside a coarser message from now on).
        """
        limit = self.coarsen_windows
        lo, hi = class_range(int(Priority.TELEMETRY))
        pos = max(lo, self._coarse_from)
        runs: dict[str, _Run] = {}
        freed = first_merged = 0

        def close(stream: str) -> None:
            nonlocal freed, first_merged
            run = runs.pop(stream, None)
            if run is None or len(run.ids) < 2:
                return
            try:
                payload = encode_message(coarsen.merge(run.msgs, run.extents))
            except coarsen.NotMergeable as err:  # a statistic that is not a number: left as is
                log.debug("outbox: not merging records %s: %s", run.ids, err)
                return
            db.execute(f"DELETE FROM records WHERE id IN ({','.join('?' * len(run.ids))})", run.ids)
            db.execute(
                INSERT,
                (
                    run.ids[0],
                    stream,
                    run.msgs[-1]["seq"],
                    run.topic,
                    run.priority,
                    payload,
                    run.created,
                ),
            )
            freed += len(run.ids) - 1
            first_merged += sum(1 for _, w in run.extents if w == 1)

        while freed < want:
            rows = db.execute(
                "SELECT id, stream, topic, priority, payload, created FROM records "
                "WHERE id >= ? AND id < ? ORDER BY id LIMIT ?",
                (pos, hi, _COARSEN_SCAN_ROWS),
            ).fetchall()
            if not rows:
                break
            for rid, stream, topic, priority, payload, created in rows:
                pos = rid + 1
                try:
                    msg = decode_payload(payload)
                    first_seq, windows = coarsen.extent(msg)
                except (msgspec.DecodeError, coarsen.NotMergeable):
                    close(stream)
                    continue
                run = runs.get(stream)
                if run is not None and (
                    first_seq != run.msgs[-1]["seq"] + 1
                    or msg.get("epoch") != run.msgs[-1].get("epoch")
                    or run.windows + windows > limit
                    or topic != run.topic
                ):
                    close(stream)
                    run = None
                if rid in self._taken or windows >= limit:
                    close(stream)
                    continue
                if run is None:
                    run = runs[stream] = _Run(topic, priority, created)
                run.ids.append(rid)
                run.msgs.append(msg)
                run.extents.append((first_seq, windows))
                run.windows += windows
                if run.windows >= limit:
                    close(stream)
                if freed >= want:
                    break
        # Runs still open hold the newest windows of their streams (or where the scan stopped):
        # scanned again next time, and merged now only when there is nothing older to merge.
        self._coarse_from = min((run.ids[0] for run in runs.values()), default=pos)
        if freed < want:
            for stream in list(runs):
                close(stream)
        return freed, first_merged

    def _evict_bytes(self, db: sqlite3.Connection, need: int) -> dict[int, int]:
        """Delete the oldest records, least important class first, until their payloads add up
        to ``need`` bytes (or nothing is left). Inside the caller's transaction."""
        evicted: dict[int, int] = {}
        if self.keep_delivered_s > 0 and self._delivered:  # delivered copies go first
            cutoff, n = None, 0
            cur = db.execute(
                "SELECT id, length(payload) + length(topic) + length(stream) + 32 "
                "FROM delivered ORDER BY id"
            )
            try:
                for rid, size in cur:
                    cutoff, n, need = rid, n + 1, need - size
                    if need <= 0:
                        break
            finally:
                cur.close()
            if cutoff is not None:
                db.execute("DELETE FROM delivered WHERE id <= ?", (cutoff,))
                self._delivered -= n
                self._counters["delivered_evicted"] += n
        for priority in reversed(CLASSES):
            if need <= 0:
                break
            lo, hi = class_range(priority)
            cutoff, n = None, 0
            cur = db.execute(
                "SELECT id, length(payload) + length(topic) + length(stream) + 32, payload "
                "FROM records WHERE id >= ? AND id < ? ORDER BY id",
                (lo, hi),
            )
            telemetry = priority == Priority.TELEMETRY
            try:
                for rid, size, payload in cur:
                    cutoff, n, need = rid, n + 1, need - size
                    if telemetry:
                        self._counters["evicted_windows"] += windows_of(payload)
                    if need <= 0:
                        break
            finally:
                cur.close()
            if cutoff is not None:
                db.execute("DELETE FROM records WHERE id >= ? AND id <= ?", (lo, cutoff))
                evicted[priority] = n
        return evicted

    def _count_evictions(
        self,
        evicted: dict[int, int],
        *,
        merged: int = 0,
        budget: bool = True,
        windows: int = 0,
        coarsened_windows: int = 0,
    ) -> None:
        """Count evictions (per class, and the telemetry ``windows`` they held), ``merged``
        records and ``coarsened_windows``; log budget episodes (``budget``), their first
        eviction and lost alerts once each."""
        total = sum(evicted.values())
        alerts = evicted.get(int(Priority.ALERT), 0)
        self._pending -= total + merged
        self._counters["evicted_windows"] += windows
        self._counters["coarsened_windows"] += coarsened_windows
        self._counters["evicted"] += total
        self._counters["evicted_alerts"] += alerts
        self._counters["coarsened"] += merged
        budget_mib = self.disk_budget_bytes / 2**20
        if budget and not self._evicting:
            self._evicting = True
            self._alerts_lost = False
            self._evict_warned = total > 0
            if self.coarsen_windows:
                log.warning(
                    "outbox over its disk budget of %.1f MiB (uplink down?): merging the oldest "
                    "telemetry into messages of up to %d windows, then evicting the oldest "
                    "records, telemetry first (%d merged, %d evicted now)",
                    budget_mib,
                    self.coarsen_windows,
                    merged,
                    total,
                )
            else:
                log.warning(
                    "outbox over its disk budget of %.1f MiB (uplink down?): evicting the oldest "
                    "records, telemetry first (%d evicted now)",
                    budget_mib,
                    total,
                )
        elif budget and total and not self._evict_warned:
            self._evict_warned = True
            log.warning(
                "outbox over its disk budget of %.1f MiB with all its telemetry merged as far "
                "as outbox.coarsen_windows allows: evicting the oldest records now (%d evicted)",
                budget_mib,
                total,
            )
        else:
            log.debug("outbox evicted %d and merged %d record(s)", total, merged)
        if alerts and not self._alerts_lost:
            self._alerts_lost = True
            log.error(
                "outbox holds nothing but alerts and is out of room: evicting the oldest alerts "
                "(%d lost now, %d in total)",
                alerts,
                self._counters["evicted_alerts"],
            )
