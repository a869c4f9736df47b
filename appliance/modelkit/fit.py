"""``appliance model fit``: a model bundle from recordings of normal operation.

Reads the recordings (:mod:`appliance.modelkit.recording`), builds windows and features with the
serving code (:func:`~appliance.features.samples.features_from_frames`), fits a Gaussian score
or an autoencoder, sets the threshold at a quantile of the normal windows' scores (score 1.0 =
threshold) and writes a complete bundle (ONNX, manifest, golden vectors).

With a context column (``--context``: a program number, a machining phase), the Gaussian is
conditioned on it: one Gaussian per context value (each with its own threshold quantile), and
the global one, fitted on all windows, for a value the fit did not see often enough
(:class:`~appliance.modelkit.gaussian.ContextGaussianModel`). The context is the model's last
feature (the channel's ``last`` sample of the window); the graph picks the model from it. A
window in which the context changes (a program change) mixes two programs' levels: the bundle's
``condition`` (the context's ``p2p`` is 0) leaves it unscored, in training and in serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from appliance.contracts import FeatureSpec
from appliance.features.samples import features_from_frames
from appliance.modelkit.export import condition_manifest, finish_model, write_bundle
from appliance.modelkit.recording import (
    DataError,
    Recording,
    check_recordings,
    context_column,
    context_labels,
    frames_of,
    read_recording,
)

#: Statistics per channel a fitted model uses.
DEFAULT_STATS = ("mean", "std", "min", "max")
#: Least number of normal windows to fit on: max(this, 5 × the number of features).
MIN_WINDOWS = 100
KINDS = ("gaussian", "autoencoder")


@dataclass(frozen=True)
class FitResult:
    out: Path
    kind: str
    windows: int
    features: tuple[FeatureSpec, ...]
    threshold_quantile: float
    #: context values with their own model (empty: no context)
    context_values: tuple[float, ...] = ()


def load_recordings(
    paths: Sequence[str | Path],
    channels: Sequence[str] | None,
    rate_hz: float | None,
    context: str | None = None,
) -> tuple[list[Recording], tuple[str, ...]]:
    """Read and cross-check ``paths``; the channels used (``channels`` or the first file's)."""
    if not paths:
        raise DataError("no recording given")
    recs = [read_recording(p, channels=channels, rate_hz=rate_hz, context=context) for p in paths]
    names = tuple(channels) if channels else recs[0].channels
    check_recordings(recs, names)
    return recs, names


def window_matrix(
    recs: Sequence[Recording],
    features: Sequence[FeatureSpec],
    window_s: float,
    condition: Sequence[tuple[FeatureSpec, float, float]] = (),
) -> list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float32]]]:
    """Per recording: (window end times, features) of the windows serving would score."""
    out = []
    for r in recs:
        ends, x, _ = features_from_frames(
            frames_of(r), features, window_s, drop_edges=True, condition=condition
        )
        out.append((ends, x))
    return out


def fit_model(
    normal: Sequence[str | Path],
    out: str | Path,
    *,
    kind: str = "gaussian",
    channels: Sequence[str] | None = None,
    rate_hz: float | None = None,
    window_s: float = 1.0,
    quantile: float = 0.999,
    name: str = "fitted",
    seed: int = 0,
    context: str | None = None,
) -> FitResult:
    """Fit a ``kind`` model on ``normal`` recordings and write its bundle into ``out``;
    conditioned on the column ``context`` when given (module docstring)."""
    if kind not in KINDS:
        raise DataError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not 0.5 <= quantile < 1.0:
        raise DataError(f"--quantile must be in [0.5, 1), got {quantile}")
    if context is not None and kind != "gaussian":
        raise DataError(f"--context works with --kind gaussian only, not {kind!r}")
    if context is not None and channels is not None and context in channels:
        raise DataError(f"--context {context!r} is also named in --channels: name it once")
    recs, names = load_recordings(normal, channels, rate_hz, context)
    labels: tuple[str, ...] | None = None
    if context is not None:
        labels = context_labels(recs)
        recs = [context_column(r, context, labels) for r in recs]
    base = tuple(FeatureSpec(c, s) for c in names for s in DEFAULT_STATS)
    features = base + ((FeatureSpec(context, "last"),) if context is not None else ())
    condition: tuple[tuple[FeatureSpec, float, float], ...] = ()
    if context is not None:
        condition = ((FeatureSpec(context, "p2p"), 0.0, 0.0),)
    per_file = window_matrix(recs, features, window_s, condition)
    x = np.vstack([m for _, m in per_file]).astype(np.float64)
    need = max(MIN_WINDOWS, 5 * len(base))
    if len(x) < need:
        raise DataError(
            f"too little data to fit: {len(x)} complete {window_s:g} s windows in "
            f"{len(recs)} file(s), at least {need} needed for {len(base)} features "
            f"({len(names)} channels × {len(DEFAULT_STATS)} statistics)"
        )
    extra: dict[str, object] = {}
    context_values: tuple[float, ...] = ()
    unknown = 0.0
    if context is not None:
        from appliance.modelkit.gaussian import fit_context_gaussian

        cg, info = fit_context_gaussian(x, quantile, need, context, labels)
        graph, score = cg.onnx_graph(name), cg.score
        context_values = tuple(float(v) for v in cg.values)
        extra["context"] = info
        extra["condition"] = condition_manifest(condition)
        # two golden rows with a context no model has: the global model's path is checked too
        unknown = float(np.nanmax(x[:, -1])) + 1.0
    elif kind == "gaussian":
        from appliance.modelkit.gaussian import fit_gaussian

        g = fit_gaussian(x, quantile)
        graph, score = g.onnx_graph(name), g.score
    else:
        from appliance.modelkit.autoencoder import fit_autoencoder

        ae = fit_autoencoder(x, quantile, seed=seed)
        graph, score = ae.onnx_graph(name), ae.score
    onnx_bytes = finish_model(graph)
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(x), size=min(16, len(x)), replace=False))
    golden_in = x[pick].astype(np.float32)
    if context is not None:
        golden_in[-2:, -1] = unknown
    golden_out = score(golden_in.astype(np.float64)).astype(np.float32)
    out_path = Path(out)
    write_bundle(
        out_path,
        name=name,
        version="1",
        description=f"{kind} score fitted by `appliance model fit`; 1.0 = threshold",
        onnx_bytes=onnx_bytes,
        features=features,
        window_s=window_s,
        golden_inputs=golden_in,
        golden_outputs=golden_out,
        threshold=1.0,
        golden_atol=1e-3,
        golden_rtol=1e-3,
        extra={
            "kind": kind,
            **extra,
            "training": {
                "files": [str(r.path) for r in recs],
                "windows": int(len(x)),
                "threshold_quantile": quantile,
            },
        },
    )
    return FitResult(out_path, kind, int(len(x)), features, quantile, context_values)
