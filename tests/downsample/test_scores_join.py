"""Model scores join the machine's telemetry message of the same window."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from appliance.contracts import Envelope, Priority, ScoreBatch
from appliance.downsample.scores import ScoreJoiner


def _tel(machine: str, end: float) -> Envelope:
    return Envelope(
        stream=f"telemetry/{machine}",
        kind="telemetry",
        topic="t",
        priority=Priority.TELEMETRY,
        ts=end,
        body={"machine": machine, "window": {"start": end - 1, "end": end}, "channels": {}},
    )


def _batch(machine: str, end: float, score: float) -> ScoreBatch:
    return ScoreBatch((machine,), np.array([end]), np.array([score], np.float32), "cpu")


def test_telemetry_waits_for_every_model_then_carries_their_scores() -> None:
    sent: list[Envelope] = []

    def emit(envs: Sequence[Envelope]) -> None:
        sent.extend(envs)

    j = ScoreJoiner({"m1": ["anomaly", "fault"], "m2": []}, emit)
    j.hold([_tel("m1", 10.0), _tel("m2", 10.0)])
    assert [e.body["machine"] for e in sent] == ["m2"]  # no model: straight through
    j.on_scores("anomaly", _batch("m1", 10.0, 0.5))
    assert len(sent) == 1
    j.on_scores("fault", _batch("m1", 10.0, 2.0))
    assert sent[-1].body["scores"] == {"anomaly": 0.5, "fault": 2.0}


def test_an_unscored_window_goes_out_with_the_next_one_and_late_scores_are_counted() -> None:
    sent: list[Envelope] = []
    j = ScoreJoiner({"m1": ["anomaly"]}, sent.extend)
    j.hold([_tel("m1", 10.0)])
    j.hold([_tel("m1", 11.0)])  # window 10 was not scored (outside the model's condition)
    assert [e.ts for e in sent] == [10.0] and "scores" not in sent[0].body
    j.on_scores("anomaly", _batch("m1", 10.0, 0.1))
    assert j.late_scores == 1
    j.flush()
    assert [e.ts for e in sent] == [10.0, 11.0]
