"""The lifecycle of one alert (one rule on one machine): a pure state machine.

Each evaluation gives the machine two booleans, *raise condition* and *clear condition*
(computed by :mod:`appliance.alerts.kinds` from good values only: NaN, missing or BAD values
never reach it), the value and its time. Transitions:

* **raised**: idle, out of the cooldown (``cooldown_s`` after the last clear), and at least
  ``debounce_k`` of the last ``debounce_n`` evaluations met the raise condition. A new stable
  ``alert_id`` (``<rule>:<machine>:<raise time in ms>``) is given.
* **updated**: active, and the value crossed ``escalate_above`` (severity lifted to
  ``escalate_severity``), or a new peak was seen and ``update_interval_s`` (> 0) passed since
  the last message of this alert.
* **cleared**: active for at least ``min_active_s``, and at least ``debounce_k`` of the last
  ``debounce_n`` evaluations met the clear condition.

While active nothing raises again (deduplication). ``transition`` counts the messages of one
alert (1 = raised): with ``alert_id`` it identifies a message, so a re-sent one can be dropped.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from appliance.config import ThresholdRule

SEVERITY_ORDER = ("info", "warning", "major", "critical")


@dataclass
class AlertState:
    """One (rule, machine) pair. The persisted part is :meth:`to_dict`; the debounce history
    restarts empty after a restart (a raised alert stays raised)."""

    rule: str
    machine: str
    active: bool = False
    alert_id: str = ""
    severity: str = "warning"
    raised_at: float = 0.0
    peak: float = math.nan
    transition: int = 0
    last_message_at: float = 0.0
    cleared_at: float = -math.inf
    acknowledged: bool = False
    restored: bool = False
    raise_hist: deque[bool] = field(default_factory=deque)
    clear_hist: deque[bool] = field(default_factory=deque)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "machine": self.machine,
            "active": self.active,
            "alert_id": self.alert_id,
            "severity": self.severity,
            "raised_at": self.raised_at,
            "peak": None if math.isnan(self.peak) else self.peak,
            "transition": self.transition,
            "last_message_at": self.last_message_at,
            "cleared_at": None if math.isinf(self.cleared_at) else self.cleared_at,
            "acknowledged": self.acknowledged,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlertState:
        return cls(
            rule=str(d["rule"]),
            machine=str(d["machine"]),
            active=bool(d["active"]),
            alert_id=str(d["alert_id"]),
            severity=str(d["severity"]),
            raised_at=float(d["raised_at"]),
            peak=math.nan if d.get("peak") is None else float(d["peak"]),
            transition=int(d["transition"]),
            last_message_at=float(d.get("last_message_at", 0.0)),
            cleared_at=-math.inf if d.get("cleared_at") is None else float(d["cleared_at"]),
            acknowledged=bool(d.get("acknowledged", False)),
            restored=True,
        )


class Lifecycle:
    """The state machine of :mod:`this module <appliance.alerts.lifecycle>` for one rule.

    ``lower_is_worse``: the peak of a ``low`` rule is its minimum."""

    def __init__(self, rule: ThresholdRule) -> None:
        self.rule = rule
        self.k = rule.debounce_k
        self.n = rule.debounce_n
        self.lower_is_worse = rule.rule_kind == "low"

    def new_state(self, machine: str) -> AlertState:
        return AlertState(
            self.rule.name,
            machine,
            severity=self.rule.severity,
            raise_hist=deque(maxlen=self.n),
            clear_hist=deque(maxlen=self.n),
        )

    def _worse(self, value: float, than: float) -> bool:
        if math.isnan(than):
            return True
        return value < than if self.lower_is_worse else value > than

    def observe(
        self, st: AlertState, ts: float, raise_c: bool, clear_c: bool, value: float
    ) -> str | None:
        """Feed one evaluation; the transition it causes (``raised``, ``updated``,
        ``cleared``) or ``None``. ``value`` must be finite (the caller checks)."""
        rule = self.rule
        if st.raise_hist.maxlen != self.n:  # restored state: histories start empty
            st.raise_hist = deque(maxlen=self.n)
            st.clear_hist = deque(maxlen=self.n)
        st.raise_hist.append(raise_c)
        st.clear_hist.append(clear_c)
        if not st.active:
            if ts < st.cleared_at + rule.cooldown_s:
                return None
            if sum(st.raise_hist) < self.k:
                return None
            st.active = True
            st.alert_id = f"{rule.name}:{st.machine}:{int(ts * 1000)}"
            st.raised_at = ts
            st.peak = value
            st.severity = rule.severity
            if rule.escalate_above is not None and value > rule.escalate_above:
                st.severity = rule.escalate_severity
            st.transition = 1
            st.last_message_at = ts
            st.acknowledged = False
            st.restored = False
            st.raise_hist.clear()
            st.clear_hist.clear()
            return "raised"
        new_peak = self._worse(value, st.peak)
        if new_peak:
            st.peak = value
        if sum(st.clear_hist) >= self.k and ts >= st.raised_at + rule.min_active_s:
            return self.clear(st, ts)
        if (
            rule.escalate_above is not None
            and value > rule.escalate_above
            and SEVERITY_ORDER.index(st.severity) < SEVERITY_ORDER.index(rule.escalate_severity)
        ):
            st.severity = rule.escalate_severity
            return self._updated(st, ts)
        if (
            new_peak
            and rule.update_interval_s > 0
            and ts - st.last_message_at >= rule.update_interval_s
        ):
            return self._updated(st, ts)
        return None

    @staticmethod
    def clear(st: AlertState, ts: float) -> str:
        """Clear ``st`` now (also used for clears decided outside :meth:`observe`)."""
        st.active = False
        st.cleared_at = ts
        st.transition += 1
        st.last_message_at = ts
        st.raise_hist.clear()
        st.clear_hist.clear()
        return "cleared"

    @staticmethod
    def _updated(st: AlertState, ts: float) -> str:
        st.transition += 1
        st.last_message_at = ts
        return "updated"
