"""Threshold rules: raise/clear lifecycle, hysteresis, dedup, per machine."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from appliance.alerts import AlertEngine
from appliance.config import ThresholdRule
from appliance.contracts import Envelope, Frame, Priority, Quality, ScoreBatch

CH = ("spindle_temp", "vibration_rms")


def temp_frame(machine: str, ts: float, temp: float, q: Quality = Quality.GOOD) -> Frame:
    return Frame(
        machine,
        CH,
        np.full(2, ts),
        np.array([0, 1], np.int32),
        np.array([temp, 1.0]),
        np.array([q, Quality.GOOD], np.uint8),
    )


def make(rules: list[ThresholdRule]) -> tuple[AlertEngine, list[Envelope]]:
    out: list[Envelope] = []

    def emit(envs: Sequence[Envelope]) -> None:
        out.extend(envs)

    return AlertEngine(rules, emit, lambda m: f"edge/x/alerts/{m}"), out


def test_channel_rule_raises_once_and_clears_below_hysteresis() -> None:
    eng, out = make([ThresholdRule(name="hot", channel="spindle_temp", above=75, clear_below=65)])
    for t, v in enumerate([50, 76, 80, 74, 70, 66, 64, 80]):
        eng.on_frame(temp_frame("m1", float(t), v))
    states = [(e.body["state"], e.body["value"]) for e in out]
    assert states == [("raised", 76), ("cleared", 64), ("raised", 80)]
    raised, cleared = out[0], out[1]
    assert raised.body["alert_id"] == cleared.body["alert_id"]
    assert cleared.body["peak"] == 80 and cleared.body["duration_s"] == 5.0
    assert raised.priority == Priority.ALERT and raised.stream == "alerts/m1"
    assert raised.topic == "edge/x/alerts/m1"
    assert eng.active()[0]["machine"] == "m1"


def test_bad_quality_values_never_raise() -> None:
    eng, out = make([ThresholdRule(name="hot", channel="spindle_temp", above=75)])
    eng.on_frame(temp_frame("m1", 0.0, 500.0, q=Quality.BAD))
    assert out == []


def test_state_is_per_machine_and_machine_filter_applies() -> None:
    eng, out = make([ThresholdRule(name="hot", channel="spindle_temp", above=75, machines=("m2",))])
    eng.on_frame(temp_frame("m1", 0.0, 90.0))
    eng.on_frame(temp_frame("m2", 0.0, 90.0))
    assert [e.body["machine"] for e in out] == ["m2"]


def test_score_rule_raises_and_clears_on_model_scores() -> None:
    eng, out = make([ThresholdRule(name="anomaly", source="score", above=2.0, clear_below=1.0)])
    eng.on_scores(scored(("m1", 1.0, 0.5), ("m2", 1.0, 3.0)))
    eng.on_scores(scored(("m2", 2.0, 1.5)))
    eng.on_scores(scored(("m2", 3.0, 0.9)))
    assert [(e.body["machine"], e.body["state"]) for e in out] == [
        ("m2", "raised"),
        ("m2", "cleared"),
    ]
    assert out[0].body["source"] == "score" and out[0].body["channel"] is None


def test_nan_values_are_ignored() -> None:
    eng, out = make([ThresholdRule(name="anomaly", source="score", above=2.0)])
    eng.on_scores(scored(("m1", 1.0, float("nan"))))
    assert out == [] and eng.raised == 0


def scored(*rows: tuple[str, float, float]) -> ScoreBatch:
    """A batch as the batcher delivers it: (machine, window_end, score) per row."""
    return ScoreBatch(
        tuple(r[0] for r in rows),
        np.array([r[1] for r in rows], np.float64),
        np.array([r[2] for r in rows], np.float32),
        "onnxruntime-cpu",
    )


def test_one_batch_can_raise_and_clear_the_same_machine_in_window_order() -> None:
    eng, out = make([ThresholdRule(name="anomaly", source="score", above=2.0, clear_below=1.0)])
    eng.on_scores(scored(("m1", 1.0, 3.0), ("m2", 1.0, 0.1), ("m1", 2.0, 2.5), ("m1", 3.0, 0.5)))
    assert [(e.body["machine"], e.body["state"], e.ts) for e in out] == [
        ("m1", "raised", 1.0),
        ("m1", "cleared", 3.0),
    ]
    assert out[1].body["peak"] == 3.0 and eng.active() == []


def test_score_rule_machine_filter_applies_to_batches() -> None:
    eng, out = make([ThresholdRule(name="a", source="score", above=2.0, machines=("m2",))])
    eng.on_scores(scored(("m1", 1.0, 5.0), ("m2", 1.0, 5.0)))
    assert [e.body["machine"] for e in out] == ["m2"]
