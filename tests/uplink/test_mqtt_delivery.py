"""What subscribers see: the ``historical`` flag, the backlog rate, alerts overtaking it, reason
codes and persistent sessions, against a real Mosquitto broker and a real paho subscriber.

Messages built here have schema-shaped bodies, so every one received is validated against the
shipped JSON Schemas (appliance/schemas/).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest
from conftest import Mosquitto
from mqtt_helpers import (
    APP,
    PREFIX,
    Subscriber,
    await_condition,
    eventually,
    mqtt_cfg,
    outbox,
    run_with_uplink,
    telemetry,
)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from appliance.contracts import Envelope, Priority
from appliance.outbox import SqliteOutbox
from appliance.payload import mark_historical
from appliance.schemas import load_schema
from appliance.uplink import MqttUplink, alert_topic, telemetry_topic

__all__ = ["outbox"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.broker, pytest.mark.timeout(30)]

T0 = 1_795_000_000.0


def window(i: int, machine: str = "cnc-1") -> Envelope:
    """A telemetry envelope shaped like the real ones (valid against telemetry.v1.json)."""
    return Envelope(
        stream=f"telemetry/{machine}",
        kind="telemetry",
        topic=telemetry_topic(PREFIX, APP, machine),
        priority=Priority.TELEMETRY,
        ts=T0 + i,
        body={
            "machine": machine,
            "window": {"start": T0 + i - 1, "end": T0 + i},
            "channels": {"spindle_temp": {"n": 10, "mean": 46.2, "min": 46.0, "max": 46.4}},
            "i": i,
        },
    )


def raised(machine: str = "cnc-1") -> Envelope:
    """An alert envelope shaped like the real ones (valid against alert.v1.json)."""
    return Envelope(
        stream=f"alerts/{machine}",
        kind="alert",
        topic=alert_topic(PREFIX, APP, machine),
        priority=Priority.ALERT,
        ts=T0,
        body={
            "machine": machine,
            "alert_id": f"overtemp:{machine}:1",
            "rule": "overtemp",
            "state": "raised",
            "severity": "major",
            "source": "channel",
            "channel": "spindle_temp",
            "value": 80.0,
            "threshold": 75.0,
            "raised_at": T0,
        },
    )


def validate(messages: list[dict[str, Any]]) -> None:
    for m in messages:
        jsonschema.validate(m, load_schema(str(m["kind"])))


def big_telemetry(blob_bytes: int) -> Envelope:
    """A telemetry record of ``blob_bytes`` bytes or so, to exceed a broker's size limit."""
    return Envelope(
        stream="telemetry/cnc-1",
        kind="telemetry",
        topic=telemetry_topic(PREFIX, APP, "cnc-1"),
        priority=Priority.TELEMETRY,
        ts=T0,
        body={"blob": "x" * blob_bytes},
    )


def test_mark_historical_appends_the_flag_as_the_last_member_of_the_object() -> None:
    out = mark_historical(b'{"v":1,"seq":3}')
    assert out == b'{"v":1,"seq":3,"historical":true}'
    assert msgspec.json.decode(out) == {"v": 1, "seq": 3, "historical": True}
    assert mark_historical(b"{}") == b"{}"  # never produced by the outbox: left alone
    assert mark_historical(b"[1]") == b"[1]"


def test_messages_appended_during_an_outage_say_historical_and_live_ones_do_not(
    mosquitto: Mosquitto, outbox: SqliteOutbox
) -> None:
    uplink = MqttUplink(mqtt_cfg(mosquitto.port, max_inflight=10), APP, outbox)

    async def append(envs: list[Envelope]) -> None:
        outbox.append(envs)
        uplink.notify()

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: up.connected)
        await append([window(i) for i in range(3)])
        await eventually(lambda: outbox.pending == 0)
        mosquitto.stop()
        await eventually(lambda: not up.connected)
        await append([window(i) for i in range(3, 8)] + [raised()])
        mosquitto.start()
        await eventually(lambda: up.connected)
        await eventually(lambda: outbox.pending == 0, timeout_s=10)
        await append([window(i) for i in range(8, 11)])
        await eventually(lambda: outbox.pending == 0)

    with Subscriber(mosquitto.port, f"{PREFIX}/{APP}/+/cnc-1", persistent=True) as sub:
        run_with_uplink(uplink, scenario)

        def all_in() -> bool:
            # Not a count: after its restart the broker may redeliver to the subscriber the
            # QoS 1 messages it had in flight, so duplicates can come before the last ones.
            got = sub.messages()
            windows = {m["i"] for m in got if m["kind"] == "telemetry"}
            return windows == set(range(11)) and any(m["kind"] == "alert" for m in got)

        await_condition(all_in)
        messages = sub.messages()
    validate(messages)
    tele = {m["i"]: m for m in messages if m["kind"] == "telemetry"}
    assert sorted(tele) == list(range(11))
    assert [i for i, m in tele.items() if m.get("historical") is True] == [3, 4, 5, 6, 7]
    assert all("historical" not in m for i, m in tele.items() if not 3 <= i <= 7)
    alerts = [m for m in messages if m["kind"] == "alert"]
    assert len(alerts) == 1 and alerts[0]["historical"] is True
    assert uplink.stats()["historical"] == 6


def test_a_record_older_than_historical_after_s_says_historical_while_connected(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    offset = [0.0]
    ob = SqliteOutbox(
        str(tmp_path / "o.sqlite"),
        appliance_id=APP,
        synchronous="NORMAL",
        clock=lambda: time.time() + offset[0],
    )
    ob.open()
    uplink = MqttUplink(mqtt_cfg(mosquitto.port, historical_after_s=2.0), APP, ob)

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: up.connected)
        offset[0] = -3.0  # appended 3 s ago (a stalled producer): older than the threshold
        ob.append([window(0)])
        offset[0] = 0.0
        ob.append([window(1)])
        up.notify()
        await eventually(lambda: ob.pending == 0)

    try:
        with Subscriber(mosquitto.port, f"{PREFIX}/{APP}/telemetry/#") as sub:
            run_with_uplink(uplink, scenario)
            await_condition(lambda: len(sub.messages()) == 2)
            messages = sub.messages()
    finally:
        ob.close()
    validate(messages)
    assert [m.get("historical", False) for m in messages] == [True, False]


def test_the_backlog_drains_at_backlog_rate_per_s_while_a_live_alert_overtakes_it(
    mosquitto: Mosquitto, outbox: SqliteOutbox
) -> None:
    n, rate = 120, 40.0
    outbox.append([window(i) for i in range(n)])  # stored before the uplink starts: backlog
    cfg = mqtt_cfg(mosquitto.port, backlog_rate_per_s=rate, max_inflight=20)
    uplink = MqttUplink(cfg, APP, outbox)
    alert_at: list[float] = []
    telemetry_before_alert: list[int] = []

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: len(sub.messages("/telemetry/")) >= 30, timeout_s=10)
        alert_at.append(time.monotonic())
        outbox.append([raised()])
        up.notify()
        await eventually(lambda: len(sub.messages("/alerts/")) == 1, timeout_s=2)
        telemetry_before_alert.append(len(sub.messages("/telemetry/")))
        await eventually(lambda: outbox.pending == 0, timeout_s=15)

    with Subscriber(mosquitto.port, f"{PREFIX}/{APP}/+/cnc-1") as sub:
        run_with_uplink(uplink, scenario)
        await_condition(lambda: len(sub.messages()) == n + 1)
        timed = sub.timed()
    validate([m for _, m in timed])
    tele = [(t, m) for t, m in timed if m["kind"] == "telemetry"]
    assert [m["seq"] for _, m in tele] == list(range(1, n + 1))
    assert all(m["historical"] is True for _, m in tele)
    # Steady-state rate, after the first 10 (the token bucket starts with a small burst):
    measured = (n - 11) / (tele[-1][0] - tele[10][0])
    assert 0.75 * rate <= measured <= 1.1 * rate, f"{measured:.1f} msg/s"
    alert_rx, alert_msg = next((t, m) for t, m in timed if m["kind"] == "alert")
    assert "historical" not in alert_msg  # live, and never rate-limited
    assert alert_rx - alert_at[0] < 0.5, f"alert took {alert_rx - alert_at[0]:.3f} s"
    assert telemetry_before_alert[0] < n - 20  # it overtook most of the backlog


def test_records_the_broker_refuses_by_acl_are_counted_per_reason_and_logged_once(
    mosquitto: Mosquitto, outbox: SqliteOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    acl = mosquitto.workdir / "acl"
    acl.write_text(
        f"topic readwrite {PREFIX}/{APP}/status\ntopic readwrite {PREFIX}/{APP}/telemetry/#\n"
    )
    mosquitto.reconfigure(f"acl_file {acl}\n")
    outbox.append([raised(), raised(), raised(), window(0)])
    uplink = MqttUplink(mqtt_cfg(mosquitto.port, protocol="5"), APP, outbox)

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: outbox.pending == 0)

    with caplog.at_level(logging.DEBUG, logger="appliance.uplink"):
        run_with_uplink(uplink, scenario)
    assert uplink.rejected_by_reason() == {"not_authorized": 3}
    assert uplink.stats()["rejected"] == 3 and uplink.stats()["published"] == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "not_authorized" in errors[0], errors


def test_quota_exceeded_is_retried_after_a_pause_while_other_failure_reasons_drop_the_record(
    mosquitto: Mosquitto, outbox: SqliteOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    """Mosquitto 2.0 never answers 0x97 or 0x99, so a wrapper around the uplink's paho
    ``on_publish`` callback rewrites the PUBACK reason of chosen packet ids (the birth status
    is mid 1, so the records get mids 2, 3, 4, 5): the only test double in this file."""
    uplink = MqttUplink(
        mqtt_cfg(mosquitto.port, protocol="5", reconnect_min_s=0.2, reconnect_max_s=0.4),
        APP,
        outbox,
    )
    real = uplink._on_publish
    plan = {3: 0x97, 4: 0x99}  # record i=1: quota exceeded; record i=2: payload format invalid
    seen: set[int] = set()

    def rewriting(client: Any, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        if mid in plan and mid not in seen:
            seen.add(mid)
            reason = ReasonCode(PacketTypes.PUBACK, identifier=plan[mid])
        real(client, userdata, mid, reason, props)

    uplink._on_publish = rewriting  # type: ignore[method-assign,assignment]

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: up.connected)
        outbox.append([telemetry(i=i) for i in range(4)])
        up.notify()
        await eventually(lambda: outbox.pending == 0)

    with Subscriber(mosquitto.port, f"{PREFIX}/{APP}/telemetry/#") as sub:
        with caplog.at_level(logging.INFO, logger="appliance.uplink"):
            run_with_uplink(uplink, scenario)
        await_condition(lambda: len(sub.messages()) == 5)
        received = [m["i"] for m in sub.messages()]
    # The broker really accepted all four; the retried one arrives a second time, later.
    assert sorted(received) == [0, 1, 1, 2, 3] and received[-1] == 1
    assert uplink.rejected_by_reason() == {"quota_exceeded": 1, "payload_format_invalid": 1}
    stats = uplink.stats()
    assert (stats["published"], stats["rejected"], stats["quota_retries"]) == (3, 1, 1)
    assert caplog.text.count("quota exceeded (0x97)") == 1


@pytest.mark.parametrize(
    ("broker_conf", "max_packet_bytes", "blob_bytes"),
    [
        ("max_packet_size 400\n", 0, 1000),  # MQTT 5 Maximum Packet Size, advertised
        # enforced but not advertised (the next test shows what it does to a connection):
        ("message_size_limit 1500\n", 2000, 3000),
    ],
    ids=["advertised", "mqtt.max_packet_bytes"],
)
def test_a_record_over_the_packet_size_limit_is_rejected_locally_and_the_rest_delivered(
    mosquitto: Mosquitto,
    outbox: SqliteOutbox,
    broker_conf: str,
    max_packet_bytes: int,
    blob_bytes: int,
) -> None:
    mosquitto.reconfigure(broker_conf)
    outbox.append([telemetry(i=0), big_telemetry(blob_bytes), telemetry(i=2)])
    cfg = mqtt_cfg(mosquitto.port, protocol="5", max_packet_bytes=max_packet_bytes)
    uplink = MqttUplink(cfg, APP, outbox)

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: outbox.pending == 0)
        assert up.stats()["disconnects"] == 0  # the broker never saw it, so kept the link

    with Subscriber(mosquitto.port, f"{PREFIX}/{APP}/telemetry/#") as sub:
        run_with_uplink(uplink, scenario)
        await_condition(lambda: len(sub.messages()) == 2)
        assert [m["i"] for m in sub.messages()] == [0, 2]
    assert uplink.rejected_by_reason() == {"packet_too_large": 1}


def test_a_connection_the_broker_keeps_dropping_backs_off_and_is_reported_once(
    mosquitto: Mosquitto, outbox: SqliteOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    """Every connection dies right after it is accepted (here: a record over mosquitto's
    unadvertised ``message_size_limit``, resent at each reconnect). The backoff must keep
    growing as for refused connections, not start over at every short-lived connection, and
    the log must say what is going on once rather than warn at every drop."""
    mosquitto.reconfigure("message_size_limit 1500\n")
    outbox.append([telemetry(i=0), big_telemetry(3000)])
    cfg = mqtt_cfg(mosquitto.port, protocol="5", reconnect_min_s=0.05, reconnect_max_s=5.0)
    uplink = MqttUplink(cfg, APP, outbox, rng=lambda: 0.999)  # the top of every window

    async def scenario(up: MqttUplink) -> None:
        await asyncio.sleep(3.0)  # windows 0.05, 0.1, 0.2, 0.4, 0.8, 1.6 s: ~6 connections

    with caplog.at_level(logging.DEBUG, logger="appliance.uplink"):
        run_with_uplink(uplink, scenario, stop_s=0.1)
    stats = uplink.stats()
    assert 4 <= stats["short_connections"] <= 8, stats  # without the growth: ~40
    assert stats["published"] == 1  # the record before the big one went through
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert sum("lost its connection" in w for w in warnings) == 2
    assert len(errors) == 1 and "dropped 3 times in a row" in errors[0]
    assert "client id" in errors[0] and "max_packet_bytes" in errors[0]


@pytest.mark.parametrize(
    ("protocol", "expiry_s", "second_session_present"),
    [("3.1.1", 86400, True), ("5", 86400, True), ("5", 0, False)],
)
def test_the_broker_keeps_the_uplink_session_across_a_restart_of_the_uplink(
    mosquitto: Mosquitto,
    outbox: SqliteOutbox,
    caplog: pytest.LogCaptureFixture,
    protocol: str,
    expiry_s: int,
    second_session_present: bool,
) -> None:
    cfg = mqtt_cfg(mosquitto.port, protocol=protocol, session_expiry_s=expiry_s)

    async def connected(up: MqttUplink) -> None:
        await eventually(lambda: up.connected)

    with caplog.at_level(logging.DEBUG, logger="appliance.uplink"):
        run_with_uplink(MqttUplink(cfg, APP, outbox), connected)
        run_with_uplink(MqttUplink(cfg, APP, outbox), connected)
    present = [r.getMessage() for r in caplog.records if "session present" in r.getMessage()]
    assert len(present) == 2
    assert "session present: False" in present[0]
    assert f"session present: {second_session_present}" in present[1]
