"""benchmarks/write_amplification.py still runs end to end at a tiny scale and measures what
it claims (figures come from full runs, docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.broker
@pytest.mark.timeout(120)
def test_the_write_amplification_benchmark_measures_written_bytes_per_payload(
    tmp_path: Path,
) -> None:
    out = tmp_path / "wa.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "write_amplification.py"),
            *("--machines", "4", "--seconds", "6", "--warmup", "2", "--speed", "4"),
            *("--json", str(out)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (r,) = json.loads(out.read_text())["results"]
    assert (r["machines"], r["messages"], r["left_unpublished"]) == (4, 24, 0)
    assert r["payload_bytes"] > 0 and r["written_bytes"] > 0  # a disk-backed directory
    assert r["amplification"] == pytest.approx(r["written_bytes"] / r["payload_bytes"], rel=0.01)
