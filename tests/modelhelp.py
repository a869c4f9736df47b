"""Helpers of the tests that serve a shipped model bundle (imported as ``modelhelp``: test
folders are not packages).

``quick_drift_bundle(tmp_path, learn_windows)``: a copy of ``cnc_drift`` whose self-baseline
stage learns over fewer windows, so that a test of seconds gets past the learning.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from appliance.infer.bundle import MODELS_DIR, load_bundle
from appliance.infer.drift import sequence_scores
from appliance.modelkit.evaluate import score_windows


def quick_drift_bundle(tmp_path: Path, learn_windows: int) -> Path:
    """The shipped ``cnc_drift`` (same graph and stage) learning over ``learn_windows`` rows
    per key instead of 30 (a deployed appliance learns over minutes; a test has seconds), its
    golden sequence recomputed for that stage (onnxruntime), so the engine's check passes."""
    d = tmp_path / "cnc_drift_quick"
    shutil.copytree(MODELS_DIR / "cnc_drift", d)
    m = json.loads((d / "manifest.json").read_text())
    m["baseline"]["learn_windows"] = learn_windows
    (d / "manifest.json").write_text(json.dumps(m))
    b = load_bundle(str(d))
    assert b.drift is not None and b.sequence_inputs is not None
    with np.load(d / "golden.npz") as g:
        arrays = {k: g[k] for k in g.files}
    arrays["sequence_outputs"] = sequence_scores(
        b.drift, b.sequence_inputs, lambda x: score_windows(b, x)
    ).astype(np.float32)
    np.savez(d / "golden.npz", **arrays)
    return d
