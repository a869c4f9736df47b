"""The recipe the bundles trained on simulated machines share (``cnc_condition``,
``cnc_process``, ``cnc_autoencoder``): their windows, training and held-out calibration
machines, threshold rule, golden vectors, command line and manifest. Each export script names
its features and fits its model; :func:`export` does the rest, the same way for all of them
(deterministic: the same arguments write the same bytes).

Windows are ``WINDOW_S`` long and scored only inside ``CONDITION`` (the spindle turning
steadily). Training: ``--machines`` machines of seed ``--seed``, ``--minutes`` of normal data
each. Threshold: 1.0 = the larger of the training windows' ``QUANTILE`` and ``MARGIN`` × the
highest score of ``CALIB_MACHINES`` held-out machines (seed + 500, ``CALIB_MINUTES`` each).
Golden vectors: 8 windows of a held-out healthy machine (seed + 1), then 8 windows of another
(seed + 2) with a fault from 100 s to 250 s, taken after the fault has had time to show.
``CONTINUOUS`` (the machine's continuous channels) is also what ``cnc_anomaly``,
``quality.py`` and ``onboarding.py`` use.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from appliance.contracts import FeatureSpec
from appliance.features.samples import features_from_frames
from appliance.modelkit.export import condition_manifest, finish_model, write_bundle
from appliance.simulate.dataset import EPOCH_S, FaultEvent, simulate_frames
from appliance.simulate.machine import CHANNELS as MACHINE_CHANNELS

F64 = npt.NDArray[np.float64]

#: The simulated machine's continuous channels (not the part counter and the program state).
CONTINUOUS = tuple(c for c in MACHINE_CHANNELS if c not in ("part_counter", "program_state"))
WINDOW_S = 1.0
QUANTILE = 0.9999
CALIB_MACHINES, CALIB_MINUTES, MARGIN = 32, 10.0, 1.1
#: Scored only while the spindle turns at a steady speed (above 1000 rpm all window, speed
#: standard deviation below 20 rpm): idle, tool changes and ramps are not scored.
CONDITION = (
    (FeatureSpec("spindle_speed", "min"), 1000.0, float("inf")),
    (FeatureSpec("spindle_speed", "std"), 0.0, 20.0),
)


class ScoreModel(Protocol):
    """What :func:`export` needs of a fitted model (``appliance.modelkit`` models)."""

    def score(self, x: npt.ArrayLike) -> F64: ...

    def onnx_graph(self, name: str) -> object: ...


class _ScalarRef(Protocol):
    """A frozen dataclass model with one threshold (``GaussianModel``, ``AutoencoderModel``)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def s_ref(self) -> float: ...

    def score(self, x: npt.ArrayLike) -> F64: ...


M = TypeVar("M", bound=_ScalarRef)


def windows(
    features: Sequence[FeatureSpec],
    seed: int,
    index: int,
    seconds: float,
    faults: tuple[FaultEvent, ...] = (),
    *,
    waveform: bool = True,
) -> tuple[F64, npt.NDArray[np.float32]]:
    """(t_rel [W] seconds since start at window end, X [W, F]) of one simulated machine; without
    ``waveform`` the machine has no vibration waveform channel (scalar registers only)."""
    ends, x, _ = features_from_frames(
        simulate_frames(seed, index, seconds, faults, waveform=waveform),
        features,
        WINDOW_S,
        condition=CONDITION,
    )
    return ends - EPOCH_S, x


def calibrated(model: M, calib: F64) -> M:
    """``model`` with the threshold rule applied: ``s_ref`` the larger of its own (the training
    windows' ``QUANTILE``) and ``MARGIN`` × the highest distance over the held-out ``calib``."""
    d_calib = model.score(calib) * model.s_ref
    return dataclasses.replace(model, s_ref=max(model.s_ref, MARGIN * float(d_calib.max())))


def export(
    doc: str | None,
    script: str,
    *,
    name: str,
    version: str,
    description: str,
    features: Sequence[FeatureSpec],
    kind: str,
    fit: Callable[[F64, F64, int], ScoreModel],
    golden_fault: str,
    golden_after_s: float = 150.0,
    waveform: bool = True,
    extra: dict[str, Any] | None = None,
    golden_rtol: float = 1e-4,
    golden_atol: float = 1e-4,
) -> None:
    """The command line of an export script (``doc`` its help, ``script`` its ``__file__``: the
    bundle goes next to it unless ``--out``): simulate the training and calibration windows of
    ``features``, ``fit(train, calib, seed)`` the model, and write its bundle with golden vectors of
    a ``golden_fault`` after ``golden_after_s`` seconds; ``extra`` goes into the manifest after
    ``kind`` and before ``condition`` and ``training``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(script).resolve().parent)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--machines", type=int, default=32)
    ap.add_argument("--minutes", type=float, default=8.0, help="normal data per machine")
    args = ap.parse_args()

    def stack(seed: int, machines: int, seconds: float) -> F64:
        return np.vstack(
            [windows(features, seed, i, seconds, waveform=waveform)[1] for i in range(machines)]
        ).astype(np.float64)

    train = stack(args.seed, args.machines, args.minutes * 60)
    # The threshold must hold on machines the fit never saw (other programs, set points).
    calib = stack(args.seed + 500, CALIB_MACHINES, CALIB_MINUTES * 60)
    model = fit(train, calib, args.seed)
    onnx_bytes = finish_model(model.onnx_graph(name))
    _, hold = windows(features, args.seed + 1, 0, 300, waveform=waveform)
    t_bad, bad = windows(
        features, args.seed + 2, 1, 300, (FaultEvent(100, golden_fault, 150),), waveform=waveform
    )
    in_fault = bad[(t_bad > golden_after_s) & (t_bad <= 250.0)]
    golden_in = np.vstack([hold[:8], in_fault[:8]]).astype(np.float32)
    golden_out = model.score(golden_in.astype(np.float64)).astype(np.float32)
    write_bundle(
        args.out,
        name=name,
        version=version,
        description=description,
        onnx_bytes=onnx_bytes,
        features=features,
        window_s=WINDOW_S,
        golden_inputs=golden_in,
        golden_outputs=golden_out,
        threshold=1.0,
        golden_rtol=golden_rtol,
        golden_atol=golden_atol,
        extra={
            "kind": kind,
            **(extra or {}),
            "condition": condition_manifest(CONDITION),
            "training": {
                "seed": args.seed,
                "machines": args.machines,
                "windows": int(len(train)),
                "calibration_windows": int(len(calib)),
                "quantile": QUANTILE,
            },
        },
    )
    print(f"trained on {len(train)} windows; wrote {args.out}")
