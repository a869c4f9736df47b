"""The embedded MQTT broker against the real paho-mqtt client (3.1.1 and 5.0), plus its pure parts.

Each test gets its own broker on an ephemeral port, running on its own event loop in a
background thread (:class:`BrokerThread`); paho clients run their own network threads. Nothing
sleeps for a fixed time: every wait polls with a short deadline. Where a test must show that
something did *not* arrive, it waits until the broker has processed the event and then sends a
sentinel message down the same path: the sentinel arriving first proves the other never will.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from appliance.demo.broker import (
    MAX_REMAINING_LENGTH,
    BrokerThread,
    EmbeddedBroker,
    MalformedPacketError,
    decode_remaining_length,
    encode_remaining_length,
    topic_matches,
    valid_topic_filter,
    valid_topic_name,
)

HOST = "127.0.0.1"
TIMEOUT_S = 2.0
PROTOCOLS = [pytest.param(mqtt.MQTTv311, id="mqtt311"), pytest.param(mqtt.MQTTv5, id="mqtt5")]


def wait_until(predicate: Callable[[], bool], timeout_s: float = TIMEOUT_S) -> None:
    """Poll ``predicate`` every 10 ms until it holds; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.01)


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def make_broker() -> Iterator[Callable[..., BrokerThread]]:
    """Start ``EmbeddedBroker(port=0, **kwargs)`` on its own loop thread; stopped at teardown."""
    started: list[BrokerThread] = []

    def make(**kwargs: Any) -> BrokerThread:
        thread = BrokerThread(EmbeddedBroker(port=0, **kwargs))
        started.append(thread)
        thread.start()
        return thread

    yield make
    for thread in started:
        thread.stop()


@pytest.fixture
def broker(make_broker: Callable[..., BrokerThread]) -> BrokerThread:
    """A running broker with default limits."""
    return make_broker()


class Client:
    """A paho-mqtt client (loop_start thread) that records what its callbacks saw."""

    def __init__(
        self,
        port: int,
        client_id: str,
        protocol: int,
        *,
        persistent: bool = False,
        session_expiry: int = 300,
        will: tuple[str, bytes, int, bool] | None = None,
    ) -> None:
        self.port = port
        self.protocol = protocol
        self.persistent = persistent
        self.session_expiry = session_expiry
        extra: dict[str, Any] = {}
        if protocol != mqtt.MQTTv5:
            extra["clean_session"] = not persistent
        self.mqtt = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            reconnect_on_failure=False,
            **extra,
        )
        if will is not None:
            self.mqtt.will_set(*will)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.session_present: bool | None = None
        self.connack_properties: Properties | None = None
        self.disconnect_reason: ReasonCode | None = None
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.pubacks: dict[int, ReasonCode] = {}
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_disconnect = self._on_disconnect
        self.mqtt.on_message = self._on_message
        self.mqtt.on_subscribe = self._on_subscribe
        self.mqtt.on_publish = self._on_publish

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.session_present = bool(flags.session_present)
        self.connack_properties = props
        self.connected.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.disconnect_reason = reason
        self.disconnected.set()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self.subacks[mid] = list(codes)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self.pubacks[mid] = reason

    def connect(self) -> Client:
        """Connect (a persistent MQTT 5 one asks for ``session_expiry``) and wait for CONNACK."""
        if self.protocol == mqtt.MQTTv5:
            properties = None
            if self.persistent and self.session_expiry:
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = self.session_expiry
            self.mqtt.connect(
                HOST, self.port, 30, clean_start=not self.persistent, properties=properties
            )
        else:
            self.mqtt.connect(HOST, self.port, 30)
        self.mqtt.loop_start()
        assert self.connected.wait(TIMEOUT_S), "no CONNACK"
        return self

    def subscribe(self, topic: str | list[tuple[str, Any]], qos: int = 1) -> list[ReasonCode]:
        """Subscribe and wait for the SUBACK; return its reason codes."""
        result, mid = self.mqtt.subscribe(topic, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS
        wait_until(lambda: mid in self.subacks)
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> ReasonCode:
        """Publish and wait until paho reports it complete; return the reason code it got."""
        info = self.mqtt.publish(topic, payload, qos, retain)
        info.wait_for_publish(TIMEOUT_S)
        wait_until(lambda: info.mid in self.pubacks)
        return self.pubacks[info.mid]

    def receive(self, count: int) -> list[mqtt.MQTTMessage]:
        """The next ``count`` messages, failing after the usual deadline."""
        deadline = time.monotonic() + TIMEOUT_S
        out = []
        for _ in range(count):
            out.append(self.messages.get(timeout=max(0.0, deadline - time.monotonic())))
        return out

    def receive_until(self, sentinel_topic: str) -> list[mqtt.MQTTMessage]:
        """Every message up to (not including) the first one on ``sentinel_topic``."""
        out = []
        while True:
            message = self.receive(1)[0]
            if message.topic == sentinel_topic:
                return out
            out.append(message)

    def close(self) -> None:
        """Disconnect cleanly (if connected), stop the network thread, close every socket."""
        self.mqtt.disconnect()
        self.mqtt.loop_stop()
        release_sockets(self.mqtt)


@pytest.fixture
def clients(broker: BrokerThread) -> Iterator[Callable[..., Client]]:
    """A factory of :class:`Client` on the ``broker`` fixture; all closed at teardown."""
    made: list[Client] = []

    def make(client_id: str, protocol: int, **kwargs: Any) -> Client:
        client = Client(broker.port, client_id, protocol, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def release_sockets(client: mqtt.Client) -> None:
    """Close paho's sockets now.

    paho closes its wake-up socket pair only in ``__del__``; when the client sits in a reference
    cycle (callbacks bound to a wrapper), the garbage collector may finalize those sockets first,
    which raises ResourceWarning — an error under this project's ``filterwarnings``.
    """
    client._reset_sockets()


@pytest.fixture
def unlooped(broker: BrokerThread) -> Iterator[Callable[[str, int, str], mqtt.Client]]:
    """A factory of paho clients with a will, driven by hand (no network thread), so a test
    can kill their socket or watch them disconnect; their sockets are closed at teardown."""
    made: list[mqtt.Client] = []

    def make(client_id: str, protocol: int, will_topic: str) -> mqtt.Client:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            reconnect_on_failure=False,
        )
        made.append(client)
        client.will_set(will_topic, b"gone", qos=1)
        client.connect(HOST, broker.port, keepalive=1)
        deadline = time.monotonic() + TIMEOUT_S
        while not client.is_connected():
            assert time.monotonic() < deadline, "no CONNACK"
            client.loop(timeout=0.01)
        return client

    yield make
    for client in made:
        release_sockets(client)


def connected_ids(broker: BrokerThread) -> frozenset[str]:
    """The broker's connected client ids, read on its own loop."""
    return broker.call(lambda: broker.broker.connected_client_ids)


# ---- raw sockets -----------------------------------------------------------------------------


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + encode_remaining_length(len(body)) + body


def connect_packet(client_id: str, keepalive: int = 60, protocol: str = "MQTT") -> bytes:
    """An MQTT 3.1.1 CONNECT with a clean session and no will."""
    body = _utf8(protocol) + b"\x04\x02" + keepalive.to_bytes(2, "big") + _utf8(client_id)
    return _packet(0x10, body)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes (the socket has a timeout)."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def raw_client(port: int, client_id: str, *, rcvbuf: int | None = None) -> socket.socket:
    """A raw TCP socket that has done an MQTT 3.1.1 CONNECT and got CONNACK accepted."""
    sock = socket.socket()
    sock.settimeout(TIMEOUT_S)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((HOST, port))
    sock.sendall(connect_packet(client_id))
    assert recv_exactly(sock, 4) == b"\x20\x02\x00\x00"
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes the connection (fails on timeout)."""
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


# ---- pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 1),
        (1, 1),
        (127, 1),
        (128, 2),
        (16_383, 2),
        (16_384, 3),
        (2_097_151, 3),
        (2_097_152, 4),
        (MAX_REMAINING_LENGTH, 4),
    ],
)
def test_remaining_length_round_trips_with_the_minimal_number_of_bytes(
    value: int, size: int
) -> None:
    encoded = encode_remaining_length(value)
    assert len(encoded) == size
    assert decode_remaining_length(b"\xaa" + encoded + b"\x55", 1) == (value, 1 + size)


def test_remaining_length_matches_the_examples_of_the_specification() -> None:
    assert encode_remaining_length(321) == b"\xc1\x02"
    assert encode_remaining_length(MAX_REMAINING_LENGTH) == b"\xff\xff\xff\x7f"


@pytest.mark.parametrize("value", [-1, MAX_REMAINING_LENGTH + 1])
def test_remaining_length_outside_the_four_byte_range_cannot_be_encoded(value: int) -> None:
    with pytest.raises(ValueError):
        encode_remaining_length(value)


@pytest.mark.parametrize("data", [b"\xff\xff\xff\xff\x01", b"\x80\x80", b""])
def test_overlong_or_truncated_remaining_length_is_malformed(data: bytes) -> None:
    with pytest.raises(MalformedPacketError):
        decode_remaining_length(data)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("a/b/c", "a/b/c", True),
        ("a/b/c", "a/b", False),
        ("a/b", "a/b/c", False),
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a//c", True),
        ("a/+/c", "a/b/d", False),
        ("a/+/c", "a/b/x/c", False),
        ("a/+", "a", False),
        ("+", "a", True),
        ("+", "a/b", False),
        ("+/+", "/a", True),
        ("a/#", "a", True),
        ("a/#", "a/b", True),
        ("a/#", "a/b/c/d", True),
        ("a/#", "ab", False),
        ("a/#", "b/a", False),
        ("#", "a/b", True),
        ("#", "/", True),
        ("#", "$SYS/broker", False),
        ("+/broker", "$SYS/broker", False),
        ("$SYS/#", "$SYS/broker", True),
        ("$SYS/+", "$SYS/broker", True),
        ("A/b", "a/b", False),
    ],
)
def test_topic_matching_follows_the_mqtt_rules(
    topic_filter: str, topic: str, matches: bool
) -> None:
    assert topic_matches(topic_filter, topic) is matches


def test_topic_names_and_filters_are_validated() -> None:
    assert valid_topic_name("a/b") and valid_topic_name("/")
    assert not valid_topic_name("") and not valid_topic_name("a/+") and not valid_topic_name("#")
    for good in ("#", "+", "a/#", "+/+/c", "/+", "$SYS/#"):
        assert valid_topic_filter(good), good
    for bad in ("", "a#", "a/#/b", "a+/b", "a/b+", "##", "a/\x00"):
        assert not valid_topic_filter(bad), bad


def test_a_broker_does_no_io_until_started_and_then_reports_its_bound_port() -> None:
    broker = EmbeddedBroker(port=0)
    assert broker.port == 0 and not broker.running
    with BrokerThread(broker) as thread:
        assert broker.running and broker.port > 0 and thread.port == broker.port
        with socket.create_connection((HOST, broker.port), timeout=TIMEOUT_S):
            pass
    assert not broker.running


# ---- against paho-mqtt -----------------------------------------------------------------------


@pytest.mark.parametrize("sub_protocol", PROTOCOLS)
@pytest.mark.parametrize("pub_protocol", PROTOCOLS)
def test_qos1_messages_arrive_in_order_and_the_publisher_sees_success(
    clients: Callable[..., Client], pub_protocol: int, sub_protocol: int
) -> None:
    subscriber = clients("sub", sub_protocol).connect()
    assert [code.value for code in subscriber.subscribe("plant/q1", qos=1)] == [1]
    publisher = clients("pub", pub_protocol).connect()
    payloads = [f"message {i}".encode() * (i + 1) for i in range(50)]
    for payload in payloads:
        reason = publisher.publish("plant/q1", payload, qos=1)
        assert not reason.is_failure
    received = subscriber.receive(len(payloads))
    assert [m.payload for m in received] == payloads
    assert {(m.topic, m.qos, m.retain) for m in received} == {("plant/q1", 1, False)}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_delivery_qos_is_the_lower_of_publish_and_subscription_qos(
    clients: Callable[..., Client], protocol: int
) -> None:
    low = clients("low", protocol).connect()
    low.subscribe("q/t", qos=0)
    high = clients("high", protocol).connect()
    high.subscribe("q/t", qos=1)
    publisher = clients("pub", protocol).connect()
    publisher.publish("q/t", b"one", qos=1)
    publisher.publish("q/t", b"zero", qos=0)
    assert [(m.payload, m.qos) for m in low.receive(2)] == [(b"one", 0), (b"zero", 0)]
    assert [(m.payload, m.qos) for m in high.receive(2)] == [(b"one", 1), (b"zero", 0)]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_plus_and_hash_wildcards_match_the_right_topics(
    clients: Callable[..., Client], protocol: int
) -> None:
    plus = clients("plus", protocol).connect()
    plus.subscribe([("a/+/c", 1), ("end", 1)])
    hash_ = clients("hash", protocol).connect()
    hash_.subscribe([("a/#", 1), ("end", 1)])
    everything = clients("everything", protocol).connect()
    everything.subscribe("#", qos=1)
    publisher = clients("pub", protocol).connect()
    for topic in ("a/b/c", "a/x/y/c", "a", "a/b", "b/b/c", "$SYS/a/b/c", "end"):
        publisher.publish(topic, topic.encode())
    assert [m.topic for m in plus.receive_until("end")] == ["a/b/c"]
    assert [m.topic for m in hash_.receive_until("end")] == ["a/b/c", "a/x/y/c", "a", "a/b"]
    assert [m.topic for m in everything.receive_until("end")] == [
        "a/b/c",
        "a/x/y/c",
        "a",
        "a/b",
        "b/b/c",
    ]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unsubscribe_stops_delivery(clients: Callable[..., Client], protocol: int) -> None:
    subscriber = clients("sub", protocol).connect()
    subscriber.subscribe([("u/t", 1), ("end", 1)])
    result, _ = subscriber.mqtt.unsubscribe("u/t")
    assert result == mqtt.MQTT_ERR_SUCCESS
    publisher = clients("pub", protocol).connect()
    # The UNSUBACK has surely been processed once a later SUBSCRIBE's SUBACK is back.
    subscriber.subscribe("other", qos=0)
    publisher.publish("u/t", b"not for you")
    publisher.publish("end", b"")
    assert subscriber.receive_until("end") == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_retained_message_reaches_a_late_subscriber_and_an_empty_payload_clears_it(
    clients: Callable[..., Client], protocol: int
) -> None:
    live = clients("live", protocol).connect()
    live.subscribe("r/#", qos=1)
    publisher = clients("pub", protocol).connect()
    publisher.publish("r/state", b"online", qos=1, retain=True)
    (message,) = live.receive(1)
    assert (message.payload, message.retain) == (b"online", False)

    late = clients("late", protocol).connect()
    late.subscribe("r/+", qos=1)
    (message,) = late.receive(1)
    assert (message.topic, message.payload, message.qos, message.retain) == (
        "r/state",
        b"online",
        1,
        True,
    )

    publisher.publish("r/state", b"", qos=1, retain=True)
    assert live.receive(1)[0].payload == b""
    later = clients("later", protocol).connect()
    later.subscribe([("r/#", 1), ("end", 1)])
    publisher.publish("end", b"")
    assert later.receive_until("end") == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_last_will_is_published_when_the_socket_drops(
    broker: BrokerThread,
    clients: Callable[..., Client],
    unlooped: Callable[[str, int, str], mqtt.Client],
    protocol: int,
) -> None:
    watcher = clients("watcher", protocol).connect()
    watcher.subscribe("wills/#", qos=1)
    dying = unlooped("dying", protocol, "wills/dying")
    dying.socket().close()
    (will,) = watcher.receive(1)
    assert (will.topic, will.payload, will.qos) == ("wills/dying", b"gone", 1)
    wait_until(lambda: "dying" not in connected_ids(broker))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_last_will_is_not_published_after_a_clean_disconnect(
    broker: BrokerThread,
    clients: Callable[..., Client],
    unlooped: Callable[[str, int, str], mqtt.Client],
    protocol: int,
) -> None:
    watcher = clients("watcher", protocol).connect()
    watcher.subscribe("wills/#", qos=1)
    polite = unlooped("polite", protocol, "wills/polite")
    polite.disconnect()
    deadline = time.monotonic() + TIMEOUT_S
    while polite.socket() is not None:
        assert time.monotonic() < deadline
        polite.loop(timeout=0.01)
    wait_until(lambda: "polite" not in connected_ids(broker))
    clients("pub", protocol).connect().publish("wills/sentinel", b"")
    assert watcher.receive_until("wills/sentinel") == []


def test_mqtt5_disconnect_with_will_message_reason_still_publishes_the_will(
    broker: BrokerThread,
    clients: Callable[..., Client],
    unlooped: Callable[[str, int, str], mqtt.Client],
) -> None:
    watcher = clients("watcher", mqtt.MQTTv5).connect()
    watcher.subscribe("wills/#", qos=1)
    leaving = unlooped("leaving", mqtt.MQTTv5, "wills/leaving")
    leaving.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=0x04))
    (will,) = watcher.receive(1)
    assert will.topic == "wills/leaving"


def test_keepalive_timeout_drops_a_silent_client_and_publishes_its_will(
    broker: BrokerThread,
    clients: Callable[..., Client],
    unlooped: Callable[[str, int, str], mqtt.Client],
) -> None:
    broker.broker.keepalive_factor = 0.2  # 1 s keep alive → dropped after 0.2 s of silence
    watcher = clients("watcher", mqtt.MQTTv5).connect()
    watcher.subscribe("wills/#", qos=1)
    unlooped("silent", mqtt.MQTTv311, "wills/silent")
    (will,) = watcher.receive(1)
    assert will.topic == "wills/silent"
    assert "silent" not in connected_ids(broker)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_persistent_session_receives_qos1_messages_published_while_it_was_offline(
    broker: BrokerThread, clients: Callable[..., Client], protocol: int
) -> None:
    sleeper = clients("sleeper", protocol, persistent=True).connect()
    assert sleeper.session_present is False
    sleeper.subscribe("p/t", qos=1)
    sleeper.close()
    wait_until(lambda: "sleeper" not in connected_ids(broker))

    publisher = clients("pub", protocol).connect()
    payloads = [f"offline {i}".encode() for i in range(5)]
    for payload in payloads:
        publisher.publish("p/t", payload, qos=1)
    publisher.publish("p/t", b"qos 0 is not queued", qos=0)

    woken = clients("sleeper", protocol, persistent=True).connect()
    assert woken.session_present is True
    assert [m.payload for m in woken.receive(len(payloads))] == payloads
    # The subscription survived too: live messages keep coming without a new SUBSCRIBE.
    publisher.publish("p/t", b"live", qos=1)
    assert woken.receive(1)[0].payload == b"live"


def test_clean_session_forgets_subscriptions(
    broker: BrokerThread, clients: Callable[..., Client]
) -> None:
    first = clients("forgetful", mqtt.MQTTv5, persistent=True).connect()
    first.subscribe("f/t", qos=1)
    first.close()
    wait_until(lambda: "forgetful" not in connected_ids(broker))
    again = clients("forgetful", mqtt.MQTTv5).connect()  # clean start
    assert again.session_present is False
    again.subscribe("end", qos=1)
    publisher = clients("pub", mqtt.MQTTv5).connect()
    publisher.publish("f/t", b"old subscription")
    publisher.publish("end", b"")
    assert again.receive_until("end") == []


def test_mqtt5_session_without_expiry_interval_ends_at_disconnect(
    broker: BrokerThread, clients: Callable[..., Client]
) -> None:
    first = clients("brief", mqtt.MQTTv5, persistent=True, session_expiry=0).connect()
    first.subscribe("b/t", qos=1)
    first.close()
    wait_until(lambda: "brief" not in connected_ids(broker))
    again = clients("brief", mqtt.MQTTv5, persistent=True).connect()
    assert again.session_present is False


def test_a_full_offline_queue_drops_the_oldest_messages_and_warns(
    make_broker: Callable[..., BrokerThread], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="appliance.demo.broker")
    broker = make_broker(max_queued_messages=5)
    sleeper = Client(broker.port, "sleeper", mqtt.MQTTv311, persistent=True).connect()
    publisher = Client(broker.port, "pub", mqtt.MQTTv311).connect()
    woken = Client(broker.port, "sleeper", mqtt.MQTTv311, persistent=True)
    try:
        sleeper.subscribe("p/t", qos=1)
        sleeper.close()
        wait_until(lambda: "sleeper" not in connected_ids(broker))
        for i in range(8):
            publisher.publish("p/t", str(i).encode(), qos=1)
        woken.connect()
        assert [m.payload for m in woken.receive(5)] == [b"3", b"4", b"5", b"6", b"7"]
        assert broker.call(lambda: broker.broker.stats).dropped_queued == 3
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
        assert "queue full" in caplog.records[0].getMessage()
    finally:
        for client in (sleeper, publisher, woken):
            client.close()


def test_a_subscriber_that_stops_reading_only_loses_its_own_qos0_messages(
    make_broker: Callable[..., BrokerThread],
) -> None:
    broker = make_broker(max_queued_qos0=8)
    publisher = Client(broker.port, "pub", mqtt.MQTTv5).connect()
    healthy = Client(broker.port, "healthy", mqtt.MQTTv5).connect()
    slow = raw_client(broker.port, "slow", rcvbuf=4096)
    try:
        subscribe = b"\x00\x01" + _utf8("bulk/#") + b"\x00"
        slow.sendall(_packet(0x82, subscribe))
        assert recv_exactly(slow, 5) == b"\x90\x03\x00\x01\x00"
        healthy.subscribe("check", qos=1)
        chunk = b"x" * 32 * 1024
        deadline = time.monotonic() + TIMEOUT_S
        while broker.call(lambda: broker.broker.stats).dropped_qos0 == 0:
            assert time.monotonic() < deadline, "the slow subscriber's queue never filled"
            for _ in range(20):
                publisher.mqtt.publish("bulk/data", chunk, qos=0)
            publisher.publish("bulk/sync", b"", qos=1)  # paho has written the batch
        publisher.publish("check", b"still fine", qos=1)
        assert healthy.receive(1)[0].payload == b"still fine"
    finally:
        slow.close()
        publisher.close()
        healthy.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_qos2_publish_completes_and_is_delivered_once(
    clients: Callable[..., Client], protocol: int
) -> None:
    subscriber = clients("sub", protocol).connect()
    assert [code.value for code in subscriber.subscribe([("q2", 2), ("end", 1)])] == [1, 1]
    publisher = clients("pub", protocol).connect()
    assert not publisher.publish("q2", b"exactly once", qos=2).is_failure
    publisher.publish("end", b"")
    assert [(m.payload, m.qos) for m in subscriber.receive_until("end")] == [(b"exactly once", 1)]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_second_connection_with_the_same_client_id_takes_over_the_session(
    broker: BrokerThread, clients: Callable[..., Client], protocol: int
) -> None:
    first = clients("twin", protocol).connect()
    first.subscribe("t/t", qos=1)
    second = clients("twin", protocol).connect()
    assert first.disconnected.wait(TIMEOUT_S)
    if protocol == mqtt.MQTTv5:
        assert first.disconnect_reason is not None and first.disconnect_reason.value == 0x8E
    second.subscribe("t/t", qos=1)
    clients("pub", protocol).connect().publish("t/t", b"to the new one")
    assert second.receive(1)[0].payload == b"to the new one"
    assert connected_ids(broker) >= {"twin"}


def test_an_empty_client_id_gets_an_assigned_identifier_under_mqtt5(
    broker: BrokerThread, clients: Callable[..., Client]
) -> None:
    anonymous = clients("", mqtt.MQTTv5).connect()
    assigned = anonymous.connack_properties.AssignedClientIdentifier  # type: ignore[union-attr]
    assert assigned.startswith("auto-")
    assert assigned in connected_ids(broker)
    clients("", mqtt.MQTTv311).connect()  # 3.1.1 with a clean session: accepted too


def test_mqtt5_no_local_subscription_skips_the_clients_own_messages(
    clients: Callable[..., Client],
) -> None:
    client = clients("echo", mqtt.MQTTv5).connect()
    client.subscribe([("chat", SubscribeOptions(qos=1, noLocal=True)), ("end", 1)])
    other = clients("other", mqtt.MQTTv5).connect()
    client.publish("chat", b"mine")
    other.publish("chat", b"theirs")
    other.publish("end", b"")
    assert [m.payload for m in client.receive_until("end")] == [b"theirs"]


def test_pingreq_gets_a_pingresp_and_disconnect_closes_the_connection(broker: BrokerThread) -> None:
    with raw_client(broker.port, "pinger") as sock:
        sock.sendall(b"\xc0\x00")
        assert recv_exactly(sock, 2) == b"\xd0\x00"
        sock.sendall(b"\xe0\x00")
        assert read_until_closed(sock) == b""


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x30\x05\x00\x01ahi", id="publish-before-connect"),
        pytest.param(b"\x10\xff\xff\xff\xff\x01", id="overlong-remaining-length"),
        pytest.param(connect_packet("x", protocol="HTTP"), id="unknown-protocol-name"),
        pytest.param(connect_packet("x") + b"\x36\x03\x00\x01a", id="publish-with-qos-3"),
        pytest.param(connect_packet("x") + b"\x30\x03\x00\x01+", id="wildcard-in-topic-name"),
        pytest.param(connect_packet("x") + b"\x80\x02\x00\x01", id="subscribe-bad-flags"),
        pytest.param(connect_packet("x") + b"\x00\x00", id="reserved-packet-type"),
    ],
)
def test_malformed_bytes_close_only_that_connection_and_are_logged_once(
    broker: BrokerThread,
    clients: Callable[..., Client],
    caplog: pytest.LogCaptureFixture,
    garbage: bytes,
) -> None:
    caplog.set_level(logging.WARNING, logger="appliance.demo.broker")
    bystander = clients("bystander", mqtt.MQTTv5).connect()
    bystander.subscribe("ok", qos=1)
    with socket.create_connection((HOST, broker.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(garbage)
        read_until_closed(sock)
    wait_until(lambda: broker.call(lambda: broker.broker.stats).malformed == 1)
    assert len(caplog.records) == 1 and "closing MQTT connection" in caplog.records[0].getMessage()
    bystander.publish("ok", b"still here")
    assert bystander.receive(1)[0].payload == b"still here"
    assert connected_ids(broker) == {"bystander"}


def test_an_unsupported_protocol_level_is_refused_with_a_connack(broker: BrokerThread) -> None:
    body = _utf8("MQTT") + b"\x07\x02\x00\x3c" + _utf8("future")
    with socket.create_connection((HOST, broker.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(_packet(0x10, body))
        assert read_until_closed(sock) == b"\x20\x02\x00\x01"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stop_disconnects_every_client_and_can_be_called_twice(
    broker: BrokerThread, clients: Callable[..., Client], protocol: int
) -> None:
    client = clients("victim", protocol).connect()
    with raw_client(broker.port, "raw") as sock:
        broker.run(broker.broker.stop())
        assert read_until_closed(sock) == b""
    assert client.disconnected.wait(TIMEOUT_S)
    if protocol == mqtt.MQTTv5:
        assert client.disconnect_reason is not None and client.disconnect_reason.value == 0x8B
    broker.run(broker.broker.stop())
    assert not broker.broker.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, broker.port), timeout=TIMEOUT_S).close()
