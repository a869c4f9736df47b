"""The MQTT uplink against a real Mosquitto broker and a real paho subscriber.

Async scenarios run through ``asyncio.run`` inside plain test functions. Waits poll with
deadlines; nothing sleeps a fixed time longer than a production step (10 ms).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time

import pytest
from conftest import Mosquitto, free_port
from mqtt_helpers import (
    ANY_FLOAT,
    APP,
    PREFIX,
    Subscriber,
    alert,
    await_condition,
    eventually,
    mqtt_cfg,
    outbox,
    run_with_uplink,
    telemetry,
)

from appliance.outbox import SqliteOutbox
from appliance.uplink import MqttUplink, backoff_delay_s
from appliance.uplink.topics import status_topic

__all__ = ["outbox"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.broker, pytest.mark.timeout(30)]


def test_backoff_window_doubles_from_the_minimum_is_capped_and_fully_jittered() -> None:
    assert [backoff_delay_s(n, 0.5, 30.0, 1.0) for n in range(8)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        30.0,
        30.0,
    ]
    assert backoff_delay_s(3, 0.5, 30.0, 0.0) == 0.0
    assert backoff_delay_s(3, 0.5, 30.0, 0.25) == 1.0
    assert backoff_delay_s(10_000, 0.5, 30.0, 0.5) == 15.0


def test_construction_does_no_io_and_refuses_an_inverted_backoff_range(
    outbox: SqliteOutbox,
) -> None:
    up = MqttUplink(mqtt_cfg(1), APP, outbox)  # port 1: nothing listens, nothing tried
    assert not up.connected and up.stats()["connects"] == 0
    with pytest.raises(ValueError, match="reconnect_min_s"):
        MqttUplink(mqtt_cfg(1, reconnect_min_s=5.0, reconnect_max_s=1.0), APP, outbox)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_appended_records_reach_a_subscriber_once_in_order_and_leave_the_outbox_after_puback(
    mosquitto: Mosquitto, outbox: SqliteOutbox, protocol: str
) -> None:
    n = 300
    uplink = MqttUplink(mqtt_cfg(mosquitto.port, protocol=protocol, max_inflight=20), APP, outbox)

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: up.connected)
        for i in range(0, n, 50):
            outbox.append([telemetry(i=j) for j in range(i, i + 50)])
            up.notify()
            await asyncio.sleep(0)
        await eventually(lambda: len(sub.seqs()) >= n)
        await eventually(lambda: outbox.pending == 0)

    with Subscriber(mosquitto.port, f"{PREFIX}/{APP}/telemetry/#") as sub:
        run_with_uplink(uplink, scenario)
        assert sub.seqs() == list(range(1, n + 1))
        assert [m["i"] for m in sub.messages()] == list(range(n))
        assert sub.messages()[0]["id"] == f"{APP}/telemetry/cnc-1/{outbox.epoch}/1"
    assert outbox.stats()["published"] == n
    assert uplink.stats() == {
        "published": n,
        "rejected": 0,
        "quota_retries": 0,
        "historical": 0,
        "connects": 1,
        "disconnects": 1,
        "auth_failures": 0,
        "tls_failures": 0,
        "connect_failures": 0,
        "short_connections": 0,  # stop() is not a drop
        "backfilled": 0,
        "in_flight": 0,
    }


def test_alerts_overtake_a_telemetry_backlog(mosquitto: Mosquitto, outbox: SqliteOutbox) -> None:
    outbox.append([telemetry(i=i) for i in range(200)])
    outbox.append([alert()])
    uplink = MqttUplink(mqtt_cfg(mosquitto.port, max_inflight=10), APP, outbox)

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: len(sub.messages()) >= 201)

    with Subscriber(mosquitto.port, f"{PREFIX}/{APP}/+/cnc-1") as sub:
        run_with_uplink(uplink, scenario)
        kinds = [m["kind"] for m in sub.messages()]
    assert kinds[0] == "alert"
    assert kinds.count("telemetry") == 200


def test_status_is_retained_online_while_running_and_offline_after_stop(
    mosquitto: Mosquitto, outbox: SqliteOutbox
) -> None:
    topic = status_topic(PREFIX, APP)
    uplink = MqttUplink(mqtt_cfg(mosquitto.port), APP, outbox)

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: up.connected)
        with Subscriber(mosquitto.port, topic) as late:  # joins after the birth: retained
            await eventually(lambda: len(late.messages()) >= 1)
            assert late.messages() == [
                {"v": 1, "kind": "status", "appliance": APP, "state": "online", "ts": ANY_FLOAT}
            ]

    run_with_uplink(uplink, scenario)
    with Subscriber(mosquitto.port, topic) as after:
        await_condition(lambda: bool(after.messages()))
        assert [m["state"] for m in after.messages()] == ["offline"]


def test_the_last_will_says_offline_when_the_connection_dies_and_the_uplink_comes_back_online(
    mosquitto: Mosquitto, outbox: SqliteOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    """The uplink's TCP connection is cut under paho (``shutdown`` of its socket), as a network
    failure would: the broker sees no DISCONNECT, so it publishes the will."""
    uplink = MqttUplink(mqtt_cfg(mosquitto.port), APP, outbox)

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: up.connected)
        await eventually(lambda: states() == ["online"])
        sock = up._client.socket() if up._client is not None else None
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        await eventually(lambda: states()[:3] == ["online", "offline", "online"])
        await eventually(lambda: up.connected)
        outbox.append([telemetry()])
        up.notify()
        await eventually(lambda: outbox.pending == 0)

    with Subscriber(mosquitto.port, status_topic(PREFIX, APP)) as sub:

        def states() -> list[str]:
            return [m["state"] for m in sub.messages()]

        with caplog.at_level(logging.INFO, logger="appliance.uplink"):
            run_with_uplink(uplink, scenario)
        assert states() == ["online", "offline", "online", "offline"]
    assert uplink.stats()["connects"] == 2
    assert caplog.text.count("lost its connection") == 1
    assert caplog.text.count("reconnected") == 1


def test_a_broker_outage_is_backfilled_to_a_persistent_subscriber_in_order_without_gaps(
    mosquitto: Mosquitto, outbox: SqliteOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    appended = 0
    uplink = MqttUplink(mqtt_cfg(mosquitto.port, max_inflight=10), APP, outbox)

    async def produce(count: int) -> None:
        nonlocal appended
        for _ in range(count):
            outbox.append([telemetry(i=appended)])
            appended += 1
            uplink.notify()
            await asyncio.sleep(0.01)

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: up.connected)
        await produce(30)
        mosquitto.stop()
        await eventually(lambda: not up.connected)
        await produce(100)
        assert outbox.pending >= 100  # nothing is deleted without a PUBACK
        mosquitto.start()
        await produce(30)
        await eventually(lambda: up.connected)
        await eventually(lambda: outbox.pending == 0, timeout_s=10)

    with Subscriber(mosquitto.port, f"{PREFIX}/{APP}/telemetry/#", persistent=True) as sub:
        with caplog.at_level(logging.INFO, logger="appliance.uplink"):
            run_with_uplink(uplink, scenario)
        expected = list(range(1, appended + 1))
        await_condition(lambda: set(sub.seqs()) == set(expected))
        seqs = sub.seqs()
    first_seen = list(dict.fromkeys(seqs))  # QoS 1: a resend may duplicate, never reorder
    assert first_seen == expected, f"{len(seqs) - len(first_seen)} duplicates"
    assert uplink.stats()["connects"] >= 2 and uplink.stats()["published"] == appended
    assert caplog.text.count("lost its connection") == 1
    assert caplog.text.count("reconnected") == 1


def test_records_in_flight_when_the_link_drops_are_resent_once_by_paho_and_never_overtaken(
    mosquitto: Mosquitto, outbox: SqliteOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker is frozen (SIGSTOP) so PUBACKs stop, then the uplink's socket is cut: the
    in-flight records must not be taken again; paho resends them after the reconnect, and the
    records appended meanwhile follow them, never before them."""
    uplink = MqttUplink(mqtt_cfg(mosquitto.port, max_inflight=10), APP, outbox)
    assert mosquitto.proc is not None
    proc = mosquitto.proc

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: up.connected)
        proc.send_signal(signal.SIGSTOP)
        try:
            outbox.append([telemetry(i=i) for i in range(25)])
            up.notify()
            await eventually(lambda: up.stats()["in_flight"] == 9)  # 1 slot kept for alerts
            sock = up._client.socket() if up._client is not None else None
            assert isinstance(sock, socket.socket)
            sock.shutdown(socket.SHUT_RDWR)
            await eventually(lambda: not up.connected)
            outbox.append([telemetry(i=i) for i in range(25, 40)])
            up.notify()
            await asyncio.sleep(0.05)
            assert up.stats()["in_flight"] == 9  # nothing new while the link is down
        finally:
            proc.send_signal(signal.SIGCONT)
        await eventually(lambda: outbox.pending == 0, timeout_s=10)

    with Subscriber(mosquitto.port, f"{PREFIX}/{APP}/telemetry/#") as sub:
        with caplog.at_level(logging.INFO, logger="appliance.uplink"):
            run_with_uplink(uplink, scenario)
        await_condition(lambda: set(sub.seqs()) == set(range(1, 41)))
        seqs = sub.seqs()
    assert list(dict.fromkeys(seqs)) == list(range(1, 41))
    assert uplink.stats()["published"] == 40  # one PUBACK per record, resends included
    assert "9 message(s) in flight will be resent" in caplog.text


@pytest.mark.timeout(60)
def test_a_broker_that_stops_answering_is_detected_by_keepalive_and_reconnected(
    mosquitto: Mosquitto, outbox: SqliteOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker is frozen (SIGSTOP): no RST, no FIN, the TCP connection just goes quiet. The
    uplink's keepalive (PINGREQ, then no PINGRESP within ``keepalive_s``) must declare the link
    dead, connection attempts must keep failing on the missing CONNACK, and once the broker
    runs again everything appended meanwhile is delivered."""
    uplink = MqttUplink(
        mqtt_cfg(mosquitto.port, keepalive_s=5, reconnect_min_s=0.2, reconnect_max_s=0.5),
        APP,
        outbox,
    )
    assert mosquitto.proc is not None
    proc = mosquitto.proc

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: up.connected)
        proc.send_signal(signal.SIGSTOP)
        try:
            frozen = time.monotonic()
            await eventually(lambda: not up.connected, timeout_s=20)
            detected_s = time.monotonic() - frozen
            assert 4.0 <= detected_s <= 16.0, detected_s  # one to two keepalive periods
            outbox.append([telemetry(i=i) for i in range(5)])
            up.notify()
        finally:
            proc.send_signal(signal.SIGCONT)
        await eventually(lambda: outbox.pending == 0, timeout_s=20)

    # persistent: the subscriber's own connection goes through the freeze as well
    with Subscriber(mosquitto.port, f"{PREFIX}/{APP}/telemetry/#", persistent=True) as sub:
        with caplog.at_level(logging.INFO, logger="appliance.uplink"):
            run_with_uplink(uplink, scenario)
        await_condition(lambda: set(sub.seqs()) == set(range(1, 6)), timeout_s=20)
    assert uplink.stats()["connects"] >= 2
    assert caplog.text.count("lost its connection") == 1


def test_records_the_broker_refuses_are_dropped_and_counted_as_rejected(
    mosquitto: Mosquitto, outbox: SqliteOutbox, caplog: pytest.LogCaptureFixture
) -> None:
    acl = mosquitto.workdir / "acl"
    acl.write_text(
        f"topic readwrite {PREFIX}/{APP}/status\ntopic readwrite {PREFIX}/{APP}/telemetry/#\n"
    )
    mosquitto.reconfigure(f"acl_file {acl}\n")
    outbox.append([alert(), telemetry(i=0), alert(), telemetry(i=1)])
    uplink = MqttUplink(mqtt_cfg(mosquitto.port, protocol="5"), APP, outbox)

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: outbox.pending == 0)
        await eventually(lambda: len(sub.messages()) >= 2)

    with Subscriber(mosquitto.port, f"{PREFIX}/{APP}/telemetry/#") as sub:
        with caplog.at_level(logging.WARNING, logger="appliance"):
            run_with_uplink(uplink, scenario)
        assert [m["i"] for m in sub.messages()] == [0, 1]
    assert uplink.stats()["rejected"] == 2 and uplink.stats()["published"] == 2
    assert outbox.stats()["rejected"] == 2
    assert f"{PREFIX}/{APP}/alerts/cnc-1" in caplog.text


def test_stop_without_a_broker_returns_by_the_drain_deadline_and_keeps_the_records(
    outbox: SqliteOutbox, caplog: pytest.LogCaptureFixture
) -> None:

    uplink = MqttUplink(mqtt_cfg(free_port()), APP, outbox)
    outbox.append([telemetry(i=i) for i in range(5)])

    async def scenario(up: MqttUplink) -> None:
        await asyncio.sleep(0.3)  # a few refused attempts
        assert not up.connected

    t0 = time.monotonic()
    with caplog.at_level(logging.DEBUG, logger="appliance.uplink"):
        run_with_uplink(uplink, scenario, stop_s=0.5)
    assert time.monotonic() - t0 < 3.0
    assert outbox.pending == 5
    assert uplink.stats()["connects"] == 0
    assert caplog.text.count("cannot connect") == 1  # once, then debug


def test_stop_while_the_broker_has_not_answered_connect_closes_the_connection_promptly(
    outbox: SqliteOutbox,
) -> None:
    """A peer that accepts TCP but never sends CONNACK (a hung broker): ``stop()`` must not wait
    for paho's keepalive; it sends DISCONNECT and closes the socket, keeping the records."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    port = server.getsockname()[1]
    uplink = MqttUplink(mqtt_cfg(port), APP, outbox)
    outbox.append([telemetry()])
    received = bytearray()

    def peer() -> None:  # a thread: the loop must stay free to send
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            while chunk := conn.recv(1024):  # CONNECT, then whatever comes until EOF
                received.extend(chunk)

    async def main() -> float:
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(None, peer)
        await uplink.start()
        await eventually(lambda: len(received) > 0)  # the CONNECT arrived
        t0 = time.monotonic()
        await uplink.stop(drain_timeout_s=0)
        stop_s = time.monotonic() - t0
        await done  # EOF seen: the uplink closed its side
        return stop_s

    try:
        stop_s = asyncio.run(main())
    finally:
        server.close()
    assert stop_s < 2.0
    assert received[0] == 0x10 and received[-2:] == b"\xe0\x00"  # CONNECT ... DISCONNECT
    assert not uplink.connected and outbox.pending == 1
