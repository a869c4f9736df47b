"""`appliance record` → `model fit` → bundle loads → golden check → `model eval`, and bad data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from appliance.cli import main
from appliance.infer.bundle import load_bundle
from appliance.modelkit.evaluate import score_windows
from appliance.modelkit.export import operator_check
from appliance.modelkit.fit import fit_model
from appliance.modelkit.record import Recorder
from appliance.modelkit.recording import DataError
from appliance.simulate.dataset import FaultEvent, simulate_frames

CHANNELS = ["spindle_speed", "spindle_load", "spindle_temp", "coolant_temp", "vibration_rms"]


def _record(path: Path, seed: int, seconds: float, faults: tuple[FaultEvent, ...] = ()) -> Path:
    """A recording as `appliance record` writes it (the Recorder), of a simulated machine."""
    rec = Recorder(path.parent)
    for frame in simulate_frames(seed, 0, seconds, faults, waveform=False, device=path.stem):
        rec.on_frame(frame)
    rec.close()
    return path


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("rec")
    return {
        "normal": _record(d / "normal.csv", 1, 400.0),
        "normal2": _record(d / "normal2.csv", 2, 300.0),
        "faulty": _record(d / "faulty.csv", 2, 300.0, (FaultEvent(30.0, "vibration_surge", 200),)),
    }


def test_fit_writes_a_bundle_that_loads_and_passes_its_golden_check(
    recordings: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "bundle"
    rc = main(["model", "fit", "--normal", str(recordings["normal"]), "--out", str(out),
               "--channels", *CHANNELS])  # fmt: skip
    assert rc == 0
    b = load_bundle(str(out))
    assert [f.channel for f in b.features[::4]] == CHANNELS
    got = score_windows(b, b.golden_inputs)
    np.testing.assert_allclose(got, b.golden_outputs, rtol=b.golden_rtol, atol=b.golden_atol)
    import onnx

    assert operator_check(onnx.load(str(b.onnx_path))) == []
    m = json.loads((out / "manifest.json").read_text())
    assert m["ir_version"] <= 13 and m["threshold"] == 1.0 and m["kind"] == "gaussian"


def test_eval_reports_auc_at_the_top_level_and_separates_a_fault(
    recordings: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    fit_model([recordings["normal"]], out, channels=CHANNELS)
    report = tmp_path / "r.json"
    rc = main(["model", "eval", str(out), "--normal", str(recordings["normal2"]),
               "--faulty", str(recordings["faulty"]), "--json", str(report)])  # fmt: skip
    assert rc == 0
    data = json.loads(report.read_text())
    assert data["auc"] > 0.8
    faulty = [f for f in data["files"] if f["label"] == "faulty"][0]
    assert faulty["detection_delay_s"] is not None and faulty["detection_delay_s"] < 40
    assert "ROC AUC" in capsys.readouterr().out


def test_plot_needs_matplotlib_and_says_so(
    recordings: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    fit_model([recordings["normal"]], out, channels=CHANNELS)
    png = tmp_path / "s.png"
    rc = main(["model", "eval", str(out), "--faulty", str(recordings["faulty"]),
               "--plot", str(png)])  # fmt: skip
    if importlib.util.find_spec("matplotlib") is None:
        assert rc == 1 and not png.exists()
        assert "--plot needs matplotlib" in capsys.readouterr().err
    else:
        assert rc == 0 and png.read_bytes()[:4] == b"\x89PNG"


def test_autoencoder_kind_fits_or_names_the_missing_extra(
    recordings: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ae"
    rc = main(["model", "fit", "--kind", "autoencoder", "--normal", str(recordings["normal"]),
               "--out", str(out), "--channels", *CHANNELS])  # fmt: skip
    if importlib.util.find_spec("torch") is None:
        assert rc == 1 and "needs PyTorch" in capsys.readouterr().err
        return
    assert rc == 0
    b = load_bundle(str(out))
    got = score_windows(b, b.golden_inputs)
    np.testing.assert_allclose(got, b.golden_outputs, rtol=b.golden_rtol, atol=b.golden_atol)


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bad_data_is_refused_saying_what_and_where(tmp_path: Path) -> None:
    ok = "time,a,b\n" + "".join(f"{i * 0.1},{np.sin(i)},{i % 7}\n" for i in range(3000))
    good = _csv(tmp_path / "good.csv", ok)
    cases = {
        "empty file": (_csv(tmp_path / "empty.csv", ""), "empty.csv: empty file"),
        "bad cell": (
            _csv(tmp_path / "cell.csv", ok.replace("\n0.5,", "\n0.5,x", 1)),
            "cell.csv:7: column 'a': 'x",
        ),
        "missing channel": (_csv(tmp_path / "noa.csv", "time,b\n0,1\n1,2\n"), "'a'"),
        "nan run": (
            _csv(
                tmp_path / "gap.csv",
                "time,a,b\n"
                + "".join(
                    f"{i * 0.1},{'' if 100 <= i < 400 else 1.5},{i}\n" for i in range(3000)
                ),  # fmt: skip
            ),
            "gap.csv: column 'a' has no value (empty or NaN) from line",
        ),
    }
    for what, (path, message) in cases.items():
        with pytest.raises(DataError, match=None) as err:
            fit_model([good, path] if what == "missing channel" else [path], tmp_path / "o")
        assert message in str(err.value), what
    const = _csv(tmp_path / "const.csv", "time,a,b\n" + "".join(f"{i},{i},3\n" for i in range(50)))
    with pytest.raises(DataError, match="channel 'b' is constant"):
        fit_model([const], tmp_path / "o")
    short = _csv(
        tmp_path / "short.csv", "time,a,b\n" + "".join(f"{i},{i},{-i}\n" for i in range(30))
    )
    with pytest.raises(DataError, match="too little data to fit: .* at least 100 needed"):
        fit_model([short], tmp_path / "o")


def test_a_csv_without_time_column_needs_the_rate(tmp_path: Path) -> None:
    rows = "a,b,program\n" + "".join(f"{np.sin(i / 3)},{np.cos(i / 5)},P1\n" for i in range(2000))
    path = _csv(tmp_path / "logger.csv", rows)
    res = fit_model([path], tmp_path / "o", rate_hz=10.0)
    assert res.windows >= 190 and {f.channel for f in res.features} == {"a", "b"}


def test_the_operator_check_flags_what_tensorrt_cannot_compile() -> None:
    from onnx import TensorProto, helper

    node = helper.make_node(
        "TreeEnsembleRegressor", ["x"], ["y"], domain="ai.onnx.ml", name="forest"
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 11
    problems = operator_check(model)
    assert any("ai.onnx.ml.TreeEnsembleRegressor" in p for p in problems)
    assert any("IR version 11" in p for p in problems) and any("opset 21" in p for p in problems)
