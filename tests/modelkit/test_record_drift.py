"""Parity of the self-baseline stage: the same recording scored by serving (`appliance record
--scores`, the appliance's feature builders, stage, batcher and engine, live against a real
simulated cell) and by `appliance model eval` gives the same windows and the same scores."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from cellhelp import serving_in_background
from modelhelp import quick_drift_bundle

from appliance.cli import main
from appliance.demo.mosquitto import free_port
from appliance.simulate.cell import SimulatedCell

#: Seed whose two machines both cut steadily within seconds of the start.
SEED = 28


def test_eval_of_a_recording_reproduces_every_score_the_appliance_served_through_the_stage(
    tmp_path: Path,
) -> None:
    bundle = quick_drift_bundle(tmp_path, learn_windows=3)
    ports = [free_port(), free_port()]
    cell = SimulatedCell(machines=2, ports=ports, seed=SEED)
    conf = tmp_path / "cell.toml"
    conf.write_text(
        "".join(
            f'[[devices]]\nname = "cnc-{i + 1}"\nhost = "127.0.0.1"\nport = {port}\n'
            'profile = "cnc-sim"\npoll_interval_ms = 100\n'
            for i, port in enumerate(ports)
        )
        + f'[[models]]\nname = "drift"\nmodel = "{bundle}"\n'
    )
    rec = tmp_path / "rec"
    with serving_in_background(cell):
        assert main(["record", "-c", str(conf), "--out", str(rec), "--duration", "14",
                     "--scores"]) == 0  # fmt: skip
    served = 0
    for machine in ("cnc-1", "cnc-2"):
        with (rec / "scores" / f"{machine}.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) >= 2, f"{machine}: too few windows past the learning"
        served += len(rows)
        report = tmp_path / f"{machine}.json"
        assert main(["model", "eval", str(bundle), "--normal", str(rec / f"{machine}.csv"),
                     "--json", str(report)]) == 0  # fmt: skip
        entry = json.loads(report.read_text())["files"][0]
        live = entry["live"]
        # the same windows (none only one side scored) and the same scores: the stage saw
        # the same rows in the same order in both
        assert live["windows"] == len(rows) == entry["windows"] and live["unmatched"] == 0, live
        assert live["max_abs_diff"] < 1e-5, live
    assert served >= 4
