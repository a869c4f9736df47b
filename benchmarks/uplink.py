"""Uplink benchmark: outbox append rate, drain rate to a real Mosquitto, outage catch-up, and the
latency a live alert gains while a backlog drains.

What it measures (every figure on demo-sized messages: telemetry of the ``cnc-sim`` profile, 10
channels x ``n mean min max``, ~0.9 KB of JSON):

``append``
    records/s appended to a :class:`~appliance.outbox.SqliteOutbox` in batches (``--batch``),
    with ``synchronous`` FULL and NORMAL. Target: >= 100k records/s batched.
``over budget``
    the same appends (a quarter of ``--records``) into an outbox whose disk budget holds about a
    tenth of them: records/s, the slowest append and the windows kept, making room by merging
    old telemetry (``coarsen_windows = 10``, the default) and by evicting it (0).
``drain``
    messages/s (and values/s, 40 values per telemetry message) published from a full outbox by
    :class:`~appliance.uplink.MqttUplink` (QoS 1, PUBACK, settled in SQLite) to a Mosquitto it
    starts itself, against ``bare``: a plain paho QoS 1 publish loop sending the same wire bytes
    (MQTT 5, the same topics, payloads and PUBLISH properties) with the same in-flight window to
    the same broker. Target: drain >= 80 % of bare.
``catch-up``
    seconds to drain the backlog of a ``--outage-s`` outage at demo load (``--machines``
    machines, one telemetry message per machine per second, plus ``--outage-alerts`` alerts),
    appended while the uplink was down; timed from the uplink's start to an empty outbox.
``alert latency``
    ms from appending a live alert to a subscriber receiving it, with the uplink idle and while
    a ``--latency-backlog``-record backlog drains (``--alerts`` samples each); the added p99 is
    the difference of the two p99s.

Run ``python benchmarks/uplink.py --help``; ``--json PATH`` writes every figure. Needs the
``mosquitto`` binary. It prints a table; the lead takes the figures in docs/benchmarks.md on a
quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes

from appliance.config import MqttSection, outbox_min_budget_bytes, outbox_wal_bytes
from appliance.contracts import Envelope, Priority
from appliance.demo.mosquitto import MosquittoProcess, free_port, mosquitto_binary
from appliance.outbox import SqliteOutbox
from appliance.outbox.layout import INSERT
from appliance.payload import mark_historical
from appliance.uplink import MqttUplink
from appliance.uplink.paho_loop import PackedProperties
from appliance.uplink.topics import alert_topic, telemetry_topic

APP = "bench-01"
PREFIX = "edge"
CHANNELS = (
    "spindle_speed",
    "spindle_load",
    "axis_load_x",
    "axis_load_y",
    "axis_load_z",
    "spindle_temp",
    "coolant_temp",
    "vibration_rms",
    "part_counter",
    "program_state",
)
STATS = ("mean", "min", "max")
VALUES_PER_TELEMETRY = len(CHANNELS) * (1 + len(STATS))
T0 = 1_795_000_000.0


def telemetry_envelope(machine: int, i: int) -> Envelope:
    """Window ``i`` of machine ``cnc-<machine>``, shaped and sized like the demo's telemetry."""
    end = T0 + i + 1.0
    channels = {
        name: {
            "n": 10,
            "mean": round(1000.0 + 37.123457 * k + (i % 97) * 0.013, 6),
            "min": round(990.0 + 37.123457 * k, 6),
            "max": round(1010.0 + 37.123457 * k + (i % 13) * 0.1, 6),
        }
        for k, name in enumerate(CHANNELS)
    }
    m = f"cnc-{machine}"
    return Envelope(
        stream=f"telemetry/{m}",
        kind="telemetry",
        topic=telemetry_topic(PREFIX, APP, m),
        priority=Priority.TELEMETRY,
        ts=end,
        body={"machine": m, "window": {"start": end - 1.0, "end": end}, "channels": channels},
    )


def alert_envelope(machine: int, i: int, sent: float = 0.0) -> Envelope:
    """A raised alert; ``sent`` (``time.perf_counter()``) lets the receiver time it."""
    m = f"cnc-{machine}"
    return Envelope(
        stream=f"alerts/{m}",
        kind="alert",
        topic=alert_topic(PREFIX, APP, m),
        priority=Priority.ALERT,
        ts=T0 + i,
        body={
            "machine": m,
            "alert_id": f"spindle_overtemp:{m}:{i}",
            "rule": "spindle_overtemp",
            "state": "raised",
            "severity": "major",
            "source": "channel",
            "channel": "spindle_temp",
            "value": 75.3,
            "threshold": 75.0,
            "raised_at": T0 + i,
            "bench_sent": sent,
        },
    )


def demo_backlog(machines: int, windows: int, alerts: int) -> list[Envelope]:
    """``windows`` seconds of demo load: one telemetry message per machine per window, with
    ``alerts`` alerts spread over it."""
    envs = [telemetry_envelope(m, i) for i in range(windows) for m in range(1, machines + 1)]
    step = max(1, len(envs) // max(1, alerts))
    for k in range(alerts):
        envs.insert(min(len(envs), k * step + k), alert_envelope(1 + k % machines, k))
    return envs


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# -- append ---------------------------------------------------------------------------------


def remove_outbox(path: Path) -> None:
    """Delete an outbox file with its -wal and -shm files (each run starts from a new file)."""
    for sfx in ("", "-wal", "-shm"):
        Path(f"{path}{sfx}").unlink(missing_ok=True)


RECORD_KINDS: dict[str, Callable[[int, int], Envelope]] = {
    "telemetry": telemetry_envelope,
    "alert": alert_envelope,
}


def bench_append(
    workdir: Path, synchronous: str, n: int, batch: int, kind: str = "telemetry"
) -> dict[str, Any]:
    """Batched appends of ``n`` demo records of ``kind`` (telemetry or alert) into a new outbox."""
    make = RECORD_KINDS[kind]
    envs = [make(1 + i % 4, i // 4) for i in range(n)]
    path = workdir / f"append-{kind}-{synchronous}.sqlite"
    ob = SqliteOutbox(str(path), appliance_id=APP, synchronous=synchronous, disk_budget_mb=4096)  # type: ignore[arg-type]
    with ob:
        os.sync()  # the previous run's write-back must not compete with this one's fsyncs
        t = time.perf_counter()
        for k in range(0, n, batch):
            ob.append(envs[k : k + batch])
        dt = time.perf_counter() - t
        payload_bytes = statistics.fmean(len(r.payload) for r in ob.take(1000))
    size = path.stat().st_size
    remove_outbox(path)
    return {
        "kind": kind,
        "synchronous": synchronous,
        "records": n,
        "batch": batch,
        "seconds": dt,
        "records_per_s": n / dt,
        "payload_bytes": payload_bytes,
        "bytes_per_record": size / n,
    }


def bench_sqlite_floor(workdir: Path, n: int, batch: int) -> dict[str, Any]:
    """The SQLite layer alone: the outbox's own schema, pragmas (``synchronous=FULL``) and insert
    statement fed pre-built rows of demo telemetry, no encoding and no per-record Python. What
    no outbox written in Python can beat on this machine for records of this size."""
    path = workdir / "floor.sqlite"
    with SqliteOutbox(str(path), appliance_id=APP, disk_budget_mb=4096) as ob:
        rows = ob.append([telemetry_envelope(1 + i % 4, i // 4) for i in range(batch)])
        batches = [[r._replace(id=r.id + k + batch) for r in rows] for k in range(0, n, batch)]
        db = ob._conn  # the benchmark measures the outbox's connection as configured
        os.sync()
        t = time.perf_counter()
        for shifted in batches:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(INSERT, shifted)
            db.execute("COMMIT")
        dt = time.perf_counter() - t
    remove_outbox(path)
    return {"records": n, "batch": batch, "seconds": dt, "records_per_s": n / dt}


def bench_over_budget(workdir: Path, n: int, batch: int, coarsen_windows: int) -> dict[str, Any]:
    """``n`` demo telemetry records appended into an outbox whose disk budget holds about a
    tenth of them (a long outage): what making room costs, by merging old telemetry
    (``coarsen_windows`` > 0) or by evicting it (0), and how many windows stay."""
    envs = [telemetry_envelope(1 + i % 4, i // 4) for i in range(n)]
    held = n * 1100 // 10  # the database's share; the budget covers the WAL too
    budget_mb = max(held + outbox_wal_bytes(held), outbox_min_budget_bytes()) / 2**20
    path = workdir / f"budget-{coarsen_windows}.sqlite"
    ob = SqliteOutbox(
        str(path), appliance_id=APP, disk_budget_mb=budget_mb, coarsen_windows=coarsen_windows
    )
    with ob:
        os.sync()
        worst = 0.0
        t = time.perf_counter()
        for k in range(0, n, batch):
            t1 = time.perf_counter()
            ob.append(envs[k : k + batch])
            worst = max(worst, time.perf_counter() - t1)
        dt = time.perf_counter() - t
        stats = ob.stats()
        kept = ob.take(n)
    windows = sum(
        msgspec.json.decode(r.payload).get("coarsened", {}).get("windows", 1) for r in kept
    )
    remove_outbox(path)
    return {
        "coarsen_windows": coarsen_windows,
        "records": n,
        "batch": batch,
        "budget_mb": budget_mb,
        "seconds": dt,
        "records_per_s": n / dt,
        "worst_append_ms": worst * 1000.0,
        "records_kept": len(kept),
        "windows_kept": windows,
        "coarsened": stats["coarsened"],
        "evicted": stats["evicted"],
    }


# -- drain: the uplink versus a bare paho loop ----------------------------------------------


def mqtt_cfg(port: int, inflight: int) -> MqttSection:
    return MqttSection(
        host="127.0.0.1",
        port=port,
        topic_prefix=PREFIX,
        client_id=f"{APP}-{os.getpid()}-{time.monotonic_ns()}",
        max_inflight=inflight,
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
    )


def fill(path: Path, envs: list[Envelope], batch: int = 1000) -> SqliteOutbox:
    """A new open outbox (synchronous FULL, the default) holding ``envs``."""
    ob = SqliteOutbox(str(path), appliance_id=APP, disk_budget_mb=4096)
    ob.open()
    for k in range(0, len(envs), batch):
        ob.append(envs[k : k + batch])
    return ob


async def _drain(ob: SqliteOutbox, port: int, inflight: int, timeout_s: float) -> float:
    uplink = MqttUplink(mqtt_cfg(port, inflight), APP, ob)
    t = time.perf_counter()
    await uplink.start()
    try:
        deadline = t + timeout_s
        while ob.pending and time.perf_counter() < deadline:
            await asyncio.sleep(0.002)
        dt = time.perf_counter() - t
        if ob.pending:
            raise RuntimeError(f"drain not done after {timeout_s} s: {ob.pending} left")
    finally:
        await uplink.stop(drain_timeout_s=1.0)
    return dt


def bench_drain(
    workdir: Path, port: int, envs: list[Envelope], inflight: int, name: str = "drain"
) -> dict[str, Any]:
    """Time :class:`MqttUplink` to publish and settle every record of a filled outbox."""
    ob = fill(workdir / f"{name}.sqlite", envs)
    n = ob.pending
    try:
        dt = asyncio.run(_drain(ob, port, inflight, timeout_s=600))
    finally:
        ob.close()
    n_tel = sum(1 for e in envs if e.kind == "telemetry")
    return {
        "messages": n,
        "inflight": inflight,
        "seconds": dt,
        "messages_per_s": n / dt,
        "values_per_s": n_tel * VALUES_PER_TELEMETRY / dt,
    }


def bench_bare(port: int, messages: list[tuple[str, bytes]], inflight: int) -> dict[str, Any]:
    """A plain paho QoS 1 loop: publish everything (paho holds all but ``inflight`` back), wait
    for the last PUBACK. The ceiling the uplink is compared with.

    Same wire bytes as the uplink: MQTT 5, QoS 1, the same topics and payloads (``messages``
    carries them as the uplink publishes a backlog, i.e. with ``"historical":true``), the same
    PUBLISH properties (packed once, as the uplink does), the same in-flight window."""
    done = threading.Event()
    acked = [0]
    n = len(messages)

    def on_publish(client: mqtt.Client, u: Any, mid: int, rc: Any, p: Any) -> None:
        acked[0] += 1
        if acked[0] >= n:
            done.set()

    connected = threading.Event()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bare-{os.getpid()}", protocol=mqtt.MQTTv5
    )
    client.on_publish = on_publish
    client.on_connect = lambda *a: connected.set()
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)
    t = time.perf_counter()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise RuntimeError("bare paho client: no CONNACK")
        props = PackedProperties(
            PacketTypes.PUBLISH, PayloadFormatIndicator=1, ContentType="application/json"
        )
        for topic, payload in messages:
            client.publish(topic, payload, qos=1, properties=props)
        if not done.wait(600):
            raise RuntimeError(f"bare paho client: {acked[0]}/{n} acked after 600 s")
        dt = time.perf_counter() - t
    finally:
        client.disconnect()
        client.loop_stop()
    return {
        "messages": n,
        "inflight": inflight,
        "seconds": dt,
        "messages_per_s": n / dt,
        "values_per_s": n * VALUES_PER_TELEMETRY / dt,
    }


# -- alert latency --------------------------------------------------------------------------


class AlertTimer:
    """A paho subscriber on the alert topics that records ``perf_counter() - bench_sent``."""

    def __init__(self, port: int) -> None:
        self.latencies_ms: list[float] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"timer-{os.getpid()}", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = lambda c, *a: c.subscribe(f"{PREFIX}/{APP}/alerts/#", qos=1)
        self.client.on_subscribe = lambda *a: self._ready.set()
        self.client.on_message = self._on_message
        self.port = port

    def _on_message(self, client: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        sent = json.loads(msg.payload).get("bench_sent", 0.0)
        if sent:
            with self._lock:
                self.latencies_ms.append((now - sent) * 1000.0)

    def count(self) -> int:
        with self._lock:
            return len(self.latencies_ms)

    def __enter__(self) -> AlertTimer:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise RuntimeError("alert timer: no SUBACK")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def _alerts_while(
    ob: SqliteOutbox, port: int, inflight: int, samples: int, gap_s: float, timer: AlertTimer
) -> dict[str, Any]:
    uplink = MqttUplink(mqtt_cfg(port, inflight), APP, ob)
    await uplink.start()
    try:
        deadline = time.perf_counter() + 10
        while not uplink.connected:
            if time.perf_counter() > deadline:
                raise RuntimeError("uplink did not connect")
            await asyncio.sleep(0.002)
        backlog_at_start = ob.pending
        pending_at_alerts: list[int] = []
        for i in range(samples):
            pending_at_alerts.append(ob.pending)
            ob.append([alert_envelope(1, 10_000 + i, time.perf_counter())])
            uplink.notify()
            await asyncio.sleep(gap_s)
        deadline = time.perf_counter() + 30
        while timer.count() < samples and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
    finally:
        await uplink.stop(drain_timeout_s=0.5)
    return {
        "backlog_at_start": backlog_at_start,
        "backlog_min_during_alerts": min(pending_at_alerts),
    }


def bench_alert_latency(
    workdir: Path, port: int, backlog: int, inflight: int, samples: int, gap_s: float, name: str
) -> dict[str, Any]:
    """Latency of ``samples`` live alerts, one every ``gap_s``, with a ``backlog`` draining."""
    envs = [telemetry_envelope(1 + i % 4, i // 4) for i in range(backlog)]
    ob = fill(workdir / f"{name}.sqlite", envs)
    try:
        with AlertTimer(port) as timer:
            info = asyncio.run(_alerts_while(ob, port, inflight, samples, gap_s, timer))
            lat = list(timer.latencies_ms)
    finally:
        ob.close()
    return {
        "backlog": backlog,
        **info,
        "samples": samples,
        "received": len(lat),
        "p50_ms": percentile(lat, 0.5),
        "p99_ms": percentile(lat, 0.99),
        "max_ms": max(lat) if lat else float("nan"),
        "mean_ms": statistics.fmean(lat) if lat else float("nan"),
    }


# -- main -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/uplink.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Every figure is on demo-sized telemetry (~0.9 KB JSON, 40 values). "
        "--quick runs everything at a small scale (for development on a busy machine).",
    )
    p.add_argument("--records", type=int, default=200_000, help="records per append run")
    p.add_argument("--batch", type=int, default=1000, help="envelopes per append() call")
    p.add_argument("--drain-records", type=int, default=50_000, help="records to drain")
    p.add_argument("--inflight", type=int, default=100, help="QoS 1 in-flight window")
    p.add_argument("--machines", type=int, default=4, help="machines of the demo load")
    p.add_argument("--outage-s", type=int, default=600, help="outage length, s (1 window/s)")
    p.add_argument("--outage-alerts", type=int, default=10, help="alerts during the outage")
    p.add_argument("--alerts", type=int, default=200, help="alert latency samples per case")
    p.add_argument("--alert-gap-ms", type=float, default=20.0, help="time between alerts, ms")
    p.add_argument(
        "--latency-backlog", type=int, default=50_000, help="backlog draining under the alerts"
    )
    p.add_argument("--repeat", type=int, default=3, help="runs of append/drain/bare; best kept")
    p.add_argument("--quick", action="store_true", help="small scale: a few seconds in all")
    p.add_argument("--workdir", type=Path, help="where the outbox files go (default: a temp dir)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write every figure here as JSON")
    return p


def best(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return max(runs, key=lambda r: float(r[key]))


def run(args: argparse.Namespace, workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    if args.quick:
        args.records, args.drain_records, args.latency_backlog = 20_000, 5_000, 5_000
        args.alerts, args.repeat, args.outage_s = 30, 1, 120
    out: dict[str, Any] = {
        "host": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_1m": os.getloadavg()[0],
        },
        "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    for sync in ("FULL", "NORMAL"):
        say(f"append, synchronous={sync} ...")
        runs = [bench_append(workdir, sync, args.records, args.batch) for _ in range(args.repeat)]
        out[f"append_{sync.lower()}"] = best(runs, "records_per_s")
    say("append of alert records, synchronous=FULL ...")
    runs = [
        bench_append(workdir, "FULL", args.records, args.batch, "alert") for _ in range(args.repeat)
    ]
    out["append_alerts_full"] = best(runs, "records_per_s")
    say("SQLite floor (pre-built rows, synchronous=FULL) ...")
    runs = [bench_sqlite_floor(workdir, args.records, args.batch) for _ in range(args.repeat)]
    out["sqlite_floor"] = best(runs, "records_per_s")
    for cw, key in ((10, "over_budget_coarsen"), (0, "over_budget_evict")):
        say(f"append over the disk budget, coarsen_windows={cw} ...")
        out[key] = bench_over_budget(workdir, max(args.records // 4, 1000), args.batch, cw)

    broker = MosquittoProcess(free_port(), workdir / "mosquitto", persistence=False)
    broker.start()
    try:
        envs = [telemetry_envelope(1 + i % 4, i // 4) for i in range(args.drain_records)]
        messages = [(e.topic, p) for e, p in zip(envs, _payloads(workdir, envs), strict=True)]
        drains, bares = [], []
        for r in range(args.repeat):
            say(f"drain via the uplink vs bare paho, run {r + 1}/{args.repeat} ...")
            drains.append(bench_drain(workdir, broker.port, envs, args.inflight, f"drain{r}"))
            bares.append(bench_bare(broker.port, messages, args.inflight))
        out["drain"] = best(drains, "messages_per_s")
        out["bare_paho"] = best(bares, "messages_per_s")
        out["drain_vs_bare"] = out["drain"]["messages_per_s"] / out["bare_paho"]["messages_per_s"]

        say(f"catch-up after a {args.outage_s} s outage ...")
        backlog = demo_backlog(args.machines, args.outage_s, args.outage_alerts)
        catch = bench_drain(workdir, broker.port, backlog, args.inflight, "catchup")
        catch["outage_s"] = args.outage_s
        catch["machines"] = args.machines
        out["catch_up"] = catch

        gap = args.alert_gap_ms / 1000.0
        say("alert latency, idle uplink ...")
        out["alert_idle"] = bench_alert_latency(
            workdir, broker.port, 0, args.inflight, args.alerts, gap, "idle"
        )
        say(f"alert latency, {args.latency_backlog}-record backlog draining ...")
        out["alert_backlog"] = bench_alert_latency(
            workdir, broker.port, args.latency_backlog, args.inflight, args.alerts, gap, "busy"
        )
        out["alert_added_p99_ms"] = out["alert_backlog"]["p99_ms"] - out["alert_idle"]["p99_ms"]
    finally:
        broker.stop()
    out["targets"] = {
        "append_full_ge_100k_per_s": out["append_full"]["records_per_s"] >= 100_000,
        "append_normal_ge_100k_per_s": out["append_normal"]["records_per_s"] >= 100_000,
        "append_alerts_full_ge_100k_per_s": (out["append_alerts_full"]["records_per_s"] >= 100_000),
        "drain_ge_80pct_of_bare": out["drain_vs_bare"] >= 0.8,
    }
    return out


def _payloads(workdir: Path, envs: list[Envelope]) -> list[bytes]:
    """The exact payloads the uplink publishes for ``envs`` drained as a backlog: as the outbox
    stores them, marked ``"historical":true`` (same bytes for the bare loop)."""
    path = workdir / "payloads.sqlite"
    with SqliteOutbox(str(path), appliance_id=APP, synchronous="NORMAL") as ob:
        payloads = [
            mark_historical(r.payload)
            for k in range(0, len(envs), 1000)
            for r in ob.append(envs[k : k + 1000])
        ]
    remove_outbox(path)
    return payloads


def table(r: dict[str, Any]) -> str:
    """The human-readable summary."""
    af, an, aa = r["append_full"], r["append_normal"], r["append_alerts_full"]
    d, b, c = r["drain"], r["bare_paho"], r["catch_up"]
    ai, ab = r["alert_idle"], r["alert_backlog"]
    rows = [
        (
            "append telemetry, FULL",
            f"{af['records_per_s']:,.0f} records/s",
            f"batch {af['batch']}, {af['payload_bytes']:.0f} B payloads",
        ),
        (
            "append telemetry, NORMAL",
            f"{an['records_per_s']:,.0f} records/s",
            f"batch {an['batch']}, {an['payload_bytes']:.0f} B payloads",
        ),
        (
            "append alerts, FULL",
            f"{aa['records_per_s']:,.0f} records/s",
            f"batch {aa['batch']}, {aa['payload_bytes']:.0f} B payloads",
        ),
        (
            "SQLite floor, telemetry rows, FULL",
            f"{r['sqlite_floor']['records_per_s']:,.0f} records/s",
            "pre-built rows: no encoding, no Python per record",
        ),
        *(
            (
                f"append over budget, {label}",
                f"{ob['records_per_s']:,.0f} records/s",
                f"worst append {ob['worst_append_ms']:.0f} ms; {ob['windows_kept']:,} of "
                f"{ob['records']:,} windows kept in {ob['records_kept']:,} records",
            )
            for label, ob in (
                ("coarsening", r["over_budget_coarsen"]),
                ("evicting", r["over_budget_evict"]),
            )
        ),
        (
            "drain via MqttUplink",
            f"{d['messages_per_s']:,.0f} msg/s",
            f"{d['values_per_s']:,.0f} values/s",
        ),
        (
            "bare paho QoS 1 loop",
            f"{b['messages_per_s']:,.0f} msg/s",
            f"{b['values_per_s']:,.0f} values/s",
        ),
        ("drain / bare", f"{r['drain_vs_bare']:.0%}", f"in-flight window {d['inflight']}"),
        (
            f"catch-up after {c['outage_s']} s outage",
            f"{c['seconds']:.2f} s",
            f"{c['messages']} records ({c['machines']} machines)",
        ),
        (
            "alert latency idle p50/p99",
            f"{ai['p50_ms']:.1f} / {ai['p99_ms']:.1f} ms",
            f"{ai['received']}/{ai['samples']} received",
        ),
        (
            "alert latency in backlog p50/p99",
            f"{ab['p50_ms']:.1f} / {ab['p99_ms']:.1f} ms",
            f"{ab['received']}/{ab['samples']} received, backlog {ab['backlog_at_start']}",
        ),
        ("added p99 alert latency", f"{r['alert_added_p99_ms']:.1f} ms", ""),
    ]
    w0 = max(len(x[0]) for x in rows)
    w1 = max(len(x[1]) for x in rows)
    lines = [f"{a:<{w0}}  {b_:>{w1}}  {c_}" for a, b_, c_ in rows]
    t = r["targets"]
    verdict = {True: "PASS", False: "FAIL"}
    lines.append(
        f"targets: append >= 100k/s telemetry FULL {verdict[t['append_full_ge_100k_per_s']]}, "
        f"NORMAL {verdict[t['append_normal_ge_100k_per_s']]}, "
        f"alerts FULL {verdict[t['append_alerts_full_ge_100k_per_s']]}; "
        f"drain >= 80 % of bare {verdict[t['drain_ge_80pct_of_bare']]}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if mosquitto_binary() is None:
        print("benchmarks/uplink.py: mosquitto is not installed", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    say: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(args, args.workdir, say)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-uplink-") as tmp:
            result = run(args, Path(tmp), say)
    print(table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
