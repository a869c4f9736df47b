"""End-to-end benchmark harness: ``appliance bench [SCENARIO ...] --out DIR`` (``python -m
benchmarks``).

Every scenario runs real processes: the simulator (``appliance simulate``, the cnc-sim cell or
``--profile bench-50`` machines), Mosquitto on a free port, the appliance
(``appliance run -c FILE --stats-json PATH``) and a paho subscriber in this process; then the
same scenario with the naive baseline (:mod:`benchmarks.baseline`) in place of the appliance.
Figures come from what the subscriber receives, from /proc of the measured process and from the
appliance's own counters; every figure is also given as a ratio against the baseline.

Scenarios: ``ingest`` (with ``bandwidth``), ``alert``, ``outage``, ``crash``, ``inference``.
Scales: ``--scale default`` (all five in < 5 minutes on 2 cores), ``--scale tiny`` (CI smoke
test), ``--scale large`` (100 machines × 50 registers at 10 Hz on the bench-50 profile,
10-minute outage, 100 crashes). Seeded (``--seed``): the simulator's values, the fault
schedule and the crash moments repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from appliance.demo.mosquitto import MosquittoProcess, free_port, free_port_block, wait_port
from appliance.simulate.cell import FAULT_DURATION_REGISTER, FAULT_REQUEST_REGISTER
from appliance.uplink.delivery import SETTLE_MAX_ACKS
from benchmarks import report
from benchmarks.procs import (
    LogReader,
    Received,
    Sampler,
    Subscriber,
    loss_and_duplicates,
    percentile,
    proc_cpu_s,
    spawn,
    stop_proc,
)

SCENARIOS = ("ingest", "bandwidth", "alert", "outage", "crash", "inference", "hotpath")
DEFAULT_SET = ("ingest", "alert", "outage", "crash", "inference")
PREFIX = "edge"
APPLIANCE_ID = "bench-cell"


@dataclass(frozen=True)
class Scale:
    """Sizes of every scenario (wall seconds unless said otherwise)."""

    ingest_machines: int = 10
    ingest_profile: str = "cnc-sim"  # or bench-50 (appliance simulate --profile bench-50)
    ingest_rate_hz: float = 10.0
    ingest_s: float = 20.0
    alert_machines: int = 4
    alert_s: float = 24.0
    alert_fault_every_s: float = 6.0
    alert_fault_s: float = 3.0
    outage_machines: int = 4
    outage_before_s: float = 5.0
    outage_down_s: float = 15.0
    outage_after_s: float = 10.0
    crash_machines: int = 4
    crash_kills: int = 3
    crash_gap_s: tuple[float, float] = (2.0, 5.0)
    max_inflight: int = 100
    inference_seconds: float = 0.3
    inference_batches: tuple[int, ...] = (1, 32, 256)
    hotpath_machines: int = 100
    hotpath_s: float = 30.0
    hotpath_warmup_s: float = 5.0


SCALES = {
    "default": Scale(),
    "tiny": Scale(
        ingest_machines=2,
        ingest_s=3.0,
        alert_machines=2,
        alert_s=6.0,
        alert_fault_every_s=2.5,
        alert_fault_s=1.0,
        outage_machines=2,
        outage_before_s=1.5,
        outage_down_s=2.0,
        outage_after_s=3.0,
        crash_machines=2,
        crash_kills=1,
        crash_gap_s=(1.5, 2.5),
        inference_seconds=0.05,
        inference_batches=(1, 32),
        hotpath_machines=3,
        hotpath_s=3.0,
        hotpath_warmup_s=1.5,
    ),
    "large": Scale(
        ingest_machines=100,
        ingest_profile="bench-50",
        ingest_s=60.0,
        alert_machines=20,
        alert_s=120.0,
        outage_machines=20,
        outage_before_s=10.0,
        outage_down_s=600.0,
        outage_after_s=120.0,
        crash_machines=10,
        crash_kills=100,
        inference_seconds=1.0,
        inference_batches=(1, 32, 256, 1024),
    ),
}

#: The model every scenario's appliance serves (and ``inference`` measures); ``hotpath`` names
#: its bench-50 machines' first registers after this model's channels, so every window is scored.
BENCH_MODEL = "cnc_anomaly"

CONFIG_TEMPLATE = """\
# Written by the benchmark harness (benchmarks/bench.py); the same format as a field config.
[appliance]
id = "{appliance_id}"
health_log_s = 1

{devices}
[features]
window_s = 1.0

[engine]
model = "{model}"

{channel_rules}
[[alerts.rules]]
name = "anomaly"
source = "score"
above = 2.0
clear_below = 1.2
severity = "warning"

[outbox]
path = "{outbox}"

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
topic_prefix = "{prefix}"
max_inflight = {max_inflight}
reconnect_min_s = 0.2
reconnect_max_s = 1.0
"""

#: Threshold rules per profile (the demo's for cnc-sim; one that never fires for bench-50, so
#: that the rule engine still sees every value).
CHANNEL_RULES = {
    "cnc-sim": """\
[[alerts.rules]]
name = "spindle_overtemp"
channel = "spindle_temp"
above = 75.0
clear_below = 65.0
severity = "major"

[[alerts.rules]]
name = "vibration_high"
channel = "vibration_rms"
above = 9.0
clear_below = 5.0
severity = "warning"
""",
    "bench-50": """\
[[alerts.rules]]
name = "r00_high"
channel = "r00"
above = 65000.0
clear_below = 60000.0
severity = "warning"
""",
}

DEVICE_TEMPLATE = """\
[[devices]]
name = "cnc-{n}"
host = "127.0.0.1"
port = {port}
profile = "{profile}"
poll_interval_ms = {interval_ms:g}
timeout_s = 0.5
"""


# ------------------------------------------------------------------------------ progress


class Progress:
    """One line per step, with the elapsed time; a rich status spinner when rich is installed."""

    def __init__(self, quiet: bool = False) -> None:
        self.t0 = time.monotonic()
        self.quiet = quiet
        self._status: Any = None
        try:
            from rich.console import Console

            self._console: Any = Console(stderr=True)
        except ImportError:
            self._console = None

    def say(self, line: str) -> None:
        if self.quiet:
            return
        t = time.monotonic() - self.t0
        text = f"[{int(t) // 60:02d}:{int(t) % 60:02d}] {line}"
        if self._console is not None:
            self._console.print(text, highlight=False, markup=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def wait(self, seconds: float, what: str, poll: Callable[[], str] | None = None) -> None:
        """Sleep ``seconds``, showing ``what`` and ``poll()`` (e.g. messages received)."""
        end = time.monotonic() + seconds
        if self.quiet or self._console is None:
            self.say(f"{what} ({seconds:g} s)")
            time.sleep(max(0.0, seconds))
            return
        with self._console.status(what) as status:
            while (left := end - time.monotonic()) > 0:
                extra = f" — {poll()}" if poll is not None else ""
                status.update(f"{what}: {left:4.0f} s left{extra}")
                time.sleep(min(0.5, left))
        self.say(f"{what}: done")


# ------------------------------------------------------------------------------ the rig


class Rig:
    """Broker + cell + subscriber for one run; the measured process is started by the caller."""

    def __init__(
        self, workdir: Path, machines: int, seed: int, profile: str = "cnc-sim", tag: str = ""
    ) -> None:
        self.workdir = workdir
        self.machines = machines
        self.seed = seed
        self.profile = profile
        self.tag = tag
        self.mqtt_port = free_port()
        self.broker = MosquittoProcess(
            self.mqtt_port, workdir / f"mosquitto{tag}", persistence=True
        )
        self.cell: subprocess.Popen[bytes] | None = None
        self.ports: list[int] = []
        self.sub: Subscriber | None = None
        self.measured: list[Measured] = []

    def __enter__(self) -> Rig:
        self.broker.start()
        # ``appliance simulate`` in its own process: the cnc-sim cell, or bench-N machines
        # (``--profile bench-50``: 50 constant holding registers each).
        base = free_port_block(self.machines)
        self.ports = list(range(base, base + self.machines))
        argv = ["-m", "appliance", "simulate", "--machines", str(self.machines)]
        argv += ["--base-port", str(base), "--profile", self.profile, "--log-level", "warning"]
        if self.profile == "cnc-sim":
            argv += ["--seed", str(self.seed), "--fifo-address", "-1"]
        self.cell = spawn(argv, stderr=subprocess.DEVNULL)
        for p in self.ports:
            wait_port(p, 30.0)
        self.sub = Subscriber(
            self.mqtt_port, [f"{PREFIX}/{APPLIANCE_ID}/#", "naive/#"], f"bench-sub{self.tag}"
        )
        self.sub.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for m in self.measured:  # normally stopped already; not when a scenario failed
            stop_proc(m.proc, timeout_s=5.0)
            m.sampler.stop()
        if self.sub is not None:
            self.sub.stop()
        stop_proc(self.cell)
        self.broker.stop()

    def write_config(
        self, rate_hz: float, max_inflight: int, profile: str | None = None, rules: str = ""
    ) -> Path:
        """The appliance's config; ``profile`` (a profile name or .toml path) and ``rules``
        replace the rig's profile and its threshold rules in the devices' entries."""
        devices = "\n".join(
            DEVICE_TEMPLATE.format(
                n=i + 1, port=port, profile=profile or self.profile, interval_ms=1000.0 / rate_hz
            )
            for i, port in enumerate(self.ports)
        )
        text = CONFIG_TEMPLATE.format(
            appliance_id=APPLIANCE_ID,
            devices=devices,
            outbox=self.workdir / f"outbox{self.tag}.sqlite",
            mqtt_port=self.mqtt_port,
            prefix=PREFIX,
            max_inflight=max_inflight,
            channel_rules=rules or CHANNEL_RULES[self.profile],
            model=BENCH_MODEL,
        )
        path = self.workdir / f"appliance{self.tag}.toml"
        path.write_text(text)
        return path

    def received(self) -> list[Received]:
        assert self.sub is not None
        return self.sub.snapshot()


class Measured:
    """The process under test (appliance or baseline), restartable, sampled from /proc."""

    def __init__(self, argv: list[str], stats_path: Path) -> None:
        self.argv = argv
        self.stats_path = stats_path
        self.sampler = Sampler()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: LogReader | None = None
        self.started = 0.0
        self.started_wall = 0.0
        self.logs: list[LogReader] = []

    def start(self) -> None:
        self.proc = spawn(self.argv)
        assert self.proc.stderr is not None
        self.log = LogReader(self.proc.stderr)
        self.logs.append(self.log)
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.sampler.watch(self.proc.pid)

    def check(self) -> None:
        """Raise with the log's tail when the process has already exited."""
        if self.proc is not None and self.proc.poll() is not None:
            tail = "\n".join(self.log.tail[-15:]) if self.log else ""
            raise RuntimeError(f"{self.argv[:3]} exited {self.proc.returncode}:\n{tail}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> dict[str, Any]:
        stop_proc(self.proc, timeout_s=30.0)
        self.sampler.stop()
        if self.proc is not None and self.proc.returncode not in (0, -signal.SIGTERM):
            tail = "\n".join(self.log.tail[-15:]) if self.log else ""
            raise RuntimeError(f"{self.argv[:3]} exited {self.proc.returncode}:\n{tail}")
        try:
            stats: dict[str, Any] = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            stats = {}
        return stats

    def backlog(self) -> list[tuple[float, int]]:
        return [pair for log in self.logs for pair in log.backlog]


def appliance_proc(
    rig: Rig, rate_hz: float, max_inflight: int, profile: str | None = None, rules: str = ""
) -> Measured:
    cfg = rig.write_config(rate_hz, max_inflight, profile, rules)
    stats = rig.workdir / f"stats{rig.tag}.json"
    argv = ["-m", "appliance", "run", "-c", str(cfg), "--stats-json", str(stats)]
    m = Measured(argv + ["--log-level", "info"], stats)
    rig.measured.append(m)
    return m


def baseline_proc(rig: Rig, rate_hz: float) -> Measured:
    stats = rig.workdir / f"naive-stats{rig.tag}.json"
    argv = ["-m", "benchmarks.baseline", "--ports", ",".join(map(str, rig.ports))]
    argv += ["--mqtt-port", str(rig.mqtt_port), "--rate-hz", f"{rate_hz:g}"]
    argv += ["--profile", rig.profile, "--stats-json", str(stats)]
    m = Measured(argv, stats)
    rig.measured.append(m)
    return m


def values_per_poll(profile: str) -> int:
    from benchmarks.baseline import load_registers

    return len(load_registers(profile))


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def _cpu_series(m: Measured) -> list[list[float]]:
    return [[t, cpu, rss] for t, cpu, rss in m.sampler.samples]


# ------------------------------------------------------------------------------ scenarios


def _ingest_one(
    kind: str, scale: Scale, workdir: Path, seed: int, progress: Progress
) -> dict[str, Any]:
    machines, rate = scale.ingest_machines, scale.ingest_rate_hz
    with Rig(workdir, machines, seed, scale.ingest_profile, tag=f"-ingest-{kind}") as rig:
        m = (
            appliance_proc(rig, rate, scale.max_inflight)
            if kind == "appliance"
            else baseline_proc(rig, rate)
        )
        m.start()
        assert m.proc is not None and m.log is not None
        warmup = min(3.0, scale.ingest_s / 3)
        progress.wait(warmup, f"ingest/{kind}: warm-up")
        m.check()
        t_a, cpu_a = time.monotonic(), proc_cpu_s(m.proc.pid) or 0.0
        progress.wait(
            scale.ingest_s,
            f"ingest/{kind}: {machines} machines at {rate:g} Hz",
            lambda: f"{len(rig.received())} messages",
        )
        t_b, cpu_b = time.monotonic(), proc_cpu_s(m.proc.pid) or 0.0
        lines = list(m.log.polls)
        stats = m.stop()
        time.sleep(0.5)
        got = [r for r in rig.received() if r.kind != "status"]
    n_values = values_per_poll(scale.ingest_profile)
    # Values from the health lines (one a second, polls since the previous one) that fall in the
    # measured window, over the time those lines cover; CPU over the same window from /proc.
    inside = [i for i, (t, _) in enumerate(lines) if t_a < t <= t_b + 0.5]
    polls = sum(lines[i][1] for i in inside)
    covered = lines[inside[-1]][0] - lines[inside[0] - 1][0] if inside and inside[0] > 0 else 0.0
    if inside and inside[0] == 0:
        polls -= lines[0][1]
        covered = lines[inside[-1]][0] - lines[0][0]
    elapsed = t_b - t_a
    values = polls * n_values
    values_per_s = values / covered if covered else 0.0
    cpu_pct = 100 * (cpu_b - cpu_a) / elapsed if elapsed else 0.0
    cpu_us_per_value = 1e4 * cpu_pct / values_per_s if values_per_s else None
    p50 = p99 = None
    if kind == "appliance":
        jit = [d for d in stats.get("acquisition", []) if d.get("jitter_ms_p99") is not None]
        p50 = max((float(d["jitter_ms_p50"]) for d in jit), default=None)
        p99 = max((float(d["jitter_ms_p99"]) for d in jit), default=None)
    series = [[t - m.started, float(n * n_values)] for t, n in lines]
    wall_a = m.started_wall + (t_a - m.started)  # the measured window in wall-clock time
    window = [r for r in got if wall_a <= r.t <= wall_a + elapsed]
    nbytes = sum(r.nbytes for r in window)
    # The same samples as one JSON message per value (per register read), for scale.
    per_value_bytes = sum(
        len(f"naive/{r.msg['machine']}/value")
        + len(
            json.dumps(
                {k: r.msg[k] for k in ("machine", "ts", "seq")} | {"channel": ch, "value": v}
            )
        )
        for r in window
        if r.kind == "data"
        for ch, v in r.msg.items()
        if ch not in ("machine", "ts", "seq", "score")
    )
    wall = elapsed
    return {
        "machines": machines,
        "values_per_poll": n_values,
        "rate_hz": rate,
        "seconds": elapsed,
        "polls": polls,
        "values": values,
        "values_per_s": values_per_s,
        "configured_values_per_s": machines * n_values * rate,
        "poll_jitter_ms_p50_worst_device": p50,
        "poll_jitter_ms_p99_worst_device": p99,
        "cpu_pct_of_one_core": cpu_pct,
        "cpu_us_per_value": cpu_us_per_value,
        "peak_rss_mib": m.sampler.peak_rss_mib,
        "disk_write_bytes": m.sampler.io.get("write_bytes"),
        "messages_received": len(got),
        "bytes_received_after_warmup": nbytes,
        "bytes_per_s": nbytes / wall if wall else 0.0,
        "bytes_per_value": nbytes / wall / values_per_s if wall and values_per_s else None,
        "one_message_per_value_bytes_per_value": (
            per_value_bytes / wall / values_per_s if wall and values_per_s else None
        ),
        "values_per_s_series": series,
        "cpu_rss_series": _cpu_series(m),
        "stats": stats if kind == "baseline" else {k: stats.get(k) for k in ("outbox", "uplink")},
    }


def scenario_ingest(scale: Scale, workdir: Path, seed: int, progress: Progress) -> dict[str, Any]:
    app = _ingest_one("appliance", scale, workdir, seed, progress)
    naive = _ingest_one("baseline", scale, workdir, seed, progress)
    per_core = None
    if app["cpu_us_per_value"]:
        per_core = 1e6 / app["cpu_us_per_value"] / (app["values_per_poll"] * app["rate_hz"])
    return {
        "appliance": app,
        "baseline": naive,
        "machines_one_core_at_10hz_estimate": per_core,
        "ratios": {
            "values_per_s": ratio(app["values_per_s"], naive["values_per_s"]),
            "cpu_us_per_value": ratio(app["cpu_us_per_value"], naive["cpu_us_per_value"]),
            "peak_rss_mib": ratio(app["peak_rss_mib"], naive["peak_rss_mib"]),
            "bytes_per_value": ratio(app["bytes_per_value"], naive["bytes_per_value"]),
        },
    }


def scenario_bandwidth(ingest: dict[str, Any]) -> dict[str, Any]:
    """Bytes on the wire (topic + payload, as received) per value, from the ingest runs."""
    app, naive = ingest["appliance"], ingest["baseline"]
    r = ratio(app["bytes_per_value"], naive["bytes_per_value"])
    r2 = ratio(app["bytes_per_value"], naive["one_message_per_value_bytes_per_value"])
    return {
        "appliance_bytes_per_s": app["bytes_per_s"],
        "baseline_bytes_per_s": naive["bytes_per_s"],
        "appliance_bytes_per_value": app["bytes_per_value"],
        "baseline_bytes_per_value": naive["bytes_per_value"],
        "reduction_pct": None if r is None else 100 * (1 - r),
        "baseline_one_message_per_value_bytes_per_value": naive[
            "one_message_per_value_bytes_per_value"
        ],
        "reduction_vs_one_message_per_value_pct": None if r2 is None else 100 * (1 - r2),
        "ratios": {"bytes_per_value": r, "bytes_per_value_vs_one_message_per_value": r2},
    }


def _inject(port: int, code: int, duration_s: float) -> float:
    """Write the simulator's fault registers; the wall time of the write."""
    from pymodbus.client import ModbusTcpClient

    c = ModbusTcpClient("127.0.0.1", port=port, timeout=1.0)
    c.connect()  # type: ignore[no-untyped-call]
    t = time.time()
    c.write_registers(FAULT_DURATION_REGISTER, [max(1, round(duration_s))], device_id=1)
    c.write_registers(FAULT_REQUEST_REGISTER, [code], device_id=1)
    c.close()  # type: ignore[no-untyped-call]
    return t


def _alert_one(
    kind: str, scale: Scale, workdir: Path, seed: int, progress: Progress
) -> dict[str, Any]:
    rng = random.Random(seed)
    machines = scale.alert_machines
    with Rig(workdir, machines, seed, tag=f"-alert-{kind}") as rig:
        m = (
            appliance_proc(rig, 10.0, scale.max_inflight)
            if kind == "appliance"
            else baseline_proc(rig, 10.0)
        )
        m.start()
        time.sleep(2.0)
        # vibration_surge (code 2) trips the threshold rule vibration_high and the model rule.
        plan = sorted(
            (
                2.0 + k * scale.alert_fault_every_s + rng.uniform(0, 1.0) + i * 0.5,
                i,
            )
            for i in range(machines)
            for k in range(max(1, int((scale.alert_s - 4) // scale.alert_fault_every_s)))
        )
        t0 = time.monotonic()
        injected: list[tuple[float, int]] = []
        progress.say(f"alert/{kind}: {len(plan)} vibration surges on {machines} machines")
        for at, i in plan:
            delay = t0 + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            injected.append((_inject(rig.ports[i], 2, scale.alert_fault_s), i))
        time.sleep(max(0.0, t0 + scale.alert_s - time.monotonic()))
        stats = m.stop()
        time.sleep(0.5)
        got = rig.received()
    rules = {"threshold": ("vibration_high", "vibration_rms"), "model": ("anomaly", "score")}
    out: dict[str, Any] = {"faults": len(injected), "stats_alerts": stats.get("alerts")}
    for label, names in rules.items():
        pipeline_ms: list[float] = []
        detect_ms: list[float] = []
        for r in got:
            msg = r.msg
            if r.kind != "alert" or msg.get("state") != "raised" or msg.get("rule") not in names:
                continue
            pipeline_ms.append(1000 * (r.t - float(msg["ts"])))
            mi = int(str(msg["machine"]).rsplit("-", 1)[1]) - 1
            before = [t for t, i in injected if i == mi and t <= r.t]
            if before:
                detect_ms.append(1000 * (r.t - max(before)))
        out[label] = {
            "alerts": len(pipeline_ms),
            "ts_to_subscriber_ms": pipeline_ms,
            "ts_to_subscriber_ms_p50": percentile(pipeline_ms, 0.5),
            "ts_to_subscriber_ms_p99": percentile(pipeline_ms, 0.99),
            "fault_to_subscriber_ms_p50": percentile(detect_ms, 0.5),
            "fault_to_subscriber_ms_p99": percentile(detect_ms, 0.99),
        }
    return out


def scenario_alert(scale: Scale, workdir: Path, seed: int, progress: Progress) -> dict[str, Any]:
    app = _alert_one("appliance", scale, workdir, seed, progress)
    naive = _alert_one("baseline", scale, workdir, seed, progress)
    ratios = {
        f"{rule}_{fig}": ratio(app[rule][fig], naive[rule][fig])
        for rule in ("threshold", "model")
        for fig in ("ts_to_subscriber_ms_p99", "fault_to_subscriber_ms_p99")
    }
    return {"appliance": app, "baseline": naive, "ratios": ratios}


def _outage_one(
    kind: str, scale: Scale, workdir: Path, seed: int, progress: Progress
) -> dict[str, Any]:
    machines = scale.outage_machines
    with Rig(workdir, machines, seed, tag=f"-outage-{kind}") as rig:
        m = (
            appliance_proc(rig, 10.0, scale.max_inflight)
            if kind == "appliance"
            else baseline_proc(rig, 10.0)
        )
        m.start()
        progress.wait(scale.outage_before_s, f"outage/{kind}: under load")
        t_down = time.monotonic()
        rig.broker.stop()
        progress.wait(scale.outage_down_s, f"outage/{kind}: broker down")
        rig.broker.start()
        t_up = time.monotonic()
        up_wall = time.time()
        progress.wait(scale.outage_after_s, f"outage/{kind}: broker back, draining")
        stats = m.stop()
        time.sleep(0.5)
        got = rig.received()
    backlog = [[t - m.started, n] for t, n in m.backlog()]
    drained = [t for t, n in m.backlog() if t > t_up and n <= 2 * machines]
    historical = [r.t for r in got if r.msg.get("historical") is True]
    counts = loss_and_duplicates(got)
    if kind == "baseline":
        # No disk buffer, QoS 0: what it polled but the subscriber never got is lost, wherever
        # in the run (paho's reconnect backoff can outlast the measured window).
        data = loss_and_duplicates([r for r in got if r.kind == "data"])
        counts["lost"] = max(0, int(stats.get("polls", 0)) - data["unique"])
    return {
        "machines": machines,
        "down_s": t_up - t_down,
        "down_at_s": t_down - m.started,
        "up_at_s": t_up - m.started,
        "drain_s_from_health_line": (min(drained) - t_up) if drained else None,
        "drain_s_last_historical": (max(historical) - up_wall) if historical else None,
        "peak_backlog": max((n for _, n in m.backlog()), default=None),
        "backlog_series": backlog,
        "published": (stats.get("uplink") or {}).get("published", stats.get("published")),
        "pending_at_stop": (stats.get("outbox") or {}).get("pending"),
        **counts,
    }


def scenario_outage(scale: Scale, workdir: Path, seed: int, progress: Progress) -> dict[str, Any]:
    app = _outage_one("appliance", scale, workdir, seed, progress)
    naive = _outage_one("baseline", scale, workdir, seed, progress)
    return {
        "appliance": app,
        "baseline": naive,
        "ratios": {"lost": ratio(app["lost"], naive["lost"])},
    }


def scenario_crash(scale: Scale, workdir: Path, seed: int, progress: Progress) -> dict[str, Any]:
    rng = random.Random(seed + 1)
    out: dict[str, Any] = {}
    for kind in ("appliance", "baseline"):
        machines = scale.crash_machines
        with Rig(workdir, machines, seed, tag=f"-crash-{kind}") as rig:
            m = (
                appliance_proc(rig, 10.0, scale.max_inflight)
                if kind == "appliance"
                else baseline_proc(rig, 10.0)
            )
            m.start()
            moments: list[float] = []
            for k in range(scale.crash_kills):
                gap = rng.uniform(*scale.crash_gap_s)
                time.sleep(gap)
                moments.append(gap)
                m.kill()
                if k % 10 == 0 or scale.crash_kills <= 10:
                    progress.say(f"crash/{kind}: SIGKILL {k + 1}/{scale.crash_kills}")
                m.start()
            time.sleep(rng.uniform(*scale.crash_gap_s))
            stats = m.stop()
            time.sleep(1.0)
            got = rig.received()
        counts = loss_and_duplicates(got)
        if kind == "baseline":
            # The baseline restarts its sequence numbers: count per process life by time order.
            counts = _baseline_crash_counts(got)
        out[kind] = {
            "kills": scale.crash_kills,
            "kill_after_s": moments,
            "max_inflight": scale.max_inflight,
            # each kill may resend what was in flight and what was acknowledged but not yet
            # settled (settles are batched: appliance/uplink/delivery.py)
            "duplicates_bound": scale.crash_kills * (scale.max_inflight + SETTLE_MAX_ACKS),
            "published_last_life": (stats.get("uplink") or {}).get("published"),
            "pending_at_stop": (stats.get("outbox") or {}).get("pending"),
            **counts,
        }
    out["ratios"] = {"lost": ratio(out["appliance"]["lost"], out["baseline"]["lost"])}
    return out


def _baseline_crash_counts(got: list[Received]) -> dict[str, int]:
    """The baseline's seq restarts at 1 in every life: split each stream where seq drops."""
    lives: list[Received] = []
    last: dict[str, int] = {}
    life: dict[str, int] = {}
    for r in sorted((r for r in got if r.key is not None), key=lambda r: r.t):
        assert r.key is not None
        stream, _, seq = r.key
        if seq < last.get(stream, 0):
            life[stream] = life.get(stream, 0) + 1
        last[stream] = seq
        lives.append(replace(r, key=(stream, life.get(stream, 0), seq)))
    return loss_and_duplicates(lives)


def scenario_inference(scale: Scale, progress: Progress) -> dict[str, Any]:
    """Rows/s per backend and batch size through the engine against a bare onnxruntime loop
    (``benchmarks/inference.py``'s ``bench_engines``; the baseline here is the bare loop)."""
    from appliance.infer import EngineOptions, load_bundle
    from benchmarks import inference

    bundle = load_bundle(BENCH_MODEL)
    batches = list(scale.inference_batches)
    avail = inference.present_backends(bundle, EngineOptions(max_batch=max(4096, max(batches))))
    backends = [n for n, why in avail.items() if why is None]
    progress.say(f"inference: backends {backends}, batches {batches}")
    args = argparse.Namespace(threads=1, repeat=1, seconds=scale.inference_seconds)
    rows = inference.bench_engines(bundle, backends, batches, args)
    for row in rows:
        row["ratios"] = {"engine_vs_bare": ratio(row["engine_rows_per_s"], row["bare_rows_per_s"])}
    return {"absent": {n: why for n, why in avail.items() if why}, "rows": rows}


#: Issue 11's targets for the ``hotpath`` scenario (100 machines × 50 registers at 10 Hz, the
#: whole appliance with the durable outbox, ``synchronous = FULL``, on one core).
HOTPATH_TARGETS = {
    "cpu_us_per_value_max": 20.0,
    "peak_rss_mib_max": 150.0,
    "poll_jitter_ms_p99_max": 5.0,
    "overruns_max": 0,
}


def hotpath_model_channels() -> tuple[str, ...]:
    """The channels :data:`BENCH_MODEL`'s features read, in manifest order."""
    from appliance.infer.bundle import load_bundle

    return tuple(dict.fromkeys(f.channel for f in load_bundle(BENCH_MODEL).features))


HOTPATH_RULES = """\
[[alerts.rules]]
name = "r10_high"
channel = "r10"
above = 65000.0
clear_below = 60000.0
severity = "warning"
"""


def hotpath_profile(workdir: Path) -> Path:
    """The bench-50 register map (50 contiguous uint16 holding registers, one read per poll)
    with the first registers named after the model's channels: ``hotpath-50.toml``."""
    channels = hotpath_model_channels()
    lines = [f'description = "bench-50 with the {BENCH_MODEL} channels first (appliance bench)"']
    for i in range(50):
        name = channels[i] if i < len(channels) else f"r{i:02d}"
        lines += ["", "[[registers]]", f'name = "{name}"', 'table = "holding"']
        lines += [f"address = {i}", 'type = "uint16"']
    path = workdir / "hotpath-50.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def scenario_hotpath(scale: Scale, workdir: Path, seed: int, progress: Progress) -> dict[str, Any]:
    """Issue 11: the whole appliance (windows, model scoring, telemetry, alerts, the outbox with
    ``synchronous = FULL``) at ``hotpath_machines`` × 50 registers at 10 Hz against the bench-50
    machines (``appliance simulate --profile bench-50``) in their own process; no baseline. The
    machines' first registers carry the model's channel names (:func:`hotpath_profile`), so
    every window is scored (the servers' registers are constant: the scores mean nothing, the
    work is the real one); a threshold rule watches ``r10``. CPU from /proc over the measured
    window; poll jitter and overruns from the appliance's own counters (``--stats-json``: each
    device's last :data:`~appliance.acquire.poller.JITTER_WINDOW` polls, warm-up included when
    the run is shorter; overruns also from the health lines inside the measured window); loss
    and duplicates from what the subscriber received."""
    machines, rate = scale.hotpath_machines, 10.0
    with Rig(workdir, machines, seed, "bench-50", tag="-hotpath") as rig:
        m = appliance_proc(
            rig, rate, scale.max_inflight, str(hotpath_profile(workdir)), HOTPATH_RULES
        )
        m.start()
        assert m.proc is not None and m.log is not None
        progress.wait(scale.hotpath_warmup_s, "hotpath: warm-up")
        m.check()
        load_a = os.getloadavg()[0]
        t_a, cpu_a = time.monotonic(), proc_cpu_s(m.proc.pid) or 0.0
        progress.wait(
            scale.hotpath_s,
            f"hotpath: {machines} machines at {rate:g} Hz",
            lambda: f"{len(rig.received())} messages",
        )
        t_b, cpu_b = time.monotonic(), proc_cpu_s(m.proc.pid) or 0.0
        load_b = os.getloadavg()[0]
        polls = [n for t, n in m.log.polls if t_a < t <= t_b]
        overruns_window = sum(n for t, n in m.log.overruns if t_a < t <= t_b)
        covered = [t for t, _ in m.log.polls if t_a < t <= t_b]
        stats = m.stop()
        time.sleep(0.5)
        got = [r for r in rig.received() if r.kind != "status"]
    n_values = values_per_poll("bench-50")
    elapsed = t_b - t_a
    # polls per second from the health lines inside the window (each counts since the previous)
    span = covered[-1] - covered[0] if len(covered) > 1 else 0.0
    values_per_s = sum(polls[1:]) * n_values / span if span else 0.0
    cpu_pct = 100 * (cpu_b - cpu_a) / elapsed if elapsed else 0.0
    cpu_us = 1e4 * cpu_pct / values_per_s if values_per_s else None
    devices = [d for d in stats.get("acquisition", []) if d.get("jitter_ms_p99") is not None]
    p50 = [float(d["jitter_ms_p50"]) for d in devices]
    p99 = [float(d["jitter_ms_p99"]) for d in devices]
    jmax = [float(d.get("jitter_ms_max", d["jitter_ms_p99"])) for d in devices]
    overruns_run = sum(int(d.get("overruns", 0)) for d in stats.get("acquisition", []))
    counts = loss_and_duplicates(got)
    out: dict[str, Any] = {
        "machines": machines,
        "profile": "bench-50 (first 8 registers named after the model's channels)",
        "values_per_poll": n_values,
        "rate_hz": rate,
        "seconds": elapsed,
        "loadavg_1min": [load_a, load_b],
        "values_per_s": values_per_s,
        "configured_values_per_s": machines * n_values * rate,
        "cpu_pct_of_one_core": cpu_pct,
        "cpu_us_per_value": cpu_us,
        "peak_rss_mib": m.sampler.peak_rss_mib,
        "poll_jitter_ms_p50_median_device": percentile(p50, 0.5),
        "poll_jitter_ms_p50_worst_device": max(p50, default=None),
        "poll_jitter_ms_p99_median_device": percentile(p99, 0.5),
        "poll_jitter_ms_p99_worst_device": max(p99, default=None),
        "poll_jitter_ms_max": max(jmax, default=None),
        "poll_jitter_ms_max_median_device": percentile(jmax, 0.5),
        "overruns_in_window": overruns_window,
        "overruns_whole_run": overruns_run,
        "windows_closed": stats.get("windows_closed"),
        "feature_rows": stats.get("feature_rows"),
        "incomplete_windows": stats.get("incomplete_windows"),
        "alerts": (stats.get("alerts") or {}).get("raised"),
        "telemetry_messages": stats.get("telemetry_messages"),
        "outbox": stats.get("outbox"),
        "messages_received": len(got),
        **counts,
        "targets": HOTPATH_TARGETS,
        "cpu_rss_series": _cpu_series(m),
    }
    t = HOTPATH_TARGETS
    out["met"] = {
        "cpu_us_per_value": cpu_us is not None and cpu_us <= t["cpu_us_per_value_max"],
        "peak_rss_mib": out["peak_rss_mib"] <= t["peak_rss_mib_max"],
        "poll_jitter_ms_p99": bool(p99) and max(p99) <= t["poll_jitter_ms_p99_max"],
        "overruns": overruns_window <= t["overruns_max"],
        "nothing_lost": counts["lost"] == 0,
    }
    return out


# ------------------------------------------------------------------------------ main


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": mem_kib / 2**20,
        "loadavg_at_start": list(os.getloadavg()),
    }


def with_overrides(scale: Scale, sets: Sequence[str]) -> Scale:
    """``scale`` with ``FIELD=VALUE`` overrides, each VALUE parsed as the field's type."""
    changes: dict[str, Any] = {}
    for item in sets:
        name, sep, text = item.partition("=")
        if not sep or not hasattr(scale, name):
            raise ValueError(f"{item!r} is not FIELD=VALUE with a field of {sorted(asdict(scale))}")
        current = getattr(scale, name)
        if isinstance(current, tuple):
            kind = type(current[0])
            changes[name] = tuple(kind(v) for v in text.split(","))
        else:
            changes[name] = type(current)(text)
        if name == "ingest_profile" and text not in CHANNEL_RULES:
            raise ValueError(f"ingest_profile must be one of {sorted(CHANNEL_RULES)}")
    return replace(scale, **changes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="appliance bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"any of {', '.join(SCENARIOS)} (default: {' '.join(DEFAULT_SET)})",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="results folder")
    p.add_argument("--scale", choices=sorted(SCALES), default="default")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override one size of the scale, e.g. --set ingest_machines=30 "
        "--set ingest_profile=bench-50 (fields: see results.json 'params')",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--note", default="", help="a line for the report (e.g. what else ran)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chosen = list(dict.fromkeys(args.scenarios or DEFAULT_SET))
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        print(f"appliance bench: unknown scenario {unknown} (known: {SCENARIOS})", file=sys.stderr)
        return 2
    from appliance.demo.mosquitto import mosquitto_binary

    if any(s != "inference" for s in chosen) and mosquitto_binary() is None:
        print(
            "appliance bench: needs the mosquitto binary (apt-get install mosquitto)",
            file=sys.stderr,
        )
        return 2
    try:
        scale = with_overrides(SCALES[args.scale], args.set)
    except ValueError as err:
        print(f"appliance bench: --set: {err}", file=sys.stderr)
        return 2
    progress = Progress(args.quiet)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict[str, Any] = {
        "command": "appliance bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "seed": args.seed,
        "scale": args.scale,
        "params": asdict(scale),
        "note": args.note,
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory(prefix="appliance-bench-") as tmp:
        workdir = Path(tmp)
        for name in chosen:
            progress.say(f"scenario {name}")
            t = time.monotonic()
            sc = results["scenarios"]
            if name in ("ingest", "bandwidth"):
                if "ingest" not in sc:
                    sc["ingest"] = scenario_ingest(scale, workdir, args.seed, progress)
                sc["bandwidth"] = scenario_bandwidth(sc["ingest"])
            elif name == "alert":
                sc["alert"] = scenario_alert(scale, workdir, args.seed, progress)
            elif name == "outage":
                sc["outage"] = scenario_outage(scale, workdir, args.seed, progress)
            elif name == "crash":
                sc["crash"] = scenario_crash(scale, workdir, args.seed, progress)
            elif name == "inference":
                sc["inference"] = scenario_inference(scale, progress)
            elif name == "hotpath":
                sc["hotpath"] = scenario_hotpath(scale, workdir, args.seed, progress)
            sc.setdefault(name, {})["wall_s"] = time.monotonic() - t
    results["wall_s"] = time.monotonic() - started
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plots = [] if args.no_plots else report.plots(results, args.out, progress.say)
    (args.out / "report.md").write_text(report.markdown(results, plots))
    progress.say(f"wrote {args.out}/results.json, report.md and {len(plots)} plots")
    return 0
