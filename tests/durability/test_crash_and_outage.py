"""Zero loss under faults, checked by sequence number at a real subscriber.

Real peers only: Mosquitto (the ``mosquitto`` fixture), `appliance run` and `appliance simulate`
as subprocesses killed with a real SIGKILL, and a persistent-session paho subscriber
(:class:`~appliance.demo.subscriber.DemoSubscriber`) that tracks ``seq`` per stream, gaps and
duplicates. Waits poll with deadlines.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from appliance.config import MqttSection, parse_config
from appliance.contracts import Envelope, Priority
from appliance.demo.mosquitto import MosquittoProcess, free_port, wait_port
from appliance.demo.subscriber import DemoSubscriber
from appliance.outbox import SqliteOutbox
from appliance.runtime import Appliance
from appliance.schemas import load_schema
from appliance.simulate.cell import SimulatedCell
from appliance.uplink import MqttUplink
from appliance.uplink.delivery import SETTLE_MAX_ACKS
from appliance.uplink.topics import alert_topic, telemetry_topic

pytestmark = pytest.mark.broker

APPLIANCE = [sys.executable, "-m", "appliance"]
PREFIX = "edge"


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


async def wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


def subscriber(port: int, app_id: str) -> DemoSubscriber:
    return DemoSubscriber(
        "127.0.0.1", port, PREFIX, app_id, client_id=f"dur-{app_id}-{uuid.uuid4().hex[:8]}"
    )


def received(sub: DemoSubscriber) -> int:
    with sub.lock:
        return sum(s.received for s in sub.streams.values())


def last_seqs(outbox_path: Path) -> dict[str, int]:
    """The last seq handed out per stream, read from the outbox file (the ground truth)."""
    db = sqlite3.connect(f"file:{outbox_path}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT stream, seq FROM streams").fetchall())
    finally:
        db.close()


def assert_every_seq_arrived(sub: DemoSubscriber, expected: dict[str, int]) -> dict[str, Any]:
    """Every seq 1..N of every stream arrived, in order (no gap), and return the summary."""
    summary = sub.summary()
    got = {k: (v["received"], v["last_seq"], v["gaps"]) for k, v in summary["streams"].items()}
    want: dict[str, tuple[int, int, list[tuple[int, int]]]] = {
        k: (n, n, []) for k, n in expected.items()
    }
    assert got == want
    return summary


@pytest.fixture
def cell_ports() -> Iterator[list[int]]:
    """Two simulated machines served by `appliance simulate` in a subprocess."""
    port = free_port()
    sim = subprocess.Popen(
        [*APPLIANCE, "simulate", "--machines", "2", "--base-port", str(port)]
        + ["--log-level", "warning"]
    )
    try:
        wait_port(port)
        wait_port(port + 1)
        yield [port, port + 1]
    finally:
        sim.send_signal(signal.SIGINT)
        try:
            sim.wait(timeout=10)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait()


def write_config(
    tmp_path: Path, app_id: str, ports: list[int], mqtt_port: int, max_inflight: int
) -> Path:
    devices = "".join(
        f'[[devices]]\nname = "cnc-{i + 1}"\nport = {p}\nprofile = "cnc-sim"\n'
        for i, p in enumerate(ports)
    )
    cfg = tmp_path / "cell.toml"
    cfg.write_text(
        f'[appliance]\nid = "{app_id}"\n{devices}'
        '[outbox]\npath = "outbox.sqlite"\nsynchronous = "FULL"\n'
        f'[mqtt]\nport = {mqtt_port}\nclient_id = "{app_id}-{uuid.uuid4().hex[:8]}"\n'
        f"max_inflight = {max_inflight}\nreconnect_min_s = 0.1\nreconnect_max_s = 0.5\n"
    )
    return cfg


def prefill(path: Path, app_id: str, machines: int, per_machine: int) -> None:
    """A backlog from an earlier outage: ``per_machine`` telemetry records per machine."""
    with SqliteOutbox(str(path), appliance_id=app_id, synchronous="NORMAL") as ob:
        for start in range(0, per_machine, 500):
            ob.append(
                [
                    Envelope(
                        f"telemetry/cnc-{m}",
                        "telemetry",
                        telemetry_topic(PREFIX, app_id, f"cnc-{m}"),
                        Priority.TELEMETRY,
                        1_795_000_000.0 + i,
                        {"machine": f"cnc-{m}", "backlog": i},
                    )
                    for i in range(start, min(per_machine, start + 500))
                    for m in range(1, machines + 1)
                ]
            )


def run_appliance(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    """`appliance run` logging to ``log`` (a file, not a pipe nobody reads while it runs).

    Python's fault handler is on, so SIGABRT makes it write every thread's stack to the log.
    """
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*APPLIANCE, "run", "-c", str(cfg), "--log-level", "info"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )


def test_appliance_killed_with_sigkill_mid_publish_loses_nothing_after_restart(
    tmp_path: Path, mosquitto: MosquittoProcess, cell_ports: list[int]
) -> None:
    app_id, inflight, backlog = "dur-kill", 50, 10_000
    cfg = write_config(tmp_path, app_id, cell_ports, mosquitto.port, inflight)
    outbox = tmp_path / "outbox.sqlite"
    prefill(outbox, app_id, machines=2, per_machine=backlog)
    sub = subscriber(mosquitto.port, app_id)
    sub.start()
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / "run1.log", tmp_path / "run2.log"]
    try:
        app = run_appliance(cfg, logs[0])
        procs.append(app)
        # Kill while the backlog streams out: many QoS 1 messages in flight.
        wait_until(lambda: received(sub) >= 2_000 or app.poll() is not None, 60, "backlog")
        assert app.poll() is None, logs[0].read_text()
        app.send_signal(signal.SIGKILL)
        app.wait(timeout=10)
        at_kill = received(sub)
        assert at_kill < 2 * backlog, "the backlog was already delivered: no kill mid-publish"
        # The broker notices the dead connection and publishes the retained last will.
        wait_until(lambda: sub.summary()["status"] == "offline", 10, "the last will")

        app = run_appliance(cfg, logs[1])
        procs.append(app)
        wait_until(
            lambda: all(
                sub.summary()["streams"].get(f"telemetry/cnc-{m}", {}).get("last_seq", 0)
                > backlog + 2
                for m in (1, 2)
            ),
            90,
            "the rest of the backlog and live telemetry after the restart",
            poll_s=0.1,
        )
        app.send_signal(signal.SIGTERM)
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            app.send_signal(signal.SIGABRT)  # the fault handler dumps the stacks
            app.wait(timeout=10)
            raise AssertionError("no clean stop within 30 s:\n" + logs[1].read_text()) from None
        assert app.returncode == 0, logs[1].read_text()
        final = last_seqs(outbox)
        wait_until(
            lambda: {k: v["last_seq"] for k, v in sub.summary()["streams"].items()} == final,
            20,
            "every record at the subscriber",
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        sub.stop()
    summary = assert_every_seq_arrived(sub, final)
    assert final["telemetry/cnc-1"] > backlog and final["telemetry/cnc-2"] > backlog
    # Re-sent after the restart: only what was in flight (or acked, not yet settled) at the kill.
    # in flight, or acknowledged and waiting for their settle (flash wear, docs/benchmarks.md)
    assert summary["duplicates"] <= inflight + SETTLE_MAX_ACKS
    with SqliteOutbox(str(outbox), appliance_id=app_id) as ob:
        assert ob.pending == 0


def demo_config(tmp_path: Path, ports: list[int], mqtt_port: int, app_id: str) -> Any:
    return parse_config(
        {
            "appliance": {"id": app_id},
            "devices": [
                {"name": f"cnc-{i + 1}", "port": p, "profile": "cnc-sim", "timeout_s": 0.5}
                for i, p in enumerate(ports)
            ],
            "outbox": {"path": "outbox.sqlite"},
            "mqtt": {
                "port": mqtt_port,
                "client_id": f"{app_id}-{uuid.uuid4().hex[:8]}",
                "reconnect_min_s": 0.2,
                "reconnect_max_s": 1.0,
            },
        },
        source="durability",
        base_dir=tmp_path,
    )


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_broker_down_for_30_s_under_demo_load_loses_nothing_and_keeps_order(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    app_id = "dur-outage"
    ports = [free_port() for _ in range(4)]
    cell = SimulatedCell(machines=4, ports=ports, seed=11)
    app = Appliance(demo_config(tmp_path, ports, mosquitto.port, app_id))
    sub = subscriber(mosquitto.port, app_id)

    def telemetry_seqs() -> dict[str, int]:
        with sub.lock:
            return {k: v.last_seq for k, v in sub.streams.items() if k.startswith("telemetry/")}

    async def go() -> tuple[int, dict[str, int]]:
        await cell.start()
        sub.start()
        await app.start()
        try:
            await wait_for(
                lambda: len(telemetry_seqs()) == 4 and min(telemetry_seqs().values()) >= 2,
                30,
                "telemetry of all 4 machines before the outage",
            )
            await asyncio.to_thread(mosquitto.stop)
            t0 = time.monotonic()
            await wait_for(lambda: time.monotonic() - t0 >= 30.0, 40, "the 30 s outage")
            during = app.outbox.pending
            await asyncio.to_thread(mosquitto.start)
            await wait_for(lambda: app.outbox.pending == 0, 60, "the outbox drained")
        finally:
            await app.stop()
            await cell.stop()
        return during, last_seqs(tmp_path / "outbox.sqlite")

    try:
        during, final = asyncio.run(go())
        wait_until(
            lambda: {k: v["last_seq"] for k, v in sub.summary()["streams"].items()} == final,
            20,
            "every record at the subscriber",
        )
    finally:
        sub.stop()
    assert during >= 4 * 25  # ~30 windows per machine waited on disk
    assert_every_seq_arrived(sub, final)  # no gap in arrival order: order per stream kept
    assert min(v for k, v in final.items() if k.startswith("telemetry/")) >= 32


def outage_over_budget(
    tmp_path: Path,
    mosquitto: MosquittoProcess,
    app_id: str,
    body: Callable[[int], dict[str, Any]],
    coarsen_windows: int,
) -> tuple[dict[str, float], DemoSubscriber]:
    """5 telemetry windows delivered, the broker stopped, 3000 windows and 20 alerts appended
    into a 0.25 MiB outbox, the broker back: the outbox's stats at the end of the outage and
    the subscriber (stopped, holding every message) once the newest window arrived."""
    cfg = MqttSection(
        host="127.0.0.1",
        port=mosquitto.port,
        topic_prefix=PREFIX,
        client_id=f"{app_id}-{uuid.uuid4().hex[:8]}",
        reconnect_min_s=0.05,
        reconnect_max_s=0.3,
        keepalive_s=5,
    )
    ob = SqliteOutbox(
        str(tmp_path / "o.sqlite"),
        appliance_id=app_id,
        disk_budget_mb=0.375,  # the database gets 0.25 MiB, the WAL the rest
        coarsen_windows=coarsen_windows,
    )
    uplink = MqttUplink(cfg, app_id, ob)
    sub = subscriber(mosquitto.port, app_id)
    sub.keep_messages = True

    def tel(i: int) -> Envelope:
        return Envelope(
            "telemetry/cnc-1",
            "telemetry",
            telemetry_topic(PREFIX, app_id, "cnc-1"),
            Priority.TELEMETRY,
            float(i),
            body(i),
        )

    def alert(i: int) -> Envelope:
        return Envelope(
            "alerts/cnc-1",
            "alert",
            alert_topic(PREFIX, app_id, "cnc-1"),
            Priority.ALERT,
            float(i),
            {"n": i},
        )

    def append(envs: list[Envelope]) -> None:
        ob.append(envs)
        uplink.notify()

    async def go() -> dict[str, float]:
        ob.open()
        await uplink.start()
        try:
            append([tel(i) for i in range(5)])
            await wait_for(lambda: received(sub) == 5, 10, "telemetry before the outage")
            await asyncio.to_thread(mosquitto.stop)
            await wait_for(lambda: not uplink.connected, 10, "the uplink to see the outage")
            for b in range(60):
                append(
                    [tel(5 + b * 50 + i) for i in range(50)] + ([alert(b)] if b % 3 == 0 else [])
                )
            stats = ob.stats()
            await asyncio.to_thread(mosquitto.start)
            await wait_for(lambda: ob.pending == 0, 30, "the outbox drained")
            return stats
        finally:
            await uplink.stop(drain_timeout_s=1.0)
            ob.close()

    sub.start()
    try:
        stats = asyncio.run(go())
        wait_until(
            lambda: sub.summary()["streams"].get("telemetry/cnc-1", {}).get("last_seq") == 3005,
            10,
            "the newest telemetry at the subscriber",
        )
    finally:
        sub.stop()
    return stats, sub


def test_disk_budget_reached_in_a_long_outage_evicts_telemetry_and_delivers_every_alert(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    pad = "p" * 200
    stats, sub = outage_over_budget(
        tmp_path, mosquitto, "dur-budget", lambda i: {"machine": "cnc-1", "pad": pad}, 0
    )
    evicted = int(stats["evicted"])
    assert evicted > 0 and stats["evicted_alerts"] == 0
    summary = sub.summary()["streams"]
    assert summary["alerts/cnc-1"] == {"last_seq": 20, "received": 20, "gaps": []}
    # The subscriber sees exactly the evicted telemetry as one gap, right after the outage began.
    assert summary["telemetry/cnc-1"] == {
        "last_seq": 3005,
        "received": 3005 - evicted,
        "gaps": [(6, 6 + evicted)],
    }


def test_disk_budget_reached_in_a_long_outage_coarsens_telemetry_and_every_window_arrives(
    tmp_path: Path, mosquitto: MosquittoProcess
) -> None:
    def window(i: int) -> dict[str, Any]:
        temp = 40.0 + i % 7
        return {
            "machine": "cnc-1",
            "window": {"start": float(i), "end": float(i + 1)},
            "channels": {"spindle_temp": {"n": 10, "mean": temp, "min": temp - 1, "max": temp + 1}},
        }

    stats, sub = outage_over_budget(tmp_path, mosquitto, "dur-coarse", window, 10)
    assert stats["coarsened"] > 0 and stats["evicted"] == 0
    summary = sub.summary()["streams"]
    assert summary["alerts/cnc-1"] == {"last_seq": 20, "received": 20, "gaps": []}
    # Fewer messages than windows, and no gap: the subscriber checks first_seq of merged ones.
    assert summary["telemetry/cnc-1"] == {
        "last_seq": 3005,
        "received": 3005 - stats["coarsened"],
        "gaps": [],
    }
    schema = load_schema("telemetry")
    telemetry = [m for m in sub.messages if m["kind"] == "telemetry"]
    merged = [m for m in telemetry if "coarsened" in m]
    assert merged and all(m["historical"] is True for m in merged)
    for m in telemetry:
        jsonschema.validate(m, schema)
    assert sum(m.get("coarsened", {}).get("windows", 1) for m in telemetry) == 3005
    assert sum(m["channels"]["spindle_temp"]["n"] for m in telemetry) == 10 * 3005
    assert min(m["channels"]["spindle_temp"]["min"] for m in telemetry) == 39.0
