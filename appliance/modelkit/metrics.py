"""Detection metrics of window scores: ROC AUC, false alarms per shift, detection delay."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

#: Length of a shift for the false-alarm figure (s).
SHIFT_S = 8 * 3600.0


def roc_auc(neg: npt.ArrayLike, pos: npt.ArrayLike) -> float:
    """Probability that a positive window scores above a negative one (ties count half)."""
    n = np.asarray(neg, dtype=np.float64)
    p = np.asarray(pos, dtype=np.float64)
    if n.size == 0 or p.size == 0:
        return float("nan")
    allv = np.concatenate([n, p])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(allv.size)
    sorted_v = allv[order]
    # average ranks of ties
    uniq, start, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    rp = ranks[n.size :].sum()
    return float((rp - p.size * (p.size + 1) / 2.0) / (n.size * p.size))


def best_direction_auc(neg: npt.ArrayLike, pos: npt.ArrayLike) -> float:
    """AUC of a threshold that may look above or below (the better of the two)."""
    a = roc_auc(neg, pos)
    return max(a, 1.0 - a)


def alarms(score: npt.ArrayLike, threshold: float) -> int:
    """Number of raises: rising crossings of ``threshold`` (an alert raises once, then clears)."""
    s = np.asarray(score) > threshold
    return int(np.count_nonzero(s[1:] & ~s[:-1]) + (1 if s.size and s[0] else 0))


def false_alarms_per_shift(
    normal_scores: npt.ArrayLike, threshold: float, window_s: float, runs: int = 1
) -> float:
    """Raises per 8-hour shift on normal data (``normal_scores`` concatenated over ``runs``)."""
    s = np.asarray(normal_scores)
    hours = s.size * window_s
    return float(alarms(s, threshold) * SHIFT_S / hours) if hours else float("nan")


def detection_delay_s(
    t_rel: npt.ArrayLike, score: npt.ArrayLike, threshold: float, fault_at_s: float
) -> float:
    """Seconds from the fault's start to the end of the first window above ``threshold``
    (NaN when it is never detected)."""
    t = np.asarray(t_rel)
    hit = np.flatnonzero((t > fault_at_s) & (np.asarray(score) > threshold))
    return float(t[hit[0]] - fault_at_s) if hit.size else float("nan")


def debounced_raises(
    t: npt.ArrayLike,
    score: npt.ArrayLike,
    threshold: float,
    debounce_k: int = 1,
    debounce_n: int = 1,
    clear_below: float | None = None,
) -> list[float]:
    """Times (``t`` of the window) at which a score alert rule raises: ``above = threshold``,
    ``debounce_k`` of the last ``debounce_n`` scored windows, ``clear_below`` (default the
    threshold). Feed the scored windows of one machine in time order, as the alert engine gets
    them; the rule is the engine's own (:class:`appliance.alerts.lifecycle.Lifecycle`)."""
    from appliance.alerts.kinds import judge_level
    from appliance.alerts.lifecycle import Lifecycle
    from appliance.config import ThresholdRule

    rule = ThresholdRule(
        name="score",
        source="score",
        above=threshold,
        clear_below=clear_below,
        debounce_k=debounce_k,
        debounce_n=debounce_n,
    )
    life = Lifecycle(rule)
    st = life.new_state("m")
    out: list[float] = []
    for ts, v in zip(np.asarray(t, np.float64).tolist(), np.asarray(score).tolist(), strict=True):
        if not math.isfinite(v):
            continue
        raise_c, clear_c, value = judge_level(rule, v)
        if life.observe(st, ts, raise_c, clear_c, value) == "raised":
            out.append(ts)
    return out
