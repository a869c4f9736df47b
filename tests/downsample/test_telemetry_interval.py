"""Telemetry on its own interval: windows merged into one aggregate (n, min, max, mean, last,
std) per machine per interval, aligned to wall-clock multiples; flush sends the rest."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.contracts import Envelope, Window
from appliance.downsample import TelemetryDownsampler


def window(start: float, samples: list[float]) -> Window:
    x = np.array(samples)
    one = lambda v: np.array([v])  # noqa: E731
    if not len(x):
        nan = one(np.nan)
        return Window(
            "m1", start, start + 1, ("a",), np.array([0], np.int32), nan, nan, nan, nan, nan
        )
    return Window(
        "m1",
        start,
        start + 1,
        ("a",),
        np.array([len(x)], np.int32),
        one(x.mean()),
        one(np.sqrt((x * x).mean())),
        one(x.min()),
        one(x.max()),
        one(x[-1]),
    )


def test_ten_windows_become_one_message_with_exact_aggregates() -> None:
    sent: list[Envelope] = []
    ds = TelemetryDownsampler(("mean", "min", "max", "last", "std"), sent.extend, lambda m: m, 10.0)
    data = [[float(i), float(i) + 0.5] for i in range(10)]
    data[3] = []  # a window without good samples
    for i, d in enumerate(data):
        ds(window(1000.0 + i, d))
    assert len(sent) == 1
    body = sent[0].body
    assert body["window"] == {"start": 1000.0, "end": 1010.0}
    flat = np.array([v for d in data for v in d])
    a = body["channels"]["a"]
    assert a["n"] == 18 and a["min"] == 0.0 and a["max"] == 9.5 and a["last"] == 9.5
    assert a["mean"] == pytest.approx(flat.mean(), rel=1e-12)
    assert a["std"] == pytest.approx(flat.std(), rel=1e-9)


def test_flush_sends_the_held_windows_of_a_partial_interval() -> None:
    sent: list[Envelope] = []
    ds = TelemetryDownsampler(("mean",), sent.extend, lambda m: m, 10.0)
    ds(window(1000.0, [1.0]))
    ds(window(1001.0, [3.0]))
    assert sent == []
    ds.flush()
    assert sent[0].body["channels"]["a"] == {"n": 2, "mean": 2.0}


def test_deadband_channels_are_reported_by_exception_and_named_when_unchanged() -> None:
    sent: list[Envelope] = []
    ds = TelemetryDownsampler(
        ("mean",), sent.extend, lambda m: m, deadband={"a": 0.5}, max_silence_s=3.0
    )
    for i, samples in enumerate([[20.0], [20.4], [19.6, 20.2], [20.6], [20.7], [20.7], [20.8]]):
        ds(window(1000.0 + i, samples))
    reported = [("a" in e.body["channels"], e.body.get("unchanged")) for e in sent]
    assert reported == [
        (True, None),  # first report: mean 20.0
        (False, ["a"]),  # within 20.0 ± 0.5
        (False, ["a"]),
        (True, None),  # 20.6 left the band: new reference 20.6
        (False, ["a"]),
        (False, ["a"]),
        (True, None),  # max_silence_s (3 s) since the last report: sent anyway
    ]
    assert ds.unchanged_reports == 4
