"""The MQTT uplink against a real Mosquitto broker and a real paho subscriber.

Async scenarios run through ``asyncio.run`` inside plain test functions. Waits poll with
deadlines; nothing sleeps a fixed time longer than a production step (10 ms).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest
from conftest import Mosquitto, free_port
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from appliance.config import MqttSection
from appliance.contracts import Envelope, Priority
from appliance.outbox import SqliteOutbox
from appliance.uplink import MqttUplink, alert_topic, backoff_delay_s, telemetry_topic
from appliance.uplink.topics import status_topic

APP = "app-01"
PREFIX = "edge"

pytestmark = [pytest.mark.broker, pytest.mark.timeout(30)]


class Subscriber:
    """A real paho client subscribed with QoS 1 that records what it receives.

    ``persistent`` uses a fixed client id, MQTT 5 ``clean_start=False`` and a session expiry,
    so the broker queues QoS 1 messages for it while it is away (or the broker restarts); paho
    reconnects it by itself (``loop_start``).
    """

    def __init__(self, port: int, topic: str, *, persistent: bool = False) -> None:
        self.port = port
        self.topic = topic
        self.persistent = persistent
        client_id = "sub-persistent" if persistent else f"sub-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self._lock = threading.Lock()
        self._messages: list[tuple[str, bytes, bool]] = []
        self._subscribed = threading.Event()

    def __enter__(self) -> Subscriber:
        props = None
        if self.persistent:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 300
        self.client.connect(
            "127.0.0.1", self.port, keepalive=5, clean_start=not self.persistent, properties=props
        )
        self.client.loop_start()
        if not self._subscribed.wait(5):
            raise TimeoutError("no SUBACK within 5 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(
        self, client: mqtt.Client, u: Any, flags: mqtt.ConnectFlags, rc: ReasonCode, p: Any
    ) -> None:
        if not flags.session_present:
            client.subscribe(self.topic, qos=1)
        else:
            self._subscribed.set()

    def _on_subscribe(self, client: mqtt.Client, u: Any, mid: int, rcs: Any, p: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def messages(self, topic_part: str = "") -> list[dict[str, Any]]:
        """Decoded payloads received so far (on topics containing ``topic_part``), in order."""
        with self._lock:
            got = list(self._messages)
        return [msgspec.json.decode(p) for t, p, _ in got if topic_part in t]

    def seqs(self, topic_part: str = "") -> list[int]:
        return [int(m["seq"]) for m in self.messages(topic_part)]


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll ``predicate`` on the event loop (letting the uplink run) until true or timeout."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.01)


class _AnyFloat:
    """Equal to any float (status timestamps)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, float)


ANY_FLOAT: Any = _AnyFloat()


def mqtt_cfg(port: int, **kw: Any) -> MqttSection:
    kw.setdefault("reconnect_min_s", 0.05)
    kw.setdefault("reconnect_max_s", 0.5)
    kw.setdefault("keepalive_s", 5)
    return MqttSection(host="127.0.0.1", port=port, topic_prefix=PREFIX, **kw)


def telemetry(machine: str = "cnc-1", i: int = 0) -> Envelope:
    return Envelope(
        stream=f"telemetry/{machine}",
        kind="telemetry",
        topic=telemetry_topic(PREFIX, APP, machine),
        priority=Priority.TELEMETRY,
        ts=1_700_000_000.0 + i,
        body={"i": i},
    )


def alert(machine: str = "cnc-1") -> Envelope:
    return Envelope(
        stream=f"alerts/{machine}",
        kind="alert",
        topic=alert_topic(PREFIX, APP, machine),
        priority=Priority.ALERT,
        ts=1_700_000_000.0,
        body={"rule": "overheat", "state": "raised"},
    )


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[SqliteOutbox]:
    ob = SqliteOutbox(str(tmp_path / "outbox.sqlite"), appliance_id=APP, synchronous="NORMAL")
    ob.open()
    try:
        yield ob
    finally:
        ob.close()


def run_with_uplink(
    uplink: MqttUplink, scenario: Callable[[MqttUplink], Awaitable[None]], stop_s: float = 5.0
) -> None:
    """Start the uplink, run ``scenario``, always stop the uplink (joining paho's thread)."""

    async def main() -> None:
        await uplink.start()
        try:
            await scenario(uplink)
        finally:
            await uplink.stop(drain_timeout_s=stop_s)

    asyncio.run(main())


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
        assert sub.messages()[0]["id"] == f"{APP}/telemetry/cnc-1/1"
    assert outbox.stats()["published"] == n
    assert uplink.stats() == {
        "published": n,
        "rejected": 0,
        "connects": 1,
        "disconnects": 1,
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
            await eventually(lambda: up.stats()["in_flight"] == 10)
            sock = up._client.socket() if up._client is not None else None
            assert isinstance(sock, socket.socket)
            sock.shutdown(socket.SHUT_RDWR)
            await eventually(lambda: not up.connected)
            outbox.append([telemetry(i=i) for i in range(25, 40)])
            up.notify()
            await asyncio.sleep(0.05)
            assert up.stats()["in_flight"] == 10  # nothing new while the link is down
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
    assert "10 message(s) in flight will be resent" in caplog.text


def await_condition(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``predicate`` from plain (non-async) test code until true or timeout."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.01)


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
