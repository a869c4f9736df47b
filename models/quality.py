"""Detection quality on simulated data the training never saw: the best single-channel
threshold per fault kind, and a model bundle's window-level ROC AUC, false alarms per 8-hour
shift at its threshold, and detection delay.

    python -m models.quality [--bundle models/cnc_condition] [--episodes N] [--seed S]

Each episode is one machine of an unseen seed, run for 300 s with the fault injected at 100 s for
150 s (several speeds and programs across episodes), and the same machine run again without the
fault (the simulator is deterministic, so the twin differs only by the fault's effects). The
fault run's windows inside the fault are positives, the twin's windows over the same span are
negatives, so the figures measure the fault, not the machine's warm-up. With a bundle that has a
``condition`` (e.g. spindle turning), the AUCs (threshold and model alike) are over the windows
inside it; unscored windows count as score 0 for false alarms. For a classifier (a manifest
with ``classes``; its graph's second output holds the class probabilities) it also prints the
confusion matrix of those windows: true class (the healthy twins, each fault kind's windows
inside the fault) against the most probable class. The threshold
baseline takes, for every continuous channel's window mean and max and the
waveform's RMS, the better direction's AUC and reports the best channel. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from appliance.contracts import FeatureSpec
from appliance.features.samples import features_from_frames
from appliance.infer.bundle import load_bundle
from appliance.modelkit.metrics import (
    best_direction_auc,
    detection_delay_s,
    false_alarms_per_shift,
    roc_auc,
)
from appliance.simulate.dataset import EPOCH_S, WAVE_CHANNEL, FaultEvent, simulate_frames
from appliance.simulate.machine import FAULT_KINDS

CONTINUOUS = (
    "spindle_speed",
    "spindle_load",
    "axis_load_x",
    "axis_load_y",
    "axis_load_z",
    "spindle_temp",
    "coolant_temp",
    "vibration_rms",
)
BASELINE = (
    *(FeatureSpec(c, s) for c in CONTINUOUS for s in ("mean", "max")),
    FeatureSpec(WAVE_CHANNEL, "rms"),
)
AT_S, DURATION_S, RUN_S = 100.0, 150.0, 300.0


def episode(
    features: tuple[FeatureSpec, ...], seed: int, index: int, kind: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows of the fault run then of its healthy twin: (t_rel, X, label 1/0/-1 unused)."""
    faults = (FaultEvent(AT_S, kind, DURATION_S),) if kind else ()
    ends, x, _ = features_from_frames(simulate_frames(seed, index, RUN_S, faults), features, 1.0)
    ends0, x0, _ = features_from_frames(simulate_frames(seed, index, RUN_S), features, 1.0)
    t, t0 = ends - EPOCH_S, ends0 - EPOCH_S
    inside = (t > AT_S) & (t <= AT_S + DURATION_S)
    inside0 = (t0 > AT_S) & (t0 <= AT_S + DURATION_S)
    lab = np.concatenate([np.where(inside, 1, -1), np.where(inside0, 0, -1)])
    return np.concatenate([t, t0 + 1e6]), np.vstack([x, x0]).astype(np.float64), lab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", default=None, help="model bundle to measure (default: none)")
    ap.add_argument("--episodes", type=int, default=6)
    ap.add_argument("--seed", type=int, default=7000, help="first unseen seed")
    ap.add_argument("--normal-minutes", type=float, default=60.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    bundle = load_bundle(args.bundle) if args.bundle else None
    cond = bundle.condition if bundle else ()
    feats = BASELINE + (bundle.features if bundle else ()) + tuple(c[0] for c in cond)
    nb = len(BASELINE)
    nm = len(bundle.features) if bundle else 0

    def scored(x: np.ndarray) -> np.ndarray:
        """The windows the model scores (its condition); all windows without a bundle."""
        ok = np.ones(len(x), bool)
        for j, (_, lo, hi) in enumerate(cond):
            v = x[:, nb + nm + j]
            ok &= (v >= lo) & (v <= hi)
        return ok

    score_fn = None
    classify_fn = None
    classes: list[str] = list(bundle.manifest.get("classes", ())) if bundle else []
    confusion: dict[str, np.ndarray] = {}
    if bundle is not None:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
        threshold = float(bundle.manifest.get("threshold", 1.0))

        def score_fn(x: np.ndarray) -> np.ndarray:
            xm = x[:, nb : nb + nm].astype(np.float32)
            out = sess.run([bundle.output_name], {bundle.input_name: xm})[0]
            return np.asarray(out, np.float64)

        if classes:  # a classifier: its second output is the per-class probabilities

            def classify_fn(x: np.ndarray) -> np.ndarray:
                xm = x[:, nb : nb + nm].astype(np.float32)
                probs = sess.run([sess.get_outputs()[1].name], {bundle.input_name: xm})[0]
                return np.asarray(np.argmax(probs, axis=1))

    # normal operation, unseen seeds: false alarms per shift
    normal_scores = []
    per = args.normal_minutes * 60 / 4
    for i in range(4):
        ends, xn, _ = features_from_frames(simulate_frames(args.seed + 998, i, per), feats, 1.0)
        if score_fn is not None:
            xn = xn.astype(np.float64)
            normal_scores.append(np.where(scored(xn), score_fn(xn), 0.0))
    rows = []
    for kind in FAULT_KINDS:
        neg_b, pos_b, neg_m, pos_m, delays = [], [], [], [], []
        for e in range(args.episodes):
            t, x, lab = episode(feats, args.seed + e, e % 8, kind)
            ok = scored(x)
            t, x, lab = t[ok], x[ok], lab[ok]
            neg_b.append(x[lab == 0, :nb])
            pos_b.append(x[lab == 1, :nb])
            if score_fn is not None:
                s = score_fn(x)
                neg_m.append(s[lab == 0])
                pos_m.append(s[lab == 1])
                run = t < 1e6  # the fault run, not its twin
                delays.append(detection_delay_s(t[run], s[run], threshold, AT_S))
            if classify_fn is not None:
                pred = classify_fn(x)
                # the twins are the same healthy runs for every kind: count them once
                first = kind == FAULT_KINDS[0]
                for true, sel in (("healthy", (lab == 0) & first), (kind, lab == 1)):
                    counts = np.bincount(pred[sel], minlength=len(classes))
                    confusion[true] = confusion.get(true, np.zeros(len(classes), int)) + counts
        nb_all, pb_all = np.vstack(neg_b), np.vstack(pos_b)
        aucs = [best_direction_auc(nb_all[:, j], pb_all[:, j]) for j in range(nb)]
        j = int(np.nanargmax(aucs))
        row = {
            "fault": kind,
            "threshold_channel": f"{BASELINE[j].channel}:{BASELINE[j].stat}",
            "threshold_auc": aucs[j],
        }
        if score_fn is not None:
            row["model_auc"] = roc_auc(np.concatenate(neg_m), np.concatenate(pos_m))
            d = np.array(delays)
            row["detected"] = f"{int(np.sum(np.isfinite(d)))}/{len(d)}"
            row["median_delay_s"] = float(np.nanmedian(d)) if np.isfinite(d).any() else None
        rows.append(row)
    fa = (
        false_alarms_per_shift(np.concatenate(normal_scores), threshold, 1.0)
        if normal_scores
        else None
    )
    print("| fault | best single-channel threshold | its AUC | model AUC | detected | delay s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| `{r['fault']}` | `{r['threshold_channel']}` | {r['threshold_auc']:.3f} | "
            + (
                f"{r['model_auc']:.3f} | {r['detected']} | {r['median_delay_s']} |"
                if "model_auc" in r
                else "– | – | – |"
            )
        )
    if fa is not None:
        print(f"\nfalse alarms per 8-hour shift on normal data at threshold {threshold}: {fa:.2f}")
    if confusion:
        print("\nconfusion matrix (windows; rows: true, columns: predicted class):\n")
        print("| true \\ predicted | " + " | ".join(f"`{c}`" for c in classes) + " |")
        print("|---|" + "---:|" * len(classes))
        for true in ("healthy", *FAULT_KINDS):
            if true in confusion:
                print(f"| `{true}` | " + " | ".join(str(int(v)) for v in confusion[true]) + " |")
    if args.json:
        out = {"rows": rows, "false_alarms_per_shift": fa}
        if confusion:
            out["classes"] = classes
            out["confusion"] = {k: v.tolist() for k, v in confusion.items()}
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
