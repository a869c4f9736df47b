"""False alarms and detection are counted with the alert engine's own score rule."""

from __future__ import annotations

import numpy as np

from appliance.modelkit.metrics import debounced_raises


def test_a_lone_window_above_the_threshold_raises_only_without_debounce() -> None:
    t = np.arange(10.0)
    s = np.array([0.1, 0.2, 1.5, 0.3, 0.2, 1.2, 1.3, 0.5, 0.4, 0.1])
    assert debounced_raises(t, s, 1.0) == [2.0, 5.0]
    assert debounced_raises(t, s, 1.0, debounce_k=2, debounce_n=3) == [6.0]


def test_an_active_alert_does_not_raise_again_until_it_cleared() -> None:
    t = np.arange(8.0)
    s = np.array([2.0, 2.0, 0.9, 2.0, 0.5, 0.5, 2.0, 2.0])
    # clear_below 0.8: the dip to 0.9 does not clear, the two at 0.5 do
    assert debounced_raises(t, s, 1.0, clear_below=0.8) == [0.0, 6.0]
    assert debounced_raises(t, s, 1.0) == [0.0, 3.0, 6.0]


def test_non_finite_scores_are_not_evaluations() -> None:
    t = np.arange(4.0)
    s = np.array([1.5, np.nan, 1.5, 0.1])
    assert debounced_raises(t, s, 1.0, debounce_k=2, debounce_n=2) == [2.0]
