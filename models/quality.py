"""Detection quality on simulated data the training never saw: the best single-channel
threshold per fault kind, and for each model bundle its window-level ROC AUC (over all of the
fault's windows and over those past a documented severity), detection and delay at the shipped
alert rule, and false alarms per machine per 8-hour shift on long healthy runs.

    python -m models.quality --bundle models/cnc_condition [--bundle ...] [--episodes 8]
        [--shift-hours 8] [--normal-machines 4] [--debounce 2/3] [--lead-in 100] [--json PATH]

Each episode is one machine of an unseen seed (7000 + e, machine e mod 8: several speeds and
programs), run for ``--lead-in`` + 200 s (default 300 s) with the fault injected after the
healthy lead-in (default 100 s) for 150 s, and the same machine run
again without the fault (the simulator is deterministic, so the twin differs only by the
fault's effects). The fault run's windows inside the fault are positives, the twin's windows
over the same span negatives. A bundle's AUCs are over the windows it scores (its
``condition``, e.g. spindle turning steadily, and, for a bundle with a self-baseline stage
(manifest ``baseline``), that the stage emits: each run starts with a fresh stage, which learns
the machine's own baseline in the lead-in, as serving does after a start; a longer lead-in
gives it a fuller picture of the machine, the same for every bundle); the threshold baseline
uses the first bundle's
condition and takes, for every continuous channel's window mean and max and the waveform's
RMS, the better direction's AUC, reporting the best channel.

*Past severity*: the faults that ramp up from nothing over their duration
(:data:`RAMP_FAULTS`: ``temp_ramp``, ``tool_wear``, ``coolant_loss``) are, in their first
windows, physically not there yet; the second AUC counts as positives only their windows past
:data:`SEVERITY_PROGRESS` of the duration, i.e. at least half the fault's final magnitude (docs/
simulator.md: + 20 °C spindle, + 12.5 % cutting torque and + 7.5 % vibration, + 2.5 °C coolant).
The other faults are at full magnitude from their start, so both figures are the same.

*Detected*, *delay*: the score alert rule (``above`` = the bundle's threshold, ``--debounce
K/N``: K of the last N scored windows, the default 2/3 being the score rule of
``image/config/appliance.toml``), fed the fault run's scored windows from the fault's start,
raises inside the fault; delay = median seconds from the fault's start to the raise.

*False alarms*: the same rule over ``--shift-hours`` hours of healthy running of each of
``--normal-machines`` machines of another unseen seed (7998: machines 0, 1, … with their own
programs, speeds and set points), as raises per machine per 8-hour shift.

For a classifier (a manifest with ``classes``; its graph's second output holds the class
probabilities) it also prints the confusion matrix of the scored windows inside the fault (and
of the healthy twins over the same span): true class against the most probable class.

Prints Markdown tables; ``--json`` writes the same figures.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from appliance.contracts import FeatureSpec
from appliance.features.samples import features_from_frames
from appliance.infer.bundle import ModelBundle, load_bundle
from appliance.infer.drift import DriftStage
from appliance.modelkit.metrics import SHIFT_S, best_direction_auc, debounced_raises, roc_auc
from appliance.simulate.dataset import EPOCH_S, WAVE_CHANNEL, FaultEvent, simulate_frames
from appliance.simulate.machine import FAULT_KINDS
from models.simulated import CONTINUOUS

BASELINE = (
    *(FeatureSpec(c, s) for c in CONTINUOUS for s in ("mean", "max")),
    FeatureSpec(WAVE_CHANNEL, "rms"),
)
#: default healthy lead-in before the fault (s), the fault's duration, and the run after the
#: fault's start (s)
LEAD_IN_S, DURATION_S, AFTER_S = 100.0, 150.0, 200.0
#: Faults whose magnitude grows linearly from zero over their duration.
RAMP_FAULTS = ("temp_ramp", "tool_wear", "coolant_loss")
#: Share of a ramp fault's duration after which its windows count as past severity.
SEVERITY_PROGRESS = 0.5


def windows(
    features: tuple[FeatureSpec, ...],
    seed: int,
    index: int,
    seconds: float,
    faults: tuple[FaultEvent, ...] = (),
    waveform: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(t_rel [W]: window end, seconds since start; X [W, F] float64) of one machine (without
    ``waveform`` the scalar channels only: the same values, the waveform has its own random
    stream)."""
    frames = simulate_frames(seed, index, seconds, faults, waveform=waveform)
    ends, x, _ = features_from_frames(frames, features, 1.0)
    return ends - EPOCH_S, x.astype(np.float64)


class Scorer:
    """One bundle's view of the shared feature matrix: its condition and its scores."""

    def __init__(self, bundle: ModelBundle, col: dict[FeatureSpec, int]) -> None:
        import onnxruntime as ort

        self.bundle = bundle
        self.name = bundle.manifest.get("name", str(bundle.onnx_path.parent.name))
        self.threshold = float(bundle.manifest.get("threshold", 1.0))
        self.cols = [col[f] for f in bundle.features]
        self.drift = bundle.drift
        self.cond = [(col[f], lo, hi) for f, lo, hi in bundle.condition]
        self.sess = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
        self.classes: list[str] = list(bundle.manifest.get("classes", ()))
        #: a classifier's confusion matrix: true class -> windows per predicted class
        self.confusion: dict[str, np.ndarray] = {}

    def scored(self, x: np.ndarray) -> np.ndarray:
        ok = np.all(np.isfinite(x[:, self.cols]), axis=1)
        for j, lo, hi in self.cond:
            ok &= (x[:, j] >= lo) & (x[:, j] <= hi)
        return ok

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scored [W] bool, scores of the scored rows) of one machine's rows ``x`` in time
        order: the bundle's condition, then its self-baseline stage (a fresh one per run)."""
        m = self.scored(x)
        xm = x[m][:, self.cols].astype(np.float32)
        if self.drift is not None:
            keep, xm = DriftStage(self.drift).apply("m", xm)
            m = m.copy()
            m[np.flatnonzero(m)[~keep]] = False
        return m, self._infer(xm)

    def _infer(self, xm: np.ndarray) -> np.ndarray:
        if not len(xm):
            return np.zeros(0)
        out = self.sess.run([self.bundle.output_name], {self.bundle.input_name: xm})[0]
        return np.asarray(out, np.float64)

    def classify(self, x: np.ndarray) -> np.ndarray:
        """A classifier's most probable class per row (its graph's second output holds the
        class probabilities, manifest ``classes``)."""
        if not len(x):
            return np.zeros(0, np.intp)
        xm = x[:, self.cols].astype(np.float32)
        probs = self.sess.run([self.sess.get_outputs()[1].name], {self.bundle.input_name: xm})[0]
        return np.asarray(np.argmax(probs, axis=1))


def measure_faults(
    scorers: Sequence[Any],
    fspecs: tuple[FeatureSpec, ...],
    seed: int,
    episodes: int,
    at_s: float,
    deb_k: int,
    deb_n: int,
    *,
    kinds: Sequence[str] = FAULT_KINDS,
    base_ok: Callable[[np.ndarray], np.ndarray] | None = None,
    nb: int = 0,
    sim: Callable[..., tuple[np.ndarray, np.ndarray]] = windows,
) -> list[dict[str, Any]]:
    """Per fault kind of ``kinds``, ``episodes`` episodes of seeds ``seed``… (the protocol of
    the module doc, fault after ``at_s`` s): each scorer's AUCs, detections and delay; with
    ``nb`` > 0 also the best single-channel threshold over the first ``nb`` columns of
    ``fspecs`` (:data:`BASELINE`) and the windows ``base_ok`` keeps. A scorer is a
    :class:`Scorer` or anything with its ``name``, ``threshold``, ``classes``, ``run``.
    ``sim`` makes one machine's windows (:func:`windows`' signature; e.g. a cached one)."""
    base_ok = base_ok or (lambda x: np.ones(len(x), bool))
    run_s = at_s + AFTER_S
    twins = [sim(fspecs, seed + e, e % 8, run_s) for e in range(episodes)]
    rows: list[dict[str, Any]] = []
    for kind in kinds:
        neg_b, pos_b = [], []
        per: list[dict[str, list[Any]]] = [
            {"neg": [], "pos": [], "pos_sev": [], "delay": []} for _ in scorers
        ]
        for e in range(episodes):
            t, x = sim(fspecs, seed + e, e % 8, run_s, (FaultEvent(at_s, kind, DURATION_S),))
            t0, x0 = twins[e]
            inside = (t > at_s) & (t <= at_s + DURATION_S)
            inside0 = (t0 > at_s) & (t0 <= at_s + DURATION_S)
            sev = inside & (
                t - at_s >= SEVERITY_PROGRESS * DURATION_S if kind in RAMP_FAULTS else True
            )
            ok, ok0 = base_ok(x), base_ok(x0)
            neg_b.append(x0[inside0 & ok0, :nb])
            pos_b.append(x[inside & ok, :nb])
            for sc, acc in zip(scorers, per, strict=True):
                m, s = sc.run(x)
                m0, s0 = sc.run(x0)
                acc["neg"].append(s0[inside0[m0]])
                acc["pos"].append(s[inside[m]])
                acc["pos_sev"].append(s[sev[m]])
                after = t[m] > at_s
                raises = debounced_raises(t[m][after], s[after], sc.threshold, deb_k, deb_n)
                hit = [r for r in raises if r <= at_s + DURATION_S]
                acc["delay"].append(hit[0] - at_s if hit else float("nan"))
                if sc.classes:
                    # the twins are the same healthy runs for every kind: count them once
                    first = kind == kinds[0]
                    for true, pred in (
                        ("healthy", sc.classify(x0[m0 & inside0]) if first else None),
                        (kind, sc.classify(x[m & inside])),
                    ):
                        if pred is None:
                            continue
                        counts = np.bincount(pred, minlength=len(sc.classes))
                        prev = sc.confusion.get(true, np.zeros(len(sc.classes), int))
                        sc.confusion[true] = prev + counts
        row: dict[str, Any] = {"fault": kind, "models": {}}
        if nb:
            nb_all, pb_all = np.vstack(neg_b), np.vstack(pos_b)
            aucs = [best_direction_auc(nb_all[:, j], pb_all[:, j]) for j in range(nb)]
            j = int(np.nanargmax(aucs))
            row["threshold_channel"] = f"{BASELINE[j].channel}:{BASELINE[j].stat}"
            row["threshold_auc"] = aucs[j]
        for sc, acc in zip(scorers, per, strict=True):
            neg = np.concatenate(acc["neg"])
            d = np.array(acc["delay"])
            row["models"][sc.name] = {
                "auc": roc_auc(neg, np.concatenate(acc["pos"])),
                "auc_past_severity": roc_auc(neg, np.concatenate(acc["pos_sev"])),
                "detected": int(np.sum(np.isfinite(d))),
                "episodes": len(d),
                "median_delay_s": float(np.nanmedian(d)) if np.isfinite(d).any() else None,
            }
        rows.append(row)

    return rows


def measure_false_alarms(
    scorers: Sequence[Any],
    fspecs: tuple[FeatureSpec, ...],
    seed: int,
    normal_machines: int,
    shift_hours: float,
    deb_k: int,
    deb_n: int,
    *,
    sim: Callable[..., tuple[np.ndarray, np.ndarray]] = windows,
) -> dict[str, dict[str, Any]]:
    """Each scorer's raises of the score rule over ``shift_hours`` healthy hours of machines
    0 … ``normal_machines`` - 1 of seed ``seed``, per machine per 8-hour shift."""
    false_alarms: dict[str, dict[str, Any]] = {
        sc.name: {"raises": 0, "raises_undebounced": 0, "scored_windows": 0} for sc in scorers
    }
    hours = shift_hours * normal_machines
    if scorers and shift_hours > 0:
        for i in range(normal_machines):
            t, x = sim(fspecs, seed, i, shift_hours * 3600.0)
            for sc in scorers:
                m, s = sc.run(x)
                fa = false_alarms[sc.name]
                fa["raises"] += len(debounced_raises(t[m], s, sc.threshold, deb_k, deb_n))
                fa["raises_undebounced"] += len(debounced_raises(t[m], s, sc.threshold))
                fa["scored_windows"] += int(m.sum())
                fa["max_score"] = max(fa.get("max_score", 0.0), float(s.max()) if len(s) else 0.0)
        for fa in false_alarms.values():
            fa["per_machine_shift"] = fa["raises"] * SHIFT_S / (hours * 3600.0)
            fa["undebounced_per_machine_shift"] = (
                fa["raises_undebounced"] * SHIFT_S / (hours * 3600.0)
            )
    return false_alarms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", action="append", default=[], help="bundle to measure (repeat)")
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7000, help="first unseen seed")
    ap.add_argument("--shift-hours", type=float, default=8.0, help="healthy hours per machine")
    ap.add_argument("--normal-machines", type=int, default=4)
    ap.add_argument("--debounce", default="2/3", help="K/N of the score alert rule")
    ap.add_argument(
        "--lead-in",
        type=float,
        default=LEAD_IN_S,
        help="healthy seconds before each episode's fault (every bundle alike)",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    k, _, n = args.debounce.partition("/")
    deb_k, deb_n = int(k), int(n or k)
    at_s = args.lead_in

    bundles = [load_bundle(b) for b in args.bundle]
    feats: list[FeatureSpec] = list(BASELINE)
    for b in bundles:
        for f in (*b.features, *(c[0] for c in b.condition)):
            if f not in feats:
                feats.append(f)
    fspecs = tuple(feats)
    col = {f: j for j, f in enumerate(fspecs)}
    nb = len(BASELINE)
    scorers = [Scorer(b, col) for b in bundles]
    base_ok = next((s.scored for s in scorers if s.cond), lambda x: np.ones(len(x), bool))

    rows = measure_faults(
        scorers, fspecs, args.seed, args.episodes, at_s, deb_k, deb_n, base_ok=base_ok, nb=nb
    )
    hours = args.shift_hours * args.normal_machines
    false_alarms = measure_false_alarms(
        scorers, fspecs, args.seed + 998, args.normal_machines, args.shift_hours, deb_k, deb_n
    )

    head = "| fault | best single-channel threshold: AUC |"
    rule = "|---|---:|"
    for sc in scorers:
        head += f" `{sc.name}` AUC | past severity | detected | delay s |"
        rule += "---:|---:|---:|---:|"
    print(head)
    print(rule)
    for r in rows:
        line = f"| `{r['fault']}` | {r['threshold_auc']:.3f} (`{r['threshold_channel']}`) |"
        for sc in scorers:
            mm = r["models"][sc.name]
            delay = "–" if mm["median_delay_s"] is None else f"{mm['median_delay_s']:g}"
            sev = f"{mm['auc_past_severity']:.3f}" if r["fault"] in RAMP_FAULTS else "="
            line += f" {mm['auc']:.3f} | {sev} | {mm['detected']}/{mm['episodes']} | {delay} |"
        print(line)
    if scorers and args.shift_hours > 0:
        print(
            f"\nFalse alarms ({args.normal_machines} machines × {args.shift_hours:g} h healthy, "
            f"rule: above threshold, {deb_k} of {deb_n} scored windows):"
        )
        for name, fa in false_alarms.items():
            print(
                f"- `{name}`: {fa['raises']} raises in {hours:g} machine-hours "
                f"({fa['scored_windows']} scored windows, highest score {fa['max_score']:.3f}) = "
                f"{fa['per_machine_shift']:.2f} per machine per 8-hour shift "
                f"({fa['undebounced_per_machine_shift']:.2f} without debounce)"
            )
    for sc in scorers:
        if sc.confusion:
            print(f"\n`{sc.name}` confusion matrix (windows; rows: true, columns: predicted):\n")
            print("| true \\ predicted | " + " | ".join(f"`{c}`" for c in sc.classes) + " |")
            print("|---|" + "---:|" * len(sc.classes))
            for true in ("healthy", *FAULT_KINDS):
                if true in sc.confusion:
                    cells = " | ".join(str(int(v)) for v in sc.confusion[true])
                    print(f"| `{true}` | {cells} |")
    if args.json:
        out = {
            "confusion": {
                sc.name: {"classes": sc.classes, **{k: v.tolist() for k, v in sc.confusion.items()}}
                for sc in scorers
                if sc.confusion
            },
            "rows": rows,
            "false_alarms": false_alarms,
            "debounce": [deb_k, deb_n],
            "episodes": args.episodes,
            "shift_hours": args.shift_hours,
            "normal_machines": args.normal_machines,
            "lead_in_s": args.lead_in,
        }
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
