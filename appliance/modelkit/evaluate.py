"""``appliance model eval``: how a bundle scores recordings known to be normal or faulty.

Per file: windows scored, score p50/p99/max, share of windows above the bundle's threshold,
alarms (rising crossings of the threshold) and, for a faulty file, the detection delay (time from
the file's first window to the first window above the threshold). Overall: ROC AUC with the
faulty files' windows as positives and the normal files' as negatives, and false alarms per
8-hour shift on the normal files. The features are computed by the serving code
(:func:`~appliance.features.samples.features_from_frames`), passed through the bundle's
self-baseline stage when it has one (:class:`~appliance.infer.drift.DriftStage`, a fresh one
per file: each file is one machine, learning its baseline from the file's start, as serving
does after a start) and scored by onnxruntime on the CPU.

A recording made with ``appliance record --scores`` keeps the scores the appliance served
beside it (``scores/<name>`` in the recording's folder); the file's entry then has ``live``:
how many of the windows scored here the appliance scored too with the same bundle (name and
version), and the largest absolute difference between the two scores (:func:`compare_live`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.errors import ApplianceError
from appliance.features.samples import features_from_frames
from appliance.infer.bundle import ModelBundle, load_bundle
from appliance.infer.drift import DriftStage
from appliance.modelkit.metrics import alarms, false_alarms_per_shift, roc_auc
from appliance.modelkit.recording import DataError, context_column, frames_of, read_recording


def score_windows(bundle: ModelBundle, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Scores of feature rows ``x`` by the bundle's ONNX graph (onnxruntime, CPU)."""
    import onnxruntime as ort

    if len(x) == 0:
        return np.empty(0)
    sess = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {bundle.input_name: np.ascontiguousarray(x, np.float32)})[0]
    return np.asarray(out, dtype=np.float64)


def _file_scores(
    bundle: ModelBundle, path: str | Path, rate_hz: float | None
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], float]:
    channels = sorted(
        {f.channel for f in bundle.features} | {c[0].channel for c in bundle.condition}
    )
    ctx = bundle.manifest.get("context")
    if isinstance(ctx, dict):  # a context model (`model fit --context`): the column as coded
        name = str(ctx["channel"])
        channels = [c for c in channels if c != name]
        rec = read_recording(path, channels=channels, rate_hz=rate_hz, context=name)
        labels = ctx.get("labels")
        rec = context_column(rec, name, None if labels is None else [str(x) for x in labels])
    else:
        rec = read_recording(path, channels=channels, rate_hz=rate_hz)
    ends, x, _ = features_from_frames(
        frames_of(rec),
        bundle.features,
        bundle.window_s,
        drop_edges=True,
        condition=bundle.condition,
    )
    if bundle.drift is not None:  # the machine's own baseline, learned from the file's start
        keep, x = DriftStage(bundle.drift).apply(str(path), x)
        ends = ends[keep]
    return ends, score_windows(bundle, x), float(rec.ts[0])


def evaluate(
    bundle_path: str,
    normal: Sequence[str | Path],
    faulty: Sequence[str | Path],
    rate_hz: float | None = None,
) -> dict[str, Any]:
    """The report (see the module docstring) as a JSON-ready dict; ``auc`` at the top level."""
    bundle = load_bundle(bundle_path)
    thr = bundle.threshold
    files: list[dict[str, Any]] = []
    neg: list[npt.NDArray[np.float64]] = []
    pos: list[npt.NDArray[np.float64]] = []
    for label, paths in (("normal", normal), ("faulty", faulty)):
        for p in paths:
            ends, s, t0 = _file_scores(bundle, p, rate_hz)
            if s.size == 0:
                raise DataError(
                    f"{p}: no window could be scored (too short, outside the "
                    "model's condition throughout, or all in its baseline's learning period)"
                )
            (neg if label == "normal" else pos).append(s)
            hit = np.flatnonzero(s > thr)
            entry: dict[str, Any] = {
                "file": str(p),
                "label": label,
                "windows": int(s.size),
                "p50": float(np.median(s)),
                "p99": float(np.quantile(s, 0.99)),
                "max": float(s.max()),
                "above_threshold": float(np.mean(s > thr)),
                "alarms": alarms(s, thr),
                "window_end": ends.tolist(),
                "score": s.tolist(),
            }
            if label == "faulty":
                entry["detection_delay_s"] = float(ends[hit[0]] - t0) if hit.size else None
            live = compare_live(bundle, p, ends, s)
            if live is not None:
                entry["live"] = live
            files.append(entry)
    all_neg = np.concatenate(neg) if neg else np.empty(0)
    all_pos = np.concatenate(pos) if pos else np.empty(0)
    auc = roc_auc(all_neg, all_pos) if neg and pos else None
    return {
        "model": bundle.name,
        "threshold": thr,
        "auc": auc,
        "false_alarms_per_shift": (
            false_alarms_per_shift(all_neg, thr, bundle.window_s) if neg else None
        ),
        "files": files,
    }


def compare_live(
    bundle: ModelBundle,
    path: str | Path,
    ends: npt.NDArray[np.float64],
    scores: npt.NDArray[np.float64],
) -> dict[str, Any] | None:
    """The recording's kept scores (``scores/<name>`` beside it, ``record --scores``) of
    ``bundle`` against ``scores`` of the windows ending at ``ends``: ``windows`` matched (same
    window end), ``unmatched`` (scored here, not by the appliance), ``max_abs_diff``. None
    when there is no such file or it has no row of this bundle."""
    p = Path(path)
    kept = p.parent / "scores" / p.name
    if not kept.is_file():
        return None
    live: dict[float, float] = {}
    with kept.open(newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            try:
                if row["bundle"] == bundle.name and row["version"] == bundle.version:
                    live[float(row["window_end"])] = float(row["score"])
            except (KeyError, TypeError, ValueError):
                raise DataError(
                    f"{kept}:{i + 2}: not a scores row (window_end, model, bundle, version, score)"
                ) from None
    if not live:
        return None
    t = np.array(sorted(live))
    v = np.array([live[k] for k in t.tolist()])
    j = np.clip(np.searchsorted(t, ends), 0, len(t) - 1)
    j = np.where(np.abs(t[j - 1] - ends) < np.abs(t[j] - ends), j - 1, j)
    hit = np.abs(t[j] - ends) <= 1e-6
    diff = np.abs(v[j[hit]] - scores[hit])
    return {
        "file": str(kept),
        "windows": int(hit.sum()),
        "unmatched": int((~hit).sum()),
        "max_abs_diff": float(diff.max()) if diff.size else None,
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table."""
    lines = [
        f"model {report['model']}  threshold {report['threshold']:g}",
        f"{'file':40} {'label':6} {'windows':>7} {'p50':>8} {'p99':>8} {'max':>8} "
        f"{'>thr':>6} {'alarms':>6} {'delay_s':>8}",
    ]
    for f in report["files"]:
        delay = f.get("detection_delay_s")
        lines.append(
            f"{f['file'][-40:]:40} {f['label']:6} {f['windows']:7d} {f['p50']:8.3g} "
            f"{f['p99']:8.3g} {f['max']:8.3g} {f['above_threshold']:6.1%} {f['alarms']:6d} "
            f"{'-' if delay is None else format(delay, '.1f'):>8}"
        )
    for f in report["files"]:
        live = f.get("live")
        if live is not None:
            d = live["max_abs_diff"]
            lines.append(
                f"  {Path(f['file']).name}: kept scores of {live['windows']} windows, largest "
                f"difference {'-' if d is None else format(d, '.3g')}; "
                f"{live['unmatched']} windows not scored by the appliance"
            )
    auc = report["auc"]
    fa = report["false_alarms_per_shift"]
    lines.append(
        f"ROC AUC {'-' if auc is None else format(auc, '.3f')}   false alarms per 8-hour shift "
        f"{'-' if fa is None else format(fa, '.2f')}"
    )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Scores over time per file, with the threshold, as a PNG (needs the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ApplianceError(
            "--plot needs matplotlib: pip install 'cnc-edge-appliance[plot]'"
        ) from None
    fig, ax = plt.subplots(figsize=(10, 4))
    for f in report["files"]:
        t = np.asarray(f["window_end"])
        ax.plot(t - t[0], f["score"], label=f"{Path(f['file']).name} ({f['label']})", lw=0.8)
    ax.axhline(report["threshold"], color="k", ls="--", lw=1, label="threshold")
    ax.set_xlabel("time since file start (s)")
    ax.set_ylabel("score")
    ax.set_title(f"{report['model']}: AUC {report['auc']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
