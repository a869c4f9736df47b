"""Issue 10: the disk budget covers the WAL; records carry a CRC32 and a damaged one is
quarantined, never published; message ids stay unique across outbox files; eviction and
coarsening are counted in windows too."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

import msgspec
import pytest

from appliance.contracts import Envelope, Priority
from appliance.outbox import SqliteOutbox
from appliance.outbox.budget import windows_of

APP = "app-01"


def telemetry(machine: str = "cnc-1", i: int = 0, channels: int = 4) -> Envelope:
    """A telemetry window message of the downsampler's shape (mergeable)."""
    stats = {"n": 10, "mean": 1.5 + i, "min": 0.25, "max": 2.75 + i}
    return Envelope(
        f"telemetry/{machine}",
        "telemetry",
        f"edge/{APP}/telemetry/{machine}",
        Priority.TELEMETRY,
        float(i + 1),
        {
            "machine": machine,
            "window": {"start": float(i), "end": float(i + 1)},
            "channels": {f"channel_{c:02d}": stats for c in range(channels)},
        },
    )


def test_the_disk_budget_covers_the_wal(tmp_path: Path) -> None:
    budget_mb = 0.5
    path = tmp_path / "o.sqlite"
    with SqliteOutbox(str(path), appliance_id=APP, disk_budget_mb=budget_mb) as ob:
        peak = 0
        for _ in range(200):
            ob.append([telemetry(m, channels=12) for m in ("a", "b", "c", "d")])
            files = [path, Path(f"{path}-wal")]
            used = ob._used_bytes(ob._conn) + os.path.getsize(files[1])
            peak = max(peak, used)
        assert ob.stats()["evicted"] + ob.stats()["coarsened"] > 0  # the budget was reached
    assert peak <= budget_mb * 2**20


def damage_payload(path: Path, rid: int) -> None:
    """Flip bytes inside one stored payload, as a failing medium would (structure intact)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        (payload,) = db.execute("SELECT payload FROM records WHERE id = ?", (rid,)).fetchone()
        bad = payload[:20] + bytes(b ^ 0x5A for b in payload[20:40]) + payload[40:]
        db.execute("UPDATE records SET payload = ? WHERE id = ?", (bad, rid))
    finally:
        db.close()


def test_a_damaged_record_is_quarantined_never_published(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "o.sqlite"
    with SqliteOutbox(str(path), appliance_id=APP) as ob:
        recs = ob.append([telemetry(f"m{i}") for i in range(5)])
    damage_payload(path, recs[1].id)
    damage_payload(path, recs[3].id)
    with SqliteOutbox(str(path), appliance_id=APP) as ob, caplog.at_level(logging.ERROR):
        assert [r.id for r in ob.take(2)] == [recs[0].id, recs[2].id]
        assert [r.id for r in ob.take(10, exclude={recs[0].id, recs[2].id})] == [recs[4].id]
        stats = ob.stats()
        assert (stats["quarantined"], stats["pending"]) == (2, 3)
        kept = ob._conn.execute("SELECT id FROM quarantine ORDER BY id").fetchall()
        assert [k for (k,) in kept] == [recs[1].id, recs[3].id]  # kept aside, for inspection
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "CRC32" in errors[0].getMessage()  # once per episode


def test_a_version_1_file_is_migrated_on_open_and_its_rows_published_unverified(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE streams (stream TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
        CREATE TABLE records (id INTEGER PRIMARY KEY, stream TEXT NOT NULL, seq INTEGER NOT NULL,
            priority INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
            created REAL NOT NULL);
        PRAGMA user_version = 1;
        """
    )
    old = b'{"v":1,"kind":"telemetry","seq":7,"id":"app-01/telemetry/m/7"}'
    db.execute(
        "INSERT INTO records VALUES (?, 'telemetry/m', 7, 2, 't', ?, 1.0)", (2 << 48 | 3, old)
    )
    db.execute("INSERT INTO streams VALUES ('telemetry/m', 7)")
    db.close()
    with SqliteOutbox(str(path), appliance_id=APP) as ob:
        assert [r.payload for r in ob.take(5)] == [old]
        (new,) = ob.append([telemetry("m")])
        assert new.seq == 8 and f'"epoch":{ob.epoch},' in new.payload.decode()
        assert ob._conn.execute("PRAGMA user_version").fetchone()[0] == 2
    check = sqlite3.connect(path)
    crcs = check.execute("SELECT seq, crc FROM records ORDER BY id").fetchall()
    check.close()
    assert crcs[0] == (7, None) and crcs[1][1] is not None


@pytest.mark.parametrize("how", ["removed", "replaced by an empty file", "corrupt"])
def test_a_new_outbox_file_never_reuses_message_ids(tmp_path: Path, how: str) -> None:
    path = tmp_path / "o.sqlite"
    with SqliteOutbox(str(path), appliance_id=APP) as ob:
        first = {msgspec.json.decode(r.payload)["id"] for r in ob.append([telemetry()] * 3)}
    time.sleep(0.002)
    for sfx in ("", "-wal", "-shm"):
        Path(f"{path}{sfx}").unlink(missing_ok=True)
    if how == "replaced by an empty file":
        path.write_bytes(b"")
    elif how == "corrupt":
        path.write_bytes(b"garbage" * 100)
    with SqliteOutbox(str(path), appliance_id=APP) as ob:
        recs = ob.append([telemetry()] * 3)
        again = {msgspec.json.decode(r.payload)["id"] for r in recs}
    assert [r.seq for r in recs] == [1, 2, 3]  # one behaviour: a new epoch, seq from 1
    assert first.isdisjoint(again)


def test_eviction_and_coarsening_are_counted_in_windows_too(tmp_path: Path) -> None:
    n = 3000
    with SqliteOutbox(str(tmp_path / "o.sqlite"), appliance_id=APP, disk_budget_mb=0.25) as ob:
        for i in range(n):
            ob.append([telemetry("m", i, channels=40)])
        stats = ob.stats()
        kept = sum(windows_of(r.payload) for r in ob.take(100_000))
    assert stats["coarsened"] > 0 and stats["coarsened_windows"] >= stats["coarsened"]
    assert stats["evicted"] > 0 and stats["evicted_windows"] > stats["evicted"]
    # every window appended is still pending (alone or merged) or counted as evicted
    assert stats["evicted_windows"] + kept == n
