"""A pure, deterministic model of one 3-axis CNC machining centre.

The model drives every channel of the ``cnc-sim`` register profile
(``drivers/profiles/cnc-sim.toml``) so the appliance can be developed, demonstrated and tested
without a machine shop. It does no I/O and reads no clock: simulated time only advances through
:meth:`CncMachine.step`, so the same ``seed``, ``index`` and sequence of ``dt_s`` always give the
same values (``numpy.random.default_rng`` streams seeded from ``(seed, index)``: one for programs
and cycle timing, one for measurement noise, one for fault parameters, so a fault changes nothing
but its own effects).

What it models, in simulated seconds:

* **Machining cycles.** Idle (part load/unload, ``program_state`` 0) → for each operation of the
  current program: spindle ramp to the operation's speed, cut (``program_state`` 1), tool change
  between operations (spindle stopped, ``program_state`` 2) → spin down → ``part_counter`` + 1 →
  idle. Each machine owns three programs drawn from its random stream and runs them in turn.
* **Loads.** Spindle load (% of rated torque) follows the cut with feed-rate ripple and an
  acceleration spike during spin-up; axis loads (%) follow the tool path, Z carries the head's
  weight all the time.
* **Temperatures.** Spindle temperature is a first-order lag (time constant
  :data:`SPINDLE_TAU_S`) towards an equilibrium that rises with speed and load (about 31 °C
  stopped, up to about 57 °C at full cut); coolant drifts slowly between about 21 and 27 °C.
* **Vibration.** RMS velocity (mm/s) grows with spindle speed and cutting load, below about
  3 mm/s in normal running.
* **Alarm.** Above :data:`ALARM_TEMP_C` the controller stops the spindle and shows alarm
  (``program_state`` 3) until the spindle has cooled below :data:`ALARM_RESET_TEMP_C` and no
  fault is active; the interrupted part is scrapped (not counted).
* **Faults** (:meth:`CncMachine.inject`): ``temp_ramp`` adds heat that rises steadily to
  :data:`TEMP_RAMP_RISE_C` above normal (and to at least :data:`TEMP_RAMP_MIN_PEAK_C`) over the
  fault's duration and decays with
  :data:`TEMP_COOL_TAU_S` afterwards (below 60 °C within about 10 s of the end);
  ``vibration_surge`` multiplies vibration by 4–6 (at least 8 mm/s, whatever the cycle phase) and
  raises spindle load while the spindle turns.
* **Subtle faults** (:data:`SUBTLE_FAULT_KINDS`), which a threshold on one channel hardly sees:
  ``tool_wear`` (cutting torque and vibration creep up over the duration at the same feed and
  speed), ``bearing_defect`` (a narrow-band tone at the outer-race frequency
  :data:`BEARING_BPFO_ORDER` × rotation in the waveform, RMS + ~3 %), ``imbalance`` (extra 1×
  rotation component growing with speed², large only at high speed), ``chatter`` (a band of
  :data:`CHATTER_BAND_HZ` energy during cuts) and ``coolant_loss`` (coolant and spindle
  temperatures drift up by :data:`COOLANT_LOSS_RISE_C` over the duration). The waveform parts
  are given to the vibration FIFO by :meth:`CncMachine.waveform_tones`.

``step()`` is called at about 20 Hz for up to 100 machines, so it costs one numpy call (the
noise draw) plus a few dozen float operations.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

#: Fault kinds :meth:`CncMachine.inject` accepts.
SUBTLE_FAULT_KINDS: tuple[str, ...] = (
    "tool_wear",
    "bearing_defect",
    "imbalance",
    "chatter",
    "coolant_loss",
)
FAULT_KINDS: tuple[str, ...] = ("temp_ramp", "vibration_surge", *SUBTLE_FAULT_KINDS)

#: Channel names :meth:`CncMachine.values` returns, as in the ``cnc-sim`` profile.
CHANNELS: tuple[str, ...] = (
    "spindle_speed",
    "spindle_load",
    "axis_load_x",
    "axis_load_y",
    "axis_load_z",
    "spindle_temp",
    "coolant_temp",
    "vibration_rms",
    "part_counter",
    "program_state",
)

#: Time constant of the spindle's thermal lag towards equilibrium (s). Compressed from the
#: 10–30 min of a real spindle so that a demo shows thermal behaviour within minutes.
SPINDLE_TAU_S = 40.0
#: Time constant of the coolant tank temperature (s).
COOLANT_TAU_S = 90.0
#: Heat a ``temp_ramp`` fault adds by the end of its duration (°C above normal) ...
TEMP_RAMP_RISE_C = 40.0
#: ... or more, so that the spindle reaches at least this temperature even from cold (°C) and a
#: demo's over-temperature rule (75 °C) fires whatever the machine was doing.
TEMP_RAMP_MIN_PEAK_C = 82.0
#: Time constant with which the fault's extra heat decays after the fault ends (s).
TEMP_COOL_TAU_S = 4.0
#: Spindle temperature at which the controller raises an overtemperature alarm (°C).
ALARM_TEMP_C = 85.0
#: Spindle temperature below which an alarm is reset, once no fault is active (°C).
ALARM_RESET_TEMP_C = 60.0
#: Least time the controller stays in alarm (s): an operator acknowledges it.
ALARM_HOLD_S = 5.0
#: Spindle acceleration and deceleration limit (rpm/s).
SPINDLE_ACCEL_RPM_S = 6000.0
#: Spindle speed for which the thermal and vibration models are scaled (rpm).
RATED_SPEED_RPM = 12000.0
#: Time constant with which a vibration surge sets in and dies away (s).
SURGE_TAU_S = 0.3
#: ``tool_wear``: cutting torque increase at the end of the fault's duration (fraction) ...
TOOL_WEAR_LOAD_RISE = 0.25
#: ... and vibration increase (fraction); a new tool (fault end) resets both.
TOOL_WEAR_VIB_RISE = 0.15
#: ``bearing_defect``: outer-race defect frequency as a multiple of the rotation frequency
#: (ball pass frequency, outer race, of a typical spindle bearing) ...
BEARING_BPFO_ORDER = 3.58
#: ... and its RMS as a fraction of the healthy vibration RMS.
BEARING_TONE_FRACTION = 0.25
#: ``imbalance``: RMS of the extra 1× component as a fraction of the healthy RMS, at rated speed
#: (scales with speed²).
IMBALANCE_FRACTION_AT_RATED = 0.9
#: ``chatter``: band of the self-excited vibration during cuts (Hz) ...
CHATTER_BAND_HZ = (360.0, 440.0)
#: ... and its RMS as a fraction of the healthy vibration RMS.
CHATTER_FRACTION = 0.45
#: ``coolant_loss``: coolant temperature rise at the end of the fault's duration (°C); the
#: spindle, cooled less, gains 1.5 times as much.
COOLANT_LOSS_RISE_C = 5.0


class ProgramState(enum.IntEnum):
    """Value of the ``program_state`` register."""

    IDLE = 0
    RUNNING = 1
    TOOL_CHANGE = 2
    ALARM = 3


class _Phase(enum.Enum):
    """Finer-grained controller phase; several map onto one :class:`ProgramState`."""

    IDLE = enum.auto()
    SPIN_UP = enum.auto()
    CUT = enum.auto()
    SPIN_DOWN = enum.auto()
    TOOL_CHANGE = enum.auto()
    ALARM = enum.auto()


_STATE_OF_PHASE: dict[_Phase, float] = {
    _Phase.IDLE: float(ProgramState.IDLE),
    _Phase.SPIN_UP: float(ProgramState.RUNNING),
    _Phase.CUT: float(ProgramState.RUNNING),
    _Phase.SPIN_DOWN: float(ProgramState.RUNNING),
    _Phase.TOOL_CHANGE: float(ProgramState.TOOL_CHANGE),
    _Phase.ALARM: float(ProgramState.ALARM),
}

_TWO_PI = 2.0 * math.pi


@dataclass(frozen=True)
class Operation:
    """One machining operation: one tool, one spindle speed, one cut."""

    speed_rpm: float
    load_pct: float  # mean spindle load while cutting, % of rated torque
    duration_s: float  # cutting time
    path_hz: float  # frequency of the tool path's back-and-forth (axis load ripple)


@dataclass(frozen=True)
class Program:
    """A part program: the operations one cycle runs in order."""

    number: int
    operations: tuple[Operation, ...]


class CncMachine:
    """One simulated machining centre. Pure: no I/O, no clock, deterministic per seed and index.

    Not thread-safe; the simulator's tick task owns each instance.
    """

    def __init__(self, seed: int, index: int = 0) -> None:
        """Draw this machine's programs and set points from ``(seed, index)``."""
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        self.seed = seed
        self.index = index
        # Three independent streams, so that injecting a fault (which draws from its own) leaves
        # the cycle timing and the measurement noise exactly as they would have been.
        rng = np.random.default_rng([seed, index, 0])
        self._rng = rng  # programs and cycle timing
        self._noise_rng = np.random.default_rng([seed, index, 1])
        self._fault_rng = np.random.default_rng([seed, index, 2])
        self.programs: tuple[Program, ...] = tuple(
            Program(
                number=1000 + 10 * p,
                operations=tuple(
                    Operation(
                        speed_rpm=float(round(rng.uniform(3000.0, 11000.0), -2)),
                        load_pct=float(rng.uniform(25.0, 65.0)),
                        duration_s=float(rng.uniform(6.0, 18.0)),
                        path_hz=float(rng.uniform(0.2, 1.0)),
                    )
                    for _ in range(int(rng.integers(2, 5)))
                ),
            )
            for p in range(3)
        )
        self._coolant_setpoint_c = float(rng.uniform(21.5, 23.5))
        self._vib_floor_mm_s = float(rng.uniform(0.15, 0.3))

        self._time_s = 0.0
        self._phase = _Phase.IDLE
        self._phase_t = 0.0
        self._phase_len = float(rng.uniform(0.5, 6.0))  # desynchronises the machines
        self._program_i = int(rng.integers(0, len(self.programs)))
        self._op_i = 0
        self._parts = int(rng.integers(100, 5000))
        self._speed = 0.0
        self._target_speed = 0.0
        self._coolant_c = self._coolant_setpoint_c + float(rng.uniform(0.0, 1.0))
        self._spindle_base_c = self._coolant_c + 8.0 + float(rng.uniform(0.0, 10.0))
        self._fault_heat_c = 0.0
        self._temp_rate_c_s = 0.0
        self._surge = 0.0
        self._surge_mult = 1.0
        self._faults: dict[str, float] = {}  # kind -> remaining simulated seconds
        self._fault_len: dict[str, float] = {}  # kind -> duration it was injected with
        self._coolant_loss_c = 0.0  # extra coolant heat of a coolant loss (decays after it)
        self._tones: tuple[tuple[str, float, float], ...] = ()
        self._values: dict[str, float] = {}
        self._update_outputs(0.0)

    # ------------------------------------------------------------------ public API

    @property
    def time_s(self) -> float:
        """Simulated seconds since construction."""
        return self._time_s

    @property
    def program_state(self) -> ProgramState:
        """Current controller state, as the ``program_state`` register shows it."""
        return ProgramState(int(_STATE_OF_PHASE[self._phase]))

    @property
    def active_faults(self) -> frozenset[str]:
        """Kinds of the faults in progress (a ``temp_ramp``'s cool-down is not one)."""
        return frozenset(self._faults)

    def inject(self, kind: str, duration_s: float) -> None:
        """Start fault ``kind`` (one of :data:`FAULT_KINDS`) for ``duration_s`` simulated seconds.

        Injecting a fault that is already active restarts it with the new duration; a
        ``temp_ramp`` then continues from the heat already added towards
        :data:`TEMP_RAMP_RISE_C`.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r} (known: {', '.join(FAULT_KINDS)})")
        if not (math.isfinite(duration_s) and duration_s > 0.0):
            raise ValueError(f"fault duration_s must be a positive number, got {duration_s!r}")
        self._faults[kind] = float(duration_s)
        self._fault_len[kind] = float(duration_s)
        if kind == "temp_ramp":
            rise_c = max(TEMP_RAMP_RISE_C, TEMP_RAMP_MIN_PEAK_C - self._spindle_base_c)
            self._temp_rate_c_s = max(0.0, rise_c - self._fault_heat_c) / duration_s
        elif kind == "vibration_surge":
            self._surge_mult = float(self._fault_rng.uniform(4.0, 6.0))

    def step(self, dt_s: float) -> None:
        """Advance simulated time by ``dt_s`` s (stable for any step, faithful below 0.5 s)."""
        if not dt_s >= 0.0 or math.isinf(dt_s):
            raise ValueError(f"dt_s must be a finite number >= 0, got {dt_s!r}")
        if dt_s == 0.0:
            return
        self._time_s += dt_s
        self._advance_faults(dt_s)
        self._advance_controller(dt_s)
        step = SPINDLE_ACCEL_RPM_S * dt_s
        self._speed += min(step, max(-step, self._target_speed - self._speed))
        self._update_outputs(dt_s)

    def values(self) -> dict[str, float]:
        """Current value of every channel in :data:`CHANNELS`, in the profile's units."""
        return dict(self._values)

    def waveform_tones(self) -> tuple[tuple[str, float, float], ...]:
        """The fault components of the vibration waveform now: ``(key, frequency_hz, rms_mm_s)``
        per tone. Their power is part of ``values()["vibration_rms"]``; the FIFO adds them on top
        of the healthy signal (whose RMS is what remains), keeping each key's phase continuous."""
        return self._tones

    def _progress(self, kind: str) -> float:
        """How far fault ``kind`` is through its duration (0..1; 0 when not active)."""
        if kind not in self._faults:
            return 0.0
        total = self._fault_len.get(kind, 0.0)
        return 1.0 if total <= 0.0 else min(1.0, 1.0 - self._faults[kind] / total)

    # ------------------------------------------------------------------ internals

    def _advance_faults(self, dt_s: float) -> None:
        """Count fault durations down and evolve the extra heat and the surge level."""
        faults = self._faults
        if "temp_ramp" in faults:
            remaining = faults["temp_ramp"]
            self._fault_heat_c += self._temp_rate_c_s * min(dt_s, remaining)
            if remaining <= dt_s:
                del faults["temp_ramp"]
            else:
                faults["temp_ramp"] = remaining - dt_s
        elif self._fault_heat_c > 0.0:
            self._fault_heat_c *= math.exp(-dt_s / TEMP_COOL_TAU_S)
            if self._fault_heat_c < 1e-3:
                self._fault_heat_c = 0.0
        for kind in SUBTLE_FAULT_KINDS:
            if kind in faults:
                remaining = faults[kind] - dt_s
                if remaining <= 0.0:
                    del faults[kind]
                else:
                    faults[kind] = remaining
        if "coolant_loss" in faults:
            self._coolant_loss_c = COOLANT_LOSS_RISE_C * self._progress("coolant_loss")
        elif self._coolant_loss_c > 0.0:
            self._coolant_loss_c *= math.exp(-dt_s / COOLANT_TAU_S)
            if self._coolant_loss_c < 1e-3:
                self._coolant_loss_c = 0.0
        target = 0.0
        if "vibration_surge" in faults:
            target = 1.0
            remaining = faults["vibration_surge"] - dt_s
            if remaining <= 0.0:
                del faults["vibration_surge"]
            else:
                faults["vibration_surge"] = remaining
        if self._surge != target:
            self._surge += (target - self._surge) * (1.0 - math.exp(-dt_s / SURGE_TAU_S))
            if abs(self._surge - target) < 1e-3:
                self._surge = target

    def _enter(self, phase: _Phase, length_s: float = 0.0) -> None:
        self._phase = phase
        self._phase_t = 0.0
        self._phase_len = length_s

    def _advance_controller(self, dt_s: float) -> None:
        """The controller's state machine: cycles, tool changes, alarm."""
        self._phase_t += dt_s
        phase = self._phase
        spindle_c = self._spindle_base_c + self._fault_heat_c
        if phase is not _Phase.ALARM and spindle_c > ALARM_TEMP_C:
            self._enter(_Phase.ALARM)
            self._target_speed = 0.0
            return
        op = self.programs[self._program_i].operations[self._op_i]
        if phase is _Phase.IDLE:
            if self._phase_t >= self._phase_len:
                self._op_i = 0
                self._target_speed = self.programs[self._program_i].operations[0].speed_rpm
                self._enter(_Phase.SPIN_UP)
        elif phase is _Phase.SPIN_UP:
            if abs(self._speed - self._target_speed) < 1.0:
                self._enter(_Phase.CUT, op.duration_s)
        elif phase is _Phase.CUT:
            if self._phase_t >= self._phase_len:
                if self._op_i + 1 < len(self.programs[self._program_i].operations):
                    self._target_speed = 0.0
                    self._enter(_Phase.TOOL_CHANGE, float(self._rng.uniform(4.0, 7.0)))
                else:
                    self._target_speed = 0.0
                    self._enter(_Phase.SPIN_DOWN)
        elif phase is _Phase.TOOL_CHANGE:
            if self._phase_t >= self._phase_len and self._speed == 0.0:
                self._op_i += 1
                self._target_speed = self.programs[self._program_i].operations[self._op_i].speed_rpm
                self._enter(_Phase.SPIN_UP)
        elif phase is _Phase.SPIN_DOWN:
            if self._speed == 0.0:
                self._parts += 1
                self._next_program()
        elif self._phase_t >= ALARM_HOLD_S and spindle_c < ALARM_RESET_TEMP_C and not self._faults:
            self._next_program()

    def _next_program(self) -> None:
        self._program_i = (self._program_i + 1) % len(self.programs)
        self._op_i = 0
        self._target_speed = 0.0
        self._enter(_Phase.IDLE, float(self._rng.uniform(3.0, 8.0)))

    def _update_outputs(self, dt_s: float) -> None:
        """Loads, temperatures and vibration for the current phase, with measurement noise."""
        z = self._noise_rng.standard_normal(9).tolist()
        phase = self._phase
        speed = self._speed
        speed_frac = speed / RATED_SPEED_RPM
        t = self._phase_t
        spinning = speed > 1.0

        axis_x = 2.0
        axis_y = 2.0
        axis_z = 10.0  # the vertical axis holds the spindle head against gravity
        if phase is _Phase.CUT:
            op = self.programs[self._program_i].operations[self._op_i]
            engage = min(1.0, t / 0.5)
            w = _TWO_PI * op.path_hz * t
            wear = TOOL_WEAR_LOAD_RISE * self._progress("tool_wear")
            load = (
                engage * op.load_pct * (1.0 + 0.12 * math.sin(w)) * (1.0 + wear)
                + 4.0
                + 3.0 * speed_frac
            )
            axis_x = 12.0 + 18.0 * engage * abs(math.sin(w))
            axis_y = 12.0 + 18.0 * engage * abs(math.cos(w))
            axis_z = 10.0 + 0.25 * load
            load_noise = 1.5
        elif phase is _Phase.SPIN_UP:
            load = 35.0 + 3.0 * speed_frac
            load_noise = 2.0
        elif spinning:
            load = 4.0 + 3.0 * speed_frac
            load_noise = 0.5
        else:
            load = 0.0
            load_noise = 0.2
        if phase is _Phase.TOOL_CHANGE and t < 1.0:
            axis_x = axis_y = 20.0  # rapid traverse to the tool changer
        if spinning and self._surge > 0.0:
            load += self._surge * (0.3 * load + 8.0)
        load = max(0.0, load + load_noise * z[0])

        if dt_s > 0.0:
            coolant_eq = self._coolant_setpoint_c + 3.0 * speed_frac * (0.5 + load / 100.0)
            self._coolant_c += (coolant_eq - self._coolant_c) * (
                1.0 - math.exp(-dt_s / COOLANT_TAU_S)
            )
            spindle_eq = (
                self._coolant_c + 8.0 + 24.0 * speed_frac + 0.08 * load + 0.5 * self._coolant_loss_c
            )
            self._spindle_base_c += (spindle_eq - self._spindle_base_c) * (
                1.0 - math.exp(-dt_s / SPINDLE_TAU_S)
            )

        vib = self._vib_floor_mm_s + 0.13 * speed / 1000.0
        if phase is _Phase.CUT:
            vib += 0.01 * load
        vib = vib * (1.0 + 0.06 * z[1]) + 0.03 * z[2]
        vib *= 1.0 + TOOL_WEAR_VIB_RISE * self._progress("tool_wear")
        tones = self._fault_tones(max(0.05, vib), speed, phase is _Phase.CUT)
        self._tones = tones
        if tones:
            vib = math.sqrt(vib * vib + sum(a * a for _, _, a in tones))
        if self._surge > 0.0:
            vib += self._surge * (self._surge_mult * max(vib, 2.0) - vib)
        vib = max(0.05, vib)

        self._values = {
            "spindle_speed": max(0.0, speed + (3.0 * z[3] if spinning else 0.0)),
            "spindle_load": load,
            "axis_load_x": max(0.0, axis_x + 0.8 * z[4]),
            "axis_load_y": max(0.0, axis_y + 0.8 * z[5]),
            "axis_load_z": max(0.0, axis_z + 0.8 * z[6]),
            "spindle_temp": self._spindle_base_c
            + self._fault_heat_c
            + self._coolant_loss_c
            + 0.08 * z[7],
            "coolant_temp": self._coolant_c + self._coolant_loss_c + 0.02 * z[8],
            "vibration_rms": vib,
            "part_counter": float(self._parts),
            "program_state": _STATE_OF_PHASE[phase],
        }

    def _fault_tones(
        self, vib: float, speed: float, cutting: bool
    ) -> tuple[tuple[str, float, float], ...]:
        """Waveform components of the active subtle faults (see :meth:`waveform_tones`)."""
        faults = self._faults
        if speed <= 1.0 or not (
            "bearing_defect" in faults or "imbalance" in faults or "chatter" in faults
        ):
            return ()
        shaft_hz = speed / 60.0
        tones: list[tuple[str, float, float]] = []
        if "bearing_defect" in faults:
            tones.append(("bpfo", BEARING_BPFO_ORDER * shaft_hz, BEARING_TONE_FRACTION * vib))
        if "imbalance" in faults:
            frac = IMBALANCE_FRACTION_AT_RATED * (speed / RATED_SPEED_RPM) ** 2
            tones.append(("imbalance", shaft_hz, frac * vib))
        if "chatter" in faults and cutting:
            lo, hi = CHATTER_BAND_HZ
            n = 8
            each = CHATTER_FRACTION * vib / math.sqrt(n)
            tones.extend((f"chatter{k}", lo + (hi - lo) * (k + 0.5) / n, each) for k in range(n))
        return tuple(tones)
