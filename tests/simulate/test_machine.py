"""The pure CNC machine model: determinism, realistic ranges, cycles and faults.

Simulated time is driven directly with small steps; nothing here sleeps on the wall clock.
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest

from appliance.simulate.machine import (
    ALARM_TEMP_C,
    CHANNELS,
    FAULT_KINDS,
    TEMP_RAMP_RISE_C,
    CncMachine,
    ProgramState,
)
from drivers.modbus.registers import load_profile

DT_S = 0.05  # the cell's default tick: 20 Hz


def run(machine: CncMachine, seconds: float, dt_s: float = DT_S) -> list[dict[str, float]]:
    """Step ``machine`` for ``seconds`` simulated seconds and return every step's values."""
    out = []
    for _ in range(round(seconds / dt_s)):
        machine.step(dt_s)
        out.append(machine.values())
    return out


def column(rows: list[dict[str, float]], name: str) -> list[float]:
    return [r[name] for r in rows]


def warm_machine(index: int, min_temp_c: float = 0.0) -> CncMachine:
    """A machine that has run for two simulated minutes (and at least up to ``min_temp_c``)."""
    machine = CncMachine(seed=42, index=index)
    run(machine, 120.0)
    for _ in range(20):
        if machine.values()["spindle_temp"] >= min_temp_c:
            break
        run(machine, 30.0)
    assert machine.values()["spindle_temp"] >= min_temp_c
    return machine


def test_values_name_every_channel_of_the_cnc_sim_profile() -> None:
    names = {r.name for r in load_profile("cnc-sim")}
    assert set(CncMachine(seed=1).values()) == names == set(CHANNELS)


def test_same_seed_index_and_steps_give_identical_series() -> None:
    steps = [0.05, 0.1, 0.01, 0.25] * 500
    series = []
    for _ in range(2):
        machine = CncMachine(seed=7, index=3)
        rows = []
        for i, dt in enumerate(steps):
            if i == 700:
                machine.inject("vibration_surge", 15.0)
            if i == 1200:
                machine.inject("temp_ramp", 20.0)
            machine.step(dt)
            rows.append(machine.values())
        series.append(rows)
    assert series[0] == series[1]


def test_different_seed_or_index_gives_a_different_series() -> None:
    base = run(CncMachine(seed=7, index=0), 30.0)
    assert run(CncMachine(seed=8, index=0), 30.0) != base
    assert run(CncMachine(seed=7, index=1), 30.0) != base


@pytest.mark.parametrize("index", range(6))
def test_values_stay_in_realistic_ranges_over_five_minutes(index: int) -> None:
    rows = run(CncMachine(seed=42, index=index), 300.0)
    for name, low, high in [
        ("spindle_speed", 0.0, 12000.0),
        ("spindle_load", 0.0, 100.0),
        ("axis_load_x", 0.0, 40.0),
        ("axis_load_y", 0.0, 40.0),
        ("axis_load_z", 0.0, 40.0),
        ("spindle_temp", 28.0, 60.0),
        ("coolant_temp", 20.0, 28.0),
        ("vibration_rms", 0.0, 3.5),
    ]:
        values = column(rows, name)
        assert low <= min(values) and max(values) <= high, (name, min(values), max(values))
        assert all(math.isfinite(v) for v in values)
    states = set(column(rows, "program_state"))
    assert states == {ProgramState.IDLE, ProgramState.RUNNING, ProgramState.TOOL_CHANGE}
    running_speeds = [
        r["spindle_speed"] for r in rows if r["program_state"] == ProgramState.RUNNING
    ]
    assert max(running_speeds) >= 3000.0


def test_spindle_is_stopped_while_idle_and_loaded_only_while_running() -> None:
    rows = run(CncMachine(seed=42, index=2), 240.0)
    idle = [r for r in rows if r["program_state"] == ProgramState.IDLE]
    assert idle and all(r["spindle_speed"] == 0.0 and r["spindle_load"] < 3.0 for r in idle)
    loaded = [r for r in rows if r["spindle_load"] > 25.0]
    assert loaded
    assert all(
        r["program_state"] == ProgramState.RUNNING and r["spindle_speed"] > 0.0 for r in loaded
    )


def test_part_counter_is_monotonic_and_counts_each_completed_cycle() -> None:
    rows = run(CncMachine(seed=42, index=1), 600.0)
    parts = column(rows, "part_counter")
    steps = [b - a for a, b in pairwise(parts)]
    assert all(s in (0.0, 1.0) for s in steps)
    assert all(p == int(p) for p in parts)
    assert parts[-1] - parts[0] >= 5
    for before, after in pairwise(rows):
        if after["part_counter"] > before["part_counter"]:
            assert before["program_state"] == ProgramState.RUNNING
            assert after["program_state"] == ProgramState.IDLE


@pytest.mark.parametrize("index", range(4))
def test_temp_ramp_fault_raises_then_recovers_spindle_temp(index: int) -> None:
    machine = warm_machine(index)
    machine.inject("temp_ramp", 20.0)
    assert machine.active_faults == {"temp_ramp"}
    during = column(run(machine, 20.0), "spindle_temp")
    assert machine.active_faults == frozenset()
    assert max(during) > 75.0
    # The rise is steady: each 5 s quarter of the fault ends hotter than the one before.
    quarters = [during[i * 100 - 1] for i in range(1, 5)]
    assert quarters == sorted(quarters)
    after = column(run(machine, 15.0), "spindle_temp")
    assert after[-1] < 60.0
    assert max(column(run(machine, 60.0), "spindle_temp")) < 65.0


def test_temp_ramp_from_a_cold_spindle_still_passes_the_demo_alert_threshold() -> None:
    machine = CncMachine(seed=42, index=0)
    assert machine.values()["spindle_temp"] < 45.0
    machine.inject("temp_ramp", 20.0)
    assert max(column(run(machine, 20.0), "spindle_temp")) > 78.0
    assert column(run(machine, 15.0), "spindle_temp")[-1] < 60.0


def test_temp_ramp_adds_about_forty_degrees_over_an_identical_twin() -> None:
    faulty, twin = CncMachine(seed=5, index=0), CncMachine(seed=5, index=0)
    run(faulty, 30.0)
    run(twin, 30.0)
    faulty.inject("temp_ramp", 10.0)
    excess = [
        a["spindle_temp"] - b["spindle_temp"]
        for a, b in zip(run(faulty, 10.0), run(twin, 10.0), strict=True)
    ]
    assert 35.0 < excess[-1] < 45.0
    assert excess[len(excess) // 2] == pytest.approx(excess[-1] / 2, abs=3.0)


def test_overheating_spindle_alarms_stops_and_resets_after_cooling() -> None:
    machine = warm_machine(index=2, min_temp_c=ALARM_TEMP_C - TEMP_RAMP_RISE_C + 2.0)
    machine.inject("temp_ramp", 20.0)
    rows = run(machine, 20.0)
    alarm = [r for r in rows if r["program_state"] == ProgramState.ALARM]
    assert alarm, max(column(rows, "spindle_temp"))
    assert min(r["spindle_temp"] for r in alarm) > ALARM_TEMP_C - 1.0
    assert alarm[-1]["spindle_speed"] == 0.0
    rows = run(machine, 40.0)
    assert rows[-1]["program_state"] != ProgramState.ALARM
    assert rows[-1]["spindle_temp"] < 60.0


def test_vibration_surge_multiplies_vibration_and_raises_spindle_load() -> None:
    faulty, twin = CncMachine(seed=9, index=1), CncMachine(seed=9, index=1)
    run(faulty, 60.0)
    run(twin, 60.0)
    faulty.inject("vibration_surge", 30.0)
    assert faulty.active_faults == {"vibration_surge"}
    surge, normal = run(faulty, 30.0), run(twin, 30.0)
    settled = list(zip(surge, normal, strict=True))[40:]  # after the 0.3 s onset time constant
    assert all(a["vibration_rms"] >= 3.5 * b["vibration_rms"] for a, b in settled)
    assert all(a["vibration_rms"] > 7.0 for a, _ in settled)
    assert max(a["vibration_rms"] for a, _ in settled) > 10.0
    spinning = [(a, b) for a, b in settled if b["spindle_speed"] > 1000.0]
    assert spinning
    assert all(a["spindle_load"] > b["spindle_load"] for a, b in spinning)
    assert faulty.active_faults == frozenset()
    after = run(faulty, 10.0)[40:]
    assert max(column(after, "vibration_rms")) < 3.5


def test_injecting_an_unknown_fault_kind_raises() -> None:
    machine = CncMachine(seed=1)
    with pytest.raises(ValueError, match="unknown fault kind 'spindle_fire'"):
        machine.inject("spindle_fire", 10.0)
    assert machine.active_faults == frozenset()
    assert set(FAULT_KINDS) == {
        "temp_ramp",
        "vibration_surge",
        "tool_wear",
        "bearing_defect",
        "imbalance",
        "chatter",
        "coolant_loss",
    }


@pytest.mark.parametrize("duration_s", [0.0, -1.0, math.nan, math.inf])
def test_injecting_a_fault_without_a_positive_duration_raises(duration_s: float) -> None:
    with pytest.raises(ValueError, match="duration_s"):
        CncMachine(seed=1).inject("temp_ramp", duration_s)


@pytest.mark.parametrize("dt_s", [-0.05, math.nan, math.inf])
def test_stepping_by_a_negative_or_non_finite_time_raises(dt_s: float) -> None:
    with pytest.raises(ValueError, match="dt_s"):
        CncMachine(seed=1).step(dt_s)


def test_large_steps_stay_stable() -> None:
    rows = run(CncMachine(seed=3), 600.0, dt_s=1.0)
    assert all(28.0 < r["spindle_temp"] < 60.0 for r in rows)
    assert len(set(column(rows, "part_counter"))) > 3
