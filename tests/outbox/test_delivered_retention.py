"""Retention of delivered telemetry for ``backfill`` (``outbox.keep_delivered_s``): settled
telemetry is kept (alerts are not), ``take`` never returns it, it is pruned by age and goes
first when the disk budget needs room; ``requeue_delivered`` queues a range of it again, after
every live record, with the same payload bytes."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import msgspec
from outboxhelp import FakeClock

from appliance.contracts import Envelope, Priority
from appliance.outbox import SqliteOutbox
from appliance.outbox.layout import class_range

APP = "app-01"
T0 = 1_700_000_000.0


def telemetry(machine: str, ts: float, size: int = 4) -> Envelope:
    return Envelope(
        f"telemetry/{machine}",
        "telemetry",
        f"edge/{APP}/telemetry/{machine}",
        Priority.TELEMETRY,
        ts,
        {"machine": machine, "channels": {f"c{i}": {"n": 10, "mean": ts + i} for i in range(size)}},
    )


def alert(machine: str, ts: float) -> Envelope:
    return Envelope(
        f"alerts/{machine}", "alert", f"edge/{APP}/alerts/{machine}", Priority.ALERT, ts, {"r": 1}
    )


def outbox(tmp_path: Path, clock: FakeClock, keep: float = 3600.0, **kw: Any) -> SqliteOutbox:
    return SqliteOutbox(
        str(tmp_path / "o.sqlite"), appliance_id=APP, keep_delivered_s=keep, clock=clock, **kw
    )


def deliver_all(ob: SqliteOutbox) -> list[int]:
    ids = [r.id for r in ob.take(100_000)]
    ob.settle(ids)
    return ids


def test_settled_telemetry_is_kept_and_never_taken_again_while_alerts_are_deleted(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    with outbox(tmp_path, clock) as ob:
        ob.append([telemetry("cnc-1", T0 + i) for i in range(5)] + [alert("cnc-1", T0)])
        deliver_all(ob)
        assert ob.take(100) == [] and ob.pending == 0
        stats = ob.stats()
        assert stats["delivered"] == 5 and stats["delivered_kept"] == 5
        assert stats["published"] == 6
        summary = ob.delivered_summary()
        assert (summary["oldest_ts"], summary["newest_ts"]) == (T0, T0 + 4)
    with outbox(tmp_path, clock) as ob:  # a restart keeps them
        assert ob.stats()["delivered"] == 5 and ob.take(100) == []


def test_without_retention_settle_deletes_as_before_and_a_kept_table_is_dropped(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    with outbox(tmp_path, clock) as ob:
        ob.append([telemetry("cnc-1", T0 + i) for i in range(3)])
        deliver_all(ob)
    with outbox(tmp_path, clock, keep=0.0) as ob:
        ob.append([telemetry("cnc-1", T0 + 9)])
        deliver_all(ob)
        assert ob.stats()["delivered"] == 0
        assert ob.requeue_delivered(T0, T0 + 10) == (0, None)
    db = sqlite3.connect(tmp_path / "o.sqlite")
    tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    db.close()
    assert "delivered" not in tables and "records" in tables


def test_delivered_telemetry_older_than_the_retention_is_pruned(tmp_path: Path) -> None:
    clock = FakeClock()
    with outbox(tmp_path, clock, keep=60.0) as ob:
        ob.append([telemetry("cnc-1", T0 + i) for i in range(3)])
        deliver_all(ob)
        clock.now += 61.0
        ob.append([telemetry("cnc-1", clock.now)])
        deliver_all(ob)  # prunes the three older than 60 s, keeps the new one
        stats = ob.stats()
        assert stats["delivered"] == 1 and stats["delivered_pruned"] == 3
        assert ob.delivered_summary()["oldest_ts"] == clock.now


def test_requeue_queues_exactly_the_range_after_every_live_record_with_the_same_bytes(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    with outbox(tmp_path, clock) as ob:
        ob.append([telemetry(m, T0 + i) for i in range(10) for m in ("cnc-1", "cnc-2")])
        sent = {r.id: r for r in ob.take(1000)}
        ob.settle(list(sent))
        by_ts = {(r.stream, msgspec.json.decode(r.payload)["ts"]): r.payload for r in sent.values()}
        assert ob.requeue_delivered(T0 + 3, T0 + 6, ["telemetry/cnc-2"]) == (4, None)
        ob.append([telemetry("cnc-1", T0 + 20), alert("cnc-1", T0 + 20)])  # live, after
        taken = ob.take(100)
        assert [r.priority for r in taken] == [Priority.ALERT, Priority.TELEMETRY] + [
            Priority.BACKFILL
        ] * 4
        again = taken[2:]
        lo, hi = class_range(int(Priority.BACKFILL))
        assert all(lo <= r.id < hi for r in again)
        assert [msgspec.json.decode(r.payload)["ts"] for r in again] == [
            T0 + i for i in (3, 4, 5, 6)
        ]
        assert [r.payload for r in again] == [
            by_ts[("telemetry/cnc-2", T0 + i)] for i in (3, 4, 5, 6)
        ]
        assert ob.stats()["backfill_queued"] == 4 and ob.pending == 6
        ob.settle([r.id for r in taken])
        assert ob.pending == 0 and ob.stats()["delivered"] == 21  # copies are not kept twice
        assert ob.requeue_delivered(T0 + 100, T0 + 200) == (0, None)


def test_over_budget_delivered_copies_go_before_any_undelivered_record(tmp_path: Path) -> None:
    clock = FakeClock()
    # 1 MiB: ~0.8 MiB for the database; records of ~1.6 KB
    with outbox(tmp_path, clock, disk_budget_mb=1.0) as ob:
        for i in range(30):  # ~0.5 MB delivered
            ob.append([telemetry("cnc-1", T0 + i * 10 + k, size=40) for k in range(10)])
            deliver_all(ob)
        kept = ob.stats()["delivered"]
        assert kept == 300
        for i in range(25):  # ~0.4 MB undelivered on top: over budget
            ob.append([telemetry("cnc-2", T0 + i * 10 + k, size=40) for k in range(10)])
        stats = ob.stats()
        assert (
            stats["delivered_evicted"] > 0
            and stats["delivered"] == kept - stats["delivered_evicted"]
        )
        assert stats["evicted"] == 0 and stats["coarsened"] == 0
        assert ob.pending == 250
        assert ob.delivered_summary()["oldest_ts"] > T0  # the oldest went first


def test_on_a_full_disk_delivered_copies_are_deleted_before_undelivered_records(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    with outbox(tmp_path, clock) as ob:
        for i in range(20):
            ob.append([telemetry("cnc-1", T0 + i * 10 + k, size=40) for k in range(10)])
            deliver_all(ob)
        ob.append([telemetry("cnc-2", T0 + k, size=40) for k in range(50)])
        db = ob._conn  # SQLite's max_page_count raises exactly the error a full disk does
        db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
        ob.append([telemetry("cnc-3", T0 + k, size=40) for k in range(50)])
        stats = ob.stats()
        assert stats["disk_full"] >= 1 and stats["disk_full_failed"] == 0
        assert stats["delivered_evicted"] > 0 and stats["evicted"] == 0
        assert stats["delivered"] == 200 - stats["delivered_evicted"]
        assert ob.pending == 100


def test_requeue_in_chunks_queues_the_same_records_as_one_call(tmp_path: Path) -> None:
    clock = FakeClock()
    with outbox(tmp_path, clock) as ob:
        ob.append([telemetry(m, T0 + i) for i in range(10) for m in ("cnc-1", "cnc-2")])
        deliver_all(ob)
        whole, cursor = ob.requeue_delivered(T0 + 2, T0 + 8)
        assert (whole, cursor) == (14, None)
        one = [r.payload for r in ob.take(100)]
        ob.settle([r.id for r in ob.take(100)])
        chunks, cursor, calls = [], None, 0
        while True:
            n, cursor = ob.requeue_delivered(T0 + 2, T0 + 8, limit=3, after=cursor)
            chunks.append(n)
            calls += 1
            if cursor is None:
                break
        assert sum(chunks) == 14 and max(chunks) == 3 and calls >= 5
        assert [r.payload for r in ob.take(100)] == one  # the same records, in the same order


def test_backfill_records_get_fresh_ids_across_requeues_appends_and_a_restart(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    with outbox(tmp_path, clock) as ob:
        ob.append([telemetry("cnc-1", T0 + i) for i in range(5)])
        deliver_all(ob)
        ob.requeue_delivered(T0, T0 + 4)
        ob.append([telemetry("cnc-1", T0 + 9)])
        ob.requeue_delivered(T0, T0 + 4)
        first = [r.id for r in ob.take(100)]
    with outbox(tmp_path, clock) as ob:  # the queued copies survive; new ones come after
        assert ob.pending == 11
        ob.requeue_delivered(T0, T0 + 4)
        ids = [r.id for r in ob.take(100)]
    assert ids[:11] == first and len(set(ids)) == 16 and ids == sorted(ids)
