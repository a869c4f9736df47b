"""A small embedded MQTT 3.1.1 / 5.0 broker, so `appliance demo` runs where Mosquitto is missing.

It is written for a demo on one machine — a handful of clients, a few hundred messages per
second — not for production: no TLS, no authentication (user names and passwords are accepted
and ignored), no persistence to disk, no shared subscriptions, no topic aliases, no enhanced
authentication. Within that scope it aims to be correct and hard to break:

* MQTT 3.1.1 (and 3.1, protocol level 3) and MQTT 5.0 clients, side by side.
* CONNECT / CONNACK with clean session / clean start, keep alive (the connection is dropped after
  1.5 × the keep-alive interval of silence), will messages (published when a connection ends in
  any way but a normal DISCONNECT; the MQTT 5 will delay interval is ignored), assigned client
  identifiers for empty ones, session takeover when a client identifier connects twice.
* PUBLISH QoS 0, 1 and 2 inbound (PUBACK, PUBREC / PUBREL / PUBCOMP with duplicate suppression),
  outbound at min(message QoS, granted QoS), where granted QoS is at most 1.
* Retained messages (an empty retained payload clears), delivered on subscribe with RETAIN set;
  MQTT 5 subscription options No Local, Retain As Published and Retain Handling.
* ``+`` / ``#`` wildcards; topics starting with ``$`` are not matched by a leading wildcard.
* Persistent sessions (MQTT 3.1.1 ``clean_session=False``; MQTT 5 ``clean_start=False`` with a
  non-zero session expiry interval) keep subscriptions while the client is away and queue its
  QoS 1 messages; unacknowledged QoS 1 messages are re-sent (DUP set) when it comes back.
  Sessions live in memory only; an MQTT 5 session expiry interval is honoured.
* MQTT 5 application properties of a PUBLISH (payload format, content type, response topic,
  correlation data, user properties, message expiry — the latter not counted down) are
  forwarded to MQTT 5 subscribers; incoming properties are otherwise parsed and ignored.
* Bounded memory: each session's outgoing queue holds at most ``max_queued_messages`` messages
  (QoS 0 at most ``max_queued_qos0``). A full queue drops new QoS 0 messages and the oldest queued
  message for a new QoS 1 one; both are counted in :attr:`EmbeddedBroker.stats` and logged. A
  single writer task per connection awaits ``drain()``, so a slow subscriber stalls only itself.
* A malformed packet or protocol violation is logged once and closes that connection only (MQTT 5
  clients get a DISCONNECT with the reason code first); nothing a client sends can stop the broker.

:class:`EmbeddedBroker` lives on the caller's event loop; :class:`BrokerThread` runs one on its own
loop in a background thread for synchronous callers (and the tests).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Control packet types (the high nibble of the fixed header).
CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14
AUTH = 15

#: Largest value the four-byte "remaining length" variable byte integer can hold.
MAX_REMAINING_LENGTH = 268_435_455
#: Session expiry interval meaning "never expires" (MQTT 5; also used for 3.1.1 persistent ones).
SESSION_NEVER_EXPIRES = 0xFFFFFFFF

# MQTT 5 reason codes used here.
RC_SUCCESS = 0x00
RC_DISCONNECT_WITH_WILL = 0x04
RC_NO_SUBSCRIPTION_EXISTED = 0x11
RC_UNSPECIFIED_ERROR = 0x80
RC_MALFORMED_PACKET = 0x81
RC_PROTOCOL_ERROR = 0x82
RC_UNSUPPORTED_PROTOCOL_VERSION = 0x84
RC_CLIENT_ID_NOT_VALID = 0x85
RC_SERVER_SHUTTING_DOWN = 0x8B
RC_BAD_AUTH_METHOD = 0x8C
RC_KEEP_ALIVE_TIMEOUT = 0x8D
RC_SESSION_TAKEN_OVER = 0x8E
RC_TOPIC_FILTER_INVALID = 0x8F
RC_PACKET_TOO_LARGE = 0x95
RC_SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E

# MQTT 3.1.1 CONNACK return codes and the SUBACK failure code.
V3_UNACCEPTABLE_PROTOCOL = 0x01
V3_IDENTIFIER_REJECTED = 0x02
V3_SUBACK_FAILURE = 0x80

# MQTT 5 property identifiers used here.
PROP_SESSION_EXPIRY = 0x11
PROP_ASSIGNED_CLIENT_ID = 0x12
PROP_AUTH_METHOD = 0x15
PROP_RECEIVE_MAXIMUM = 0x21
PROP_TOPIC_ALIAS = 0x23
PROP_MAXIMUM_PACKET_SIZE = 0x27
PROP_SUBSCRIPTION_ID_AVAILABLE = 0x29
PROP_SHARED_SUBSCRIPTION_AVAILABLE = 0x2A

#: Property identifier → wire type, for every MQTT 5 property (section 2.2.2.2).
_PROPERTY_TYPES: dict[int, str] = {
    0x01: "byte",  # payload format indicator
    0x02: "u32",  # message expiry interval
    0x03: "str",  # content type
    0x08: "str",  # response topic
    0x09: "bin",  # correlation data
    0x0B: "varint",  # subscription identifier
    0x11: "u32",  # session expiry interval
    0x12: "str",  # assigned client identifier
    0x13: "u16",  # server keep alive
    0x15: "str",  # authentication method
    0x16: "bin",  # authentication data
    0x17: "byte",  # request problem information
    0x18: "u32",  # will delay interval
    0x19: "byte",  # request response information
    0x1A: "str",  # response information
    0x1C: "str",  # server reference
    0x1F: "str",  # reason string
    0x21: "u16",  # receive maximum
    0x22: "u16",  # topic alias maximum
    0x23: "u16",  # topic alias
    0x24: "byte",  # maximum QoS
    0x25: "byte",  # retain available
    0x26: "pair",  # user property
    0x27: "u32",  # maximum packet size
    0x28: "byte",  # wildcard subscription available
    0x29: "byte",  # subscription identifier available
    0x2A: "byte",  # shared subscription available
}
#: PUBLISH / will properties forwarded unchanged to MQTT 5 subscribers (the application's data:
#: payload format, message expiry, content type, response topic, correlation data, user props).
_FORWARDED_PROPERTIES = frozenset({0x01, 0x02, 0x03, 0x08, 0x09, 0x26})

#: Control packets (acks, pings) a connection may have waiting before its reader stops reading.
_CONTROL_HIGH_WATER = 256
#: Outgoing packets written per batch before the writer awaits ``drain()``.
_WRITE_BATCH = 64
#: Seconds a closing connection may take to flush before its transport is aborted.
_CLOSE_GRACE_S = 1.0


class MalformedPacketError(Exception):
    """A client sent bytes that are not valid MQTT, or broke the protocol; its connection closes.

    ``reason_code`` is the MQTT 5 DISCONNECT reason sent to a v5 client before closing.
    """

    def __init__(self, message: str, reason_code: int = RC_MALFORMED_PACKET) -> None:
        super().__init__(message)
        self.reason_code = reason_code


# --------------------------------------------------------------------------------------------
# Pure helpers: variable byte integers, topics, packet field reading and building.
# --------------------------------------------------------------------------------------------


def encode_remaining_length(value: int) -> bytes:
    """Encode ``value`` as an MQTT variable byte integer (1–4 bytes, 7 bits per byte)."""
    if not 0 <= value <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length {value} outside 0..{MAX_REMAINING_LENGTH}")
    out = bytearray()
    while True:
        digit, value = value & 0x7F, value >> 7
        if value:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def decode_remaining_length(data: bytes, offset: int = 0) -> tuple[int, int]:
    """Decode a variable byte integer at ``data[offset:]``; return ``(value, next_offset)``.

    Raises :class:`MalformedPacketError` when it is longer than four bytes or truncated.
    """
    value = 0
    for i in range(4):
        if offset + i >= len(data):
            raise MalformedPacketError("truncated variable byte integer")
        digit = data[offset + i]
        value |= (digit & 0x7F) << (7 * i)
        if not digit & 0x80:
            return value, offset + i + 1
    raise MalformedPacketError("variable byte integer longer than 4 bytes")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (``+`` one level, ``#`` this level and below).

    Per MQTT 4.7.2, a filter starting with a wildcard does not match a topic starting with ``$``.
    Both arguments are assumed valid (see :func:`valid_topic_filter`, :func:`valid_topic_name`).
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True
        if i >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[i]:
            return False
    return len(filter_levels) == len(topic_levels)


def valid_topic_name(topic: str) -> bool:
    """A topic a message can be published to: non-empty, no wildcards, no NUL."""
    return bool(topic) and not any(c in topic for c in "+#\x00")


def valid_topic_filter(topic_filter: str) -> bool:
    """A subscription filter: non-empty, ``+`` / ``#`` only as whole levels, ``#`` only last."""
    if not topic_filter or "\x00" in topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


class _Reader:
    """Sequential reader over one packet's body; every short read is a malformed packet."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes."""
        end = self.pos + n
        if end > len(self.data):
            raise MalformedPacketError("packet shorter than its fields")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self) -> int:
        """One byte."""
        return self.take(1)[0]

    def u16(self) -> int:
        """A big-endian two-byte integer."""
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        """A big-endian four-byte integer."""
        return int.from_bytes(self.take(4), "big")

    def varint(self) -> int:
        """A variable byte integer."""
        value, self.pos = decode_remaining_length(self.data, self.pos)
        return value

    def binary(self) -> bytes:
        """Two-byte length, then that many bytes."""
        return self.take(self.u16())

    def utf8(self) -> str:
        """A UTF-8 string (two-byte length prefix); invalid UTF-8 or U+0000 is malformed."""
        raw = self.binary()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedPacketError("invalid UTF-8 string") from exc
        if "\x00" in text:
            raise MalformedPacketError("UTF-8 string contains U+0000")
        return text

    def rest(self) -> bytes:
        """Everything not read yet."""
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk

    def at_end(self) -> bool:
        """Whether every byte has been read."""
        return self.pos >= len(self.data)


@dataclass(frozen=True)
class Properties:
    """MQTT 5 properties of one packet: single values by identifier, plus forwardable raw bytes.

    ``values`` keeps the last value of each identifier (user properties and subscription
    identifiers, which may repeat, keep their last one only — nothing here needs them);
    ``forward`` is the raw encoding of the properties in :data:`_FORWARDED_PROPERTIES`.
    """

    values: dict[int, object] = field(default_factory=dict)
    forward: bytes = b""


_NO_PROPERTIES = Properties()


def parse_properties(reader: _Reader) -> Properties:
    """Read an MQTT 5 property block (length, then id/value pairs); unknown ids are malformed."""
    length = reader.varint()
    block = _Reader(reader.take(length))
    values: dict[int, object] = {}
    forward = bytearray()
    while not block.at_end():
        start = block.pos
        prop_id = block.varint()
        kind = _PROPERTY_TYPES.get(prop_id)
        value: object
        if kind is None:
            raise MalformedPacketError(f"unknown property identifier 0x{prop_id:02x}")
        if kind == "byte":
            value = block.u8()
        elif kind == "u16":
            value = block.u16()
        elif kind == "u32":
            value = block.u32()
        elif kind == "varint":
            value = block.varint()
        elif kind == "str":
            value = block.utf8()
        elif kind == "bin":
            value = block.binary()
        else:  # "pair"
            value = (block.utf8(), block.utf8())
        values[prop_id] = value
        if prop_id in _FORWARDED_PROPERTIES:
            forward += block.data[start : block.pos]
    return Properties(values, bytes(forward))


def _utf8(text: str) -> bytes:
    """MQTT UTF-8 string: two-byte big-endian length, then the bytes."""
    raw = text.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def _property_block(encoded: bytes = b"") -> bytes:
    """An MQTT 5 property block: variable byte integer length, then the properties."""
    return encode_remaining_length(len(encoded)) + encoded


def _packet(first_byte: int, body: bytes) -> bytes:
    """A whole control packet: fixed header byte, remaining length, body."""
    return bytes([first_byte]) + encode_remaining_length(len(body)) + body


def _ack(packet_type: int, packet_id: int) -> bytes:
    """PUBACK / PUBREC / PUBCOMP (and PUBREL with its fixed flags): the short success form."""
    flags = 0x02 if packet_type == PUBREL else 0
    return bytes([packet_type << 4 | flags, 2]) + packet_id.to_bytes(2, "big")


def _disconnect_v5(reason_code: int) -> bytes:
    """An MQTT 5 DISCONNECT from the server with ``reason_code`` and no properties."""
    return bytes([DISCONNECT << 4, 2, reason_code, 0])


_PINGRESP = bytes([PINGRESP << 4, 0])


# --------------------------------------------------------------------------------------------
# Broker state.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One application message as the broker routes it.

    ``properties`` is the raw encoding of its forwardable MQTT 5 properties (empty from 3.1.1).
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: bytes = b""


@dataclass(frozen=True)
class _Outgoing:
    """A message queued for one session, at the QoS and RETAIN flag it is delivered with."""

    message: Message
    qos: int
    retain: bool


@dataclass(frozen=True)
class _Subscription:
    """One subscription of a session: granted QoS and MQTT 5 options."""

    qos: int
    no_local: bool = False
    retain_as_published: bool = False


@dataclass
class BrokerStats:
    """Counters since start; :attr:`EmbeddedBroker.stats` hands out a copy."""

    connections: int = 0
    messages_received: int = 0
    messages_sent: int = 0
    dropped_qos0: int = 0
    dropped_queued: int = 0
    dropped_too_large: int = 0
    malformed: int = 0


class _Session:
    """What the broker keeps per client identifier, connected or (if persistent) not."""

    def __init__(self, client_id: str, broker: EmbeddedBroker) -> None:
        self.client_id = client_id
        self.broker = broker
        self.subscriptions: dict[str, _Subscription] = {}
        self.queue: deque[_Outgoing] = deque()
        self.queued_qos0 = 0
        self.inflight: dict[int, _Outgoing] = {}
        self.qos2_received: set[int] = set()
        self.next_packet_id = 1
        self.conn: _Connection | None = None
        self.expiry_s = 0
        self.expiry_handle: asyncio.TimerHandle | None = None
        self.dropped = 0

    def enqueue(self, item: _Outgoing) -> None:
        """Queue ``item``; QoS 0 only while connected. A full queue drops as the module says."""
        broker = self.broker
        if item.qos == 0:
            if self.conn is None:
                return
            if (
                self.queued_qos0 >= broker.max_queued_qos0
                or len(self.queue) >= broker.max_queued_messages
            ):
                broker._stats.dropped_qos0 += 1
                self._note_drop("new QoS 0")
                return
            self.queued_qos0 += 1
        elif len(self.queue) >= broker.max_queued_messages:
            oldest = self.queue.popleft()
            if oldest.qos == 0:
                self.queued_qos0 -= 1
                broker._stats.dropped_qos0 += 1
            else:
                broker._stats.dropped_queued += 1
            self._note_drop("oldest")
        self.queue.append(item)
        if self.conn is not None:
            self.conn.wake.set()

    def _note_drop(self, which: str) -> None:
        """Count a drop; warn on the first and every thousandth, not on each."""
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.warning(
                "client %s: outgoing queue full (%d queued), dropped the %s message "
                "(%d dropped for this client so far)",
                self.client_id,
                len(self.queue),
                which,
                self.dropped,
            )

    def take_packet_id(self) -> int:
        """A packet identifier not used by any unacknowledged outgoing message."""
        while True:
            packet_id = self.next_packet_id
            self.next_packet_id = packet_id % 0xFFFF + 1
            if packet_id not in self.inflight:
                return packet_id

    def drop_qos0(self) -> None:
        """Forget queued QoS 0 messages (they are not kept for a disconnected client)."""
        if self.queued_qos0:
            self.queue = deque(item for item in self.queue if item.qos > 0)
            self.queued_qos0 = 0


class _Connection:
    """One client TCP connection: its streams, protocol version, session and writer state."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.version = 4
        self.client_id = ""
        self.session: _Session | None = None
        self.keepalive_s = 0
        self.will: Message | None = None
        self.normal_disconnect = False
        self.max_inflight = 1
        self.max_packet_size: int | None = None
        self.control: deque[bytes] = deque()
        self.wake = asyncio.Event()
        self.control_low = asyncio.Event()
        self.last_rx = asyncio.get_running_loop().time()
        self.writer_task: asyncio.Task[None] | None = None
        self.watchdog_task: asyncio.Task[None] | None = None
        self.abort_handle: asyncio.TimerHandle | None = None

    @property
    def v5(self) -> bool:
        """Whether this client speaks MQTT 5."""
        return self.version == 5

    @property
    def name(self) -> str:
        """How log lines name this connection."""
        return f"{self.client_id or '?'}@{self.peer}"

    def send(self, packet: bytes) -> None:
        """Queue a control packet (acks, pings) for the writer task; they go before messages."""
        self.control.append(packet)
        self.wake.set()

    def close(self, v5_reason: int | None = None) -> None:
        """Stop this connection: v5 clients get a DISCONNECT first; abort if flushing stalls.

        Closing the transport makes the reader see end-of-file, which ends the handler.
        """
        if self.writer_task is not None:
            self.writer_task.cancel()
        transport = self.writer.transport
        if transport.is_closing():
            return
        if v5_reason is not None and self.v5:
            with contextlib.suppress(Exception):
                self.writer.write(_disconnect_v5(v5_reason))
        transport.close()
        self.abort_handle = asyncio.get_running_loop().call_later(_CLOSE_GRACE_S, transport.abort)


class _TrackedProtocol(asyncio.StreamReaderProtocol):
    """What ``asyncio.start_server`` would use, registered in the broker while connected.

    :meth:`EmbeddedBroker.stop` aborts whatever is left in the registry, so a connection accepted
    just before shutdown, whose handler task never got to run, cannot leak its socket.
    """

    def __init__(self, broker: EmbeddedBroker, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(asyncio.StreamReader(loop=loop), broker._on_client, loop=loop)
        self._registry = broker._protocols
        self._registry.add(self)
        self._tracked: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the transport so :meth:`abort` can reach it."""
        self._tracked = transport
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        """Leave the registry: this connection no longer needs cleaning up."""
        self._registry.discard(self)
        super().connection_lost(exc)

    def abort(self) -> None:
        """Drop the connection without flushing (a no-op before it is made)."""
        if isinstance(self._tracked, asyncio.Transport):
            self._tracked.abort()


# --------------------------------------------------------------------------------------------
# The broker.
# --------------------------------------------------------------------------------------------


class EmbeddedBroker:
    """An in-process MQTT 3.1.1 / 5.0 broker on the running asyncio loop (see the module doc).

    Construction does no I/O; :meth:`start` binds (``port=0`` picks a free port, read it from
    :attr:`port` afterwards) and :meth:`stop` closes the listener and every client connection.
    A broker runs once: it cannot be started again after :meth:`stop`. ``host`` should be one
    address: a name resolving to several (``localhost`` → ::1 and 127.0.0.1) with ``port=0``
    would bind each to a different port, and :attr:`port` reports the first.

    Its methods and properties belong to the loop it runs on; from another thread use
    :class:`BrokerThread` (``call`` / ``run``).
    """

    #: Silence longer than this many keep-alive intervals drops a client (MQTT says 1.5).
    keepalive_factor: float = 1.5
    #: Seconds a new connection has to send its CONNECT.
    connect_timeout_s: float = 10.0

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_queued_messages: int = 10_000,
        max_queued_qos0: int = 1_000,
        max_inflight: int = 100,
        max_packet_size: int = 16 * 1024 * 1024,
    ) -> None:
        """Configure, without binding.

        ``max_queued_messages`` bounds each session's outgoing queue and ``max_queued_qos0``
        the QoS 0 part of it; ``max_inflight`` caps unacknowledged QoS 1 messages per client
        (an MQTT 5 client's Receive Maximum may lower it); larger inbound packets are refused.
        """
        if max_queued_messages < 1 or max_queued_qos0 < 1 or max_inflight < 1:
            raise ValueError("queue and in-flight limits must be at least 1")
        self._host = host
        self._port = port
        self.max_queued_messages = max_queued_messages
        self.max_queued_qos0 = max_queued_qos0
        self.max_inflight = min(max_inflight, 0xFFFF)
        self.max_packet_size = min(max_packet_size, MAX_REMAINING_LENGTH + 5)
        self._server: asyncio.Server | None = None
        self._stopped = False
        self._stop_done: asyncio.Event | None = None
        self._sessions: dict[str, _Session] = {}
        self._connected: dict[str, _Connection] = {}
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._protocols: set[_TrackedProtocol] = set()
        self._retained: dict[str, Message] = {}
        self._stats = BrokerStats()

    # ---- public API ------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The address it binds (or bound) to."""
        return self._host

    @property
    def port(self) -> int:
        """The bound TCP port after :meth:`start`; the requested one (maybe 0) before."""
        return self._port

    @property
    def running(self) -> bool:
        """Whether it has started and not stopped."""
        return self._server is not None and not self._stopped

    @property
    def connected_client_ids(self) -> frozenset[str]:
        """Client identifiers with an open, accepted connection."""
        return frozenset(self._connected)

    @property
    def stats(self) -> BrokerStats:
        """A snapshot of the counters."""
        return BrokerStats(**vars(self._stats))

    async def start(self) -> None:
        """Bind and listen. With ``port=0`` the OS picks the port; see :attr:`port`."""
        if self._server is not None or self._stopped:
            raise RuntimeError("an EmbeddedBroker can be started only once")
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _TrackedProtocol(self, loop), self._host, self._port
        )
        self._server = server
        self._port = int(server.sockets[0].getsockname()[1])
        log.info("embedded MQTT broker listening on %s:%s", self._host, self._port)

    async def stop(self) -> None:
        """Close the listener and every client connection; no wills are sent.

        Idempotent: a second call waits for the first one to finish. Clients see their
        connection close (MQTT 5 ones get a DISCONNECT "server shutting down" first).
        """
        if self._stop_done is not None:
            await self._stop_done.wait()
            return
        self._stop_done = asyncio.Event()
        self._stopped = True
        try:
            if self._server is not None:
                await self._shut_down(self._server)
        finally:
            self._stop_done.set()

    async def _shut_down(self, server: asyncio.Server) -> None:
        """Stop accepting, close every connection, and make sure no socket is left behind."""
        loop = asyncio.get_running_loop()
        # Stop accepting, then let accepts already under way build their transports: closing the
        # server under them trips an assertion in asyncio (3.10–3.13) that leaks the socket.
        for sock in server.sockets:
            with contextlib.suppress(Exception):  # loops without remove_reader: just close
                loop.remove_reader(sock.fileno())
        for _ in range(3):
            await asyncio.sleep(0)
        server.close()
        for conn in list(self._connections):
            conn.close(RC_SERVER_SHUTTING_DOWN)
        handlers = list(self._handlers)
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=2 * _CLOSE_GRACE_S)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        # Connections accepted a moment ago may not have a handler yet: abort their sockets and
        # give the loop a few turns to report them lost, so none leaks.
        deadline = loop.time() + _CLOSE_GRACE_S
        while (self._protocols or self._handlers) and loop.time() < deadline:
            for protocol in list(self._protocols):
                protocol.abort()
            await asyncio.sleep(0.001)
        await server.wait_closed()
        for session in self._sessions.values():
            if session.expiry_handle is not None:
                session.expiry_handle.cancel()
        log.info("embedded MQTT broker on %s:%s stopped", self._host, self._port)

    # ---- connection lifecycle ----------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one TCP connection to its end; every failure stays inside it."""
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        conn = _Connection(reader, writer, peer)
        self._connections.add(conn)
        self._stats.connections += 1
        try:
            if self._stopped:
                return
            await self._serve(conn)
        except MalformedPacketError as exc:
            self._stats.malformed += 1
            log.warning("closing MQTT connection %s: %s", conn.name, exc)
            conn.close(exc.reason_code)
        except asyncio.TimeoutError:  # before OSError: from 3.11 on it is builtins.TimeoutError
            log.info("MQTT connection %s sent no CONNECT in time", conn.name)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            log.debug("MQTT connection %s lost", conn.name)
        except asyncio.CancelledError:
            log.debug("MQTT connection %s cancelled", conn.name)
        except Exception:
            log.exception("unexpected error on MQTT connection %s; closing it", conn.name)
        finally:
            await self._finish(conn)
            self._connections.discard(conn)
            if task is not None:
                self._handlers.discard(task)

    async def _serve(self, conn: _Connection) -> None:
        """CONNECT first (within ``connect_timeout_s``), then packets until DISCONNECT."""
        loop = asyncio.get_running_loop()
        packet_type, flags, body = await asyncio.wait_for(
            self._read_packet(conn), self.connect_timeout_s
        )
        if packet_type != CONNECT:
            raise MalformedPacketError("first packet is not CONNECT", RC_PROTOCOL_ERROR)
        if flags:
            raise MalformedPacketError("CONNECT with reserved flags set")
        if not self._on_connect(conn, body):
            return
        while True:
            packet_type, flags, body = await self._read_packet(conn)
            conn.last_rx = loop.time()
            if not self._dispatch(conn, packet_type, flags, body):
                return
            if len(conn.control) >= _CONTROL_HIGH_WATER:
                conn.control_low.clear()
                await conn.control_low.wait()

    async def _read_packet(self, conn: _Connection) -> tuple[int, int, bytes]:
        """One packet as ``(type, flags, body)``; too large or bad length is malformed."""
        header = (await conn.reader.readexactly(1))[0]
        length = 0
        for i in range(4):
            digit = (await conn.reader.readexactly(1))[0]
            length |= (digit & 0x7F) << (7 * i)
            if not digit & 0x80:
                break
        else:
            raise MalformedPacketError("remaining length longer than 4 bytes")
        if length > self.max_packet_size:
            raise MalformedPacketError(
                f"packet of {length} bytes is too large", RC_PACKET_TOO_LARGE
            )
        body = await conn.reader.readexactly(length) if length else b""
        return header >> 4, header & 0x0F, body

    async def _finish(self, conn: _Connection) -> None:
        """Tidy up after a connection ends: session, will, tasks, socket."""
        for task in (conn.writer_task, conn.watchdog_task):
            if task is not None:
                task.cancel()
        session = conn.session
        if session is not None and session.conn is conn:
            session.conn = None
            if self._connected.get(conn.client_id) is conn:
                del self._connected[conn.client_id]
            session.drop_qos0()
            self._retire_session(session)
        if conn.will is not None and not conn.normal_disconnect and not self._stopped:
            log.info("publishing the will of %s to %s", conn.name, conn.will.topic)
            self._publish(conn.will, conn.client_id)
        conn.close()
        for task in (conn.writer_task, conn.watchdog_task):
            if task is None:
                continue
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("MQTT connection %s: helper task failed", conn.name)
        with contextlib.suppress(Exception):
            await conn.writer.wait_closed()
        if conn.abort_handle is not None:
            conn.abort_handle.cancel()

    def _retire_session(self, session: _Session) -> None:
        """Drop a session whose client left, or schedule its expiry."""
        if session.expiry_s == 0 or self._stopped:
            if session.expiry_s == 0:
                self._discard_session(session)
            return
        if session.expiry_s != SESSION_NEVER_EXPIRES:
            session.expiry_handle = asyncio.get_running_loop().call_later(
                session.expiry_s, self._expire_session, session
            )

    def _expire_session(self, session: _Session) -> None:
        """Timer callback: drop a persistent session still offline at expiry."""
        if session.conn is None and self._sessions.get(session.client_id) is session:
            log.info("session of %s expired", session.client_id)
            self._discard_session(session)

    def _discard_session(self, session: _Session) -> None:
        """Forget a session (its subscriptions and queued messages)."""
        if session.expiry_handle is not None:
            session.expiry_handle.cancel()
            session.expiry_handle = None
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]

    async def _keepalive_watchdog(self, conn: _Connection) -> None:
        """Close the connection after ``keepalive_factor`` × keep alive without any packet."""
        loop = asyncio.get_running_loop()
        limit = conn.keepalive_s * self.keepalive_factor
        while True:
            remaining = conn.last_rx + limit - loop.time()
            if remaining <= 0:
                log.info("MQTT client %s silent for %.1f s: keep-alive timeout", conn.name, limit)
                conn.close(RC_KEEP_ALIVE_TIMEOUT)
                return
            await asyncio.sleep(remaining)

    async def _writer_loop(self, conn: _Connection) -> None:
        """The only task that writes to the socket: control packets first, then messages.

        It awaits ``drain()`` after every batch, so a slow reader only grows its own bounded
        session queue; QoS 1 messages wait while ``max_inflight`` are unacknowledged.
        """
        session = conn.session
        assert session is not None
        writer = conn.writer
        try:
            while True:
                conn.wake.clear()
                written = 0
                while conn.control:
                    writer.write(conn.control.popleft())
                    written += 1
                conn.control_low.set()
                while session.queue and written < _WRITE_BATCH:
                    head = session.queue[0]
                    if head.qos and len(session.inflight) >= conn.max_inflight:
                        break
                    session.queue.popleft()
                    if head.qos == 0:
                        session.queued_qos0 -= 1
                        packet = self._publish_packet(conn, head, 0, dup=False)
                    else:
                        packet_id = session.take_packet_id()
                        packet = self._publish_packet(conn, head, packet_id, dup=False)
                        if packet:
                            session.inflight[packet_id] = head
                    if packet:
                        writer.write(packet)
                        written += 1
                        self._stats.messages_sent += 1
                if written:
                    await writer.drain()
                else:
                    await conn.wake.wait()
        except (ConnectionError, OSError) as exc:
            log.debug("writing to MQTT connection %s failed: %s", conn.name, exc)
            conn.writer.transport.abort()
        finally:
            conn.control_low.set()

    def _publish_packet(
        self, conn: _Connection, item: _Outgoing, packet_id: int, dup: bool
    ) -> bytes:
        """Encode ``item`` as a PUBLISH for ``conn``; empty if over the client's size limit."""
        msg = item.message
        body = bytearray(_utf8(msg.topic))
        if item.qos:
            body += packet_id.to_bytes(2, "big")
        if conn.v5:
            body += _property_block(msg.properties)
        body += msg.payload
        first = PUBLISH << 4 | (0x08 if dup else 0) | item.qos << 1 | (1 if item.retain else 0)
        packet = _packet(first, bytes(body))
        if conn.max_packet_size is not None and len(packet) > conn.max_packet_size:
            self._stats.dropped_too_large += 1
            log.warning(
                "dropping a %d-byte message on %s for %s: over its maximum packet size %d",
                len(packet),
                msg.topic,
                conn.name,
                conn.max_packet_size,
            )
            return b""
        return packet

    # ---- CONNECT -----------------------------------------------------------------------------

    def _on_connect(self, conn: _Connection, body: bytes) -> bool:
        """Handle CONNECT: validate, take over / create the session, queue CONNACK.

        Returns False when the connection was refused (and is being closed).
        """
        r = _Reader(body)
        protocol_name = r.utf8()
        level = r.u8()
        if (protocol_name, level) not in (("MQTT", 4), ("MQTT", 5), ("MQIsdp", 3)):
            if protocol_name not in ("MQTT", "MQIsdp"):
                raise MalformedPacketError(f"unknown protocol name {protocol_name!r}")
            log.info("refusing MQTT connection %s: protocol level %d", conn.name, level)
            conn.writer.write(bytes([CONNACK << 4, 2, 0, V3_UNACCEPTABLE_PROTOCOL]))
            conn.close()
            return False
        conn.version = level
        flags = r.u8()
        clean = bool(flags & 0x02)
        will_flag = bool(flags & 0x04)
        will_qos = (flags >> 3) & 0x03
        will_retain = bool(flags & 0x20)
        has_password = bool(flags & 0x40)
        has_username = bool(flags & 0x80)
        if flags & 0x01:
            raise MalformedPacketError("CONNECT reserved flag set")
        if will_qos == 3 or (not will_flag and (will_qos or will_retain)):
            raise MalformedPacketError("invalid will QoS / retain flags")
        if level < 5 and has_password and not has_username:
            raise MalformedPacketError("password without user name")
        conn.keepalive_s = r.u16()
        props = parse_properties(r) if conn.v5 else _NO_PROPERTIES
        client_id = r.utf8()
        will: Message | None = None
        if will_flag:
            will_props = parse_properties(r) if conn.v5 else _NO_PROPERTIES
            will_topic = r.utf8()
            will_payload = r.binary()
            if not valid_topic_name(will_topic):
                raise MalformedPacketError(f"invalid will topic {will_topic!r}")
            will = Message(will_topic, will_payload, will_qos, will_retain, will_props.forward)
        if has_username:
            r.utf8()
        if has_password:
            r.binary()
        if not r.at_end():
            raise MalformedPacketError("trailing bytes after CONNECT payload")

        if PROP_AUTH_METHOD in props.values:
            log.info("refusing MQTT connection %s: enhanced authentication", conn.name)
            self._refuse(conn, RC_BAD_AUTH_METHOD)
            return False
        assigned = False
        if not client_id:
            if not conn.v5 and not clean:
                log.info("refusing MQTT connection %s: persistent session without id", conn.name)
                self._refuse(conn, V3_IDENTIFIER_REJECTED)
                return False
            client_id = f"auto-{uuid.uuid4().hex}"
            assigned = True
        conn.client_id = client_id
        conn.will = will
        conn.last_rx = asyncio.get_running_loop().time()
        conn.max_inflight = self.max_inflight
        if conn.v5:
            receive_maximum = props.values.get(PROP_RECEIVE_MAXIMUM)
            if receive_maximum == 0:
                raise MalformedPacketError("receive maximum 0", RC_PROTOCOL_ERROR)
            if isinstance(receive_maximum, int):
                conn.max_inflight = min(conn.max_inflight, receive_maximum)
            max_packet = props.values.get(PROP_MAXIMUM_PACKET_SIZE)
            if max_packet == 0:
                raise MalformedPacketError("maximum packet size 0", RC_PROTOCOL_ERROR)
            if isinstance(max_packet, int):
                conn.max_packet_size = max_packet
            expiry = props.values.get(PROP_SESSION_EXPIRY, 0)
            expiry_s = expiry if isinstance(expiry, int) else 0
        else:
            expiry_s = 0 if clean else SESSION_NEVER_EXPIRES

        old = self._connected.get(client_id)
        if old is not None:
            log.info(
                "client %s connected again from %s: taking over its session", client_id, conn.peer
            )
            del self._connected[client_id]
            old.close(RC_SESSION_TAKEN_OVER)
        session = self._sessions.get(client_id)
        if session is not None and clean:
            self._discard_session(session)
            session = None
        session_present = session is not None
        if session is None:
            session = _Session(client_id, self)
            self._sessions[client_id] = session
        if session.expiry_handle is not None:
            session.expiry_handle.cancel()
            session.expiry_handle = None
        session.expiry_s = expiry_s
        session.conn = conn
        conn.session = session
        self._connected[client_id] = conn

        if conn.v5:
            props_out = bytearray()
            if assigned:
                props_out += bytes([PROP_ASSIGNED_CLIENT_ID]) + _utf8(client_id)
            props_out += bytes([PROP_MAXIMUM_PACKET_SIZE]) + self.max_packet_size.to_bytes(4, "big")
            props_out += bytes([PROP_SUBSCRIPTION_ID_AVAILABLE, 0])
            props_out += bytes([PROP_SHARED_SUBSCRIPTION_AVAILABLE, 0])
            body_out = bytes([int(session_present), RC_SUCCESS]) + _property_block(bytes(props_out))
        else:
            body_out = bytes([int(session_present), 0])
        conn.send(_packet(CONNACK << 4, body_out))
        # Unacknowledged QoS 1 messages of a resumed session go again, before anything new.
        for packet_id, item in list(session.inflight.items()):
            packet = self._publish_packet(conn, item, packet_id, dup=True)
            if packet:
                conn.send(packet)
            else:
                del session.inflight[packet_id]
        log.info(
            "MQTT client %s connected (MQTT %s, clean=%s, keepalive=%ds, session present=%s)",
            conn.name,
            "5.0" if conn.v5 else "3.1.1",
            clean,
            conn.keepalive_s,
            session_present,
        )
        conn.writer_task = asyncio.create_task(self._writer_loop(conn))
        if conn.keepalive_s:
            conn.watchdog_task = asyncio.create_task(self._keepalive_watchdog(conn))
        return True

    def _refuse(self, conn: _Connection, code: int) -> None:
        """Send a refusing CONNACK (``code`` in the connection's protocol version) and close."""
        if conn.v5:
            code = RC_CLIENT_ID_NOT_VALID if code == V3_IDENTIFIER_REJECTED else code
            conn.writer.write(_packet(CONNACK << 4, bytes([0, code, 0])))
        else:
            conn.writer.write(_packet(CONNACK << 4, bytes([0, code])))
        conn.close()

    # ---- everything after CONNECT -----------------------------------------------------------

    def _dispatch(self, conn: _Connection, packet_type: int, flags: int, body: bytes) -> bool:
        """Handle one packet; False when the client disconnected normally."""
        session = conn.session
        assert session is not None
        if packet_type == PUBLISH:
            self._on_publish(conn, session, flags, body)
            return True
        expected_flags = 0x02 if packet_type in (PUBREL, SUBSCRIBE, UNSUBSCRIBE) else 0
        if flags != expected_flags:
            raise MalformedPacketError(f"packet type {packet_type} with flags 0x{flags:x}")
        if packet_type == PUBACK:
            packet_id = _Reader(body).u16()
            if session.inflight.pop(packet_id, None) is not None:
                conn.wake.set()
        elif packet_type == PUBREL:
            packet_id = _Reader(body).u16()
            session.qos2_received.discard(packet_id)
            conn.send(_ack(PUBCOMP, packet_id))
        elif packet_type in (PUBREC, PUBCOMP):
            # The broker never sends QoS 2, so there is nothing of ours to acknowledge.
            log.debug("ignoring unexpected packet type %d from %s", packet_type, conn.name)
        elif packet_type == SUBSCRIBE:
            self._on_subscribe(conn, session, body)
        elif packet_type == UNSUBSCRIBE:
            self._on_unsubscribe(conn, session, body)
        elif packet_type == PINGREQ:
            conn.send(_PINGRESP)
        elif packet_type == DISCONNECT:
            self._on_disconnect(conn, session, body)
            return False
        else:
            raise MalformedPacketError(f"unexpected packet type {packet_type}", RC_PROTOCOL_ERROR)
        return True

    def _on_publish(self, conn: _Connection, session: _Session, flags: int, body: bytes) -> None:
        """Inbound PUBLISH: validate, route, acknowledge per QoS (QoS 2 exactly once)."""
        qos = (flags >> 1) & 0x03
        retain = bool(flags & 0x01)
        if qos == 3:
            raise MalformedPacketError("PUBLISH with QoS 3")
        if qos == 0 and flags & 0x08:
            raise MalformedPacketError("PUBLISH with QoS 0 and DUP set")
        r = _Reader(body)
        topic = r.utf8()
        packet_id = r.u16() if qos else 0
        if qos and packet_id == 0:
            raise MalformedPacketError("PUBLISH with packet identifier 0")
        props = parse_properties(r) if conn.v5 else _NO_PROPERTIES
        if PROP_TOPIC_ALIAS in props.values:
            raise MalformedPacketError("topic aliases are not supported", RC_PROTOCOL_ERROR)
        if not valid_topic_name(topic):
            raise MalformedPacketError(f"invalid topic name {topic!r}")
        message = Message(topic, r.rest(), qos, retain, props.forward)
        self._stats.messages_received += 1
        if qos == 2:
            if packet_id not in session.qos2_received:
                session.qos2_received.add(packet_id)
                self._publish(message, conn.client_id)
            conn.send(_ack(PUBREC, packet_id))
            return
        self._publish(message, conn.client_id)
        if qos == 1:
            conn.send(_ack(PUBACK, packet_id))

    def _publish(self, message: Message, sender: str) -> None:
        """Route ``message``: update the retained store, queue it for every matching session."""
        if message.retain:
            if message.payload:
                self._retained[message.topic] = message
            else:
                self._retained.pop(message.topic, None)
        for session in self._sessions.values():
            best: _Subscription | None = None
            retain_as_published = False
            for topic_filter, sub in session.subscriptions.items():
                if sub.no_local and session.client_id == sender:
                    continue
                if topic_matches(topic_filter, message.topic):
                    retain_as_published = retain_as_published or sub.retain_as_published
                    if best is None or sub.qos > best.qos:
                        best = sub
            if best is not None:
                retain = message.retain and retain_as_published
                session.enqueue(_Outgoing(message, min(message.qos, best.qos), retain))

    def _on_subscribe(self, conn: _Connection, session: _Session, body: bytes) -> None:
        """SUBSCRIBE: record each filter, answer SUBACK, then queue matching retained ones."""
        r = _Reader(body)
        packet_id = r.u16()
        if packet_id == 0:
            raise MalformedPacketError("SUBSCRIBE with packet identifier 0")
        if conn.v5:
            parse_properties(r)  # subscription identifiers are not supported (CONNACK says so)
        requests: list[tuple[str, int]] = []
        while not r.at_end():
            requests.append((r.utf8(), r.u8()))
        if not requests:
            raise MalformedPacketError("SUBSCRIBE without topic filters", RC_PROTOCOL_ERROR)
        codes = bytearray()
        send_retained: list[tuple[str, int]] = []
        for topic_filter, options in requests:
            qos = options & 0x03
            retain_handling = (options >> 4) & 0x03
            reserved = options & (0xC0 if conn.v5 else 0xFC)
            if qos == 3 or reserved or retain_handling == 3:
                raise MalformedPacketError(f"invalid subscription options 0x{options:02x}")
            if not valid_topic_filter(topic_filter):
                codes.append(RC_TOPIC_FILTER_INVALID if conn.v5 else V3_SUBACK_FAILURE)
                continue
            if topic_filter.startswith("$share/"):
                codes.append(
                    RC_SHARED_SUBSCRIPTIONS_NOT_SUPPORTED if conn.v5 else V3_SUBACK_FAILURE
                )
                continue
            granted = min(qos, 1)
            existed = topic_filter in session.subscriptions
            session.subscriptions[topic_filter] = _Subscription(
                granted,
                no_local=conn.v5 and bool(options & 0x04),
                retain_as_published=conn.v5 and bool(options & 0x08),
            )
            codes.append(granted)
            if retain_handling == 0 or (retain_handling == 1 and not existed):
                send_retained.append((topic_filter, granted))
        header = packet_id.to_bytes(2, "big") + (b"\x00" if conn.v5 else b"")
        conn.send(_packet(SUBACK << 4, header + bytes(codes)))
        for topic_filter, granted in send_retained:
            for topic, message in list(self._retained.items()):
                if topic_matches(topic_filter, topic):
                    session.enqueue(_Outgoing(message, min(message.qos, granted), True))

    def _on_unsubscribe(self, conn: _Connection, session: _Session, body: bytes) -> None:
        """UNSUBSCRIBE: drop the filters and answer UNSUBACK."""
        r = _Reader(body)
        packet_id = r.u16()
        if packet_id == 0:
            raise MalformedPacketError("UNSUBSCRIBE with packet identifier 0")
        if conn.v5:
            parse_properties(r)
        codes = bytearray()
        while not r.at_end():
            existed = session.subscriptions.pop(r.utf8(), None) is not None
            codes.append(RC_SUCCESS if existed else RC_NO_SUBSCRIPTION_EXISTED)
        if not codes:
            raise MalformedPacketError("UNSUBSCRIBE without topic filters", RC_PROTOCOL_ERROR)
        if conn.v5:
            conn.send(_packet(UNSUBACK << 4, packet_id.to_bytes(2, "big") + b"\x00" + bytes(codes)))
        else:
            conn.send(_ack(UNSUBACK, packet_id))

    def _on_disconnect(self, conn: _Connection, session: _Session, body: bytes) -> None:
        """A DISCONNECT: no will (unless MQTT 5 reason 0x04); MQTT 5 may change session expiry."""
        conn.normal_disconnect = True
        if conn.v5 and body:
            r = _Reader(body)
            reason = r.u8()
            props = parse_properties(r) if not r.at_end() else _NO_PROPERTIES
            if reason == RC_DISCONNECT_WITH_WILL:
                conn.normal_disconnect = False
            expiry = props.values.get(PROP_SESSION_EXPIRY)
            if isinstance(expiry, int):
                session.expiry_s = expiry
        log.info("MQTT client %s disconnected", conn.name)
        conn.close()


# --------------------------------------------------------------------------------------------
# Running a broker from synchronous code.
# --------------------------------------------------------------------------------------------


class BrokerThread:
    """Run an :class:`EmbeddedBroker` on its own event loop in a daemon thread.

    For synchronous callers (and tests): ``start()`` returns once it listens, ``stop()`` stops
    it and joins the thread; both are idempotent. Also a context manager.
    """

    def __init__(self, broker: EmbeddedBroker | None = None, *, name: str = "mqtt-broker") -> None:
        """Wrap ``broker`` (a default ``EmbeddedBroker()`` if None); nothing starts yet."""
        self.broker = broker if broker is not None else EmbeddedBroker()
        self._thread = threading.Thread(target=self._thread_main, name=name, daemon=True)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        """The broker's bound port."""
        return self.broker.port

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the thread and wait until the broker listens; re-raises its start error."""
        if self._thread.is_alive() or self._ready.is_set():
            return
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"broker did not start within {timeout_s} s")
        if self._error is not None:
            self._thread.join(timeout_s)
            raise self._error

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the broker (closing every client connection) and join the thread."""
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None:
            with contextlib.suppress(RuntimeError):  # the loop already finished
                loop.call_soon_threadsafe(stop_event.set)
        if self._thread.is_alive():
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"broker thread did not stop within {timeout_s} s")

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 10.0) -> T:
        """Run ``coro`` on the broker's loop and return its result (e.g. ``broker.stop()``)."""
        if self._loop is None:
            coro.close()
            raise RuntimeError("the broker thread is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def call(self, fn: Callable[[], T], timeout_s: float = 10.0) -> T:
        """Call ``fn`` on the broker's loop (to read broker state safely) and return its result."""
        if self._loop is None:
            raise RuntimeError("the broker thread is not running")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def invoke() -> None:
            """Run ``fn`` on the loop and hand its outcome to the waiting thread."""
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

        self._loop.call_soon_threadsafe(invoke)
        return future.result(timeout_s)

    def __enter__(self) -> BrokerThread:
        """Start, as :meth:`start`."""
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop, as :meth:`stop`."""
        self.stop()

    def _thread_main(self) -> None:
        """The thread's body: one event loop for the broker's whole life."""
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
            if self._ready.is_set():  # start() re-raises errors from before that point
                log.exception("embedded MQTT broker thread failed")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        """Start the broker, wait for :meth:`stop`, stop the broker."""
        self._stop_event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        try:
            await self.broker.start()
            self._ready.set()
            await self._stop_event.wait()
        finally:
            await self.broker.stop()
