"""The benchmark harnesses still run end to end (at a tiny scale) and report what they claim.

Speed is not asserted here (figures come from full runs on a quiet machine, docs/benchmarks.md);
these tests catch a harness that no longer starts, measures nothing or drops messages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_script(script: str, *args: str, timeout_s: float = 100.0) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.broker
@pytest.mark.timeout(120)
def test_the_uplink_benchmark_measures_every_figure_and_loses_no_message(tmp_path: Path) -> None:
    out = tmp_path / "uplink.json"
    run_script(
        "uplink.py",
        *("--records", "3000", "--drain-records", "1000", "--latency-backlog", "1000"),
        *("--alerts", "10", "--alert-gap-ms", "5", "--repeat", "1", "--outage-s", "30"),
        *("--workdir", str(tmp_path / "work"), "--json", str(out)),
    )
    r = json.loads(out.read_text())
    for key in ("append_full", "append_normal", "append_alerts_full", "sqlite_floor"):
        assert r[key]["records"] == 3000 and r[key]["records_per_s"] > 0, key
    assert r["append_full"]["payload_bytes"] > 2 * r["append_alerts_full"]["payload_bytes"]
    coarse, evict = r["over_budget_coarsen"], r["over_budget_evict"]
    assert coarse["coarsened"] > 0 and evict["coarsened"] == 0 and evict["evicted"] > 0
    assert coarse["windows_kept"] > 5 * evict["windows_kept"]  # ~10x the history, coarser
    assert r["drain"]["messages"] == r["bare_paho"]["messages"] == 1000
    assert r["catch_up"]["messages"] == 4 * 30 + 10
    for case in ("alert_idle", "alert_backlog"):
        assert r[case]["received"] == r[case]["samples"] == 10, case
    assert r["alert_backlog"]["backlog_at_start"] == 1000
    assert set(r["targets"]) == {
        "append_full_ge_100k_per_s",
        "append_normal_ge_100k_per_s",
        "append_alerts_full_ge_100k_per_s",
        "drain_ge_80pct_of_bare",
    }


@pytest.mark.timeout(120)
def test_the_acquisition_benchmark_polls_both_ways_without_errors(tmp_path: Path) -> None:
    out = tmp_path / "acquisition.json"
    run_script(
        "acquisition.py", "--devices", "2", "--seconds", "1", "--warmup", "0.5", "--json", str(out)
    )
    r = json.loads(out.read_text())
    assert set(r["modes"]) == {"paced", "max"}
    for mode, loops in r["modes"].items():
        for loop in ("acquisition", "bare"):
            assert loops[loop]["requests"] > 0 and loops[loop]["errors"] == 0, (mode, loop)


@pytest.mark.timeout(120)
def test_the_bandwidth_benchmark_reports_every_configuration(tmp_path: Path) -> None:
    out = tmp_path / "bandwidth.json"
    run_script("bandwidth.py", "--machines", "2", "--seconds", "30", "--json", str(out))
    r = json.loads(out.read_text())
    by = {c["config"]: c for c in r["configs"]}
    assert set(by) == {"window", "10s", "60s", "10s+deadband"}
    assert by["10s"]["raw_json_bytes"] > 0 and by["10s"]["reduction"] > by["window"]["reduction"]
    assert by["10s"]["published_bytes"] == by["10s"]["telemetry_bytes"] + by["10s"]["alert_bytes"]
    assert all(v > 0 for v in r["cpu"].values())
