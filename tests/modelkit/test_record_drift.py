"""Parity of the self-baseline stage: the same recording scored by serving (`appliance record
--scores`, the appliance's feature builders, stage, batcher and engine, live against a real
simulated cell) and by `appliance model eval` gives the same windows and the same scores."""

from __future__ import annotations

import asyncio
import csv
import json
import shutil
import threading
from pathlib import Path

import numpy as np

from appliance.cli import main
from appliance.demo.mosquitto import free_port
from appliance.infer.bundle import MODELS_DIR, load_bundle
from appliance.infer.drift import sequence_scores
from appliance.modelkit.evaluate import score_windows
from appliance.simulate.cell import SimulatedCell

#: Seed whose two machines both cut steadily within seconds of the start.
SEED = 28


def quick_drift_bundle(tmp_path: Path, learn_windows: int) -> Path:
    """The shipped ``cnc_drift`` (same graph and stage) learning over ``learn_windows`` rows
    per key instead of 30, so that a test of seconds gets past the learning; its golden
    sequence recomputed for that stage (onnxruntime)."""
    d = tmp_path / "cnc_drift_quick"
    shutil.copytree(MODELS_DIR / "cnc_drift", d)
    m = json.loads((d / "manifest.json").read_text())
    m["baseline"]["learn_windows"] = learn_windows
    (d / "manifest.json").write_text(json.dumps(m))
    with np.load(d / "golden.npz") as g:
        arrays = {k: g[k] for k in g.files}
    arrays["sequence_outputs"] = np.full(len(arrays["sequence_inputs"]), np.nan, np.float32)
    np.savez(d / "golden.npz", **arrays)  # the shapes hold while the stage's outputs change
    b = load_bundle(str(d))
    assert b.drift is not None and b.sequence_inputs is not None
    arrays["sequence_outputs"] = sequence_scores(
        b.drift, b.sequence_inputs, lambda x: score_windows(b, x)
    ).astype(np.float32)
    np.savez(d / "golden.npz", **arrays)
    return d


def test_eval_of_a_recording_reproduces_every_score_the_appliance_served_through_the_stage(
    tmp_path: Path,
) -> None:
    bundle = quick_drift_bundle(tmp_path, learn_windows=3)
    ports = [free_port(), free_port()]
    cell = SimulatedCell(machines=2, ports=ports, seed=SEED)
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(cell.start())
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    assert ready.wait(10)
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
    try:
        assert main(["record", "-c", str(conf), "--out", str(rec), "--duration", "14",
                     "--scores"]) == 0  # fmt: skip
    finally:
        asyncio.run_coroutine_threadsafe(cell.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.close()
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
