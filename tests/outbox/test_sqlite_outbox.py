"""The SQLite outbox: ordering, sequence numbers, durability across reopen, settle, eviction."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from outboxhelp import APP, FakeClock, telemetry

from appliance.config import OutboxSection
from appliance.contracts import Envelope, Priority
from appliance.outbox import SqliteOutbox
from appliance.payload import encode_payload


def alert(machine: str = "cnc-1", ts: float = 1.0, **body: Any) -> Envelope:
    return Envelope(
        stream=f"alerts/{machine}",
        kind="alert",
        topic=f"edge/{APP}/alerts/{machine}",
        priority=Priority.ALERT,
        ts=ts,
        body=body or {"rule": "overheat", "state": "raised"},
    )


def status(ts: float = 1.0) -> Envelope:
    return Envelope(
        stream="status",
        kind="status",
        topic=f"edge/{APP}/status",
        priority=Priority.STATUS,
        ts=ts,
        body={"state": "online"},
    )


def outbox(path: Path, **kwargs: Any) -> SqliteOutbox:
    kwargs.setdefault("appliance_id", APP)
    return SqliteOutbox(str(path / "outbox.sqlite"), **kwargs)


def test_construction_does_no_io_and_open_creates_the_directory_in_wal_mode(
    tmp_path: Path,
) -> None:
    ob = SqliteOutbox(str(tmp_path / "a" / "b" / "o.sqlite"), appliance_id=APP)
    assert not (tmp_path / "a").exists()
    with ob:
        assert (tmp_path / "a" / "b" / "o.sqlite").exists()
        db = sqlite3.connect(ob.path)
        try:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            db.close()
    ob.close()  # idempotent


def test_from_config_uses_the_outbox_section(tmp_path: Path) -> None:
    cfg = OutboxSection(path=str(tmp_path / "o.sqlite"), synchronous="NORMAL", disk_budget_mb=2)
    ob = SqliteOutbox.from_config(cfg, appliance_id=APP)
    assert (ob.path, ob.synchronous) == (cfg.path, "NORMAL")
    assert ob.disk_budget_bytes + ob.wal_bytes == 2 * 2**20  # the budget covers the WAL


def test_invalid_synchronous_level_is_refused() -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SqliteOutbox("x.sqlite", appliance_id=APP, synchronous="OFF")  # type: ignore[arg-type]


def test_using_a_closed_outbox_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not open"):
        outbox(tmp_path).append([telemetry()])


def test_payload_carries_the_header_then_the_body(tmp_path: Path) -> None:
    with outbox(tmp_path) as ob:
        (rec,) = ob.append([telemetry(ts=12.5, mean={"rpm": 1.5}, n=np.int32(3))])
        epoch = ob.epoch
    assert msgspec.json.decode(rec.payload) == {
        "v": 1,
        "kind": "telemetry",
        "appliance": APP,
        "stream": "telemetry/cnc-1",
        "epoch": epoch,
        "seq": 1,
        "id": f"{APP}/telemetry/cnc-1/{epoch}/1",
        "ts": 12.5,
        "mean": {"rpm": 1.5},
        "n": 3,
    }
    assert list(msgspec.json.decode(rec.payload))[:8] == [
        "v",
        "kind",
        "appliance",
        "stream",
        "epoch",
        "seq",
        "id",
        "ts",
    ]


@pytest.mark.parametrize(
    "env",
    [
        telemetry(ts=1.0),
        Envelope('we"ird\\strea\u00e9m', "k\nind", "t", Priority.STATUS, 1e-7, {}),
        Envelope("s", "k", "t", Priority.ALERT, float("nan"), {"x": [1, 2.5, None, "\u2603"]}),
        Envelope("s", "k", "t", Priority.ALERT, 3, {"nested": {"a": {"b": True}}}),
    ],
)
def test_append_encodes_the_same_bytes_as_the_reference_encoder(
    tmp_path: Path, env: Envelope
) -> None:
    with outbox(tmp_path, appliance_id='a"pp') as ob:
        ob.append([env])
        (rec,) = ob.append([env])
    assert rec.payload == encode_payload('a"pp', env, 2, ob.epoch)
    msgspec.json.decode(rec.payload)


def test_a_body_using_a_header_key_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    with outbox(tmp_path) as ob:
        with pytest.raises(ValueError, match="seq"):
            ob.append([telemetry(), telemetry(seq=5)])
        assert ob.pending == 0
        assert ob.append([telemetry()])[0].seq == 1


def test_seq_is_monotonic_per_stream_and_survives_reopen(tmp_path: Path) -> None:
    with outbox(tmp_path) as ob:
        recs = ob.append([telemetry("a"), telemetry("b"), telemetry("a"), alert("a")])
        assert [(r.stream, r.seq) for r in recs] == [
            ("telemetry/a", 1),
            ("telemetry/b", 1),
            ("telemetry/a", 2),
            ("alerts/a", 1),
        ]
        ob.settle([r.id for r in recs])  # all delivered: the seq must still not restart
        assert ob.pending == 0
    with outbox(tmp_path) as ob:
        recs = ob.append([telemetry("a"), telemetry("b")])
        assert [(r.stream, r.seq) for r in recs] == [("telemetry/a", 3), ("telemetry/b", 2)]
        assert [r.seq for r in ob.append([telemetry("a")] * 3)] == [4, 5, 6]


def test_take_orders_alerts_then_status_then_telemetry_and_each_stream_by_seq(
    tmp_path: Path,
) -> None:
    with outbox(tmp_path) as ob:
        ob.append([telemetry("a"), telemetry("b"), telemetry("a")])
        ob.append([status(), alert("b")])
        ob.append([telemetry("a"), alert("a"), alert("b")])
        taken = ob.take(100)
        assert [(r.stream, r.seq) for r in taken] == [
            ("alerts/b", 1),
            ("alerts/a", 1),
            ("alerts/b", 2),
            ("status", 1),
            ("telemetry/a", 1),
            ("telemetry/b", 1),
            ("telemetry/a", 2),
            ("telemetry/a", 3),
        ]
        assert [r.priority for r in taken] == [0, 0, 0, 1, 2, 2, 2, 2]
        assert ob.take(3) == taken[:3]


def test_take_skips_records_in_flight_and_leaves_everything_stored(tmp_path: Path) -> None:
    with outbox(tmp_path) as ob:
        recs = ob.append([telemetry() for _ in range(6)])
        first = ob.take(2)
        assert first == recs[:2]
        second = ob.take(2, exclude=[r.id for r in first])
        assert second == recs[2:4]
        assert ob.take(10, exclude={r.id for r in recs}) == []
        assert ob.pending == 6
        assert ob.take(0) == []


def test_unsettled_records_survive_reopen_and_settled_ones_do_not(tmp_path: Path) -> None:
    with outbox(tmp_path) as ob:
        recs = ob.append([telemetry(ts=float(i)) for i in range(5)] + [alert()])
        ob.settle([recs[0].id, recs[2].id])
    with outbox(tmp_path) as ob:
        assert ob.pending == 4
        assert ob.take(10) == [recs[5], recs[1], recs[3], recs[4]]
        newer = ob.append([telemetry()])
        assert newer[0].id > recs[4].id  # ids keep growing after a restart


def test_settle_deletes_accepted_and_rejected_and_counts_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    with outbox(tmp_path, clock=clock) as ob:
        recs = ob.append([telemetry("a"), telemetry("a"), alert("b")])
        clock.now += 7.5
        assert ob.stats()["oldest_age_s"] == 7.5
        with caplog.at_level(logging.WARNING, logger="appliance.outbox"):
            ob.settle([recs[0].id], rejected=[recs[2].id, 999])
        assert "1 record(s) rejected" in caplog.text
        assert f"edge/{APP}/alerts/b" in caplog.text
        assert ob.take(10) == [recs[1]]
        ob.settle([recs[0].id])  # already gone: ignored
        stats = ob.stats()
        assert stats == {
            "appended": 3,
            "published": 1,
            "rejected": 1,
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
            "pending": 1,
            "delivered": 0,
            "oldest_age_s": 7.5,
        }
        ob.settle([recs[1].id])
        assert ob.stats()["pending"] == 0
        assert ob.stats()["oldest_age_s"] == 0.0


def used_bytes(ob: SqliteOutbox) -> int:
    db = sqlite3.connect(ob.path)
    try:
        pages, free, size = (
            db.execute(f"PRAGMA {p}").fetchone()[0]
            for p in ("page_count", "freelist_count", "page_size")
        )
        return int((pages - free) * size)
    finally:
        db.close()


def test_over_the_disk_budget_the_oldest_telemetry_goes_first_and_alerts_stay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    budget_mb = 0.25
    with outbox(tmp_path, disk_budget_mb=budget_mb) as ob:
        alerts = ob.append([alert(n=i) for i in range(20)])
        pad = "x" * 200
        with caplog.at_level(logging.WARNING, logger="appliance.outbox"):
            for _ in range(40):
                ob.append([telemetry(pad=pad) for _ in range(50)])
        stats = ob.stats()
        assert stats["evicted"] > 0
        assert stats["evicted_alerts"] == 0
        assert stats["appended"] == 20 + 40 * 50
        assert stats["pending"] == 20 + 40 * 50 - stats["evicted"]
        assert caplog.text.count("over its disk budget") == 1  # one warning per episode
        assert used_bytes(ob) <= budget_mb * 2**20
        left = ob.take(10_000)
        assert left[:20] == alerts
        seqs = [r.seq for r in left[20:]]
        assert seqs == list(range(seqs[0], 40 * 50 + 1))  # the newest, without holes
        assert seqs[0] == stats["evicted"] + 1


def test_when_only_alerts_remain_the_oldest_alerts_are_evicted_with_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with outbox(tmp_path, disk_budget_mb=0.25) as ob:
        with caplog.at_level(logging.WARNING, logger="appliance.outbox"):
            for _ in range(40):
                ob.append([alert(pad="y" * 200) for _ in range(50)])
        stats = ob.stats()
        assert stats["evicted_alerts"] == stats["evicted"] > 0
        assert any(r.levelno == logging.ERROR and "alerts" in r.message for r in caplog.records)
        seqs = [r.seq for r in ob.take(10_000)]
        assert seqs == list(range(int(stats["evicted"]) + 1, 40 * 50 + 1))


def test_an_eviction_episode_ends_when_the_backlog_drains(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with outbox(tmp_path, disk_budget_mb=0.25) as ob:
        with caplog.at_level(logging.INFO, logger="appliance.outbox"):
            for _ in range(2):
                for _ in range(30):
                    ob.append([telemetry(pad="z" * 200) for _ in range(50)])
                while batch := ob.take(500):
                    ob.settle([r.id for r in batch])
        assert caplog.text.count("over its disk budget") == 2
        assert caplog.text.count("eviction episode over") == 2


def test_settle_is_not_fsynced_but_leaves_appends_at_the_configured_level(tmp_path: Path) -> None:
    with outbox(tmp_path, synchronous="FULL") as ob:
        recs = ob.append([telemetry(), telemetry()])
        ob.settle([recs[0].id])
        db = ob._conn  # the connection's level after a settle: FULL again (2)
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert ob.take(5) == [recs[1]]


def test_take_skips_fragmented_exclusions_in_sql_and_beyond_the_run_limit(tmp_path: Path) -> None:
    """Excluded ids as a few runs (SQL form) and as many single ids (the scanning fallback)
    give the same records: every record not excluded, in drain order."""
    with outbox(tmp_path) as ob:
        recs = ob.append([telemetry() for _ in range(60)] + [alert() for _ in range(4)])
        order = ob.take(100)
        assert len(order) == 64
        for exclude in (
            {order[0].id, order[1].id, order[5].id},  # 2 runs
            {r.id for r in order[1:40:2]},  # 20 runs: past the SQL form's limit
            {r.id for r in recs[10:30]} | {recs[-1].id},
        ):
            want = [r for r in order if r.id not in exclude]
            assert ob.take(100, exclude=exclude) == want
            assert ob.take(3, exclude=sorted(exclude)) == want[:3]


def test_payloads_of_a_batch_sharing_a_timestamp_match_the_reference_encoding(
    tmp_path: Path,
) -> None:
    """append() reuses the encoded ``ts`` of the previous envelope when equal: same bytes."""
    envs = [
        telemetry("cnc-1", ts=5.5),
        telemetry("cnc-2", ts=5.5),
        telemetry("cnc-3", ts=0.0),
        telemetry("cnc-4", ts=-0.0),
        telemetry("cnc-5", ts=5),
        telemetry("cnc-6", ts=5.0),
        Envelope("s", "status", "t", Priority.STATUS, 5.0, {}),
    ]
    with outbox(tmp_path) as ob:
        recs = ob.append(envs)
        for env, rec in zip(envs, recs, strict=True):
            assert rec.payload == encode_payload(APP, env, rec.seq, ob.epoch)
