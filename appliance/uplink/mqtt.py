"""The MQTT uplink: publishes the outbox with QoS 1 and keeps a retained online/offline status.

Threads and tasks
-----------------
paho-mqtt's network loop runs in paho's own thread (``loop_start``); it connects, reconnects,
resends and reads acknowledgements. Everything else runs on the event loop: the publisher task
takes records from the outbox, hands them to ``client.publish`` (thread-safe, never blocks on the
network) and settles acknowledged records in SQLite, one transaction per loop iteration. paho's
callbacks only hand their results to the loop with ``call_soon_threadsafe``.

Delivery
--------
At least once, ordered per stream: a record is deleted from the outbox only after its PUBACK
(``reason_code.is_failure`` settles it as *rejected*: dropped and counted, since the broker would
refuse it again; MQTT 5's 0x10 "no matching subscribers" is a success). At most ``max_inflight``
records are unacknowledged at a time; the next ones are taken as acks free slots, alerts first.

paho keeps unacknowledged QoS 1 messages in memory and resends them (same mid, DUP set) after a
reconnect, so in-flight records are not taken again after a disconnect; their mids stay mapped and
their acks arrive after the reconnect. Until all of them are acked, no new record is published,
so a resend can never be overtaken by a newer record of the same stream. (paho's callbacks bump a
link generation; the publisher also holds back while the loop has not caught up with it, so a
stale "connected" never lets a record slip in ahead of the resends.) Only after a process
restart are unsettled records taken again (they are still in the outbox): subscribers may see a
duplicate then, recognisable by the payload's ``id``.

Connection
----------
Reconnects use capped exponential backoff with full jitter: before attempt ``n`` (0 after a
successful connection) paho waits ``rng() * min(reconnect_max_s, reconnect_min_s * 2**n)``
seconds (paho's own backoff has no jitter, so the delay is recomputed and handed to
``reconnect_delay_set`` from paho's thread before every wait). On every connect the uplink
publishes a retained ``{"state": "online"}`` to the status topic (QoS 1); the broker publishes
the retained last will ``{"state": "offline"}`` when the connection dies without a DISCONNECT;
``stop()`` publishes ``offline`` itself before disconnecting cleanly. The status ``ts`` of the
will is the time that connection was opened.

Left for later: TLS and authentication, MQTT 5 properties (message expiry, topic aliases) and
reason strings, a downlink, rate-limited backlog replay.
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
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from appliance.config import MqttSection
from appliance.outbox.sqlite import SqliteOutbox
from appliance.uplink.topics import status_topic

log = logging.getLogger(__name__)

STATUS_ACK_TIMEOUT_S = 1.0
"""How long ``stop()`` waits for the broker to acknowledge the ``offline`` status, seconds."""

_RETRY_AFTER_ERROR_S = 1.0
_PROTOCOLS = {"3.1.1": mqtt.MQTTv311, "5": mqtt.MQTTv5}
_encode = msgspec.json.Encoder().encode


def backoff_delay_s(attempt: int, min_s: float, max_s: float, u: float) -> float:
    """Full-jitter delay before reconnect ``attempt`` (0-based), seconds.

    ``u`` is a uniform random number in [0, 1). The window doubles from ``min_s`` per attempt and
    is capped at ``max_s``; spreading reconnects over the whole window keeps a fleet of
    appliances from reconnecting in lockstep after a broker restart.
    """
    window = min(max_s, min_s * 2.0 ** min(attempt, 32))
    return u * window


class MqttUplink:
    """Publishes the outbox to an MQTT broker (see the module docstring for the guarantees).

    Construction does no I/O. ``start()``/``stop()`` and ``notify()`` are called on the event
    loop; ``notify()`` after every ``outbox.append`` wakes the publisher.

    :param cfg: the ``[mqtt]`` section.
    :param appliance_id: names the status topic and, by default, the MQTT client id.
    :param outbox: the open outbox to drain; the uplink never closes it.
    :param rng: uniform [0, 1) source of the reconnect jitter (called from paho's thread).
    :param clock: wall-clock seconds (epoch) for the status messages' ``ts``.
    """

    def __init__(
        self,
        cfg: MqttSection,
        appliance_id: str,
        outbox: SqliteOutbox,
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
        # Owned by the event loop:
        self._connected = False
        self._link_logged: Literal["", "up", "down"] = ""
        self._down_since = 0.0
        self._inflight: dict[int, int] = {}  # paho mid -> outbox record id
        self._inflight_ids: set[int] = set()
        self._carried: set[int] = set()  # mids unacked across a reconnect: resent by paho
        self._acked: list[int] = []
        self._rejected: list[int] = []
        self._status_waiters: dict[int, asyncio.Future[bool]] = {}
        self._counters = {"published": 0, "rejected": 0, "connects": 0, "disconnects": 0}
        self._seen_gen = 0  # the link generation the loop has caught up with
        # Written by paho's thread only:
        self._attempt = 0
        self._link_gen = 0  # bumped on every connect and disconnect

    # -- public API --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the broker accepted the current connection (as last seen on the loop)."""
        return self._connected

    def stats(self) -> dict[str, int]:
        """``published`` and ``rejected`` (records acked either way), ``in_flight`` (records
        awaiting a PUBACK), ``connects`` and ``disconnects`` (since ``start``)."""
        return {**self._counters, "in_flight": len(self._inflight)}

    def notify(self) -> None:
        """Wake the publisher: the outbox has new records. Call on the event loop."""
        if self._wake is not None:
            self._wake.set()

    async def start(self) -> None:
        """Create the client, connect in the background and start the publisher task.

        Returns at once; the connection comes up (and is retried) in paho's thread.
        """
        if self._client is not None:
            raise RuntimeError("MqttUplink.start() called twice")
        cfg = self._cfg
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id or self.appliance_id,
            protocol=_PROTOCOLS[cfg.protocol],
        )
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.will_set(self.status_topic, self._status("offline"), qos=1, retain=True)
        client.max_inflight_messages_set(cfg.max_inflight)
        client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive_s)
        self._client = client
        client.loop_start()
        self._task = asyncio.create_task(self._publish_loop(), name="mqtt-uplink-publisher")
        log.info(
            "MQTT uplink starting: %s:%d, MQTT %s, client id %r, status topic %s",
            cfg.host,
            cfg.port,
            cfg.protocol,
            cfg.client_id or self.appliance_id,
            self.status_topic,
        )

    async def stop(self, drain_timeout_s: float = 5.0) -> None:
        """Drain, say ``offline``, disconnect cleanly. Idempotent.

        Waits up to ``drain_timeout_s`` seconds for the outbox to empty (every record acked),
        then publishes the retained ``offline`` status (waiting up to
        :data:`STATUS_ACK_TIMEOUT_S` for its ack) when connected, disconnects and joins paho's
        thread. Records still unacked stay in the outbox for the next start.
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
        client.disconnect()
        await loop.run_in_executor(None, client.loop_stop)
        await asyncio.sleep(0)  # run the handlers paho's thread queued before it ended
        try:
            self._flush_settled()
        except Exception:
            log.exception("MQTT uplink: cannot settle the last acknowledged records")
        log.info(
            "MQTT uplink stopped: %d record(s) published, %d left in the outbox",
            self._counters["published"],
            self._outbox.pending,
        )

    # -- event loop side ---------------------------------------------------------------------

    async def _publish_loop(self) -> None:
        """Take, publish, settle; sleep until an append, an ack or a connect wakes it."""
        assert self._wake is not None
        failing = False
        while True:
            try:
                self._flush_settled()
                if self._closing:
                    return
                self._publish_more()
                if failing:
                    failing = False
                    log.info("MQTT uplink publisher recovered")
            except Exception:
                if self._closing:
                    log.exception("MQTT uplink publisher failed while stopping")
                    return
                if not failing:
                    failing = True
                    log.exception(
                        "MQTT uplink publisher failed; retrying every %s s", _RETRY_AFTER_ERROR_S
                    )
                await asyncio.sleep(_RETRY_AFTER_ERROR_S)
                continue
            self._wake.clear()
            await self._wake.wait()

    def _publish_more(self) -> None:
        client = self._client
        if client is None or not self._can_publish():
            return
        room = self._cfg.max_inflight - len(self._inflight)
        if room <= 0:
            return
        for rec in self._outbox.take(room, exclude=self._inflight_ids):
            if not self._can_publish():
                break
            try:
                info = client.publish(rec.topic, rec.payload, qos=1, retain=False)
            except ValueError as err:  # a topic paho refuses (wildcard, empty): never sendable
                log.error("cannot publish record %d on topic %r: %s", rec.id, rec.topic, err)
                self._rejected.append(rec.id)
                self.notify()
                continue
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                # Not queued by paho (mid clash, queue full): retry on the next wake-up.
                log.debug("paho did not queue record %d: %s", rec.id, mqtt.error_string(info.rc))
                break
            # NO_CONN: paho keeps the message and sends it after the reconnect.
            self._inflight[info.mid] = rec.id
            self._inflight_ids.add(rec.id)

    def _can_publish(self) -> bool:
        """Connected, caught up with paho's view of the link, and no resend pending.

        A link change the loop has not processed yet (``_link_gen`` moved on) or records still
        unacked from before the current connection (``_carried``) hold new publishes back, so
        paho's resends always go out first.
        """
        return self._connected and self._seen_gen == self._link_gen and not self._carried

    def _flush_settled(self) -> None:
        """Settle the acks gathered since the last call, in one outbox transaction."""
        if not self._acked and not self._rejected:
            return
        acked, rejected = self._acked, self._rejected
        self._outbox.settle(acked, rejected)
        self._acked, self._rejected = [], []
        self._counters["published"] += len(acked)
        self._counters["rejected"] += len(rejected)
        if self._settled is not None:
            self._settled.set()

    async def _publish_offline(self, client: mqtt.Client, loop: asyncio.AbstractEventLoop) -> None:
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

    def _handle_ack(self, mid: int, reason: ReasonCode) -> None:
        rid = self._inflight.pop(mid, None)
        self._carried.discard(mid)
        if rid is None:  # a status message (birth from paho's thread, or stop()'s offline)
            waiter = self._status_waiters.get(mid)
            if waiter is not None and not waiter.done():
                waiter.set_result(not reason.is_failure)
            return
        self._inflight_ids.discard(rid)
        if reason.is_failure:
            log.debug("broker rejected record %d: %s", rid, reason)
            self._rejected.append(rid)
        else:
            self._acked.append(rid)
        self.notify()

    def _handle_connected(self, gen: int, session_present: bool) -> None:
        cfg = self._cfg
        self._seen_gen = gen
        self._carried = set(self._inflight)
        self._connected = True
        self._counters["connects"] += 1
        if self._link_logged == "down":
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

    def _handle_disconnected(self, gen: int, reason: ReasonCode) -> None:
        cfg = self._cfg
        self._seen_gen = gen
        self._carried = set(self._inflight)
        if not self._connected:
            log.debug("MQTT connection attempt to %s:%d ended: %s", cfg.host, cfg.port, reason)
            return
        self._connected = False
        self._counters["disconnects"] += 1
        if self._closing:
            log.info("MQTT uplink disconnected from %s:%d", cfg.host, cfg.port)
            return
        self._down_since = time.monotonic()
        self._link_logged = "down"
        log.warning(
            "MQTT uplink lost its connection to %s:%d (%s); reconnecting, %d message(s) in "
            "flight will be resent",
            cfg.host,
            cfg.port,
            reason,
            len(self._inflight),
        )

    def _handle_connect_failed(self, reason: str) -> None:
        cfg = self._cfg
        if self._link_logged != "down":
            self._link_logged = "down"
            self._down_since = time.monotonic()
            log.warning(
                "MQTT uplink cannot connect to %s:%d (%s); retrying with backoff up to %s s",
                cfg.host,
                cfg.port,
                reason,
                cfg.reconnect_max_s,
            )
        else:
            log.debug("MQTT connect to %s:%d failed: %s", cfg.host, cfg.port, reason)

    # -- paho's thread -----------------------------------------------------------------------

    def _to_loop(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the event loop (called from paho's thread)."""
        loop = self._loop
        if loop is None:
            return
        # A closed loop means stop() was never awaited: nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)

    def _set_next_delay(self, client: mqtt.Client) -> None:
        cfg = self._cfg
        delay = backoff_delay_s(
            self._attempt, cfg.reconnect_min_s, cfg.reconnect_max_s, self._rng()
        )
        self._attempt += 1
        # paho sleeps on floats; its hint says int. min == max: paho's own doubling stays off.
        client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        client.will_set(self.status_topic, self._status("offline"), qos=1, retain=True)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        if reason.is_failure:
            self._to_loop(self._handle_connect_failed, f"refused: {reason}")
            return  # paho closes the socket and calls on_disconnect, which schedules a retry
        self._attempt = 0
        self._link_gen += 1
        client.publish(self.status_topic, self._status("online"), qos=1, retain=True)
        self._to_loop(self._handle_connected, self._link_gen, flags.session_present)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._set_next_delay(client)
        self._to_loop(self._handle_connect_failed, "connection failed")

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        self._link_gen += 1
        self._set_next_delay(client)
        self._to_loop(self._handle_disconnected, self._link_gen, reason)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        self._to_loop(self._handle_ack, mid, reason)

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
