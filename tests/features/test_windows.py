"""Windows and feature rows: pure units on synthetic frames."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.contracts import FeatureRow, Frame, Quality, Window
from appliance.features.windows import FeatureBuilder, FeatureSpec, WindowAggregator

CHANNELS = ("a", "b")


def frame(ts: float, a: float, b: float, qb: Quality = Quality.GOOD, device: str = "m1") -> Frame:
    return Frame(
        device=device,
        channels=CHANNELS,
        ts=np.full(2, ts),
        channel=np.array([0, 1], np.int32),
        value=np.array([a, b]),
        quality=np.array([Quality.GOOD, qb], np.uint8),
    )


def test_window_statistics_match_numpy_over_good_samples() -> None:
    out: list[Window] = []
    agg = WindowAggregator(1.0, [out.append])
    a = [1.0, 2.0, 3.0, 4.0]
    for i, v in enumerate(a):
        agg.on_frame(frame(100.0 + i * 0.2, v, -v, qb=Quality.BAD if i == 2 else Quality.GOOD))
    agg.on_frame(frame(101.05, 9.0, 9.0))  # first frame of the next window closes the first
    assert len(out) == 1
    w = out[0]
    assert (w.start, w.end) == (100.0, 101.0)
    assert w.count.tolist() == [4, 3]
    assert w.mean[0] == pytest.approx(np.mean(a))
    assert w.rms[0] == pytest.approx(np.sqrt(np.mean(np.square(a))))
    assert (w.min[0], w.max[0], w.last[0]) == (1.0, 4.0, 4.0)
    # the BAD sample (-3) is excluded from channel b
    assert w.mean[1] == pytest.approx(np.mean([-1.0, -2.0, -4.0]))
    assert w.min[1] == -4.0


def test_channel_without_good_sample_has_zero_count_and_nan_stats() -> None:
    out: list[Window] = []
    agg = WindowAggregator(1.0, [out.append])
    agg.on_frame(frame(10.1, 1.0, 5.0, qb=Quality.BAD))
    agg.flush()
    w = out[0]
    assert w.count.tolist() == [1, 0]
    assert np.isnan([w.mean[1], w.min[1], w.max[1], w.last[1]]).all()


def test_windows_are_per_machine_and_aligned_to_wall_clock() -> None:
    out: list[Window] = []
    agg = WindowAggregator(2.0, [out.append])
    agg.on_frame(frame(11.5, 1, 1, device="m1"))
    agg.on_frame(frame(10.2, 1, 1, device="m2"))
    agg.on_frame(frame(12.1, 1, 1, device="m1"))
    agg.flush()
    assert sorted((w.machine, w.start, w.end) for w in out) == [
        ("m1", 10.0, 12.0),
        ("m1", 12.0, 14.0),
        ("m2", 10.0, 12.0),
    ]


def test_flush_emits_the_partial_window_so_shutdown_loses_nothing() -> None:
    out: list[Window] = []
    agg = WindowAggregator(1.0, [out.append])
    agg.on_frame(frame(5.5, 1, 2))
    assert out == []
    agg.flush()
    assert len(out) == 1 and agg.windows_closed == 1
    agg.flush()
    assert len(out) == 1


def test_feature_row_follows_manifest_layout() -> None:
    rows: list[FeatureRow] = []
    fb = FeatureBuilder([FeatureSpec("b", "max"), FeatureSpec("a", "mean")], rows.append)
    agg = WindowAggregator(1.0, [fb])
    agg.on_frame(frame(1.1, 1.0, 10.0))
    agg.on_frame(frame(1.6, 3.0, 30.0))
    agg.flush()
    assert len(rows) == 1
    assert rows[0].vector.dtype == np.float32
    assert rows[0].vector.tolist() == [30.0, 2.0]
    assert rows[0].window_end == 2.0


def test_window_missing_a_model_channel_is_counted_not_scored() -> None:
    rows: list[FeatureRow] = []
    fb = FeatureBuilder([FeatureSpec("a", "mean"), FeatureSpec("b", "mean")], rows.append)
    agg = WindowAggregator(1.0, [fb])
    agg.on_frame(frame(1.1, 1.0, 10.0, qb=Quality.BAD))
    agg.flush()
    assert rows == [] and fb.incomplete_windows == 1


def test_unknown_feature_stat_is_rejected() -> None:
    with pytest.raises(ValueError, match="stat must be one of"):
        FeatureBuilder([FeatureSpec("a", "median")], lambda r: None)


def test_a_waveform_frame_across_a_window_boundary_is_split_by_sample_time() -> None:
    out: list[Window] = []
    agg = WindowAggregator(1.0, [out.append])
    ts = np.arange(0.5, 1.5, 0.125)  # 8 samples, 4 in [0, 1) and 4 in [1, 2)
    agg.on_frame(
        Frame("m1", ("w",), ts, np.zeros(8, np.int32), np.arange(8.0), np.zeros(8, np.uint8))
    )
    agg.flush()
    assert [(w.start, int(w.count[0]), float(w.max[0])) for w in out] == [
        (0.0, 4, 3.0),
        (1.0, 4, 7.0),
    ]
