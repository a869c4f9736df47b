"""`appliance run` facing an unusable outbox file: moved aside with a clear error, a new outbox
created, the appliance runs; nothing silently overwritten. Real subprocesses, no broker needed
(the uplink keeps retrying) and no machine (the device is offline)."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

from appliance.demo.mosquitto import free_port

APPLIANCE = [sys.executable, "-m", "appliance"]


def config(tmp_path: Path, outbox_path: str) -> Path:
    cfg = tmp_path / "cell.toml"
    cfg.write_text(
        '[appliance]\nid = "corrupt"\n'
        f'[[devices]]\nname = "cnc-1"\nport = {free_port()}\nprofile = "cnc-sim"\n'
        f'[outbox]\npath = "{outbox_path}"\n'
        f"[mqtt]\nport = {free_port()}\n"
    )
    return cfg


def run(cfg: Path) -> subprocess.CompletedProcess[str]:
    """`appliance run --duration 1`; on a hang, SIGABRT makes Python's fault handler write every
    thread's stack into the stderr that the assertion shows."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [*APPLIANCE, "run", "-c", str(cfg), "--duration", "1", "--log-level", "info"],
            stdout=out,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            proc.wait(timeout=10)
            err.seek(0)
            raise AssertionError("`appliance run` did not stop:\n" + err.read()) from None
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


def test_run_moves_a_corrupt_outbox_aside_logs_both_paths_and_starts_a_new_one(
    tmp_path: Path,
) -> None:
    outbox = tmp_path / "outbox.sqlite"
    garbage = b"\x00\xffnot an outbox\n" * 1000
    outbox.write_bytes(garbage)
    res = run(config(tmp_path, "outbox.sqlite"))
    assert res.returncode == 0, res.stderr
    (aside,) = tmp_path.glob("outbox.sqlite.corrupt-*")
    assert aside.read_bytes() == garbage  # kept, byte for byte
    (line,) = [ln for ln in res.stderr.splitlines() if " ERROR " in ln]
    assert "appliance.outbox" in line and str(outbox) in line and str(aside) in line
    assert "appliance stopped" in res.stderr
    db = sqlite3.connect(outbox)  # the new outbox is a real, checked one
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
    finally:
        db.close()

    # A second corrupt file later gets its own name: the first one is never overwritten.
    outbox.write_bytes(b"corrupt again" * 100)
    res = run(config(tmp_path, "outbox.sqlite"))
    assert res.returncode == 0, res.stderr
    asides = sorted(tmp_path.glob("outbox.sqlite.corrupt-*"))
    assert len(asides) == 2 and aside.read_bytes() == garbage
    assert {p.read_bytes() for p in asides} == {garbage, b"corrupt again" * 100}


def test_run_exits_1_with_a_clear_error_when_the_outbox_cannot_be_created(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the outbox directory should be")
    res = run(config(tmp_path, "not-a-dir/outbox.sqlite"))
    assert res.returncode == 1, res.stderr
    assert re.search(r"appliance: outbox .*not-a-dir/outbox\.sqlite: cannot create", res.stderr)
    assert "Traceback" not in res.stderr
    assert blocker.read_text() == "a file where the outbox directory should be"
