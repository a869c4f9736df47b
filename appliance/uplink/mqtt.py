"""The MQTT uplink: publishes the outbox with QoS 1 and keeps a retained online/offline status.

:class:`MqttUplink` (this module: lifecycle, connection, status) is built from three parts:
:mod:`appliance.uplink.paho_loop` (paho on the event loop), :mod:`appliance.uplink.tls` (TLS
and credentials) and :mod:`appliance.uplink.delivery` (what is published when, and what each
PUBACK does). It drains the outbox through :class:`appliance.contracts.Outbox`.

Threads and tasks
-----------------
paho-mqtt runs on the event loop, in its "external event loop" mode: the socket is registered
with the loop (``add_reader``/``add_writer``), paho's ``loop_read``/``loop_write`` run as their
callbacks, and the connector task calls ``loop_misc`` (keepalive, PINGREQ) every second. paho's
callbacks (CONNACK, PUBACK, disconnect) therefore run on the loop thread and update the uplink's
state directly. The publisher task takes records from the outbox, hands them to
``client.publish`` (which only queues the packet; the writer callback sends every packet queued
in one loop iteration together) and settles acknowledged records in SQLite, in one transaction
per :data:`~appliance.uplink.delivery.SETTLE_DELAY_S` (2 s; at once for 256 acks, a
rejection, a lost connection or at stop: flash wear, docs/benchmarks.md); acknowledged records
stay excluded from ``take`` until then, and a crash before it re-sends them (at most 256 plus
the in-flight window of duplicates, recognisable by ``id``). The
one blocking step, opening a connection (DNS, TCP connect, TLS handshake, each bounded by
paho's 5 s connect timeout), runs in a worker thread while the connector task awaits it;
nothing else uses the client meanwhile, and the socket is handed to the loop when it is open.

There is no paho network thread: it would compete with the loop for the GIL, and every SQLite
call of the publisher (which releases the GIL) would then wait for it. Measured on 2 cores, the
drain rate went from ~74 % to ~94 % of a bare paho loop (``benchmarks/uplink.py``).

Delivery
--------
At least once, ordered per stream: a record is deleted from the outbox only after its PUBACK
(a failure reason code settles it as *rejected*, except 0x97: see *Reason codes* below; MQTT 5's
0x10 "no matching subscribers" is a success). At most ``max_inflight`` records are
unacknowledged at a time; the next ones are taken as acks free slots, alerts first. Over MQTT 5
every record goes out with *payload format indicator* 1 and *content type* ``application/json``.

paho keeps unacknowledged QoS 1 messages in memory and resends them (same mid, DUP set) after a
reconnect, so in-flight records are not taken again after a disconnect; their mids stay mapped and
their acks arrive after the reconnect. Until all of them are acked, no new record is published,
so a resend can never be overtaken by a newer record of the same stream. (paho's callbacks run
on the loop, so the publisher never acts on a stale "connected".) Only after a process
restart are unsettled records taken again (they are still in the outbox): subscribers may see a
duplicate then, recognisable by the payload's ``id``.

Connection
----------
The first attempt is made at ``start()``. Reconnects use capped exponential backoff with full
jitter: before attempt ``n`` the connector task waits ``rng() * min(reconnect_max_s,
reconnect_min_s * 2**n)`` seconds (:func:`appliance.backoff.backoff_delay_s`, as acquisition's
reconnects; paho's own backoff has no jitter and is not used). ``n`` starts over at 0 only when
a connection that lasted at least 10 s drops: a connection the broker keeps dropping right
after accepting it (another client with the same client id, a
message over a size limit the broker does not advertise) backs off like a refused one, is
counted (``short_connections``) and, from the third in a row, logged once as an error instead of
a warning per drop. A connection that goes quiet is closed by paho's keepalive check (no
CONNACK or PINGRESP within ``keepalive_s``) and retried the same way. On every connect the uplink
publishes a retained ``{"state": "online"}`` to the status topic (QoS 1); the broker publishes
the retained last will ``{"state": "offline"}`` when the connection dies without a DISCONNECT;
``stop()`` publishes ``offline`` itself before disconnecting cleanly. The status ``ts`` of the
will is the time that connection was opened.

Security
--------
``tls = true`` verifies the broker's certificate chain (``ca_file``, or the system CA store when
empty) and its host name, TLS 1.2 at least; ``cert_file``/``key_file`` add a client certificate.
``tls_insecure = true`` turns both checks off and logs a warning at every start. The password is
read from ``password_file`` (re-read before every connection attempt, so a corrected file is
picked up by the next retry) or the environment variable ``password_env``; it is never in the
config struct, never logged. A refused CONNACK (bad credentials, not authorised) or a TLS
failure logs one error naming ``host:port`` and the reason, is counted (``auth_failures``,
``tls_failures``, ``connect_failures``), and the uplink keeps retrying with the backoff above.

Sessions: MQTT 3.1.1 connects with ``clean_session=False``; MQTT 5 with ``clean_start=False``
and ``SessionExpiryInterval = session_expiry_s``.

Reason codes (MQTT 5 PUBACK)
----------------------------
A failure reason settles the record as *rejected* (dropped, counted per reason in
:meth:`MqttUplink.rejected_by_reason`, first occurrence of each reason logged as an error):
the broker's verdict on that message would not change on a resend. The exception is 0x97
*quota exceeded*, a flow-control signal: the record stays in the outbox, publishing pauses for
a jittered backoff (``reconnect_min_s`` .. ``reconnect_max_s``, doubling per consecutive 0x97)
and it is published again (counted as ``quota_retries``). Records already in flight with it can
then overtake it: its ``seq`` arrives late, so subscribers should deduplicate by ``id`` rather
than by "``seq`` <= last". Records whose PUBLISH packet would exceed the broker's advertised
MQTT 5 *Maximum Packet Size*, or ``mqtt.max_packet_bytes`` when set (for brokers that enforce a
limit without advertising it: MQTT 3.1.1 brokers, cloud brokers, mosquitto's deprecated
``message_size_limit``), are rejected locally (``packet_too_large``) rather than sent: such
brokers drop the connection over them (mosquitto 2.0 answers 0x95, not a PUBACK code, which
paho takes for a malformed packet), and a record resent after every reconnect would stall the
uplink for good.

Backlog and the ``historical`` flag
-----------------------------------
A record is *historical* when it was appended before the current connection came up, or more
than ``historical_after_s`` seconds before it is published. Its payload then gets
``"historical":true`` inserted before the closing brace at publish time (the stored payload is
untouched); live messages carry no ``historical`` key. Paho's resends after a reconnect repeat
the bytes first handed to it. Historical records other than alerts are published at most
``backlog_rate_per_s`` per second (token bucket, burst 50 ms worth; 0 = unlimited); alerts are
never rate-limited and one slot of the in-flight window is kept for them (when ``max_inflight``
> 1), so a live alert appended during a long backlog drain goes out at once.

Records queued by the ``backfill`` command (:attr:`~appliance.contracts.Priority.BACKFILL`,
copies of delivered telemetry) come after every live record in the drain order, so they are
taken only when nothing live waits, are always flagged ``historical``, and are published at
most ``backfill_rate_per_s`` per second (their own token bucket, burst 50 ms worth, starting
empty), counted as ``backfilled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any, Literal

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from appliance.config import MqttSection
from appliance.contracts import Outbox
from appliance.errors import ConfigError
from appliance.uplink.delivery import BURST_S, DeliveryPolicy, packet_limit
from appliance.uplink.paho_loop import (
    PackedProperties,
    PahoOnLoop,
    connect_async,
    connect_properties,
    new_client,
)
from appliance.uplink.sparkplug import SparkplugFormat
from appliance.uplink.tls import (
    AUTH_REASONS,
    Secret,
    check_password_file_mode,
    read_password,
    tls_context,
)
from appliance.uplink.topics import status_topic

log = logging.getLogger(__name__)

STATUS_ACK_TIMEOUT_S = 1.0
"""How long ``stop()`` waits for the broker to acknowledge the ``offline`` status, seconds."""

_STABLE_LINK_S = 10.0  # a connection that lasted this long resets the backoff when it drops
_FLAP_WARNINGS = 3  # short-lived connections in a row before one error replaces the warnings
_encode = msgspec.json.Encoder().encode


class MqttUplink(DeliveryPolicy, PahoOnLoop):
    """Publishes the outbox to an MQTT broker (see the module docstring for the guarantees).

    Construction does no I/O. ``start()``/``stop()`` and ``notify()`` are called on the event
    loop; ``notify()`` after every ``outbox.append`` wakes the publisher.

    :param cfg: the ``[mqtt]`` section.
    :param appliance_id: names the status topic and, by default, the MQTT client id.
    :param outbox: the open outbox to drain; the uplink never closes it.
    :param rng: uniform [0, 1) source of the reconnect jitter.
    :param clock: wall-clock seconds (epoch) for the status messages' ``ts`` and the
        ``historical`` decision (compared with the outbox's ``created``).
    """

    def __init__(
        self,
        cfg: MqttSection,
        appliance_id: str,
        outbox: Outbox,
        *,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if cfg.reconnect_min_s > cfg.reconnect_max_s:
            raise ValueError(
                f"mqtt.reconnect_min_s ({cfg.reconnect_min_s}) must be <= "
                f"mqtt.reconnect_max_s ({cfg.reconnect_max_s})"
            )
        self._cfg = cfg
        self.appliance_id = appliance_id
        self.status_topic = status_topic(cfg.topic_prefix, appliance_id)
        self._outbox = outbox
        self._rng = rng
        self._clock = clock
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._settled: asyncio.Event | None = None
        self._stopped = False
        self._closing = False
        self._pub_props: PackedProperties | None = None
        # Owned by the event loop:
        self._connected = False
        self._link_logged: Literal["", "up", "down"] = ""
        self._fail_logged = ""  # category+reason of the last logged connect failure
        self._down_since = 0.0
        self._link_up_wall = float("inf")  # wall time the current connection came up
        self._max_packet = 0  # the packet size limit in force (see _packet_limit); 0 = none
        self._max_packet_why = ""
        self._inflight: dict[int, int] = {}  # paho mid -> outbox record id
        self._inflight_ids: set[int] = set()
        self._carried: set[int] = set()  # mids unacked across a reconnect: resent by paho
        self._acked: list[int] = []
        self._settle_due: float | None = None
        self._rejected: list[int] = []
        self._status_waiters: dict[int, asyncio.Future[bool]] = {}
        self._counters = {
            "published": 0,
            "rejected": 0,
            "quota_retries": 0,
            "historical": 0,
            "connects": 0,
            "disconnects": 0,
            "auth_failures": 0,
            "tls_failures": 0,
            "connect_failures": 0,
            "short_connections": 0,
            "backfilled": 0,
        }
        self._by_reason: dict[str, int] = {}
        self._tokens = max(1.0, cfg.backlog_rate_per_s * BURST_S)
        self._tokens_at = 0.0
        self._backfill_tokens = 0.0
        self._backfill_tokens_at = 0.0
        self._hold_until = 0.0  # loop time before which nothing is published (0x97 pause)
        self._quota_attempt = 0
        self._attempt = 0  # reconnect attempts since the last stable connection
        self._up_since = 0.0  # time.monotonic() the current connection came up
        self._flaps = 0  # connections in a row that dropped within _STABLE_LINK_S
        self._connector: asyncio.Task[None] | None = None
        self._halt: asyncio.Event | None = None  # set by stop(): the connector gives up
        self._nudge: asyncio.Event | None = None  # wakes the connector: socket closed, stop()
        self._sock_closed: asyncio.Event | None = None  # no socket registered with the loop
        self._fd = -1  # the socket registered with the loop; -1 = none
        self._loop_thread = 0
        # Written by the connection worker thread (on_pre_connect) or paho's logger:
        self._paho_error = ""  # paho's last error log line since the last connection attempt
        self._password: Secret | None = None
        #: mqtt.format = "sparkplug_b": Sparkplug B messages instead of JSON and the status
        self._sparkplug = (
            SparkplugFormat(cfg.sparkplug_group_id or cfg.topic_prefix, appliance_id, clock)
            if cfg.format == "sparkplug_b"
            else None
        )

    # -- public API --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the broker accepted the current connection (as last seen on the loop)."""
        return self._connected

    def stats(self) -> dict[str, int]:
        """Counters since ``start``.

        ``published`` and ``rejected`` (records acked either way, rejections local or by the
        broker), ``quota_retries`` (0x97 PUBACKs, record kept), ``historical`` (records
        published with ``historical: true``), ``connects``, ``disconnects``, refused or failed
        connection attempts (``auth_failures``, ``tls_failures``, ``connect_failures``),
        ``short_connections`` (dropped within 10 s of being established), ``backfilled``
        (records re-published for a ``backfill`` command) and ``in_flight`` (records awaiting
        a PUBACK).
        """
        return {**self._counters, "in_flight": len(self._inflight)}

    def rejected_by_reason(self) -> dict[str, int]:
        """Rejected records per reason (:func:`reason_key` of the PUBACK reason code, e.g.
        ``not_authorized``; ``topic_refused`` and ``packet_too_large`` for local refusals) and
        ``quota_exceeded`` for 0x97 PUBACKs (retried, not rejected)."""
        return dict(self._by_reason)

    async def start(self) -> None:
        """Read the credentials, create the client, connect in the background, start publishing.

        Returns at once; the connection comes up (and is retried) in the background. Raises
        :class:`ConfigError` when the password, CA, certificate or key cannot be loaded.
        """
        if self._loop is not None:
            raise RuntimeError("MqttUplink.start() called twice")
        cfg = self._cfg
        password = read_password(cfg)
        check_password_file_mode(cfg)
        ctx = tls_context(cfg) if cfg.tls else None
        loop = self._bind_loop()
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()
        self._tokens_at = loop.time()
        v5 = cfg.protocol == "5"
        client = new_client(
            self,
            cfg,
            cfg.client_id or self.appliance_id,
            on_pre_connect=self._on_pre_connect,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
            log_sink=self._set_paho_error,
            password=password.value if password else None,
            tls=ctx,
        )
        client.on_publish = self._on_publish
        if self._sparkplug is not None:
            client.on_message = self._on_message
        self._set_will(client)
        client.max_inflight_messages_set(cfg.max_inflight)
        if cfg.username:
            self._password = password
        connect_props = connect_properties(cfg)
        if v5 and self._sparkplug is None:  # Sparkplug payloads are protobuf, not UTF-8 JSON
            self._pub_props = PackedProperties(
                PacketTypes.PUBLISH, PayloadFormatIndicator=1, ContentType="application/json"
            )
        connect_async(client, cfg, connect_props)
        self._client = client
        self._connector = asyncio.create_task(
            self._connect_loop(cfg, self._handle_connect_failed), name="mqtt-uplink-connector"
        )
        self._task = asyncio.create_task(self._publish_loop(), name="mqtt-uplink-publisher")
        log.info(
            "MQTT uplink starting: %s:%d, MQTT %s, %s, user %s, client id %r, status topic %s",
            cfg.host,
            cfg.port,
            cfg.protocol,
            ("TLS" + (" with client certificate" if cfg.cert_file else ""))
            if cfg.tls
            else "no TLS",
            repr(cfg.username) if cfg.username else "none",
            cfg.client_id or self.appliance_id,
            self.status_topic,
        )
        if cfg.tls_insecure:
            log.warning(
                "mqtt.tls_insecure = true: the certificate of %s:%d is NOT verified; anyone on the "
                "network path can impersonate the broker and read the credentials and data. "
                "Bench tests only: set mqtt.ca_file instead",
                cfg.host,
                cfg.port,
            )
        elif not cfg.tls and cfg.username:
            log.warning(
                "MQTT credentials for %s:%d travel in clear text: set mqtt.tls = true",
                cfg.host,
                cfg.port,
            )

    async def stop(self, drain_timeout_s: float = 5.0) -> None:
        """Drain, say ``offline``, disconnect cleanly. Idempotent.

        Waits up to ``drain_timeout_s`` seconds for the outbox to empty (every record acked),
        then publishes the retained ``offline`` status (waiting up to
        :data:`STATUS_ACK_TIMEOUT_S` for its ack) when connected, then disconnects. Records
        still unacked stay in the outbox for the next start.
        """
        client, loop = self._client, self._loop
        if client is None or loop is None or self._stopped:
            return
        self._stopped = True
        deadline = loop.time() + drain_timeout_s
        while self._outbox.pending > 0 and self._settled is not None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._settled.clear()
            try:
                await asyncio.wait_for(self._settled.wait(), remaining)
            except asyncio.TimeoutError:
                break
        self._closing = True
        self.notify()
        if self._task is not None:
            await self._task
        if self._connected:
            await self._publish_offline(client, loop)
        if self._halt is not None and self._nudge is not None:
            self._halt.set()
            self._nudge.set()
        await self._close_link(client)
        if self._connector is not None:
            await self._connector  # ends after a connection attempt under way, if any
        await self._close_link(client)  # the socket such an attempt opened
        self._client = None
        try:
            self._flush_settled(force=True)
        except Exception:
            log.exception("MQTT uplink: cannot settle the last acknowledged records")
        log.info(
            "MQTT uplink stopped: %d record(s) published, %d left in the outbox",
            self._counters["published"],
            self._outbox.pending,
        )

    # -- event loop side ---------------------------------------------------------------------

    async def _publish_offline(self, client: mqtt.Client, loop: asyncio.AbstractEventLoop) -> None:
        if self._sparkplug is not None:  # NDEATH: the broker sends no will on a clean DISCONNECT
            death_topic, death = self._sparkplug.goodbye()
            info = client.publish(death_topic, death, qos=1)
        else:
            info = client.publish(self.status_topic, self._status("offline"), qos=1, retain=True)
        waiter: asyncio.Future[bool] = loop.create_future()
        self._status_waiters[info.mid] = waiter
        try:
            await asyncio.wait_for(waiter, STATUS_ACK_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning(
                "MQTT broker did not acknowledge the offline status within %s s",
                STATUS_ACK_TIMEOUT_S,
            )
        finally:
            self._status_waiters.pop(info.mid, None)

    def _handle_connected(self, session_present: bool, up_wall: float, max_packet: int) -> None:
        cfg = self._cfg
        self._carried = set(self._inflight)
        self._connected = True
        self._link_up_wall = up_wall
        self._max_packet, self._max_packet_why = packet_limit(max_packet, cfg.max_packet_bytes)
        self._fail_logged = ""
        self._counters["connects"] += 1
        self._up_since = time.monotonic()
        if self._flaps >= _FLAP_WARNINGS:
            log.debug("MQTT uplink connected to %s:%d again", cfg.host, cfg.port)
        elif self._link_logged == "down":
            log.info(
                "MQTT uplink %s to %s:%d after %.1f s without a link; %d record(s) pending",
                "reconnected" if self._counters["connects"] > 1 else "connected",
                cfg.host,
                cfg.port,
                time.monotonic() - self._down_since,
                self._outbox.pending,
            )
        else:
            log.info("MQTT uplink connected to %s:%d", cfg.host, cfg.port)
        log.debug(
            "session present: %s; resending %d in-flight", session_present, len(self._carried)
        )
        self._link_logged = "up"
        self.notify()

    def _handle_disconnected(self, reason: ReasonCode, paho_error: str) -> None:
        cfg = self._cfg
        self._carried = set(self._inflight)
        if not self._connected:
            if paho_error and ("SSL" in paho_error or "TLS" in paho_error):
                # TLS 1.3: a refused client certificate shows up after the handshake, as an alert
                self._handle_connect_failed("tls", f"TLS session refused: {paho_error}")
            else:
                log.debug("MQTT connection attempt to %s:%d ended: %s", cfg.host, cfg.port, reason)
            return
        self._connected = False
        self._link_up_wall = float("inf")
        self._counters["disconnects"] += 1
        try:  # delivered: out of the outbox now (an outage may fill it and evict them)
            self._flush_settled(force=True)
        except Exception:
            log.exception("MQTT uplink: cannot settle the acknowledged records")
        if self._closing:
            log.info("MQTT uplink disconnected from %s:%d", cfg.host, cfg.port)
            return
        self._down_since = time.monotonic()
        self._link_logged = "down"
        if self._down_since - self._up_since >= _STABLE_LINK_S:
            self._flaps = 0
            self._attempt = 0  # the backoff starts over only after a stable connection
        else:
            self._flaps += 1
            self._counters["short_connections"] += 1
        if self._flaps < _FLAP_WARNINGS:
            log.warning(
                "MQTT uplink lost its connection to %s:%d (%s); reconnecting, %d message(s) in "
                "flight will be resent",
                cfg.host,
                cfg.port,
                reason,
                len(self._inflight),
            )
        elif self._flaps == _FLAP_WARNINGS:
            log.error(
                "MQTT connection to %s:%d dropped %d times in a row within %.0f s of being "
                "established (last: %s); reconnecting with a growing backoff, further drops "
                "logged at debug level. Check that no other client uses client id %r and that "
                "messages fit the broker's size limit (mqtt.max_packet_bytes)",
                cfg.host,
                cfg.port,
                self._flaps,
                _STABLE_LINK_S,
                reason,
                cfg.client_id or self.appliance_id,
            )
        else:
            log.debug("MQTT connection to %s:%d dropped again: %s", cfg.host, cfg.port, reason)

    def _handle_refused(self, reason: ReasonCode) -> None:
        cfg = self._cfg
        if reason.value in AUTH_REASONS:
            where = "password_env" if cfg.password_env else "password_file"
            self._handle_connect_failed(
                "auth",
                f"not authorised: check mqtt.username / {where} ({reason}, 0x{reason.value:02x})",
            )
        else:
            self._handle_connect_failed(
                "connect", f"refused by the broker: {reason} (0x{reason.value:02x})"
            )

    def _handle_connect_failed(self, category: str, reason: str) -> None:
        """Count a failed attempt; log it once per change of reason (error for auth and TLS)."""
        cfg = self._cfg
        self._counters[f"{category}_failures"] += 1
        if self._link_logged != "down":
            self._link_logged = "down"
            self._down_since = time.monotonic()
        key = f"{category}:{reason}"
        if self._fail_logged == key:
            log.debug("MQTT connect to %s:%d failed: %s", cfg.host, cfg.port, reason)
            return
        self._fail_logged = key
        log.log(
            logging.WARNING if category == "connect" else logging.ERROR,
            "MQTT uplink cannot connect to %s:%d (%s); retrying with backoff up to %s s",
            cfg.host,
            cfg.port,
            reason,
            cfg.reconnect_max_s,
        )

    def _handle_password_error(self, message: str) -> None:
        if self._fail_logged != message:
            self._fail_logged = message
            log.error("MQTT uplink: %s; keeping the previous password", message)

    # -- the connection ----------------------------------------------------------------------

    async def _close_link(self, client: mqtt.Client) -> None:
        """Send DISCONNECT and wait (briefly) for paho to close the socket; close it if not."""
        if self._fd < 0 or self._sock_closed is None:
            return
        client.disconnect()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._sock_closed.wait(), STATUS_ACK_TIMEOUT_S)
        sock = client.socket()
        if self._fd >= 0 and sock is not None:
            self._unwatch(sock)
            with contextlib.suppress(OSError):
                sock.close()

    # -- paho's callbacks (on the loop; on_pre_connect and on_socket_* may also run in the
    # -- connection worker thread) -----------------------------------------------------------

    def _set_will(self, client: mqtt.Client) -> None:
        """The last will: the retained ``offline`` status, or Sparkplug's NDEATH of a new
        session."""
        if self._sparkplug is not None:
            death_topic, death = self._sparkplug.will()
            client.will_set(death_topic, death, qos=1, retain=False)
        else:
            client.will_set(self.status_topic, self._status("offline"), qos=1, retain=True)

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        self._paho_error = ""
        self._set_will(client)
        cfg = self._cfg
        if cfg.password_file:  # picked up without a restart once corrected on disk
            try:
                password = read_password(cfg)
            except ConfigError as err:
                self._on_loop(self._handle_password_error, str(err))
                return
            if password is not None and password != self._password:
                self._password = password
                client.username_pw_set(cfg.username, password.value)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        if reason.is_failure:
            self._handle_refused(reason)
            return  # paho closes the socket; the connector retries with backoff
        max_packet = int(getattr(properties, "MaximumPacketSize", 0) or 0)
        if self._sparkplug is not None:  # NBIRTH and the DBIRTHs come first in a session
            client.subscribe(self._sparkplug.command_topic, qos=1)
            for birth_topic, birth in self._sparkplug.on_connect():
                client.publish(birth_topic, birth, qos=1)
        else:
            client.publish(self.status_topic, self._status("online"), qos=1, retain=True)
        self._handle_connected(flags.session_present, self._clock(), max_packet)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        self._handle_disconnected(reason, self._paho_error)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        self._handle_ack(mid, reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Sparkplug commands (NCMD): a rebirth request is answered with NBIRTH and DBIRTHs."""
        if self._sparkplug is None:
            return
        births = self._sparkplug.on_command(msg.topic, bytes(msg.payload))
        if births:
            log.info("Sparkplug rebirth requested: NBIRTH and %d DBIRTH sent", len(births) - 1)
        for birth_topic, birth in births:
            client.publish(birth_topic, birth, qos=1)

    def _set_paho_error(self, line: str) -> None:
        self._paho_error = line

    # -- payloads ----------------------------------------------------------------------------

    def _status(self, state: Literal["online", "offline"]) -> bytes:
        """The retained status payload (kind ``status``)."""
        return _encode(
            {
                "v": 1,
                "kind": "status",
                "appliance": self.appliance_id,
                "state": state,
                "ts": self._clock(),
            }
        )
