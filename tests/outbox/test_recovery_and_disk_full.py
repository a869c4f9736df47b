"""The outbox facing a bad file at start and a full disk: move aside, never lose silently."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.contracts import Envelope, Priority
from appliance.outbox import OutboxFullError, SqliteOutbox

APP = "app-01"
NOW = 1_795_000_000.0
STAMP = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(NOW))


def clock() -> float:
    return NOW


def telemetry(machine: str = "cnc-1", pad: str = "") -> Envelope:
    return Envelope(
        f"telemetry/{machine}",
        "telemetry",
        f"edge/{APP}/telemetry/{machine}",
        Priority.TELEMETRY,
        1.0,
        {"pad": pad} if pad else {"x": 1},
    )


def alert(machine: str = "cnc-1") -> Envelope:
    return Envelope(
        f"alerts/{machine}", "alert", f"edge/{APP}/alerts/{machine}", Priority.ALERT, 1.0, {}
    )


def make(path: Path, **kw: object) -> SqliteOutbox:
    return SqliteOutbox(str(path), appliance_id=APP, clock=clock, **kw)  # type: ignore[arg-type]


def valid_outbox(path: Path, n: int = 3) -> bytes:
    """A real outbox with ``n`` pending telemetry records, closed; returns the file's bytes."""
    with make(path) as ob:
        ob.append([telemetry() for _ in range(n)])
    return path.read_bytes()


def not_a_database(path: Path) -> None:
    path.write_bytes(b"this is a text file, not SQLite\n" * 100)


def truncated(path: Path) -> None:
    data = valid_outbox(path, 500)
    path.write_bytes(data[: len(data) // 3 + 100])


def header_only(path: Path) -> None:
    path.write_bytes(valid_outbox(path)[:60])


def wrong_user_version(path: Path) -> None:
    valid_outbox(path)
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 7")
    db.close()


def foreign_schema(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE customers (name TEXT)")
    db.execute("INSERT INTO customers VALUES ('acme')")
    db.commit()
    db.close()


def wrong_columns(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE records (id INTEGER PRIMARY KEY, data BLOB)")
    db.execute("CREATE TABLE streams (stream TEXT PRIMARY KEY, seq INTEGER)")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()


def a_directory(path: Path) -> None:
    path.mkdir()
    (path / "keep.txt").write_text("mine")


BAD_FILES: dict[str, Callable[[Path], None]] = {
    "not a database": not_a_database,
    "truncated": truncated,
    "only the header": header_only,
    "wrong user_version": wrong_user_version,
    "another application's schema": foreign_schema,
    "wrong columns": wrong_columns,
    "a directory": a_directory,
}


def snapshot(path: Path) -> bytes | str:
    return path.read_bytes() if path.is_file() else repr(sorted(os.listdir(path)))


@pytest.mark.parametrize("make_bad", BAD_FILES.values(), ids=list(BAD_FILES))
def test_an_unusable_file_is_moved_aside_untouched_and_a_new_outbox_starts(
    tmp_path: Path, make_bad: Callable[[Path], None], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.sqlite"
    make_bad(path)
    before = snapshot(path)
    with caplog.at_level(logging.ERROR, logger="appliance.outbox"), make(path) as ob:
        (rec,) = ob.append([telemetry()])
        assert ob.stats()["recovered_corrupt"] == 1
        assert ob.pending == 1
    aside = tmp_path / f"outbox.sqlite.corrupt-{STAMP}"
    assert snapshot(aside) == before
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(path) in errors[0] and str(aside) in errors[0]
    # A new epoch (the new file's creation time in ms): its ids differ from the old file's.
    assert rec.seq == 1 and f"/{int(NOW * 1000)}/1" in rec.payload.decode()
    with make(path) as ob:  # the new file is an ordinary outbox now
        assert ob.stats()["recovered_corrupt"] == 0
        assert ob.epoch == int(NOW * 1000)
        assert [r.seq for r in ob.take(5)] == [rec.seq]
        assert ob.append([telemetry("other")])[0].seq == 1


def test_moving_aside_never_overwrites_an_earlier_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    for i in range(3):
        path.write_bytes(b"garbage %d" % i * 50)
        with make(path):
            pass
    names = sorted(p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name)
    stamp = f"outbox.sqlite.corrupt-{STAMP}"
    assert names == [stamp, f"{stamp}-1", f"{stamp}-2"]
    assert [(tmp_path / n).read_bytes() for n in names] == [
        b"garbage %d" % i * 50 for i in range(3)
    ]


def test_the_wal_and_shm_files_move_aside_with_the_database(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    not_a_database(path)
    Path(f"{path}-wal").write_bytes(b"old wal")
    Path(f"{path}-shm").write_bytes(b"old shm")
    with make(path) as ob:
        ob.append([telemetry()])
    aside = f"{path}.corrupt-{STAMP}"
    assert Path(f"{aside}-wal").read_bytes() == b"old wal"
    assert Path(f"{aside}-shm").exists()  # an index SQLite derives from the WAL: may be rebuilt
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").read_bytes() != b"old wal"


def test_an_intact_outbox_is_not_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    valid_outbox(path)
    with make(path) as ob:
        assert ob.pending == 3 and ob.stats()["recovered_corrupt"] == 0
        assert ob.append([telemetry()])[0].seq == 4
    assert [p.name for p in tmp_path.iterdir() if "corrupt" in p.name] == []


def test_a_file_that_cannot_be_moved_aside_is_left_in_place_with_a_clear_error() -> None:
    """The directory is read-only for the outbox's user (``nobody`` via ``setpriv`` when the
    test runs as root, since root may write anywhere)."""
    with tempfile.TemporaryDirectory(prefix="outbox-ro-") as top:
        path = Path(top) / "ro" / "outbox.sqlite"
        path.parent.mkdir()
        not_a_database(path)
        path.chmod(0o666)  # readable and writable, but not renamable: the directory is not
        before = path.read_bytes()
        res = run_as_other_user(path, mode=0o555)
        assert res.returncode == 1, res.stderr
        assert "OutboxError" in res.stderr and "cannot be moved aside" in res.stderr
        assert "move or repair it by hand" in res.stderr
        Path(top, "ro").chmod(0o755)
        assert path.read_bytes() == before
        assert sorted(p.name for p in path.parent.iterdir()) == ["outbox.sqlite"]


def test_a_locked_file_is_not_mistaken_for_a_corrupt_one(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    valid_outbox(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode=DELETE")  # lets an exclusive lock block every reader
    holder.execute("BEGIN EXCLUSIVE")
    try:
        ob = SqliteOutbox(str(path), appliance_id=APP)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            ob.open()  # after waiting sqlite3's default 5 s for the lock
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [p.name for p in tmp_path.iterdir() if "corrupt" in p.name] == []


NOBODY = 65534
_OPEN_SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(message)s")
from appliance.outbox import SqliteOutbox
with SqliteOutbox(sys.argv[1], appliance_id="app-01") as ob:
    print("recovered", ob.stats()["recovered_corrupt"])
"""


def run_as_other_user(path: Path, mode: int) -> subprocess.CompletedProcess[str]:
    """Open an outbox at ``path`` in a subprocess, as ``nobody`` when this runs as root (root
    ignores permissions), with ``path``'s directory set to ``mode``."""
    cmd = [sys.executable, "-c", _OPEN_SCRIPT, str(path)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.fail("running as root needs setpriv (util-linux) to drop privileges")
        cmd = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
        path.parent.parent.chmod(0o755)  # the TemporaryDirectory: let nobody through
    path.parent.chmod(mode)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_a_file_without_read_permission_is_moved_aside() -> None:
    """The file belongs to root with mode 0600 and the outbox runs as ``nobody`` (or the file
    has mode 0000 when the test does not run as root). Made under /tmp: pytest's own temporary
    directories are closed to other users."""
    with tempfile.TemporaryDirectory(prefix="outbox-perm-") as top:
        path = Path(top) / "d" / "outbox.sqlite"
        path.parent.mkdir()
        valid_outbox(path)
        before = path.read_bytes()
        path.chmod(0o600 if os.geteuid() == 0 else 0o000)
        res = run_as_other_user(path, mode=0o777)
        assert res.returncode == 0, res.stderr
        assert "recovered 1" in res.stdout
        assert "permission denied" in res.stderr.lower() and ".corrupt-" in res.stderr
        (aside,) = path.parent.glob("outbox.sqlite.corrupt-*")
        aside.chmod(0o600)
        assert aside.read_bytes() == before


def fill(ob: SqliteOutbox, n_batches: int, batch: int = 50, pad: int = 400) -> None:
    for _ in range(n_batches):
        ob.append([telemetry(pad="x" * pad) for _ in range(batch)])


def limit_pages(ob: SqliteOutbox, extra: int) -> None:
    """Make the database 'full' ``extra`` pages above its current size: SQLite's own
    ``max_page_count`` raises exactly the SQLITE_FULL error a full disk does."""
    db = ob._conn
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages + extra}")


def test_on_a_full_disk_old_telemetry_is_evicted_and_the_append_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with make(tmp_path / "o.sqlite") as ob:
        alerts = ob.append([alert() for _ in range(5)])
        fill(ob, 10)
        limit_pages(ob, 0)
        with caplog.at_level(logging.WARNING, logger="appliance.outbox"):
            recs = ob.append([telemetry("new", pad="n" * 400) for _ in range(100)])
            ob.append([alert("new")])
        stats = ob.stats()
        assert stats["disk_full"] >= 1 and stats["disk_full_failed"] == 0
        assert stats["evicted"] > 0 and stats["evicted_alerts"] == 0
        assert stats["pending"] == 5 + 500 + 101 - stats["evicted"]
        left = ob.take(10_000)
        assert left[:5] == alerts
        assert [r.seq for r in left if r.stream == "telemetry/new"] == [r.seq for r in recs]
        old = [r.seq for r in left if r.stream == "telemetry/cnc-1"]
        assert old == list(range(old[0], 501))  # the newest survive, no hole
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "full" in warnings[0].getMessage()


def test_when_eviction_cannot_make_room_the_append_fails_clearly_and_stores_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with make(tmp_path / "o.sqlite") as ob:
        ob.append([telemetry() for _ in range(3)])
        limit_pages(ob, 0)
        with (
            caplog.at_level(logging.ERROR, logger="appliance.outbox"),
            pytest.raises(OutboxFullError, match="full"),
        ):
            ob.append([telemetry(pad="y" * 2000) for _ in range(200)])
        stats = ob.stats()
        assert (stats["disk_full"], stats["disk_full_failed"]) == (1, 1)
        assert (stats["appended"], stats["evicted"], stats["pending"]) == (3, 3, 0)
        assert "NOT stored" in caplog.text
        ob._conn.execute("PRAGMA max_page_count = 1073741823")
        assert ob.append([telemetry()])[0].seq == 4  # the failed batch took no seq


def damage_under(ob: SqliteOutbox) -> None:
    """Damage the open outbox's file the way a failing medium would: checkpoint the WAL into the
    database, overwrite every page after the header page with garbage, and have another
    connection commit, which makes the outbox's connection drop its page cache and read the
    file again."""
    other = sqlite3.connect(ob.path, isolation_level=None)
    page = other.execute("PRAGMA page_size").fetchone()[0]
    try:
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with open(ob.path, "r+b") as f:
            f.seek(page)  # page 2 onwards
            f.write(b"\xa5" * (os.path.getsize(ob.path) - page))
        other.execute("PRAGMA user_version = 1")  # a commit (page 1 only, via the WAL)
    finally:
        other.close()


def test_a_file_damaged_while_running_is_moved_aside_and_the_append_lands_in_a_new_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "outbox.sqlite"
    with make(path) as ob:
        first = ob.append([telemetry() for _ in range(40)] + [alert()])
        old_epoch = ob.epoch
        ob.settle([r.id for r in first[:10]])  # 31 stay unsent in the file that breaks
        damage_under(ob)
        with caplog.at_level(logging.ERROR, logger="appliance.outbox"):
            (rec,) = ob.append([telemetry()])
        stats = ob.stats()
        assert (stats["recovered_corrupt"], stats["pending"]) == (1, 1)
        # A new file is a new epoch, as at start; record ids continue.
        assert ob.epoch > old_epoch
        assert rec.seq == 1 and rec.id > max(r.id for r in first)
        assert [r.id for r in ob.take(10)] == [rec.id]
        nxt = ob.append([alert()])[0]
        assert nxt.seq == 1
        ob.settle([r.id for r in first[10:]])  # late acks of old records settle nothing new
        assert ob.pending == 2
    aside = tmp_path / f"outbox.sqlite.corrupt-{STAMP}"
    assert aside.exists() and path.exists()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert str(path) in errors[0] and str(aside) in errors[0] and "31 unsent" in errors[0]
    with make(path) as again:  # the new file is a sound outbox
        assert [r.seq for r in again.take(10)] == [1, 1]


def test_take_settle_and_stats_on_a_file_damaged_while_running_recover_too(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    with make(path) as ob:
        recs = ob.append([telemetry() for _ in range(5)])
        damage_under(ob)
        assert ob.take(10) == []  # the new file is empty; no exception reaches the uplink
        ob.settle([r.id for r in recs])
        damage_under(ob)
        ob.settle([r.id for r in recs])
        ob.append([telemetry()])
        damage_under(ob)
        assert ob.stats()["recovered_corrupt"] == 3  # stats() reads the file too
        assert ob.stats()["pending"] == 0
