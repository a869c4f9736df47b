"""`appliance model fit --context COLUMN`: a model conditioned on a program number or machining
phase finds a fault that hides in the spread of the programs' normal levels (issue 14, item 4).

The data: three programs whose normal spindle load and temperature differ (20/50/80 %,
30/40/50 °C). The fault runs program 100 at program 200's levels (a blunt tool): every one of
its windows looks like a normal window of the cell, so a model without the program cannot see
it, and one conditioned on the program must.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from appliance.cli import main
from appliance.infer.bundle import load_bundle
from appliance.modelkit.evaluate import evaluate, score_windows
from appliance.modelkit.fit import fit_model
from appliance.modelkit.recording import DataError

RATE_HZ = 10.0
T0 = 1_800_000_000.5  # program changes fall mid-window
LEVELS = {100: (20.0, 30.0), 200: (50.0, 40.0), 300: (80.0, 50.0)}  # load %, temp °C
PHASES = {100: "roughing", 200: "semi-finishing", 300: "finishing"}


def _write(
    path: Path, seed: int, seconds: float, programs: list[int], *, fault: bool = False,
    labels: bool = False,
) -> Path:  # fmt: skip
    """A CSV as a historian exports it: time, program (or phase label), load, temp; the
    program changes every 60 s, cycling through ``programs``."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE_HZ)
    t = T0 + np.arange(n) / RATE_HZ
    prog = np.array([programs[int(i / RATE_HZ // 60) % len(programs)] for i in range(n)])
    load = np.array([LEVELS[200 if fault else p][0] for p in prog]) + rng.normal(0, 2.0, n)
    temp = np.array([LEVELS[200 if fault else p][1] for p in prog]) + rng.normal(0, 0.5, n)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["time", "phase" if labels else "program", "spindle_load", "spindle_temp"])
        for row in zip(t, prog, load, temp, strict=True):
            ctx = PHASES[int(row[1])] if labels else str(int(row[1]))
            w.writerow([repr(float(row[0])), ctx, repr(float(row[2])), repr(float(row[3]))])
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ctx")
    cycle = [100, 200, 300]
    return {
        "train": _write(d / "train.csv", 1, 1800.0, cycle),
        "normal": _write(d / "normal.csv", 2, 540.0, cycle),
        "faulty": _write(d / "faulty.csv", 3, 300.0, [100], fault=True),
        "train_labels": _write(d / "train_l.csv", 1, 1800.0, cycle, labels=True),
        "normal_labels": _write(d / "normal_l.csv", 2, 540.0, cycle, labels=True),
        "faulty_labels": _write(d / "faulty_l.csv", 3, 300.0, [100], fault=True, labels=True),
    }


def _auc(bundle: Path, normal: Path, faulty: Path) -> float:
    auc = evaluate(str(bundle), [normal], [faulty])["auc"]
    assert isinstance(auc, float)
    return auc


def test_a_fault_hidden_in_the_programs_spread_is_found_only_with_the_context(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain, ctx = tmp_path / "plain", tmp_path / "ctx"
    channels = ["spindle_load", "spindle_temp"]
    assert main(["model", "fit", "--normal", str(data["train"]), "--out", str(plain),
                 "--channels", *channels]) == 0  # fmt: skip
    assert main(["model", "fit", "--normal", str(data["train"]), "--out", str(ctx),
                 "--channels", *channels, "--context", "program"]) == 0  # fmt: skip
    assert "context program: own model for 3 value(s)" in capsys.readouterr().out
    auc_plain = _auc(plain, data["normal"], data["faulty"])
    auc_ctx = _auc(ctx, data["normal"], data["faulty"])
    assert auc_ctx > 0.99, auc_ctx
    assert auc_ctx > auc_plain + 0.3, (auc_plain, auc_ctx)
    m = json.loads((ctx / "manifest.json").read_text())
    assert m["features"][-1] == {"channel": "program", "stat": "last"}
    assert m["context"]["channel"] == "program" and m["context"]["values"] == [100, 200, 300]
    assert m["context"]["unknown"] == "global" and "labels" not in m["context"]
    # a window in which the program changes is not scored: 30 changes in the 1800 s
    assert m["condition"] == [{"channel": "program", "stat": "p2p", "min": 0.0, "max": 0.0}]
    assert m["training"]["windows"] == 1800 - 30
    # the ONNX graph reproduces the golden vectors, among them two with an unknown program
    b = load_bundle(str(ctx))
    got = score_windows(b, b.golden_inputs)
    np.testing.assert_allclose(got, b.golden_outputs, rtol=b.golden_rtol, atol=b.golden_atol)
    assert b.golden_inputs[-1, -1] == 301.0
    # an unknown program is scored by the global model, whatever its number; a known one by
    # its own model
    x = load_bundle(str(plain)).golden_inputs

    def scores(program: float) -> np.ndarray:
        return score_windows(b, np.column_stack([x, np.full(len(x), program, np.float32)]))

    np.testing.assert_array_equal(scores(999.0), scores(-7.0))
    for program in (100.0, 200.0, 300.0):
        assert not np.allclose(scores(program), scores(999.0), rtol=1e-2)


def test_a_non_numeric_phase_column_is_a_context_served_as_its_label_index(
    data: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "ctx"
    res = fit_model([data["train_labels"]], out, channels=["spindle_load"], context="phase")
    assert res.context_values == (0.0, 1.0, 2.0)
    m = json.loads((out / "manifest.json").read_text())
    assert m["context"]["labels"] == ["finishing", "roughing", "semi-finishing"]
    assert _auc(out, data["normal_labels"], data["faulty_labels"]) > 0.99


def test_without_context_a_non_numeric_column_is_ignored(
    data: dict[str, Path], tmp_path: Path
) -> None:
    res = fit_model([data["train_labels"]], tmp_path / "b")
    assert {f.channel for f in res.features} == {"spindle_load", "spindle_temp"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"context": "nope"}, "no context column 'nope'"),
        ({"context": "program", "kind": "autoencoder"}, "--context works with --kind gaussian"),
        ({"context": "program", "channels": ["program"]}, "also named in --channels"),
    ],
)
def test_a_wrong_context_is_refused_saying_what(
    data: dict[str, Path], tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        fit_model([data["train"]], tmp_path / "b", **kwargs)  # type: ignore[arg-type]
