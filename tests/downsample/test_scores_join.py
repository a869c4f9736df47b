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


def _interval_tel(machine: str, start: float, end: float) -> Envelope:
    env = _tel(machine, end)
    env.body["window"] = {"start": start, "end": end}
    return env


def test_every_window_score_of_an_interval_reaches_its_message() -> None:
    """telemetry.interval_s = 5 with 1 s windows: the scores of windows 1-4 arrive before the
    interval's message exists, window 5's after it; all five are in it (before the fix only
    window 5's was, the others counted as late)."""
    sent: list[Envelope] = []
    j = ScoreJoiner({"m1": ["anomaly", "fault"]}, sent.extend, interval_stats=True)
    for end, s in zip((1.0, 2.0, 3.0, 4.0), (0.2, 3.5, 0.4, 0.1), strict=True):
        j.on_scores("anomaly", _batch("m1", end, s))
    j.on_scores("fault", _batch("m1", 3.0, 7.0))  # the fault model scored one window only
    j.hold([_interval_tel("m1", 0.0, 5.0)])
    j.on_scores("anomaly", _batch("m1", 5.0, 0.3))
    assert sent == []  # the fault model has not scored window 5 yet
    j.on_scores("fault", _batch("m1", 5.0, 1.0))
    assert len(sent) == 1 and j.late_scores == 0
    body = sent[0].body
    assert body["scores"] == {"anomaly": np.float32(3.5), "fault": 7.0}
    stats = body["score_stats"]
    assert isinstance(stats, dict)
    assert stats["anomaly"]["n"] == 5 and stats["anomaly"]["max"] == np.float32(3.5)
    assert stats["anomaly"]["last"] == np.float32(0.3)
    want = float(np.sum(np.array([0.2, 3.5, 0.4, 0.1, 0.3], np.float32).astype(np.float64)))
    assert abs(stats["anomaly"]["mean"] - want / 5) < 1e-12
    assert stats["fault"] == {"n": 2, "max": 7.0, "mean": 4.0, "last": 1.0}


def test_an_interval_whose_last_window_is_unscored_goes_out_with_the_next_message() -> None:
    sent: list[Envelope] = []
    j = ScoreJoiner({"m1": ["anomaly"]}, sent.extend, interval_stats=True)
    j.on_scores("anomaly", _batch("m1", 1.0, 0.5))
    j.hold([_interval_tel("m1", 0.0, 2.0)])  # window 2 is not scored
    j.on_scores("anomaly", _batch("m1", 3.0, 0.7))  # the next interval's first window
    j.hold([_interval_tel("m1", 2.0, 4.0)])
    assert [e.ts for e in sent] == [2.0]
    assert sent[0].body["score_stats"] == {
        "anomaly": {"n": 1, "max": 0.5, "mean": 0.5, "last": 0.5}
    }
    j.on_scores("anomaly", _batch("m1", 2.0, 9.0))  # too late for its message: counted
    j.on_scores("anomaly", _batch("m1", 4.0, 0.9))
    assert j.late_scores == 1 and [e.ts for e in sent] == [2.0, 4.0]
    assert sent[1].body["scores"] == {"anomaly": np.float32(0.9)}
    assert sent[1].body["score_stats"]["anomaly"]["n"] == 2  # type: ignore[index]


def test_scores_of_windows_before_the_first_message_are_counted_late_not_joined() -> None:
    sent: list[Envelope] = []
    j = ScoreJoiner({"m1": ["anomaly"]}, sent.extend)
    j.on_scores("anomaly", _batch("m1", 5.0, 9.0))  # no message for window 5 will come
    j.hold([_tel("m1", 10.0)])
    j.on_scores("anomaly", _batch("m1", 10.0, 0.5))
    assert sent[0].body["scores"] == {"anomaly": 0.5}
    assert j.late_scores == 1 and j.joined == 1
