"""Alert state survives a SIGKILL: an active alert is neither lost nor raised twice, and a
transition decided just before the kill reaches the outbox exactly once (real SQLite files,
a real child process killed with SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from appliance.alerts import AlertEngine, AlertStore
from appliance.config import ThresholdRule
from appliance.contracts import Frame, Quality
from appliance.outbox import SqliteOutbox
from appliance.payload import decode_payload

RULE = ThresholdRule(name="hot", channel="spindle_temp", above=80, clear_below=75)

CHILD = """
import os, signal, sys, time
import numpy as np
from appliance.alerts import AlertEngine, AlertStore
from appliance.config import ThresholdRule
from appliance.contracts import Frame
from appliance.outbox import SqliteOutbox

outbox_path, state_path, mode = sys.argv[1:4]
outbox = SqliteOutbox(outbox_path, appliance_id="a")
outbox.open()
store = AlertStore(state_path)

def emit(envs):
    if mode == "before_append":
        os.kill(os.getpid(), signal.SIGKILL)
    outbox.append(envs)
    if mode == "after_append":
        os.kill(os.getpid(), signal.SIGKILL)

rule = ThresholdRule(name="hot", channel="spindle_temp", above=80, clear_below=75)
eng = AlertEngine([rule], emit, lambda m: "t/" + m, store=store)
eng.start(outbox)
ch = ("spindle_temp",)
for t, v in enumerate([70.0, 90.0]):
    eng.on_frame(Frame("m1", ch, np.array([float(t)]), np.zeros(1, np.int32),
                       np.array([v]), np.zeros(1, np.uint8)))
print("raised", flush=True)
time.sleep(60)
"""


def run_child(tmp_path: Path, mode: str) -> None:
    args = [str(tmp_path / "o.sqlite"), str(tmp_path / "s.sqlite"), mode]
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), *args], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            if mode == "running":
                assert proc.stdout is not None
                assert proc.stdout.readline().strip() == "raised"
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL


def restart(tmp_path: Path) -> tuple[AlertEngine, SqliteOutbox]:
    outbox = SqliteOutbox(str(tmp_path / "o.sqlite"), appliance_id="a")
    outbox.open()
    eng = AlertEngine(
        [RULE], outbox.append, lambda m: "t/" + m, store=AlertStore(tmp_path / "s.sqlite")
    )
    eng.start(outbox)
    return eng, outbox


def alerts_in(outbox: SqliteOutbox) -> list[dict[str, Any]]:
    return [decode_payload(r.payload) for r in outbox.take(1000)]


def frame(ts: float, v: float) -> Frame:
    return Frame(
        "m1",
        ("spindle_temp",),
        np.array([ts]),
        np.zeros(1, np.int32),
        np.array([v]),
        np.array([Quality.GOOD], np.uint8),
    )


def test_sigkill_while_an_alert_is_active_neither_loses_nor_repeats_it(tmp_path: Path) -> None:
    run_child(tmp_path, "running")
    eng, outbox = restart(tmp_path)
    assert [a["alert_id"] for a in eng.active()] == ["hot:m1:1000"]
    eng.on_frame(frame(10.0, 95.0))  # still hot: not raised again
    eng.on_frame(frame(11.0, 70.0))
    msgs = alerts_in(outbox)
    assert [(m["state"], m["alert_id"], m["transition"]) for m in msgs] == [
        ("raised", "hot:m1:1000", 1),
        ("cleared", "hot:m1:1000", 2),
    ]
    assert msgs[1]["reason"] == "condition_cleared" and msgs[1]["peak"] == 95.0
    eng.close()
    outbox.close()


def test_an_alert_that_cleared_while_down_is_cleared_with_a_reason(tmp_path: Path) -> None:
    run_child(tmp_path, "running")
    eng, outbox = restart(tmp_path)
    eng.on_frame(frame(20.0, 60.0))
    msgs = alerts_in(outbox)
    assert [m["state"] for m in msgs] == ["raised", "cleared"]
    assert msgs[1]["reason"] == "cleared_while_down" and eng.active() == []
    eng.close()
    outbox.close()


def test_a_kill_before_the_outbox_append_sends_the_raise_once_after_restart(
    tmp_path: Path,
) -> None:
    run_child(tmp_path, "before_append")
    eng, outbox = restart(tmp_path)
    assert eng.resent_after_restart == 1
    eng.on_frame(frame(10.0, 95.0))
    assert [(m["state"], m["alert_id"]) for m in alerts_in(outbox)] == [("raised", "hot:m1:1000")]
    eng.close()
    outbox.close()


def test_a_kill_after_the_outbox_append_does_not_send_the_raise_again(tmp_path: Path) -> None:
    run_child(tmp_path, "after_append")
    eng, outbox = restart(tmp_path)
    assert eng.resent_after_restart == 0
    assert [m["state"] for m in alerts_in(outbox)] == ["raised"]
    eng.close()
    outbox.close()


def test_an_active_alert_of_a_removed_rule_is_cleared_at_start(tmp_path: Path) -> None:
    run_child(tmp_path, "running")
    outbox = SqliteOutbox(str(tmp_path / "o.sqlite"), appliance_id="a")
    outbox.open()
    other = ThresholdRule(name="cold", kind="low", channel="spindle_temp", below=5)
    eng = AlertEngine(
        [other], outbox.append, lambda m: "t/" + m, store=AlertStore(tmp_path / "s.sqlite")
    )
    eng.start(outbox)
    msgs = alerts_in(outbox)
    assert [(m["state"], m.get("reason")) for m in msgs] == [
        ("raised", None),
        ("cleared", "rule_removed"),
    ]
    eng.close()
    outbox.close()


def test_an_unreadable_state_file_is_moved_aside_and_the_engine_starts(tmp_path: Path) -> None:
    (tmp_path / "s.sqlite").write_bytes(b"this is not a database" * 100)
    store = AlertStore(tmp_path / "s.sqlite")
    eng = AlertEngine([RULE], lambda envs: None, lambda m: m, store=store)
    eng.start()
    eng.on_frame(frame(1.0, 90.0))
    assert store.recovered_corrupt == 1 and eng.raised == 1
    assert len(list(tmp_path.glob("s.sqlite.corrupt-*"))) == 1
    eng.close()
