"""The per-machine self-baseline stage: a model's feature rows as deviations from the machine's
own normal, smoothed over its past windows (manifest ``baseline``, docs/models.md).

A slow drift (a dulling tool, a coolant loss) starts inside the spread BETWEEN healthy machines
(each has its own coolant set point, vibration floor and cutting loads), so no model of one
window can see it early; the machine's own history can. For each machine served, the stage
learns the mean of chosen feature columns over the machine's first ``learn_windows`` rows, per
value of a key column (e.g. the spindle speed rounded to 100 rpm: one baseline per operation),
then freezes it. From then on each such column is replaced by its deviation from that baseline
(``x / b - 1`` for ``ratio`` columns, ``x - b`` for ``diff`` ones), smoothed by an exponentially
weighted moving average per machine that starts from 0 (``ewma`` = the newest row's weight;
1.0 = no smoothing). A column may be one-sided (``direction``: ``up`` / ``down``): its smoothed
deviation is then clipped at 0 on the other side before it is scored (a fault that only ever
raises the value gets all of the false-alarm budget: a healthy machine below its baseline is
scored as at it); the EWMA itself is not clipped.
Rows of a key still learning are consumed, not emitted (``learning_windows``). Other columns
pass unchanged. The ONNX graph stays stateless: it scores the rows the stage emits.

One implementation for everything that scores: serving (``appliance run``, ``appliance record
--scores``: :meth:`DriftStage.wrap` around the batcher's ``submit``), ``appliance model eval``,
``models/quality.py`` (:meth:`DriftStage.apply` over one machine's rows in order) and the golden
check (:func:`check_sequence`, the bundle's ``sequence_inputs`` through a fresh stage).

Threading: one stage per served model, called on the event loop (serving) or one thread
(evaluation); not thread-safe. State lives in memory only: after a restart every machine learns
its baseline again; a machine whose windows are not scored (idle, outside the condition,
incomplete) leaves its state as it is (frozen) until it is scored again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.contracts import FeatureRow, FeatureSpec

MODES = ("diff", "ratio")
#: ``direction`` of a baselined column: the smoothed deviation as it is, or clipped at 0 below
#: (``up``: only increases are evidence) or above (``down``)
DIRECTIONS = ("both", "up", "down")


@dataclass(frozen=True)
class DriftColumn:
    """One baselined column: its index in the model's feature layout, how a deviation is
    taken (``diff`` / ``ratio``), the EWMA weight of the newest row (0 < ewma <= 1) and which
    side of the smoothed deviation is scored (``both`` / ``up`` / ``down``)."""

    index: int
    mode: str
    ewma: float
    direction: str = "both"


@dataclass(frozen=True)
class DriftSpec:
    """The manifest's ``baseline``, resolved against the model's feature layout."""

    columns: tuple[DriftColumn, ...]
    learn_windows: int
    #: column of the key feature and the step it is rounded to (None: one baseline per machine)
    key_index: int | None = None
    key_step: float = 1.0

    @classmethod
    def from_manifest(cls, entry: Any, features: Sequence[FeatureSpec]) -> DriftSpec:
        """Parse ``manifest["baseline"]``; ``ValueError`` naming the key (``baseline.columns[1]
        .ewma``) on a bad value."""
        if not isinstance(entry, Mapping):
            raise ValueError(f"baseline must be an object, got {entry!r}")
        col = {f: j for j, f in enumerate(features)}

        def feature(where: str, e: Any) -> int:
            if not isinstance(e, Mapping) or "channel" not in e or "stat" not in e:
                raise ValueError(f"{where} must name a feature ('channel', 'stat'), got {e!r}")
            spec = FeatureSpec(str(e["channel"]), str(e["stat"]))
            if spec not in col:
                raise ValueError(
                    f"{where}: {spec.channel}:{spec.stat} is not one of the model's features"
                )
            return col[spec]

        learn = entry.get("learn_windows")
        if isinstance(learn, bool) or not isinstance(learn, int) or learn < 1:
            raise ValueError(f"baseline.learn_windows must be an integer >= 1, got {learn!r}")
        raw = entry.get("columns")
        if not isinstance(raw, Sequence) or isinstance(raw, str) or not raw:
            raise ValueError(f"baseline.columns must be a non-empty list, got {raw!r}")
        columns: list[DriftColumn] = []
        for i, e in enumerate(raw):
            where = f"baseline.columns[{i}]"
            j = feature(where, e)
            mode = e.get("mode", "diff")
            if mode not in MODES:
                raise ValueError(f"{where}.mode must be one of {MODES}, got {mode!r}")
            ewma = e.get("ewma", 1.0)
            if isinstance(ewma, bool) or not isinstance(ewma, int | float) or not 0 < ewma <= 1:
                raise ValueError(f"{where}.ewma must be a number in (0, 1], got {ewma!r}")
            direction = e.get("direction", "both")
            if direction not in DIRECTIONS:
                raise ValueError(
                    f"{where}.direction must be one of {DIRECTIONS}, got {direction!r}"
                )
            if any(c.index == j for c in columns):
                raise ValueError(f"{where}: column {e['channel']}:{e['stat']} named twice")
            columns.append(DriftColumn(j, str(mode), float(ewma), str(direction)))
        key = entry.get("key")
        key_index: int | None = None
        step = 1.0
        if key is not None:
            key_index = feature("baseline.key", key)
            step = key.get("step", 1.0)
            if (
                isinstance(step, bool)
                or not isinstance(step, int | float)
                or not (0 < step < math.inf)
            ):
                raise ValueError(f"baseline.key.step must be a number > 0, got {step!r}")
            if any(c.index == key_index for c in columns):
                raise ValueError("baseline.key must not be one of baseline.columns")
        return cls(tuple(columns), learn, key_index, float(step))

    def to_manifest(self, features: Sequence[FeatureSpec]) -> dict[str, Any]:
        """The inverse of :meth:`from_manifest`."""
        columns: list[dict[str, Any]] = []
        for c in self.columns:
            col: dict[str, Any] = {
                "channel": features[c.index].channel,
                "stat": features[c.index].stat,
                "mode": c.mode,
                "ewma": c.ewma,
            }
            if c.direction != "both":
                col["direction"] = c.direction
            columns.append(col)
        out: dict[str, Any] = {"learn_windows": self.learn_windows, "columns": columns}
        if self.key_index is not None:
            k = features[self.key_index]
            out["key"] = {"channel": k.channel, "stat": k.stat, "step": self.key_step}
        return out


class _Machine:
    """One machine's state: per key the running sum and count while learning, then the frozen
    baseline; the EWMA of the deviations (None before the first emitted row: it starts from 0,
    the machine at its baseline)."""

    __slots__ = ("sums", "counts", "base", "ewma")

    def __init__(self) -> None:
        self.sums: dict[float, npt.NDArray[np.float64]] = {}
        self.counts: dict[float, int] = {}
        self.base: dict[float, npt.NDArray[np.float64]] = {}
        self.ewma: npt.NDArray[np.float64] | None = None


class DriftStage:
    """The stage's state for one served model: per machine, per key (see the module doc)."""

    def __init__(self, spec: DriftSpec) -> None:
        self.spec = spec
        self._cols = np.array([c.index for c in spec.columns], dtype=np.intp)
        self._ratio = np.array([c.mode == "ratio" for c in spec.columns])
        self._alpha = np.array([c.ewma for c in spec.columns], dtype=np.float64)
        self._lo = np.array([0.0 if c.direction == "up" else -np.inf for c in spec.columns])
        self._hi = np.array([0.0 if c.direction == "down" else np.inf for c in spec.columns])
        self._machines: dict[str, _Machine] = {}
        #: rows consumed to learn a baseline (not emitted, not scored)
        self.learning_windows = 0
        #: rows dropped because a baselined or key column was not finite
        self.invalid_windows = 0

    def machines(self) -> dict[str, dict[str, Any]]:
        """Per machine: keys learned and keys still learning (the model's stats,
        ``baseline_keys``)."""
        return {
            m: {"learned": len(st.base), "learning": len(st.counts) - len(st.base)}
            for m, st in self._machines.items()
        }

    def baseline(self, machine: str, key: float = 0.0) -> npt.NDArray[np.float64] | None:
        """The frozen baseline of ``machine`` for key value ``key`` (rounded), or None."""
        st = self._machines.get(machine)
        return None if st is None else st.base.get(key)

    def key_of(self, vector: npt.NDArray[Any]) -> float:
        """The key value of a row (its key column over the step, rounded; 0.0 without a key)."""
        j = self.spec.key_index
        if j is None:
            return 0.0
        return float(round(float(vector[j]) / self.spec.key_step))

    def transform(
        self, machine: str, vector: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float32] | None:
        """The row to score for ``machine``'s next window, or None (learning, or invalid)."""
        v = vector[self._cols].astype(np.float64)
        j = self.spec.key_index
        if not np.all(np.isfinite(v)) or (j is not None and not math.isfinite(float(vector[j]))):
            self.invalid_windows += 1
            return None
        st = self._machines.get(machine)
        if st is None:
            st = self._machines[machine] = _Machine()
        key = self.key_of(vector)
        base = st.base.get(key)
        if base is None:
            n = st.counts.get(key, 0) + 1
            total = st.sums.get(key, 0.0) + v
            st.counts[key] = n
            if n >= self.spec.learn_windows:
                st.base[key] = total / n
                st.sums.pop(key, None)
            else:
                st.sums[key] = total
            self.learning_windows += 1
            return None
        with np.errstate(divide="ignore", invalid="ignore"):
            dev = np.where(self._ratio, v / base - 1.0, v - base)
        if not np.all(np.isfinite(dev)):  # a ratio against a zero baseline
            self.invalid_windows += 1
            return None
        prev = st.ewma if st.ewma is not None else np.zeros_like(dev)  # baseline: deviation 0
        st.ewma = self._alpha * dev + (1.0 - self._alpha) * prev
        out = np.array(vector, dtype=np.float32, copy=True)
        out[self._cols] = np.clip(st.ewma, self._lo, self._hi)
        return out

    def wrap(self, emit: Callable[[FeatureRow], None]) -> Callable[[FeatureRow], None]:
        """``emit`` behind the stage: what a feature builder calls instead of the batcher's
        ``submit`` (serving)."""

        def submit(row: FeatureRow) -> None:
            out = self.transform(row.machine, row.vector)
            if out is not None:
                emit(FeatureRow(row.machine, row.window_end, out))

        return submit

    def apply(
        self, machine: str, x: npt.NDArray[Any]
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32]]:
        """Rows ``x`` [W, F] of one machine, in time order, through the stage (evaluation):
        ``(emitted [W] bool, rows [E, F] float32)`` — the same as serving them one by one."""
        keep = np.zeros(len(x), dtype=bool)
        rows: list[npt.NDArray[np.float32]] = []
        for i in range(len(x)):
            out = self.transform(machine, np.asarray(x[i], dtype=np.float32))
            if out is not None:
                keep[i] = True
                rows.append(out)
        width = x.shape[1] if x.ndim == 2 else 0
        return keep, (np.vstack(rows) if rows else np.empty((0, width), np.float32))


def sequence_scores(
    spec: DriftSpec,
    inputs: npt.NDArray[np.float32],
    infer: Callable[[npt.NDArray[np.float32]], npt.NDArray[Any]],
    max_batch: int = 4096,
) -> npt.NDArray[np.float64]:
    """Scores of one machine's raw rows ``inputs`` [S, F] through a fresh stage and ``infer``
    (the engine, at most ``max_batch`` rows a call): [S], NaN where the stage emitted nothing
    (learning). The golden check of a bundle with a ``baseline`` compares these with its
    ``sequence_outputs``."""
    keep, rows = DriftStage(spec).apply("golden", inputs)
    out = np.full(len(inputs), np.nan)
    if len(rows):
        step = max(1, max_batch)
        out[keep] = np.concatenate(
            [
                np.asarray(infer(np.ascontiguousarray(rows[i : i + step])), np.float64)
                for i in range(0, len(rows), step)
            ]
        )
    return out
