"""Train and export the CNC spectrogram model: a small CNN fault classifier over vibration
spectrograms (deterministic, CPU; a few minutes, most of it simulating).

    python -m models.cnc_spectrogram.export [--out DIR] [--seed N] [--machines M]

Needs the ``train`` extra (PyTorch). Feature: one log-spectrogram image of the 1 kHz vibration
waveform per 1 s window (``RAW``: 64 frequency rows of 7.8 Hz × 8 time columns, 128-sample Hann
segments every 32 samples, ``appliance.features.spectrogram``), computed by the serving code
(``appliance.features.samples``) over frames of ``appliance.simulate.dataset.simulate_frames``;
scored only while the spindle turns steadily (the ``CONDITION`` of ``cnc_condition``).

Classes (``CLASSES``): healthy and the faults visible in the vibration waveform. Per training
machine (seed 1000, ``--machines`` machines, three programs and their speeds each): a healthy
run, and for each fault kind a run with the fault active throughout. A fault run's window is a
training example of its class where the fault shows (one of its image's row means is at least
``VISIBLE_DB`` above its healthy twin's: the simulator is deterministic, so the twin differs
only by the fault); elsewhere (e.g. imbalance at low speed, which grows with speed²) the window
is left out rather than taught as healthy or faulty. Pixels are normalised with the healthy
training windows' mean and standard deviation (written into the manifest's feature entry).

Model: ``appliance.modelkit.cnn`` (3 convolutions, about 4.9 k weights), the healthy class
weighted ``HEALTHY_WEIGHT`` times. Served output ``score`` = (1 − P(healthy)) / p_ref, where
p_ref (score 1.0, the threshold) is the largest of ``P_REF_MIN`` (the model 99 % sure), the
healthy training windows' 99.99th percentile and the highest value over 32 held-out healthy
machines (seed 1500; ``cnc_condition``'s 1.1 margin would put the threshold above 1 − P = 1,
which a classifier's saturated output cannot reach). Second output ``class_probs`` (not
served; ``models/quality.py``'s confusion matrix). Golden outputs come from the trained torch
network; the ONNX graph must reproduce them.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from appliance.contracts import SpectrogramSpec
from appliance.features.samples import features_from_frames
from appliance.modelkit.cnn import fit_cnn
from appliance.modelkit.export import condition_manifest, finish_model, write_bundle
from appliance.simulate.dataset import EPOCH_S, WAVE_CHANNEL, FaultEvent, simulate_frames
from models.simulated import CALIB_MACHINES, CALIB_MINUTES, CONDITION

NAME = "cnc_spectrogram"
VERSION = "1.0.0"
WINDOW_S = 1.0
QUANTILE = 0.9999
#: Healthy, then the fault kinds that show in the vibration waveform.
CLASSES = ("healthy", "bearing_defect", "imbalance", "chatter", "vibration_surge")
#: A fault window is a training example when some image row's mean is this far above its
#: healthy twin's (dB).
VISIBLE_DB = 4.5
#: The image: shape, STFT and the samples a window needs (90 % of a 1 s window at 1 kHz); the
#: normalisation (offset_db, scale_db) is fitted below.
RAW = SpectrogramSpec(
    height=64, width=8, nperseg=128, hop=32, rate_hz=1000.0, min_samples=900,
    offset_db=0.0, scale_db=1.0,
)  # fmt: skip
#: Simulated seconds of each fault run and of each healthy run.
FAULT_SECONDS, HEALTHY_SECONDS = 300.0, 600.0
#: Weight of the healthy class in the loss (over the classes' inverse frequency): fewer
#: healthy windows of unseen machines called faulty, for slightly less sensitivity.
HEALTHY_WEIGHT = 4.0
#: The least 1 − P(healthy) that scores 1.0 (the model 99 % sure of a fault).
P_REF_MIN = 0.99


def windows(
    spec: SpectrogramSpec,
    seed: int,
    index: int,
    seconds: float,
    faults: tuple[FaultEvent, ...] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """(t_rel [W] seconds since start at window end, X [W, F]) of one simulated machine."""
    ends, x, _ = features_from_frames(
        simulate_frames(seed, index, seconds, faults),
        spec.columns(WAVE_CHANNEL),
        WINDOW_S,
        condition=CONDITION,
    )
    return ends - EPOCH_S, x


def normalise(x_raw: np.ndarray, spec: SpectrogramSpec) -> np.ndarray:
    """Raw dB images (``RAW``) as the serving code normalises them with ``spec`` (float32)."""
    raw = np.asarray(x_raw, np.float32)
    out: np.ndarray = (raw - np.float32(spec.offset_db)) / np.float32(spec.scale_db)
    return out.astype(np.float32)


def training_set(seed: int, machines: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Raw images and class indices of the training machines, and the dropped windows per kind."""
    xs, ys = [], []
    dropped = dict.fromkeys(CLASSES[1:], 0)
    for i in range(machines):
        t_h, x_h = windows(RAW, seed, i, HEALTHY_SECONDS)
        xs.append(x_h)
        ys.append(np.zeros(len(x_h), np.int64))
        for c, kind in enumerate(CLASSES[1:], start=1):
            t_f, x_f = windows(RAW, seed, i, FAULT_SECONDS, (FaultEvent(0.0, kind, 1e9),))
            _, a, b = np.intersect1d(t_f, t_h, return_indices=True)
            rise = (x_f[a] - x_h[b]).reshape(len(a), RAW.height, RAW.width).mean(axis=2)
            visible = rise.max(axis=1) >= VISIBLE_DB
            xs.append(x_f[a][visible])
            ys.append(np.full(int(visible.sum()), c, np.int64))
            dropped[kind] += int((~visible).sum())
    return np.vstack(xs), np.concatenate(ys), dropped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--machines", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    t0 = time.monotonic()

    x_raw, y, dropped = training_set(args.seed, args.machines)
    healthy = x_raw[y == 0].astype(np.float64)
    spec = replace(RAW, offset_db=float(healthy.mean()), scale_db=float(healthy.std()))
    x = normalise(x_raw, spec)
    print(f"{len(x)} training windows {np.bincount(y).tolist()}, left out {dropped} "
          f"({time.monotonic() - t0:.0f} s)")  # fmt: skip
    model, reference = fit_cnn(
        x,
        y,
        CLASSES,
        spec.height,
        spec.width,
        epochs=args.epochs,
        seed=args.seed,
        healthy_weight=HEALTHY_WEIGHT,
    )
    p_train, probs = reference(x)
    acc = float(np.mean(np.argmax(probs, axis=1) == y))
    calib = np.vstack(
        [windows(spec, args.seed + 500, i, CALIB_MINUTES * 60)[1] for i in range(CALIB_MACHINES)]
    )
    p_calib, _ = reference(calib)
    p_ref = max(P_REF_MIN, float(np.quantile(p_train[y == 0], QUANTILE)), float(p_calib.max()))
    print(f"training accuracy {acc:.4f}; p_ref {p_ref:.4g} over {len(calib)} held-out windows "
          f"({time.monotonic() - t0:.0f} s)")  # fmt: skip
    model = replace(model, p_ref=p_ref)
    onnx_bytes = finish_model(model.onnx_graph(NAME))
    _, hold = windows(spec, args.seed + 1, 0, 300)
    t_bad, bad = windows(spec, args.seed + 2, 1, 300, (FaultEvent(100, "bearing_defect", 150),))
    in_fault = bad[(t_bad > 150.0) & (t_bad <= 250.0)]
    golden_in = np.vstack([hold[:8], in_fault[:8]]).astype(np.float32)
    golden_out = (reference(golden_in)[0] / p_ref).astype(np.float32)
    write_bundle(
        args.out,
        name=NAME,
        version=VERSION,
        description="CNN fault classifier over vibration spectrograms; score = "
        "(1 - P(healthy)) scaled so that 1.0 = alert threshold",
        onnx_bytes=onnx_bytes,
        features=spec.columns(WAVE_CHANNEL),
        window_s=WINDOW_S,
        golden_inputs=golden_in,
        golden_outputs=golden_out,
        threshold=1.0,
        golden_rtol=1e-3,
        golden_atol=1e-4,
        extra={
            "kind": "cnn",
            "classes": list(CLASSES),
            "outputs": {"class_probs": "[N, K] per-class probabilities in `classes` order"},
            "condition": condition_manifest(CONDITION),
            "training": {
                "seed": args.seed,
                "machines": args.machines,
                "healthy_seconds": HEALTHY_SECONDS,
                "fault_seconds": FAULT_SECONDS,
                "healthy_weight": HEALTHY_WEIGHT,
                "windows_per_class": np.bincount(y, minlength=len(CLASSES)).tolist(),
                "left_out_not_visible": dropped,
                "visible_db": VISIBLE_DB,
                "epochs": args.epochs,
                "training_accuracy": acc,
                "calibration_windows": int(len(calib)),
                "quantile": QUANTILE,
                "p_ref": p_ref,
                "calibration_max": float(p_calib.max()),
            },
        },
    )
    print(f"wrote {args.out} ({len(onnx_bytes)} bytes ONNX, {time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
