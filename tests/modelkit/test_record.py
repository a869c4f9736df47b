"""`appliance record` against a real simulated cell (pymodbus servers)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from cellhelp import serving_in_background

from appliance.cli import main
from appliance.demo.mosquitto import free_port
from appliance.modelkit.recording import read_recording
from appliance.simulate.cell import SimulatedCell


def test_record_writes_a_csv_per_machine_with_time_and_every_channel(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    cell = SimulatedCell(machines=2, ports=ports, seed=5)
    conf = tmp_path / "cell.toml"
    conf.write_text(
        "".join(
            f'[[devices]]\nname = "cnc-{i + 1}"\nhost = "127.0.0.1"\nport = {p}\n'
            'profile = "cnc-sim"\npoll_interval_ms = 100\n[devices.waveform]\n'
            for i, p in enumerate(ports)
        )
    )
    with serving_in_background(cell):
        assert main(["record", "-c", str(conf), "--out", str(tmp_path / "rec"),
                     "--duration", "2"]) == 0  # fmt: skip
    for m in ("cnc-1", "cnc-2"):
        with (tmp_path / "rec" / f"{m}.csv").open() as f:
            rows = list(csv.reader(f))
        assert (
            rows[0][0] == "time" and "spindle_speed" in rows[0] and rows[0][-1] == "vibration_wave"
        )
        speed = rows[0].index("spindle_speed")
        assert sum(1 for r in rows[1:] if r[speed]) >= 10  # 10 Hz polls for ~2 s
        assert sum(1 for r in rows[1:] if r[-1]) > 1000  # 1 kHz waveform samples
        rec = read_recording(tmp_path / "rec" / f"{m}.csv")  # what model fit/eval read
        assert rec.channels == tuple(rows[0][1:]) and np.all(np.diff(rec.ts) >= 0)


def test_record_scores_keeps_the_served_scores_and_eval_reproduces_them(tmp_path: Path) -> None:
    """`appliance record --scores` keeps every window's score of the configured model, as
    `appliance run` serves it, in rec/scores/<machine>.csv; `model eval` of the recording
    scores the same windows and reports the difference (issue 14, item 6)."""
    port = free_port()
    cell = SimulatedCell(machines=1, ports=[port], seed=6)
    conf = tmp_path / "cell.toml"
    conf.write_text(
        f'[[devices]]\nname = "cnc-1"\nhost = "127.0.0.1"\nport = {port}\n'
        'profile = "cnc-sim"\npoll_interval_ms = 100\n'
        '[[models]]\nname = "anomaly"\nmodel = "cnc_anomaly"\n'
    )
    rec = tmp_path / "rec"
    with serving_in_background(cell):
        assert main(["record", "-c", str(conf), "--out", str(rec), "--duration", "5",
                     "--scores"]) == 0  # fmt: skip
    assert sorted(p.name for p in rec.glob("*.csv")) == ["cnc-1.csv"]  # scores apart
    with (rec / "scores" / "cnc-1.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 3
    assert {(r["model"], r["bundle"]) for r in rows} == {("anomaly", "cnc_anomaly")}
    report = tmp_path / "r.json"
    assert main(["model", "eval", "cnc_anomaly", "--normal", str(rec / "cnc-1.csv"),
                 "--json", str(report)]) == 0  # fmt: skip
    live = json.loads(report.read_text())["files"][0]["live"]
    assert live["windows"] >= 2 and live["unmatched"] == 0, live
    assert live["max_abs_diff"] < 1e-3, live
