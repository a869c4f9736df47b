"""What each rule kind measures, per (rule, machine): pure functions of good samples and time.

Each returns ``(raise condition, clear condition, value)`` for the lifecycle
(:mod:`appliance.alerts.lifecycle`), or ``None`` when the sample cannot be judged yet (the
first sample of a rate). Only finite values of GOOD quality reach them; a BAD or NaN value
never raises or clears an alert.

* ``high``/``score``: the value against ``above`` / ``clear_below`` (default ``above``).
* ``low``: the value against ``below`` / ``clear_above`` (default ``below``).
* ``rate``: ``|dv/dt|`` (unit per second) between consecutive good samples.
* ``stuck``: seconds the channel stayed within ``tolerance`` (a flat run), against ``for_s``.
* ``stale`` / ``offline``: seconds since the last good sample of the channel / good poll of
  the device, against ``for_s`` (judged on the engine's clock tick, and at once when good
  data arrives again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from appliance.config import ThresholdRule

Judgement = tuple[bool, bool, float]


@dataclass
class SeriesState:
    """What a rate or stuck rule remembers of one machine's channel."""

    prev_ts: float = math.nan
    prev_value: float = math.nan
    run_start: float = math.nan
    run_lo: float = math.nan
    run_hi: float = math.nan


def levels(rule: ThresholdRule) -> tuple[float, float]:
    """``(raise level, clear level)`` of a level rule (high, low, rate, score)."""
    if rule.rule_kind == "low":
        assert rule.below is not None
        return rule.below, rule.below if rule.clear_above is None else rule.clear_above
    assert rule.above is not None
    return rule.above, rule.above if rule.clear_below is None else rule.clear_below


def judge_level(rule: ThresholdRule, value: float) -> Judgement:
    raise_at, clear_at = levels(rule)
    if rule.rule_kind == "low":
        return value < raise_at, value > clear_at, value
    return value > raise_at, value < clear_at, value


def judge_rate(rule: ThresholdRule, s: SeriesState, ts: float, value: float) -> Judgement | None:
    prev_ts, prev_value = s.prev_ts, s.prev_value
    s.prev_ts, s.prev_value = ts, value
    if math.isnan(prev_ts) or ts <= prev_ts:
        return None
    rate = abs(value - prev_value) / (ts - prev_ts)
    raise_at, clear_at = levels(rule)
    return rate > raise_at, rate < clear_at, rate


def judge_stuck(rule: ThresholdRule, s: SeriesState, ts: float, value: float) -> Judgement:
    if math.isnan(s.run_start):
        s.run_start, s.run_lo, s.run_hi = ts, value, value
    else:
        lo, hi = min(s.run_lo, value), max(s.run_hi, value)
        if hi - lo > rule.tolerance:  # the run is broken: a new one starts here
            s.run_start, s.run_lo, s.run_hi = ts, value, value
        else:
            s.run_lo, s.run_hi = lo, hi
    flat_s = ts - s.run_start
    return flat_s >= rule.duration_s, flat_s < rule.duration_s, flat_s


def judge_age(rule: ThresholdRule, age_s: float) -> Judgement:
    return age_s > rule.duration_s, age_s <= rule.duration_s, age_s
