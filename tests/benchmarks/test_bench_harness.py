"""The end-to-end harness (``appliance bench`` / ``python -m benchmarks``) runs at a tiny scale
with real processes (simulator, Mosquitto, appliance, baseline, subscriber) and reports what it
claims. Speeds are not asserted (docs/benchmarks.md has the figures of a full run); these tests
catch a harness that no longer starts, measures nothing, or an appliance that loses messages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance import cli

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.bench import SCALES, with_overrides  # noqa: E402
from benchmarks.procs import Received, loss_and_duplicates  # noqa: E402


def run_bench(out: Path, *scenarios: str) -> tuple[dict[str, Any], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", *scenarios, "--scale", "tiny", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), proc.stderr


def check_plots(out: Path, log: str, names: list[str]) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots skipped: matplotlib is not installed" in log
        return
    for name in names:
        assert (out / name).stat().st_size > 1000, name
        assert f"]({name})" in (out / "report.md").read_text()


def msg(stream: str, seq: int, epoch: int | None = None, **extra: Any) -> Received:
    body = {"stream": stream, "seq": seq, **extra}
    return Received(0.0, 10, "telemetry", (stream, epoch, seq), body)


def test_loss_counts_gaps_from_seq_1_and_duplicates_per_stream_and_epoch() -> None:
    got = [msg("t/a", 1), msg("t/a", 2), msg("t/a", 2), msg("t/a", 5), msg("t/b", 3)]
    # t/a misses 3, 4; t/b misses 1, 2 (streams start at 1); one duplicate of t/a 2.
    assert loss_and_duplicates(got) == {"streams": 2, "unique": 4, "lost": 4, "duplicates": 1}
    # With an epoch the stream restarts: counted from the first seq seen in that epoch.
    got = [msg("t/a", 7, epoch=1), msg("t/a", 8, epoch=1), msg("t/a", 1, epoch=2)]
    assert loss_and_duplicates(got)["lost"] == 0
    # A coarsened message covers first_seq..seq.
    got = [msg("t/a", 1), msg("t/a", 11, coarsened={"windows": 10, "first_seq": 2})]
    assert loss_and_duplicates(got)["lost"] == 0


def test_set_overrides_one_size_of_a_scale_with_the_fields_type_and_refuses_unknown_ones() -> None:
    scale = with_overrides(
        SCALES["tiny"],
        ["ingest_machines=30", "ingest_profile=bench-50", "outage_down_s=7", "crash_gap_s=1,2"],
    )
    assert (scale.ingest_machines, scale.ingest_profile) == (30, "bench-50")
    assert scale.outage_down_s == 7.0 and scale.crash_gap_s == (1.0, 2.0)
    assert scale.alert_machines == SCALES["tiny"].alert_machines
    for bad in ("machines=3", "ingest_machines", "ingest_profile=cnc-x", "ingest_s=fast"):
        with pytest.raises(ValueError):
            with_overrides(SCALES["tiny"], [bad])


def test_appliance_bench_says_clearly_when_the_harness_is_not_there(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Stands in for an installed package without a source checkout (nothing else to run).
    monkeypatch.setattr(cli, "_bench_package", lambda: None)
    assert cli.main(["bench", "--out", "x"]) == cli.EXIT_CONFIG
    assert "not installed with the package" in capsys.readouterr().err


def test_appliance_bench_passes_every_option_to_the_harness(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--scale" in out and "ingest" in out


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(100)
def test_ingest_bandwidth_and_outage_run_end_to_end_and_the_appliance_loses_nothing(
    tmp_path: Path,
) -> None:
    r, log = run_bench(tmp_path, "ingest", "outage")
    sc = r["scenarios"]
    app, naive = sc["ingest"]["appliance"], sc["ingest"]["baseline"]
    for side in (app, naive):
        assert side["values_per_s"] > 0 and side["cpu_us_per_value"] > 0, side
        assert side["peak_rss_mib"] > 10 and side["cpu_rss_series"]
    assert app["values_per_poll"] == 10 and app["poll_jitter_ms_p99_worst_device"] is not None
    assert sc["ingest"]["ratios"]["values_per_s"] > 0
    # Windows of statistics are fewer bytes per value than one message per sample.
    assert sc["bandwidth"]["ratios"]["bytes_per_value"] < 1
    out_app, out_naive = sc["outage"]["appliance"], sc["outage"]["baseline"]
    assert out_app["lost"] == 0 and out_app["unique"] > 0
    assert out_app["peak_backlog"] > 0 and out_app["backlog_series"]
    assert out_app["pending_at_stop"] == 0  # from `appliance run --stats-json`
    assert out_naive["lost"] > 0  # QoS 0, no disk buffer: the outage's samples are gone
    assert r["machine"]["cpus"] and r["seed"] == 42
    check_plots(tmp_path, log, ["ingest_values_cpu.png", "ingest_rss.png", "outage_backlog.png"])
    assert "## Outage" in (tmp_path / "report.md").read_text()


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(100)
def test_alert_latency_and_crash_run_end_to_end_and_the_appliance_loses_nothing(
    tmp_path: Path,
) -> None:
    r, log = run_bench(tmp_path, "alert", "crash")
    sc = r["scenarios"]
    for side in ("appliance", "baseline"):
        for rule in ("threshold", "model"):
            fig = sc["alert"][side][rule]
            assert fig["alerts"] > 0, (side, rule)
            assert fig["ts_to_subscriber_ms_p99"] >= fig["ts_to_subscriber_ms_p50"] >= 0
    crash = sc["crash"]["appliance"]
    assert crash["kills"] == 1 and crash["lost"] == 0 and crash["unique"] > 0
    assert crash["duplicates"] <= crash["duplicates_bound"]
    check_plots(tmp_path, log, ["alert_latency.png"])


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(100)
def test_hotpath_runs_the_whole_appliance_and_reports_issue_11s_figures_and_loses_nothing(
    tmp_path: Path,
) -> None:
    r, _ = run_bench(tmp_path, "hotpath")
    h = r["scenarios"]["hotpath"]
    assert (h["machines"], h["values_per_poll"], h["rate_hz"]) == (3, 50, 10.0)
    assert h["values_per_s"] > 0 and h["cpu_us_per_value"] > 0 and h["peak_rss_mib"] > 10
    assert h["cpu_pct_of_one_core"] > 0 and len(h["loadavg_1min"]) == 2
    for key in (
        "p50_worst_device",
        "p50_median_device",
        "p99_worst_device",
        "p99_median_device",
        "max",
        "max_median_device",
    ):
        assert h[f"poll_jitter_ms_{key}"] is not None, key
    assert h["poll_jitter_ms_max"] >= h["poll_jitter_ms_p99_worst_device"]
    assert h["overruns_in_window"] >= 0 and h["overruns_whole_run"] >= h["overruns_in_window"]
    assert set(h["met"]) == {
        "cpu_us_per_value",
        "peak_rss_mib",
        "poll_jitter_ms_p99",
        "overruns",
        "nothing_lost",
    }
    # every machine's windows closed, were scored by the model and reached the subscriber
    assert h["windows_closed"] >= 3 * 3 and h["feature_rows"] >= 3 * 3
    assert h["incomplete_windows"] == 0
    assert h["streams"] >= 3 and h["lost"] == 0 and h["duplicates"] == 0
    assert h["outbox"]["append_failures"] == 0 and h["outbox"]["pending"] == 0
    report = (tmp_path / "report.md").read_text()
    assert "## Hot path (issue 11)" in report
    assert "poll jitter p50 / p99 / max ms (median device)" in report  # the doc's table, all of it
