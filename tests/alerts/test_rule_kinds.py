"""Rule kinds and the lifecycle: raise → updated → cleared with one alert_id, debounce,
minimum active time, cooldown, evidence; NaN and BAD values never raise or clear."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from appliance.alerts import AlertEngine
from appliance.config import ThresholdRule, load_config
from appliance.contracts import Envelope, Frame, Quality, Window
from appliance.errors import ConfigError

CH = ("spindle_temp", "vibration_rms")


def frame(machine: str, ts: float, temp: float, q: Quality = Quality.GOOD) -> Frame:
    return Frame(
        machine,
        CH,
        np.full(2, float(ts)),
        np.array([0, 1], np.int32),
        np.array([temp, 1.0]),
        np.array([q, Quality.GOOD], np.uint8),
    )


def make(*rules: ThresholdRule, devices: Sequence[str] = ()) -> tuple[AlertEngine, list[Envelope]]:
    out: list[Envelope] = []

    def emit(envs: Sequence[Envelope]) -> None:
        out.extend(envs)

    eng = AlertEngine(
        rules, emit, lambda m: f"edge/x/alerts/{m}", devices=devices, clock=lambda: 0.0
    )
    eng.start()
    return eng, out


def feed(eng: AlertEngine, values: Sequence[float], machine: str = "m1", t0: float = 0.0) -> None:
    for i, v in enumerate(values):
        eng.on_frame(frame(machine, t0 + i, v))


def states(out: list[Envelope]) -> list[str]:
    return [e.body["state"] for e in out]


def test_high_rule_raises_updates_on_escalation_and_clears_with_one_alert_id() -> None:
    rule = ThresholdRule(
        name="hot",
        channel="spindle_temp",
        above=80,
        clear_below=75,
        escalate_above=95,
        severity="major",
        update_interval_s=0,
    )
    eng, out = make(rule)
    feed(eng, [70, 81, 85, 96, 90, 74, 70])
    assert states(out) == ["raised", "updated", "cleared"]
    assert len({e.body["alert_id"] for e in out}) == 1
    assert [e.body["severity"] for e in out] == ["major", "critical", "critical"]
    assert [e.body["transition"] for e in out] == [1, 2, 3]
    cleared = out[-1].body
    assert cleared["peak"] == 96 and cleared["reason"] == "condition_cleared"
    ev = out[0].body["evidence"]
    assert ev["values"] == [70.0, 81.0] and ev["from"] == 0.0 and ev["to"] == 1.0


def test_new_peak_updates_at_most_once_per_update_interval() -> None:
    eng, out = make(
        ThresholdRule(name="hot", channel="spindle_temp", above=80, update_interval_s=2)
    )
    feed(eng, [81, 82, 83, 84, 85, 86])
    assert states(out) == ["raised", "updated", "updated"]
    assert [e.body["value"] for e in out] == [81, 83, 85]


def test_debounce_k_of_n_ignores_a_single_spike() -> None:
    rule = ThresholdRule(name="hot", channel="spindle_temp", above=80, debounce_k=3, debounce_n=4)
    eng, out = make(rule)
    feed(eng, [90, 70, 70, 70, 90, 90, 70, 90])
    assert states(out) == ["raised"] and out[0].ts == 7.0
    feed(eng, [70, 90, 70, 70, 70], t0=8.0)
    assert states(out) == ["raised", "cleared"] and out[1].ts == 11.0


def test_min_active_time_holds_the_clear_and_cooldown_delays_the_next_raise() -> None:
    rule = ThresholdRule(name="hot", channel="spindle_temp", above=80, min_active_s=3, cooldown_s=5)
    eng, out = make(rule)
    feed(eng, [90, 70, 70, 70, 70, 90, 90, 90, 90, 90])
    assert [(e.body["state"], e.ts) for e in out] == [
        ("raised", 0.0),
        ("cleared", 3.0),
        ("raised", 8.0),
    ]


def test_low_rule_raises_below_and_clears_above_its_clear_level() -> None:
    eng, out = make(
        ThresholdRule(name="cold", kind="low", channel="spindle_temp", below=10, clear_above=15)
    )
    feed(eng, [20, 9, 5, 12, 16])
    assert states(out) == ["raised", "cleared"]
    assert out[1].body["peak"] == 5 and out[1].body["threshold"] == 15


def test_rate_rule_judges_the_change_per_second() -> None:
    eng, out = make(
        ThresholdRule(name="jump", kind="rate", channel="spindle_temp", above=5, clear_below=1)
    )
    feed(eng, [50, 51, 60, 62, 62.5])
    assert states(out) == ["raised", "cleared"]
    assert out[0].body["value"] == 9.0 and out[1].body["value"] == 0.5


def test_stuck_rule_raises_after_for_s_flat_and_clears_when_it_moves() -> None:
    eng, out = make(
        ThresholdRule(name="flat", kind="stuck", channel="spindle_temp", for_s=3, tolerance=0.1)
    )
    feed(eng, [50, 50.05, 50, 50.08, 50, 51])
    assert [(e.body["state"], e.ts) for e in out] == [("raised", 3.0), ("cleared", 5.0)]


def test_stale_rule_raises_on_the_tick_and_clears_on_the_next_good_sample() -> None:
    eng, out = make(
        ThresholdRule(name="stale", kind="stale", channel="spindle_temp", for_s=5), devices=["m1"]
    )
    eng.on_frame(frame("m1", 1.0, 50))
    eng.tick(5.0)
    for t in (2.0, 3.0, 4.0):  # the channel is BAD: it does not count as data
        eng.on_frame(frame("m1", t, 50, Quality.BAD))
    eng.tick(6.5)
    assert states(out) == ["raised"] and out[0].body["evidence"]["last_good"] == 1.0
    eng.on_frame(frame("m1", 7.0, 50))
    assert states(out) == ["raised", "cleared"]


def test_offline_rule_defaults_to_five_minutes_without_a_good_poll() -> None:
    eng, out = make(ThresholdRule(name="offline", kind="offline"), devices=["m1", "m2"])
    eng.on_frame(frame("m1", 0.0, 50))
    eng.on_frame(frame("m2", 0.0, 50))
    eng.tick(299.0)
    assert out == []
    eng.on_frame(frame("m2", 250.0, 50))
    eng.tick(301.0)
    assert [(e.body["machine"], e.body["state"]) for e in out] == [("m1", "raised")]
    eng.on_frame(frame("m1", 302.0, 50))
    assert [(e.body["machine"], e.body["state"]) for e in out][-1] == ("m1", "cleared")


def test_nan_and_bad_values_never_raise_or_clear() -> None:
    eng, out = make(ThresholdRule(name="hot", channel="spindle_temp", above=80))
    eng.on_frame(frame("m1", 0.0, 500.0, Quality.BAD))
    eng.on_frame(frame("m1", 1.0, math.nan))
    assert out == []
    eng.on_frame(frame("m1", 2.0, 90.0))
    eng.on_frame(frame("m1", 3.0, 10.0, Quality.BAD))
    eng.on_frame(frame("m1", 4.0, math.nan))
    assert states(out) == ["raised"]


def test_alert_evidence_carries_the_machines_last_window_summary() -> None:
    eng, out = make(ThresholdRule(name="hot", channel="spindle_temp", above=80))
    eng.on_window(
        Window("m1", 0.0, 1.0, CH, np.array([10, 0], np.int32), *(np.array([81.0, np.nan]),) * 5)
    )
    feed(eng, [90])
    win = out[0].body["evidence"]["window"]
    assert win["channels"]["spindle_temp"]["n"] == 10
    assert "vibration_rms" not in win["channels"]  # a channel rule: its own channel


DEVICE = """
[[devices]]
name = "m1"
host = "127.0.0.1"
[[devices.registers]]
name = "spindle_temp"
address = 0
type = "float32"
unit = "degC"
"""


def load(text: str, tmp_path: Path) -> ThresholdRule:
    path = tmp_path / "a.toml"
    path.write_text(DEVICE + text)
    cfg = load_config(path)
    return cfg.alerts.rules[0]


def test_rule_levels_in_another_unit_are_converted_to_the_channels_unit(tmp_path: Path) -> None:
    rule = load(
        '[[alerts.rules]]\nname = "hot"\nchannel = "spindle_temp"\nunit = "degF"\n'
        "above = 212.0\nclear_below = 176.0\n",
        tmp_path,
    )
    assert rule.above == pytest.approx(100.0) and rule.clear_below == pytest.approx(80.0)
    assert rule.unit == "degC"


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            'name = "x"\nchannel = "spindle_temp"\nabove = 5\nclear_below = 6\n',
            "alerts.rules[0] (x): clear_below (6.0) must be <= above",
        ),
        (
            'name = "x"\nkind = "low"\nchannel = "spindle_temp"\nbelow = 5\nclear_above = 4\n',
            "clear_above (4.0) must be >= below",
        ),
        (
            'name = "x"\nchannel = "spindle_tmp"\nabove = 5\n',
            "alerts.rules[0] (x).channel: 'spindle_tmp'",
        ),
        ('name = "x"\nkind = "offline"\nmachines = ["m9"]\n', "alerts.rules[0] (x).machines: 'm9'"),
        (
            'name = "x"\nchannel = "spindle_temp"\nunit = "bar"\nabove = 5\n',
            "alerts.rules[0] (x).unit: no conversion from 'bar'",
        ),
        (
            'name = "x"\nchannel = "spindle_temp"\nabove = 5\ndebounce_k = 3\ndebounce_n = 2\n',
            "debounce_k (3) must be <= debounce_n",
        ),
        (
            'name = "x"\nkind = "stuck"\nchannel = "spindle_temp"\nabove = 5\n',
            "`above` does not apply",
        ),
    ],
)
def test_bad_rule_config_fails_at_load_naming_the_key_path(
    rule: str, message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        load("[[alerts.rules]]\n" + rule, tmp_path)
    assert message in str(err.value), str(err.value)


def test_a_rule_suppressed_by_an_active_one_does_not_raise_and_is_counted() -> None:
    hot = ThresholdRule(name="hot", channel="spindle_temp", above=80, clear_below=70)
    hotter = ThresholdRule(
        name="hotter", channel="spindle_temp", above=85, clear_below=70, suppressed_by=("hot",)
    )
    eng, out = make(hot, hotter)
    feed(eng, [90, 95, 60])
    assert [(e.body["rule"], e.body["state"]) for e in out] == [
        ("hot", "raised"),
        ("hot", "cleared"),
    ]
    assert eng.suppressed == 1
    feed(eng, [84, 90], t0=10.0)  # "hot" raises first again; "hotter" stays suppressed
    assert eng.suppressed == 2 and [e.body["rule"] for e in out].count("hotter") == 0
