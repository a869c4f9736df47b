"""The alert engine: rules of every kind (:mod:`.kinds`), each (rule, machine) pair going
through the lifecycle of :mod:`.lifecycle`, its state kept on disk by :mod:`.store`.

Channel rules (``high``, ``low``, ``rate``, ``stuck``) judge every GOOD, finite raw sample
(:meth:`AlertEngine.on_frame`); ``score`` rules judge each scored window
(:meth:`AlertEngine.on_scores`); ``stale`` and ``offline`` rules judge the time since the last
good sample / good poll on the engine's clock tick (:meth:`AlertEngine.tick`, once a second
from the supervisor) and clear as soon as good data arrives. Each transition becomes one alert
envelope on the stream ``alerts/<machine>``; raised, updated and cleared share one
``alert_id``, and every message carries its evidence: the recent raw values (or scores) with
their times, the machine's last window summary (of the rule's channel, or of every channel
for score and offline rules) and, for scores, the backend.

After a restart (:meth:`AlertEngine.start`), an alert active before it stays active, neither
forgotten nor raised again; when the first judgement after the restart already finds its clear
condition, it is cleared with ``reason: "cleared_while_down"``; an active alert whose rule left
the configuration is cleared with ``reason: "rule_removed"``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import numpy as np

from appliance.alerts.kinds import (
    Judgement,
    SeriesState,
    judge_age,
    judge_level,
    judge_rate,
    judge_stuck,
    levels,
)
from appliance.alerts.lifecycle import AlertState, Lifecycle
from appliance.alerts.store import AlertStore
from appliance.config import AlertAction, ThresholdRule
from appliance.contracts import Envelope, Frame, Outbox, Priority, Quality, ScoreBatch, Window
from appliance.payload import decode_payload

log = logging.getLogger(__name__)

_GOOD = int(Quality.GOOD)
SAMPLE_KINDS = ("high", "low", "rate", "stuck")
AGE_KINDS = ("stale", "offline")


def _num(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


class AlertEngine:
    """Evaluates rules; a frame sink, a window sink and a score sink. Called on the event loop
    only.

    ``topic_for(machine)`` gives the MQTT topic for a machine's alerts; ``emit`` receives the
    alert envelopes (the outbox). ``store`` keeps the state across restarts (``None``: in
    memory only); ``devices`` are the machines an ``offline`` rule watches from the start
    (others once they sent a frame); ``clock`` gives wall-clock seconds (a seam for tests).
    ``act(machine, action, rule, alert_id, "raise" | "clear")`` performs a rule's local action
    (after the alert's message is stored; it must not block) and reports back through
    :meth:`record_action`; ``None``: actions are not performed.
    """

    def __init__(
        self,
        rules: Sequence[ThresholdRule],
        emit: Callable[[Sequence[Envelope]], None],
        topic_for: Callable[[str], str],
        *,
        store: AlertStore | None = None,
        devices: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
        act: Callable[[str, AlertAction, str, str, str], None] | None = None,
        default_model: str = "",
    ) -> None:
        self._use_rules(rules)
        self._default_model = default_model  # the model a score rule without `model` watches
        self._emit = emit
        self._topic_for = topic_for
        self._store = store
        self._devices = tuple(devices)
        self._clock = clock
        self._act = act
        self._pending_acts: list[tuple[str, AlertAction, str, str, str]] = []
        self._state: dict[tuple[str, str], AlertState] = {}
        self._series: dict[tuple[str, str], SeriesState] = {}
        self._recent: dict[tuple[str, str], deque[tuple[float, float]]] = {}
        self._last_good: dict[tuple[str, str], float] = {}  # (machine, channel or "") → ts
        self._windows: dict[str, Window] = {}
        self._index_cache: dict[tuple[str, ...], dict[str, int]] = {}
        self._out: list[tuple[AlertState, Envelope]] = []
        self._started_at = math.nan
        self.raised = 0
        self.updated = 0
        self.cleared = 0
        self._acknowledged: set[str] = set()
        self.resent_after_restart = 0
        self.suppressed = 0  # raises held back by suppressed_by (episodes)
        self._suppressing: dict[tuple[str, str], frozenset[str]] = {}

    def _use_rules(self, rules: Sequence[ThresholdRule]) -> None:
        self.rules = tuple(rules)
        self._sample_rules = [r for r in rules if r.rule_kind in SAMPLE_KINDS]
        self._stale_rules = [r for r in rules if r.rule_kind == "stale"]
        self._offline_rules = [r for r in rules if r.rule_kind == "offline"]
        self._score_rules = [r for r in rules if r.rule_kind == "score"]
        self._channel_rules = self._sample_rules + self._stale_rules
        self._life = {r.name: Lifecycle(r) for r in rules}

    def set_rules(self, rules: Sequence[ThresholdRule]) -> None:
        """Replace the rules while running (the downlink's ``rules.apply``). An alert of a rule
        that keeps its name stays active under the new levels; an active alert whose rule is
        gone is cleared with ``reason: "rule_removed"`` (as at a start)."""
        self._use_rules(rules)
        names = {r.name for r in self.rules}
        now = self._clock()
        for st in list(self._state.values()):
            if st.rule in names:
                continue
            if st.active:
                Lifecycle.clear(st, now)
                self.cleared += 1
                self._queue_orphan_clear(st)
            else:
                del self._state[(st.rule, st.machine)]
        self._flush()
        log.info("alerts: %d rule(s) in force now", len(self.rules))

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, outbox: Outbox | None = None) -> None:
        """Load the stored state, finish what a crash interrupted (messages decided but not in
        ``outbox``), and clear alerts of rules no longer configured. Call after the outbox is
        open and before the uplink takes from it."""
        self._started_at = self._clock()
        if self._store is None:
            return
        self._store.open()
        for d in self._store.load():
            st = AlertState.from_dict(d)
            self._state[(st.rule, st.machine)] = st
        pending = self._store.pending()
        if pending:
            stored = _alert_keys_in(outbox) if outbox is not None else set()
            missing = [
                env
                for _, env in pending
                if (env.body.get("alert_id"), env.body.get("transition")) not in stored
            ]
            if missing:
                self._emit(missing)
                self.resent_after_restart += len(missing)
                log.info("alerts: %d message(s) a crash left unsent appended now", len(missing))
            self._store.done([i for i, _ in pending])
        names = {r.name for r in self.rules}
        for st in list(self._state.values()):
            if st.active and st.rule not in names:
                Lifecycle.clear(st, self._started_at)
                self.cleared += 1
                self._queue_orphan_clear(st)
            elif st.rule not in names:
                del self._state[(st.rule, st.machine)]
        self._flush()
        active = sum(1 for s in self._state.values() if s.active)
        if active:
            log.info("alerts: %d alert(s) still active after the restart", active)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    @property
    def store_recovered_corrupt(self) -> int:
        """State files found unreadable at start and moved aside (see :mod:`.store`)."""
        return self._store.recovered_corrupt if self._store is not None else 0

    def active(self) -> list[dict[str, object]]:
        """Currently raised alerts (for the local API and tests)."""
        return [
            {
                "rule": s.rule,
                "machine": s.machine,
                "alert_id": s.alert_id,
                "since": s.raised_at,
                "severity": s.severity,
                "acknowledged": s.acknowledged,
            }
            for s in self._state.values()
            if s.active
        ]

    def acknowledge(self, alert_id: str, *, by: str = "") -> bool:
        """Mark an active alert as seen by someone. True when ``alert_id`` is active now;
        False (nothing changes) otherwise. Acknowledging changes no lifecycle state: the alert
        still clears on its rule, and a new raise gets a new ``alert_id``.

        ``by`` empty (the local API): kept in memory only, nothing sent upstream. ``by`` given
        (the downlink's ``alerts.ack``: who acknowledged): the alert's state records it (on disk,
        and ``acknowledged: true`` in its later messages) and an ``acknowledged`` message with
        ``acknowledged_by`` goes out on the alert's stream."""
        active = {s.alert_id for s in self._state.values() if s.active}
        self._acknowledged &= active  # forget cleared alerts
        if alert_id not in active:
            return False
        self._acknowledged.add(alert_id)
        if by:
            st = next(s for s in self._state.values() if s.active and s.alert_id == alert_id)
            st.acknowledged = True
            st.transition += 1
            self._queue_acknowledged(st, by)
            self._flush()
        return True

    def acknowledged(self, alert_id: str) -> bool:
        """Whether ``alert_id`` was acknowledged (while it is active)."""
        return alert_id in self._acknowledged or any(
            s.active and s.acknowledged and s.alert_id == alert_id for s in self._state.values()
        )

    # -- sinks --------------------------------------------------------------------------------
    def on_window(self, window: Window) -> None:
        """Keep the machine's last window summary (evidence)."""
        self._windows[window.machine] = window

    def on_frame(self, frame: Frame) -> None:
        machine = frame.device
        good = frame.quality == _GOOD
        good &= np.isfinite(frame.value)
        if self._offline_rules and good.any():
            last = float(frame.ts[good].max())
            self._last_good[(machine, "")] = last
            for rule in self._offline_rules:
                if self._watches(rule, machine) and self._pending(rule, machine):
                    self._judge_age(rule, machine, "", last)
        if not self._channel_rules:
            self._flush()
            return
        pos = self._index_cache.get(frame.channels)
        if pos is None:
            pos = self._index_cache[frame.channels] = {n: i for i, n in enumerate(frame.channels)}
        for rule in self._channel_rules:
            if not self._watches(rule, machine):
                continue
            ch = pos.get(rule.channel)
            if ch is None:
                continue
            sel = (frame.channel == ch) & good
            if not sel.any():
                continue
            times = frame.ts[sel]
            if rule.rule_kind == "stale":
                last = float(times.max())
                self._last_good[(machine, rule.channel)] = last
                if self._pending(rule, machine):  # good data can only clear
                    self._judge_age(rule, machine, rule.channel, last)
                continue
            values = frame.value[sel]
            key = (rule.name, machine)
            recent = self._recent.get(key)
            if recent is None:
                recent = self._recent[key] = deque(maxlen=rule.evidence_samples)
            ts_list, v_list = times.tolist(), values.tolist()
            recent.extend(zip(ts_list, v_list, strict=True))
            if rule.rule_kind in ("high", "low") and self._quiet(rule, machine, values):
                continue  # idle, nothing pending, no sample past the raise level
            for v, t in zip(v_list, ts_list, strict=True):
                self._judge_sample(rule, machine, t, v)
        self._flush()

    def on_scores(self, scores: ScoreBatch, model: str = "") -> None:
        """Evaluate the score rules watching ``model`` (a rule's ``model``, or the default
        model when it names none) on one scored batch, rows in batch order."""
        if not self._score_rules or not len(scores):
            return
        values = scores.score.tolist()
        ends = scores.window_end.tolist()
        for rule in self._score_rules:
            if (rule.model or self._default_model) != model:
                continue
            raise_at, _ = levels(rule)
            for i, machine in enumerate(scores.machines):
                if not self._watches(rule, machine):
                    continue
                v = values[i]
                if not math.isfinite(v):
                    continue
                key = (rule.name, machine)
                st = self._state.get(key)
                recent = self._recent.get(key)
                if recent is None:
                    recent = self._recent[key] = deque(maxlen=rule.evidence_samples)
                recent.append((ends[i], v))
                if v <= raise_at and (st is None or (not st.active and not any(st.raise_hist))):
                    continue
                self._step(rule, machine, ends[i], judge_level(rule, v), scores.backend)
        self._flush()

    def tick(self, now: float | None = None) -> None:
        """Judge the age rules (stale channel, offline device) at ``now`` (default: the
        clock). Called about once a second by the supervisor."""
        now = self._clock() if now is None else now
        if math.isnan(self._started_at):
            self._started_at = now
        for rule in self._offline_rules:
            machines = set(self._devices) | {m for m, c in self._last_good if c == ""}
            for machine in sorted(machines):
                if self._watches(rule, machine):
                    self._judge_age(rule, machine, "", now)
        for rule in self._stale_rules:
            machines = set(self._devices) | {m for m, c in self._last_good if c == rule.channel}
            for machine in sorted(machines):
                if self._watches(rule, machine):
                    self._judge_age(rule, machine, rule.channel, now)
        self._flush()

    # -- judging ------------------------------------------------------------------------------
    @staticmethod
    def _watches(rule: ThresholdRule, machine: str) -> bool:
        return not rule.machines or machine in rule.machines

    def _pending(self, rule: ThresholdRule, machine: str) -> bool:
        """Whether (rule, machine) is active or has raise votes in its debounce history."""
        st = self._state.get((rule.name, machine))
        return st is not None and (st.active or any(st.raise_hist))

    def _quiet(self, rule: ThresholdRule, machine: str, values: np.ndarray[Any, Any]) -> bool:
        st = self._state.get((rule.name, machine))
        if st is not None and (st.active or any(st.raise_hist)):
            return False
        raise_at, _ = levels(rule)
        hot = values < raise_at if rule.rule_kind == "low" else values > raise_at
        return not bool(hot.any())

    def _judge_sample(self, rule: ThresholdRule, machine: str, ts: float, v: float) -> None:
        kind = rule.rule_kind
        judgement: Judgement | None
        if kind in ("high", "low"):
            judgement = judge_level(rule, v)
        else:
            s = self._series.get((rule.name, machine))
            if s is None:
                s = self._series[(rule.name, machine)] = SeriesState()
            judgement = (
                judge_rate(rule, s, ts, v) if kind == "rate" else judge_stuck(rule, s, ts, v)
            )
        if judgement is not None:
            self._step(rule, machine, ts, judgement, None)

    def _judge_age(self, rule: ThresholdRule, machine: str, channel: str, now: float) -> None:
        last = self._last_good.get((machine, channel), self._started_at)
        if math.isnan(last):
            last = now
        self._step(rule, machine, now, judge_age(rule, max(0.0, now - last)), None)

    def _step(
        self,
        rule: ThresholdRule,
        machine: str,
        ts: float,
        judgement: Judgement,
        backend: str | None,
    ) -> None:
        raise_c, clear_c, value = judgement
        life = self._life[rule.name]
        key = (rule.name, machine)
        st = self._state.get(key)
        if st is None:
            st = self._state[key] = life.new_state(machine)
        was_restored = st.active and st.restored
        if not st.active and rule.suppressed_by:
            by = frozenset(
                o.alert_id
                for other in rule.suppressed_by
                if (o := self._state.get((other, machine))) is not None and o.active
            )
            if by:
                if raise_c and self._suppressing.get(key) != by:  # once per suppressing alert
                    self._suppressing[key] = by
                    self.suppressed += 1
                    log.info("alert %s on %s suppressed by %s", rule.name, machine, sorted(by))
                return
        transition = life.observe(st, ts, raise_c, clear_c, value)
        reason = None
        if was_restored:
            if transition == "cleared":
                reason = "cleared_while_down"
            elif not clear_c:
                st.restored = False  # the condition still holds after the restart
        if transition is None:
            return
        if transition == "raised":
            self.raised += 1
            log.info(
                "alert raised: %s on %s (%s = %.6g)", rule.name, machine, rule.rule_kind, value
            )
        elif transition == "updated":
            self.updated += 1
        else:
            self.cleared += 1
            reason = reason or "condition_cleared"
            log.info("alert cleared: %s on %s (%.6g)", rule.name, machine, value)
        self._queue(rule, st, transition, value, ts, backend, reason)
        action = rule.action
        if action is not None and self._act is not None:
            if transition == "raised":
                self._pending_acts.append((machine, action, rule.name, st.alert_id, "raise"))
            elif transition == "cleared" and action.on_clear is not None:
                self._pending_acts.append((machine, action, rule.name, st.alert_id, "clear"))

    def record_action(
        self, rule_name: str, machine: str, alert_id: str, result: dict[str, Any]
    ) -> None:
        """Record the result of a rule's local action (a register write, done by the caller of
        ``act``) as an ``action`` message of the alert ``alert_id``."""
        st = self._state.get((rule_name, machine))
        rule = next((r for r in self.rules if r.name == rule_name), None)
        if st is None or rule is None or st.alert_id != alert_id:
            log.warning("alert action result for an unknown alert %s: %s", alert_id, result)
            return
        st.transition += 1
        ts = float(result.get("at", self._clock()))
        kind = rule.rule_kind
        body: dict[str, Any] = {
            "machine": machine,
            "alert_id": alert_id,
            "rule": rule_name,
            "state": "action",
            "transition": st.transition,
            "severity": st.severity,
            "source": "score" if kind == "score" else "channel",
            "rule_kind": kind,
            "channel": rule.channel or None,
            "value": _num(st.peak),
            "threshold": None,
            "raised_at": st.raised_at,
            "peak": _num(st.peak),
            "acknowledged": st.acknowledged,
            "evidence": {"from": st.raised_at, "to": ts},
            "action": result,
        }
        self._out.append((st, self._envelope(machine, ts, body)))
        self._flush()

    # -- messages -----------------------------------------------------------------------------
    def _evidence(
        self, rule: ThresholdRule, machine: str, ts: float, backend: str | None
    ) -> dict[str, Any]:
        ev: dict[str, Any] = {}
        recent = self._recent.get((rule.name, machine))
        if recent:
            ev["ts"] = [t for t, _ in recent]
            ev["values"] = [v for _, v in recent]
            ev["from"], ev["to"] = recent[0][0], recent[-1][0]
        else:
            ev["from"] = ev["to"] = ts
        if rule.rule_kind in AGE_KINDS:
            last = self._last_good.get((machine, rule.channel))
            ev["last_good"] = last
        if rule.unit:
            ev["unit"] = rule.unit
        if backend is not None:
            ev["backend"] = backend
        window = self._windows.get(machine)
        if window is not None:
            ev["window"] = {
                "start": window.start,
                "end": window.end,
                "channels": {
                    name: {
                        "n": int(window.count[i]),
                        "mean": _num(float(window.mean[i])),
                        "min": _num(float(window.min[i])),
                        "max": _num(float(window.max[i])),
                        "last": _num(float(window.last[i])),
                    }
                    for i, name in enumerate(window.channels)
                    if not rule.channel or name == rule.channel  # a channel rule: its channel
                },
            }
        return ev

    def _queue(
        self,
        rule: ThresholdRule,
        st: AlertState,
        transition: str,
        value: float,
        ts: float,
        backend: str | None,
        reason: str | None,
    ) -> None:
        kind = rule.rule_kind
        if kind in AGE_KINDS or kind == "stuck":
            raise_at = clear_at = rule.duration_s
        else:
            raise_at, clear_at = levels(rule)
        body: dict[str, Any] = {
            "machine": st.machine,
            "alert_id": st.alert_id,
            "rule": rule.name,
            "state": transition,
            "transition": st.transition,
            "severity": st.severity,
            "source": "score" if kind == "score" else "channel",
            "rule_kind": kind,
            "channel": rule.channel or None,
            "value": value,
            "threshold": clear_at if transition == "cleared" else raise_at,
            "raised_at": st.raised_at,
            "peak": _num(st.peak),
            "acknowledged": st.acknowledged,
            "evidence": self._evidence(rule, st.machine, ts, backend),
        }
        if transition == "cleared":
            body["duration_s"] = ts - st.raised_at
            body["reason"] = reason
        self._out.append((st, self._envelope(st.machine, ts, body)))

    def _queue_acknowledged(self, st: AlertState, by: str) -> None:
        ts = self._clock()
        rule = next((r for r in self.rules if r.name == st.rule), None)
        kind = rule.rule_kind if rule is not None else "removed"
        body: dict[str, Any] = {
            "machine": st.machine,
            "alert_id": st.alert_id,
            "rule": st.rule,
            "state": "acknowledged",
            "transition": st.transition,
            "severity": st.severity,
            "source": "score" if kind == "score" else "channel",
            "rule_kind": kind,
            "channel": (rule.channel or None) if rule is not None else None,
            "value": _num(st.peak),
            "threshold": None,
            "raised_at": st.raised_at,
            "peak": _num(st.peak),
            "acknowledged": True,
            "acknowledged_by": by,
            "evidence": {"from": st.raised_at, "to": ts},
        }
        self._out.append((st, self._envelope(st.machine, ts, body)))

    def _queue_orphan_clear(self, st: AlertState) -> None:
        ts = st.cleared_at
        body: dict[str, Any] = {
            "machine": st.machine,
            "alert_id": st.alert_id,
            "rule": st.rule,
            "state": "cleared",
            "transition": st.transition,
            "severity": st.severity,
            "source": "channel",
            "rule_kind": "removed",
            "channel": None,
            "value": _num(st.peak),
            "threshold": None,
            "raised_at": st.raised_at,
            "peak": _num(st.peak),
            "acknowledged": st.acknowledged,
            "evidence": {"from": st.raised_at, "to": ts},
            "duration_s": ts - st.raised_at,
            "reason": "rule_removed",
        }
        self._out.append((st, self._envelope(st.machine, ts, body)))

    def _envelope(self, machine: str, ts: float, body: dict[str, Any]) -> Envelope:
        return Envelope(
            stream=f"alerts/{machine}",
            kind="alert",
            topic=self._topic_for(machine),
            priority=Priority.ALERT,
            ts=ts,
            body=body,
        )

    def _flush(self) -> None:
        """Store the changed states with their messages (one transaction), then hand the
        messages to the outbox, then mark them delivered to it (see :mod:`.store`)."""
        if not self._out:
            return
        out, self._out = self._out, []
        envelopes = [env for _, env in out]
        pending: list[int] = []
        if self._store is not None:
            states = {id(st): st for st, _ in out}
            pending = self._store.commit([st.to_dict() for st in states.values()], envelopes)
        self._emit(envelopes)
        if self._store is not None:
            self._store.done(pending)
        if self._pending_acts and self._act is not None:
            acts, self._pending_acts = self._pending_acts, []
            for machine, action, rule_name, alert_id, on in acts:
                self._act(machine, action, rule_name, alert_id, on)


def _alert_keys_in(outbox: Outbox) -> set[tuple[object, object]]:
    """``(alert_id, transition)`` of every alert record stored in ``outbox`` (alerts are taken
    first, so this reads only them and stops at the first record of another class)."""
    keys: set[tuple[object, object]] = set()
    seen: list[int] = []
    while True:
        records = outbox.take(256, exclude=seen)
        if not records:
            return keys
        for rec in records:
            if rec.priority != Priority.ALERT:
                return keys
            seen.append(rec.id)
            try:
                msg = decode_payload(rec.payload)
            except msgspec.DecodeError:
                continue
            if isinstance(msg, dict):
                keys.add((msg.get("alert_id"), msg.get("transition")))
