"""Data-quality events: one begin and one end per episode of stale, stuck, out-of-range and
clock-skewed data, on the stream quality/<machine>, counted."""

from __future__ import annotations

import numpy as np

from appliance.alerts.quality import DataQualityMonitor
from appliance.contracts import Envelope, Frame, Priority, Quality

CH = ("temp", "speed")


def frame(ts: float, temp: float, q: Quality = Quality.GOOD) -> Frame:
    return Frame(
        "m1",
        CH,
        np.full(2, ts),
        np.array([0, 1], np.int32),
        np.array([temp, 100.0 + ts]),
        np.array([q, Quality.GOOD], np.uint8),
    )


def monitor(now: list[float], **kw: object) -> tuple[DataQualityMonitor, list[Envelope]]:
    out: list[Envelope] = []
    mon = DataQualityMonitor(out.extend, lambda m: f"q/{m}", clock=lambda: now[0], **kw)  # type: ignore[arg-type]
    return mon, out


def events(out: list[Envelope]) -> list[tuple[str, str | None, str]]:
    return [(e.body["event"], e.body["channel"], e.body["state"]) for e in out]


def test_stale_begins_on_the_tick_and_ends_with_the_next_good_sample() -> None:
    now = [0.0]
    mon, out = monitor(now, stale_s=5.0, max_clock_skew_s=0.0)
    mon.on_frame(frame(0.0, 20.0))
    for t in (1.0, 2.0, 6.0):
        mon.on_frame(frame(t, 20.0, Quality.BAD))  # BAD is no data
    mon.tick(6.0)
    mon.tick(7.0)  # still stale: no second event
    mon.on_frame(frame(8.0, 20.0))
    assert events(out) == [("stale", "temp", "begin"), ("stale", "temp", "end")]
    assert out[0].stream == "quality/m1" and out[0].priority == Priority.STATUS
    assert mon.stats()["stale"] == 1


def test_out_of_range_and_stuck_are_one_episode_each() -> None:
    now = [0.0]
    mon, out = monitor(now, stale_s=0.0, stuck_s=3.0, ranges={"temp": (0.0, 50.0)})
    for t, v in enumerate([20.0, 60.0, 70.0, 20.0, 20.0, 20.0, 20.0, 21.0]):
        now[0] = float(t)
        mon.on_frame(frame(float(t), v))
    assert events(out) == [
        ("out_of_range", "temp", "begin"),
        ("out_of_range", "temp", "end"),
        ("stuck", "temp", "begin"),
        ("stuck", "temp", "end"),
    ]
    assert out[0].body["value"] == 60.0 and out[2].ts == 6.0


def test_clock_skew_of_a_devices_timestamps_is_reported_once() -> None:
    now = [100.0]
    mon, out = monitor(now, stale_s=0.0, max_clock_skew_s=5.0)
    mon.on_frame(frame(90.0, 20.0))
    mon.on_frame(frame(91.0, 20.0))
    mon.on_frame(frame(99.0, 20.0))
    assert events(out) == [("clock_skew", None, "begin"), ("clock_skew", None, "end")]
    assert out[0].body["value"] == -10.0
