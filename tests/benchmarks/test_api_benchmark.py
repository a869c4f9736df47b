"""benchmarks/api.py still runs end to end at a tiny scale and measures every mode (speed is
not asserted here: docs/benchmarks.md has the figures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_api_benchmark_measures_cpu_and_jitter_with_and_without_clients(
    tmp_path: Path,
) -> None:
    out = tmp_path / "api.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "api.py"), "--machines", "2"]
        + ["--seconds", "3", "--warmup", "2", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert [run["mode"] for run in r["runs"]] == ["off", "idle", "load"]
    for run in r["runs"]:
        assert run["polls"] > 0 and run["cpu_pct"] > 0, run
    client = r["runs"][2]["client"]
    assert client["metrics"] >= 2 and client["status"] >= 4 and client["errors"] == 0
    assert set(r) >= {"added_cpu_pct", "added_jitter_p99_ms", "env"}
