"""Every driver returns a ReadResult; a NaN or infinite value in one is BAD and NaN, never a
sample (issue 10), whichever driver (Modbus float32 patterns, text devices printing nan/inf)."""

from __future__ import annotations

import math

import numpy as np

from drivers.quality import BAD, GOOD, STALE, ReadResult


def test_non_finite_values_are_bad_and_nan_whatever_driver_built_the_result() -> None:
    values = np.array([45.0, math.nan, math.inf, -math.inf, 7.0])
    quality = np.array([GOOD, GOOD, GOOD, STALE, GOOD], dtype=np.uint8)
    r = ReadResult(values, quality)
    assert r.quality.tolist() == [GOOD, BAD, BAD, BAD, GOOD]
    assert r.values[0] == 45.0 and r.values[4] == 7.0
    assert all(math.isnan(v) for v in r.values[1:4])


def test_finite_results_are_left_alone() -> None:
    values = np.array([1.0, 2.0])
    quality = np.array([GOOD, BAD], dtype=np.uint8)
    r = ReadResult(values, quality)
    assert r.quality.tolist() == [GOOD, BAD] and r.values.tolist() == [1.0, 2.0]
