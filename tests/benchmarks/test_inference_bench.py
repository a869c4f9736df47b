"""The inference benchmark still runs end to end (at a tiny scale) and reports every figure.

Speed is not asserted (figures come from full runs, docs/benchmarks.md); this catches a harness
that no longer starts, measures nothing, or loses a window.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_the_inference_benchmark_measures_engines_batcher_and_window_latency(
    tmp_path: Path,
) -> None:
    out = tmp_path / "inference.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "inference.py"),
            *("--batches", "1,32", "--seconds", "0.02", "--repeat", "1"),
            *("--roundtrips", "20", "--machines", "10", "--rounds", "3"),
            *("--latency-configs", "4:2", "--json", str(out)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert [(e["backend"], e["batch"]) for e in r["engines"]] == [
        ("onnxruntime-cpu", 1),
        ("onnxruntime-cpu", 32),
    ]
    for e in r["engines"]:
        assert e["bare_rows_per_s"] > 0 and e["engine_rows_per_s"] > 0
        assert e["serving_rows_per_s"] > 0 and e["engine_pct_of_bare"] > 0
    assert set(r["absent"]) == {"tensorrt", "onnxruntime-cuda"}
    assert [(b["submit"], b["batch"]) for b in r["batcher"]] == [
        ("submit_many", 1),
        ("submit_many", 32),
        ("submit", 1),
        ("submit", 32),
    ]
    for b in r["batcher"]:
        assert b["roundtrip_p50_us"] > b["infer_p50_us"] > 0
    assert set(r["batcher_added_cost"]) == {"submit_many", "submit"}
    assert r["handoff_floor"]["p50_us"] > 0
    assert [c["batch"] for c in r["batcher_loop_side"]] == [1, 32]
    assert all(c["submit_and_launch_p50_us"] > 0 for c in r["batcher_loop_side"])
    (lat,) = r["window_to_score"]
    assert lat["windows"] == 10 * 3 and 0 < lat["p50_ms"] <= lat["p99_ms"]
    assert set(r["targets"]) == {
        "batcher_per_batch_le_20us",
        "batcher_per_row_le_0_2us",
        "engine_within_10pct_of_bare_at_batch_ge_32",
    }
