"""Threshold rules with hysteresis and a raise/clear lifecycle.

A rule watches a channel's raw values (every acquired GOOD sample) or the model score of each
window. It RAISES when the value goes above ``above`` and CLEARS when it falls below
``clear_below`` (default: ``above``, i.e. no hysteresis band). State is kept per (rule, machine);
a raised alert is not raised again until it has cleared (deduplication). Each transition becomes
one alert envelope on the stream ``alerts/<machine>``; raise and clear share an ``alert_id``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from appliance.config import ThresholdRule
from appliance.contracts import Envelope, Frame, Priority, Quality, ScoreBatch

log = logging.getLogger(__name__)


@dataclass
class _State:
    active: bool = False
    alert_id: str = ""
    raised_at: float = 0.0
    peak: float = float("-inf")


class AlertEngine:
    """Evaluates rules; a frame sink and a score sink. Called on the event loop only.

    ``topic_for(machine)`` gives the MQTT topic for a machine's alerts; ``emit`` receives the
    alert envelopes (the outbox).
    """

    def __init__(
        self,
        rules: Sequence[ThresholdRule],
        emit: Callable[[Sequence[Envelope]], None],
        topic_for: Callable[[str], str],
        default_model: str = "",
    ) -> None:
        self._channel_rules = [r for r in rules if r.source == "channel"]
        self._score_rules = [r for r in rules if r.source == "score"]
        self._default_model = default_model  # the model a score rule without `model` watches
        self._emit = emit
        self._topic_for = topic_for
        self._state: dict[tuple[str, str], _State] = {}
        self._index_cache: dict[tuple[str, ...], dict[str, int]] = {}
        self._active_count: dict[str, int] = {}  # rule name → machines it is raised on
        self.raised = 0
        self.cleared = 0

    def active(self) -> list[dict[str, object]]:
        """Currently raised alerts (for the local API and tests)."""
        return [
            {"rule": rule, "machine": machine, "alert_id": s.alert_id, "since": s.raised_at}
            for (rule, machine), s in self._state.items()
            if s.active
        ]

    def on_frame(self, frame: Frame) -> None:
        if not self._channel_rules:
            return
        pos = self._index_cache.get(frame.channels)
        if pos is None:
            pos = self._index_cache[frame.channels] = {n: i for i, n in enumerate(frame.channels)}
        out: list[Envelope] = []
        for rule in self._channel_rules:
            if rule.machines and frame.device not in rule.machines:
                continue
            ch = pos.get(rule.channel)
            if ch is None:
                continue
            sel = (frame.channel == ch) & (frame.quality == Quality.GOOD)
            if not sel.any():
                continue
            values = frame.value[sel]
            times = frame.ts[sel]
            for v, t in zip(values.tolist(), times.tolist(), strict=False):
                self._evaluate(rule, frame.device, v, t, out)
        if out:
            self._emit(out)

    def on_scores(self, scores: ScoreBatch, model: str = "") -> None:
        """Evaluate the score rules watching ``model`` (a rule's ``model``, or the default
        model when it names none) on one scored batch, rows in batch order. While a rule has
        no raised machine, the rows before its first score above the threshold cannot change an
        alert and are skipped in numpy (the common case: the whole batch)."""
        if not self._score_rules or not len(scores):
            return
        out: list[Envelope] = []
        values = scores.score
        for rule in self._score_rules:
            if (rule.model or self._default_model) != model:
                continue
            first = 0  # raised machines may clear: look at every row
            if not self._active_count.get(rule.name, 0):
                hot = np.flatnonzero(values > rule.above)
                if not len(hot):
                    continue
                first = int(hot[0])  # nothing before the first raise can change an alert
            for i in range(first, len(scores)):
                machine = scores.machines[i]
                if rule.machines and machine not in rule.machines:
                    continue
                self._evaluate(rule, machine, float(values[i]), float(scores.window_end[i]), out)
        if out:
            self._emit(out)

    def _evaluate(
        self, rule: ThresholdRule, machine: str, value: float, ts: float, out: list[Envelope]
    ) -> None:
        if not np.isfinite(value):
            return
        st = self._state.setdefault((rule.name, machine), _State())
        clear_below = rule.above if rule.clear_below is None else rule.clear_below
        if not st.active:
            if value > rule.above:
                st.active = True
                st.alert_id = f"{rule.name}:{machine}:{int(ts * 1000)}"
                st.raised_at = ts
                st.peak = value
                self.raised += 1
                self._active_count[rule.name] = self._active_count.get(rule.name, 0) + 1
                log.info(
                    "alert raised: %s on %s (%s %.3g > %.3g)",
                    rule.name,
                    machine,
                    rule.channel or "score",
                    value,
                    rule.above,
                )
                out.append(self._envelope(rule, machine, "raised", value, ts, st))
        else:
            st.peak = max(st.peak, value)
            if value < clear_below:
                st.active = False
                self.cleared += 1
                self._active_count[rule.name] -= 1
                log.info(
                    "alert cleared: %s on %s (%.3g < %.3g)", rule.name, machine, value, clear_below
                )
                out.append(self._envelope(rule, machine, "cleared", value, ts, st))

    def _envelope(
        self, rule: ThresholdRule, machine: str, state: str, value: float, ts: float, st: _State
    ) -> Envelope:
        body: dict[str, object] = {
            "machine": machine,
            "alert_id": st.alert_id,
            "rule": rule.name,
            "state": state,
            "severity": rule.severity,
            "source": rule.source,
            "channel": rule.channel or None,
            "value": value,
            "threshold": rule.above
            if state == "raised"
            else (rule.above if rule.clear_below is None else rule.clear_below),
            "raised_at": st.raised_at,
        }
        if state == "cleared":
            body["peak"] = st.peak
            body["duration_s"] = round(ts - st.raised_at, 3)
        return Envelope(
            stream=f"alerts/{machine}",
            kind="alert",
            topic=self._topic_for(machine),
            priority=Priority.ALERT,
            ts=ts,
            body=body,
        )
