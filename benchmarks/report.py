"""The harness's report: a Markdown page and PNG plots (matplotlib, the ``bench`` extra) from
``results.json``. Without matplotlib the plots are skipped with one line saying so."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def _f(v: Any, unit: str = "") -> str:
    """A figure as measured (3 significant digits for display only; results.json keeps all)."""
    if v is None:
        return "—"
    if isinstance(v, float):
        text = f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    else:
        text = f"{v:,}" if isinstance(v, int) else str(v)
    return f"{text}{unit}"


def _mib(v: int | None) -> str:
    return "—" if v is None else _f(v / 2**20)


def _ratio(v: Any) -> str:
    return "—" if v is None else f"{v:.3g}×"


def markdown(r: dict[str, Any], plots: list[str]) -> str:
    m = r["machine"]
    sc = r["scenarios"]
    lines = [
        f"# Benchmark report, {r['date_utc']}",
        "",
        f"Command: `{r['command']}` (scale `{r['scale']}`, seed {r['seed']}); "
        f"{r['wall_s']:.0f} s in all.",
        "",
        f"Machine: `{m['host']}`, {m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']:.1f} GiB, "
        f"{m['platform']}, Python {m['python']}; 1-minute load average "
        f"{m['loadavg_at_start'][0]:.2f} at the start, {m['loadavg_at_end'][0]:.2f} at the end.",
    ]
    if r.get("note"):
        lines += ["", f"Note: {r['note']}"]
    lines += [
        "",
        "Appliance = `appliance run` as shipped (one process); baseline = "
        "`benchmarks/baseline.py`, the tutorial loop (sync pymodbus poll, one ONNX call per "
        "sample, one JSON message per sample over paho QoS 0, no disk buffer). Ratio = "
        "appliance / baseline.",
    ]
    if "ingest" in sc:
        a, b, q = sc["ingest"]["appliance"], sc["ingest"]["baseline"], sc["ingest"]["ratios"]
        lines += [
            "",
            f"## Ingest: {a['machines']} machines × {a['values_per_poll']} registers at "
            f"{a['rate_hz']:g} Hz ({_f(a['configured_values_per_s'])} values/s configured)",
            "",
            "| figure | appliance | baseline | ratio |",
            "|---|---:|---:|---:|",
            f"| values/s | {_f(a['values_per_s'])} | {_f(b['values_per_s'])} | "
            f"{_ratio(q['values_per_s'])} |",
            f"| poll jitter p50 / p99, worst device (ms) | "
            f"{_f(a['poll_jitter_ms_p50_worst_device'])} / "
            f"{_f(a['poll_jitter_ms_p99_worst_device'])} | — | |",
            f"| CPU, % of one core | {_f(a['cpu_pct_of_one_core'])} | "
            f"{_f(b['cpu_pct_of_one_core'])} | |",
            f"| CPU µs per value | {_f(a['cpu_us_per_value'])} | {_f(b['cpu_us_per_value'])} | "
            f"{_ratio(q['cpu_us_per_value'])} |",
            f"| peak RSS (MiB) | {_f(a['peak_rss_mib'])} | {_f(b['peak_rss_mib'])} | "
            f"{_ratio(q['peak_rss_mib'])} |",
            f"| disk written, whole run (/proc io, MiB) | {_mib(a['disk_write_bytes'])} | "
            f"{_mib(b['disk_write_bytes'])} | |",
            f"| messages received | {_f(a['messages_received'])} | "
            f"{_f(b['messages_received'])} | |",
            "",
            "Machines one core would sustain at 10 Hz, extrapolated from CPU µs per value: "
            f"{_f(sc['ingest']['machines_one_core_at_10hz_estimate'])} (an estimate, not a run).",
        ]
    if "bandwidth" in sc and "appliance_bytes_per_value" in sc["bandwidth"]:
        bw = sc["bandwidth"]
        lines += [
            "",
            "## Bandwidth (bytes received by the subscriber, topic + payload, ingest runs)",
            "",
            "| figure | appliance | baseline | ratio |",
            "|---|---:|---:|---:|",
            f"| bytes/s | {_f(bw['appliance_bytes_per_s'])} | {_f(bw['baseline_bytes_per_s'])} | |",
            f"| bytes per value | {_f(bw['appliance_bytes_per_value'])} | "
            f"{_f(bw['baseline_bytes_per_value'])} | {_ratio(bw['ratios']['bytes_per_value'])} |",
            f"| bytes per value, the same samples as one JSON message per value | — | "
            f"{_f(bw['baseline_one_message_per_value_bytes_per_value'])} | "
            f"{_ratio(bw['ratios']['bytes_per_value_vs_one_message_per_value'])} |",
            "",
            f"Reduction: {_f(bw['reduction_pct'], ' %')} fewer bytes than the baseline's one JSON "
            "message per sample (one poll of a machine, all its registers); "
            f"{_f(bw['reduction_vs_one_message_per_value_pct'], ' %')} fewer than one JSON "
            "message per value (computed from the baseline's samples, not sent).",
        ]
    if "alert" in sc:
        al = sc["alert"]
        lines += [
            "",
            f"## Alert latency ({al['appliance']['faults']} vibration surges injected over Modbus)",
            "",
            "`ts → subscriber`: the alert's event time (`ts`: the sample or window end that "
            "raised it) to its arrival at the subscriber. `fault → subscriber`: the fault "
            "register write to the arrival (includes the physics: the surge has to build up, "
            "and for the model rule the window has to close).",
            "",
            "| rule | figure | appliance | baseline | ratio |",
            "|---|---|---:|---:|---:|",
        ]
        for rule in ("threshold", "model"):
            a, b = al["appliance"][rule], al["baseline"][rule]
            lines += [
                f"| {rule} | alerts received | {a['alerts']} | {b['alerts']} | |",
                f"| {rule} | ts → subscriber p50 / p99 (ms) | {_f(a['ts_to_subscriber_ms_p50'])} "
                f"/ {_f(a['ts_to_subscriber_ms_p99'])} | {_f(b['ts_to_subscriber_ms_p50'])} / "
                f"{_f(b['ts_to_subscriber_ms_p99'])} | "
                f"{_ratio(al['ratios'][f'{rule}_ts_to_subscriber_ms_p99'])} |",
                f"| {rule} | fault → subscriber p50 / p99 (ms) | "
                f"{_f(a['fault_to_subscriber_ms_p50'])} / {_f(a['fault_to_subscriber_ms_p99'])} "
                f"| {_f(b['fault_to_subscriber_ms_p50'])} / "
                f"{_f(b['fault_to_subscriber_ms_p99'])} | "
                f"{_ratio(al['ratios'][f'{rule}_fault_to_subscriber_ms_p99'])} |",
            ]
        lines += ["", "With few alerts, p99 is the slowest one."]
    if "outage" in sc:
        a, b = sc["outage"]["appliance"], sc["outage"]["baseline"]
        lines += [
            "",
            f"## Outage: broker down {a['down_s']:.1f} s under load ({a['machines']} machines "
            "at 10 Hz)",
            "",
            "| figure | appliance | baseline | ratio |",
            "|---|---:|---:|---:|",
            f"| lost (appliance: sequence gaps at the subscriber; baseline: samples polled and "
            f"never received) | **{a['lost']}** | {b['lost']} | "
            f"{_ratio(sc['outage']['ratios']['lost'])} |",
            f"| duplicates | {a['duplicates']} | {b['duplicates']} | |",
            f"| unique messages received | {_f(a['unique'])} | {_f(b['unique'])} | |",
            f"| peak backlog (outbox pending) | {_f(a['peak_backlog'])} | no buffer | |",
            f"| drain time after the broker is back, to the last `historical` message at the "
            f"subscriber (s) | {_f(a['drain_s_last_historical'])} | — | |",
            f"| drain time after the broker is back, to the first health line with the outbox "
            f"drained (s, 1 s resolution) | {_f(a['drain_s_from_health_line'])} | — | |",
        ]
    if "crash" in sc:
        a, b = sc["crash"]["appliance"], sc["crash"]["baseline"]
        lines += [
            "",
            f"## Crash: SIGKILL {a['kills']} times at random moments",
            "",
            "| figure | appliance | baseline | ratio |",
            "|---|---:|---:|---:|",
            f"| lost | **{a['lost']}** | {b['lost']} | {_ratio(sc['crash']['ratios']['lost'])} |",
            "| duplicates (bound: kills × (max_inflight + unsettled acks) = "
            f"{a['duplicates_bound']}) | "
            f"{a['duplicates']} | {b['duplicates']} | |",
            f"| unique messages received | {_f(a['unique'])} | {_f(b['unique'])} | |",
            "",
            "The baseline's losses are counted inside each process life only (its sequence "
            "numbers restart); samples it polled but never sent before a kill are not visible.",
        ]
    if "inference" in sc:
        inf = sc["inference"]
        lines += [
            "",
            "## Inference (rows/s; baseline = a bare onnxruntime `run` loop)",
            "",
            "| backend | batch | bare | engine | serving | engine / bare |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in inf["rows"]:
            lines.append(
                f"| {row['backend']} | {row['batch']} | {_f(row['bare_rows_per_s'])} | "
                f"{_f(row['engine_rows_per_s'])} | {_f(row['serving_rows_per_s'])} | "
                f"{_ratio(row['ratios']['engine_vs_bare'])} |"
            )
        for name, why in inf["absent"].items():
            lines.append(f"\n{name}: absent ({why})")
    if "hotpath" in sc:
        h = sc["hotpath"]
        t, met = h["targets"], h["met"]

        def ok(key: str) -> str:
            return "met" if met[key] else "**not met**"

        lines += [
            "",
            f"## Hot path (issue 11): {h['machines']} machines × {h['values_per_poll']} registers "
            f"at {h['rate_hz']:g} Hz, the whole appliance, outbox `synchronous = FULL`",
            "",
            f"Measured {h['seconds']:.0f} s; 1-minute load average "
            f"{h['loadavg_1min'][0]:.2f} → {h['loadavg_1min'][1]:.2f}.",
            "",
            "| figure | measured | target | |",
            "|---|---:|---:|---|",
            f"| values/s | {_f(h['values_per_s'])} | {_f(h['configured_values_per_s'])} | |",
            f"| CPU µs per value (% of one core) | {_f(h['cpu_us_per_value'])} "
            f"({_f(h['cpu_pct_of_one_core'])} %) | ≤ {t['cpu_us_per_value_max']:g} | "
            f"{ok('cpu_us_per_value')} |",
            f"| peak RSS MiB | {_f(h['peak_rss_mib'])} | ≤ {t['peak_rss_mib_max']:g} | "
            f"{ok('peak_rss_mib')} |",
            "| poll jitter p50 / p99 ms (worst device) | "
            f"{_f(h['poll_jitter_ms_p50_worst_device'])} / "
            f"{_f(h['poll_jitter_ms_p99_worst_device'])} | p99 ≤ "
            f"{t['poll_jitter_ms_p99_max']:g} | {ok('poll_jitter_ms_p99')} |",
            "| poll jitter p50 / p99 / max ms (median device) | "
            f"{_f(h['poll_jitter_ms_p50_median_device'])} / "
            f"{_f(h['poll_jitter_ms_p99_median_device'])} / "
            f"{_f(h.get('poll_jitter_ms_max_median_device'))} | | |",
            f"| poll jitter max ms (worst device) | {_f(h['poll_jitter_ms_max'])} | | |",
            f"| overruns in the measured window (whole run) | {h['overruns_in_window']} "
            f"({h['overruns_whole_run']}) | {t['overruns_max']} | {ok('overruns')} |",
            f"| lost / duplicates | {h['lost']} / {h['duplicates']} | 0 | {ok('nothing_lost')} |",
            f"| windows closed / scored (feature rows) | {h['windows_closed']} / "
            f"{h['feature_rows']} | | |",
        ]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def plots(r: dict[str, Any], out: Path, say: Callable[[str], None]) -> list[str]:
    """Write the PNG plots; the file names written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        say("plots skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return []
    sc = r["scenarios"]
    written: list[str] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(name)

    if "alert" in sc:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, rule in zip(axes, ("threshold", "model"), strict=True):
            both = {
                w: sc["alert"][w][rule]["ts_to_subscriber_ms"] for w in ("appliance", "baseline")
            }
            every = [v for values in both.values() for v in values]
            bins = list(np.histogram_bin_edges(every, bins=30)) if every else 30
            for who, values in both.items():
                if values:
                    ax.hist(values, bins=bins, alpha=0.6, label=f"{who} (n={len(values)})")
            ax.set_title(f"alert latency, {rule} rule")
            ax.set_xlabel("event ts → subscriber (ms)")
            ax.set_ylabel("alerts")
            ax.legend()
        save(fig, "alert_latency.png")
    if "ingest" in sc:
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
        for who in ("appliance", "baseline"):
            d = sc["ingest"][who]
            s = d["values_per_s_series"]
            if s:
                ax1.plot([p[0] for p in s], [p[1] for p in s], label=who)
            c = d["cpu_rss_series"]
            ax2.plot([p[0] for p in c], [p[1] for p in c], label=who)
        ax1.set_ylabel("values/s")
        ax1.legend()
        ax2.set_ylabel("CPU, % of one core")
        ax2.set_xlabel("s since start")
        ax1.set_title("ingest: values/s and CPU over time")
        save(fig, "ingest_values_cpu.png")
        fig, ax = plt.subplots(figsize=(9, 4))
        for who in ("appliance", "baseline"):
            c = sc["ingest"][who]["cpu_rss_series"]
            ax.plot([p[0] for p in c], [p[2] for p in c], label=who)
        ax.set_ylabel("RSS (MiB)")
        ax.set_xlabel("s since start")
        ax.set_title("ingest: resident memory over time")
        ax.legend()
        save(fig, "ingest_rss.png")
    if "outage" in sc:
        a = sc["outage"]["appliance"]
        fig, ax = plt.subplots(figsize=(9, 4))
        s = a["backlog_series"]
        ax.plot([p[0] for p in s], [p[1] for p in s], label="outbox pending")
        ax.axvspan(a["down_at_s"], a["up_at_s"], color="red", alpha=0.15, label="broker down")
        ax.set_xlabel("s since the appliance started")
        ax.set_ylabel("messages pending")
        ax.set_title("outage: backlog (appliance health line, 1 s)")
        ax.legend()
        save(fig, "outage_backlog.png")
    return written
