"""Settles off the event loop (issue 11): ``settle_soon`` deletes acknowledged records in the
outbox's writer thread. The ids leave ``take`` at once, the records leave the file only with
the commit: a crash before it re-sends them once (the subscriber's dedup by id tolerates that),
one after it never brings them back."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

from appliance.contracts import Envelope, Priority
from appliance.outbox import SqliteOutbox

APP = "app-01"
WRITES = ("BEGIN", "INSERT", "DELETE", "UPDATE", "COMMIT", "REPLACE")


def telemetry(machine: str, ts: float) -> Envelope:
    return Envelope(
        stream=f"telemetry/{machine}",
        kind="telemetry",
        topic=f"edge/{APP}/telemetry/{machine}",
        priority=Priority.TELEMETRY,
        ts=ts,
        body={"mean": {"rpm": 1200.0}},
    )


def hold_writer_before_commit(box: SqliteOutbox) -> tuple[threading.Event, threading.Event]:
    """The writer thread's next COMMIT waits for ``release``; ``reached`` says it got there."""
    release, reached = threading.Event(), threading.Event()
    configure = box._configure

    def hold(sql: str) -> None:
        if sql.strip().upper() == "COMMIT" and threading.current_thread().name != "MainThread":
            reached.set()
            assert release.wait(10.0)

    def configure_held(db: sqlite3.Connection) -> None:
        configure(db)
        db.set_trace_callback(hold)

    box._configure = configure_held  # type: ignore[method-assign]
    return release, reached


async def until(flag: threading.Event) -> None:
    for _ in range(2500):
        if flag.is_set():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("the writer thread never got there")


def test_settling_ids_leave_take_at_once_and_the_file_only_with_the_commit(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.sqlite"
    box = SqliteOutbox(str(path), appliance_id=APP)
    box.open()
    box.append([telemetry(f"m{i}", 1.0) for i in range(10)])
    ids = [r.id for r in box.take(100)]
    release, reached = hold_writer_before_commit(box)
    seen: dict[str, Any] = {}

    async def scenario() -> None:
        done = box.settle_soon(ids[:6])
        await until(reached)  # deleted in the thread's transaction, not committed
        seen["take"] = [r.id for r in box.take(100)]
        seen["pending"] = box.pending
        # what a crash now would leave on disk: the file and its WAL as they are
        for suffix in ("", "-wal"):
            src = Path(f"{path}{suffix}")
            if src.exists():
                shutil.copy(src, tmp_path / f"crashed.sqlite{suffix}")
        release.set()
        await done
        seen["after"] = [r.id for r in box.take(100)]

    asyncio.run(scenario())
    assert seen["take"] == ids[6:]  # never handed out again, though not deleted yet
    assert seen["pending"] == 10  # counted when the commit has returned
    assert seen["after"] == ids[6:] and box.pending == 4
    assert box.stats()["published"] == 6
    box.close()

    crashed = SqliteOutbox(str(tmp_path / "crashed.sqlite"), appliance_id=APP)
    crashed.open()  # a crash between the PUBACKs and the settle's commit: all 10 sent again
    assert [r.id for r in crashed.take(100)] == ids and crashed.pending == 10
    crashed.close()
    again = SqliteOutbox(str(path), appliance_id=APP)
    again.open()  # after the commit: the settled records never come back
    assert [r.id for r in again.take(100)] == ids[6:] and again.pending == 4
    again.close()


def test_settle_soon_runs_no_write_on_the_loops_connection(tmp_path: Path) -> None:
    box = SqliteOutbox(str(tmp_path / "o.sqlite"), appliance_id=APP, keep_delivered_s=60.0)
    box.open()
    on_loop: list[str] = []

    async def scenario() -> None:
        for k in range(3):
            await box.append_off_loop([telemetry(f"m{i}", float(k)) for i in range(20)])
        box._conn.set_trace_callback(on_loop.append)
        records = box.take(100)
        await box.settle_soon([r.id for r in records[:50]])
        await box.settle_soon([r.id for r in records[50:]])
        box._conn.set_trace_callback(None)

    asyncio.run(scenario())
    writes = [sql for sql in on_loop if sql.lstrip().upper().startswith(WRITES)]
    assert writes == []
    assert box.pending == 0 and box.stats()["published"] == 60
    assert box.stats()["delivered_kept"] == 60  # kept for backfill, in the thread
    box.close()


def test_a_settle_the_thread_cannot_do_is_done_on_the_loop(tmp_path: Path) -> None:
    box = SqliteOutbox(str(tmp_path / "o.sqlite"), appliance_id=APP)
    box.open()
    box.append([telemetry(f"m{i}", 1.0) for i in range(5)])
    ids = [r.id for r in box.take(100)]

    def broken(*_: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    box._settle_in_thread = broken  # type: ignore[assignment,method-assign]

    async def scenario() -> None:
        await box.settle_soon(ids)

    asyncio.run(scenario())
    assert box.pending == 0 and box.take(100) == [] and box.stats()["published"] == 5
    box.close()


def test_close_accounts_for_a_settle_the_loop_never_harvested(tmp_path: Path) -> None:
    path = str(tmp_path / "o.sqlite")
    box = SqliteOutbox(path, appliance_id=APP)
    box.open()
    box.append([telemetry(f"m{i}", 1.0) for i in range(5)])
    ids = [r.id for r in box.take(100)]

    async def scenario() -> None:
        box.settle_soon(ids[:3])  # the loop ends before the callback runs

    asyncio.run(scenario())
    box.close()
    assert box.stats()["published"] == 3 and box.pending == 2
    again = SqliteOutbox(path, appliance_id=APP)
    again.open()
    assert [r.id for r in again.take(100)] == ids[3:]
    again.close()
