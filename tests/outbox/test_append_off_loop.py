"""Appends off the event loop (issue 11): the transaction, its commit and its fsync run in the
outbox's writer thread while the loop keeps running; the records count as stored only when the
awaitable returns, and the uplink's ``take`` never sees a record before its commit."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import zlib
from pathlib import Path

from outboxhelp import APP, telemetry

from appliance.outbox import SqliteOutbox


def test_loop_keeps_running_and_take_sees_nothing_until_the_threads_commit_returns(
    tmp_path: Path,
) -> None:
    box = SqliteOutbox(str(tmp_path / "o.sqlite"), appliance_id=APP)
    box.open()
    release = threading.Event()
    in_thread = threading.Event()
    configure = box._configure

    def hold_before_commit(sql: str) -> None:  # rows inserted, COMMIT not yet run
        if sql.strip().upper() == "COMMIT" and threading.current_thread().name != "MainThread":
            in_thread.set()
            assert release.wait(10.0)

    def configure_held(db: sqlite3.Connection) -> None:
        configure(db)
        db.set_trace_callback(hold_before_commit)

    box._configure = configure_held  # type: ignore[method-assign]
    seen_while_writing: list[int] = []

    async def scenario() -> list[int]:
        task = asyncio.create_task(box.append_off_loop([telemetry(f"m{i}", 1.0) for i in range(5)]))
        for _ in range(500):  # the loop is free while the thread holds the transaction
            await asyncio.sleep(0.002)
            if in_thread.is_set():
                break
        assert in_thread.is_set()
        seen_while_writing.append(len(box.take(100)))
        seen_while_writing.append(box.pending)
        release.set()
        records = await task
        return [r.seq for r in records]

    seqs = asyncio.run(scenario())
    assert seen_while_writing == [0, 0]  # not stored yet: neither taken nor counted
    assert seqs == [1] * 5 and box.pending == 5
    assert sorted(r.stream for r in box.take(100)) == [f"telemetry/m{i}" for i in range(5)]
    box.close()


def test_off_loop_and_loop_appends_share_one_sequence_per_stream_across_a_reopen(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "o.sqlite")
    box = SqliteOutbox(path, appliance_id=APP)
    box.open()

    async def scenario() -> None:
        await box.append_off_loop([telemetry("m1", 1.0), telemetry("m1", 2.0)])
        await box.append_off_loop([telemetry(f"m{i}", 1.0) for i in range(2, 150)])  # 3 INSERTs
        box.append([telemetry("m1", 3.0)])
        await box.append_off_loop([telemetry("m1", 4.0)])

    asyncio.run(scenario())
    box.close()
    again = SqliteOutbox(path, appliance_id=APP)
    again.open()
    assert [r.seq for r in again.take(1000) if r.stream == "telemetry/m1"] == [1, 2, 3, 4]
    assert again.pending == 152 and len(again.take(1000)) == 152  # every CRC32 checked by take
    crcs = again._conn.execute("SELECT crc, payload FROM records").fetchall()
    assert len(crcs) == 152 and all(crc == zlib.crc32(payload) for crc, payload in crcs)
    again.append([telemetry("m1", 5.0)])
    assert [r.seq for r in again.take(1000) if r.stream == "telemetry/m1"][-1] == 5
    again.close()


def test_an_append_over_the_budget_is_done_on_the_loop_with_eviction(tmp_path: Path) -> None:
    box = SqliteOutbox(str(tmp_path / "o.sqlite"), appliance_id=APP, disk_budget_mb=0.5)
    box.open()
    big = "x" * 2000

    async def scenario() -> None:
        for k in range(150):
            await box.append_off_loop([telemetry("m1", float(k), pad=big)])

    asyncio.run(scenario())
    stats = box.stats()
    assert stats["appended"] == 150
    assert stats["evicted"] + stats["coarsened"] > 0  # the budget held: older records went
    assert box._used_bytes(box._conn) <= box.disk_budget_bytes
    seqs = [r.seq for r in box.take(1000)]
    assert seqs == sorted(seqs) and seqs[-1] == 150
    box.close()
