"""The uplink's delivery policy (see "Delivery", "Reason codes" and "Backlog and the
``historical`` flag" in :mod:`appliance.uplink.mqtt`): what to take from the outbox and when,
what to do with each PUBACK.

:class:`DeliveryPolicy` is the publisher side of :class:`~appliance.uplink.mqtt.MqttUplink` (a
mixin; the uplink sets the attributes): take records while the in-flight window has room (one
slot kept for alerts), rate-limit historical non-alert records with a token bucket, refuse
records over the packet size limit locally, settle acks in one outbox transaction every
:data:`SETTLE_DELAY_S`, pause on MQTT 5 quota exceeded (0x97). Everything runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from appliance.backoff import backoff_delay_s
from appliance.config import MqttSection
from appliance.contracts import Outbox, Priority
from appliance.payload import mark_historical
from appliance.uplink.paho_loop import PackedProperties
from appliance.uplink.sparkplug import SparkplugFormat

log = logging.getLogger("appliance.uplink.mqtt")  # the uplink logs under one name

QUOTA_EXCEEDED = 0x97
"""MQTT 5 PUBACK reason retried after a pause instead of rejecting the record."""

_RETRY_AFTER_ERROR_S = 1.0
SETTLE_DELAY_S = 2.0
"""Acks are settled in one outbox transaction at most this long after the first of them
arrived (or at once: :data:`SETTLE_MAX_ACKS` of them, a rejection, a lost connection, stop).
Settling a few windows' acks together rewrites each outbox page once instead of once per window
(flash wear, docs/benchmarks.md); the cost is that a crash re-sends the acknowledged messages
still waiting (duplicates)."""
SETTLE_MAX_ACKS = 256
"""At most this many acks wait for their settle (also bounds the duplicates after a crash)."""
_MIN_RATE_WAIT_S = 0.01  # the publisher never wakes more often than this for the rate limit
BURST_S = 0.05  # token bucket capacity, seconds of backlog_rate_per_s
_PACKET_OVERHEAD_BYTES = 64  # PUBLISH header + packet id + our properties, upper bound
#: Records published per pass of the publisher; with more to send it yields to the event loop
#: between passes, so that polls due meanwhile start on time (issue 11: 100 machines' telemetry
#: of one window close published in one pass held the loop 3.5-6 ms of CPU).
PUBLISH_CHUNK = 25


def packet_limit(advertised: int, configured: int) -> tuple[int, str]:
    """The PUBLISH size limit in force and where it comes from: the smaller of the broker's
    advertised MQTT 5 *Maximum Packet Size* and ``mqtt.max_packet_bytes`` (0: none)."""
    if configured and (not advertised or configured <= advertised):
        return configured, "mqtt.max_packet_bytes"
    if advertised:
        return advertised, "advertised by the broker"
    return 0, ""


def reason_key(reason: ReasonCode) -> str:
    """A metric-friendly name of a reason code: ``Not authorized`` -> ``not_authorized``."""
    return str(reason).strip().lower().replace(" ", "_").replace("-", "_")


class DeliveryPolicy:
    """Take, publish, settle (see the module docstring); a mixin of
    :class:`~appliance.uplink.mqtt.MqttUplink`, which sets these attributes."""

    _cfg: MqttSection
    _outbox: Outbox
    _rng: Callable[[], float]
    _clock: Callable[[], float]
    _client: mqtt.Client | None
    _loop: asyncio.AbstractEventLoop | None
    _wake: asyncio.Event | None
    _settled: asyncio.Event | None
    _closing: bool
    _stopped: bool
    _settle_due: float | None
    _pub_props: PackedProperties | None
    _connected: bool
    _link_up_wall: float
    _max_packet: int
    _max_packet_why: str
    _inflight: dict[int, int]
    _inflight_ids: set[int]
    _carried: set[int]
    _acked: list[int]
    _rejected: list[int]
    _status_waiters: dict[int, asyncio.Future[bool]]
    _counters: dict[str, int]
    _by_reason: dict[str, int]
    _tokens: float
    _tokens_at: float
    _backfill_tokens: float
    _backfill_tokens_at: float
    _hold_until: float
    _quota_attempt: int
    _sparkplug: SparkplugFormat | None

    def notify(self) -> None:
        """Wake the publisher: the outbox has new records. Call on the event loop."""
        if self._wake is not None:
            self._wake.set()

    async def _publish_loop(self) -> None:
        """Take, publish, settle; sleep until an append, an ack, a connect or a token wakes it."""
        assert self._wake is not None
        failing = False
        while True:
            delay: float | None = None
            try:
                settle_in = self._flush_settled()
                if self._closing:
                    return
                delay = self._publish_more()
                if settle_in is not None:
                    delay = settle_in if delay is None else min(delay, settle_in)
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
            if delay == 0.0:
                await asyncio.sleep(0)  # a full chunk went out: more may wait, after due polls
            elif delay is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)

    def _publish_more(self) -> float | None:
        """Publish what the in-flight window, the quota pause and the backlog rate allow.

        Returns seconds after which to try again without a wake-up (a token or the end of a
        quota pause), ``0.0`` when a whole chunk of :data:`PUBLISH_CHUNK` records went out (the
        loop yields once, then goes on), or ``None`` to wait for one.
        """
        client, loop = self._client, self._loop
        if client is None or loop is None or not self._can_publish():
            return None
        cfg = self._cfg
        now = loop.time()
        if now < self._hold_until:
            return self._hold_until - now
        room = cfg.max_inflight - len(self._inflight)
        if room <= 0:
            return None
        bulk_limit = cfg.max_inflight - 1 if cfg.max_inflight > 1 else 1  # a slot for alerts
        rate = cfg.backlog_rate_per_s
        if rate > 0:
            self._tokens = min(
                max(1.0, rate * BURST_S), self._tokens + (now - self._tokens_at) * rate
            )
            self._tokens_at = now
        wall = self._clock()
        delay: float | None = None
        records = self._outbox.take(min(room, PUBLISH_CHUNK), exclude=self._inflight_ids)
        for rec in records:
            if not self._can_publish():
                break
            alert = rec.priority == Priority.ALERT
            if not alert and len(self._inflight) >= bulk_limit:
                break
            backfill = rec.priority == Priority.BACKFILL
            historical = backfill or (
                rec.created < self._link_up_wall or wall - rec.created > cfg.historical_after_s
            )
            if backfill:  # after every live record (drain order), at its own rate
                wait = self._take_backfill_token(now)
                if wait:
                    delay = wait
                    break
                self._counters["backfilled"] += 1
            elif historical and not alert and rate > 0:
                if self._tokens < 1.0:
                    delay = max(_MIN_RATE_WAIT_S, (1.0 - self._tokens) / rate)
                    break
                self._tokens -= 1.0
            if self._sparkplug is not None:
                if not self._publish_sparkplug(client, rec.id, rec.topic, rec.payload, historical):
                    break
                if historical:
                    self._counters["historical"] += 1
                continue
            payload = mark_historical(rec.payload) if historical else rec.payload
            if self._max_packet and (
                len(payload) + len(rec.topic.encode()) + _PACKET_OVERHEAD_BYTES > self._max_packet
            ):
                self._reject(
                    rec.id,
                    "packet_too_large",
                    rec.topic,
                    f"larger than the maximum packet size of {self._max_packet} bytes "
                    f"({self._max_packet_why})",
                )
                continue
            try:
                info = client.publish(
                    rec.topic, payload, qos=1, retain=False, properties=self._pub_props
                )
            except ValueError as err:  # a topic paho refuses (wildcard, empty): never sendable
                self._reject(rec.id, "topic_refused", rec.topic, str(err))
                continue
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                # Not queued by paho (mid clash, queue full): retry on the next wake-up.
                log.debug("paho did not queue record %d: %s", rec.id, mqtt.error_string(info.rc))
                break
            # NO_CONN: paho keeps the message and sends it after the reconnect.
            self._inflight[info.mid] = rec.id
            self._inflight_ids.add(rec.id)
            if historical:
                self._counters["historical"] += 1
        else:
            if len(records) == PUBLISH_CHUNK:
                return 0.0  # a full chunk went out and nothing stopped it: go on after a yield
        return delay

    def _take_backfill_token(self, now: float) -> float:
        """Take a token of the ``backfill`` bucket (``mqtt.backfill_rate_per_s``, burst 50 ms
        worth): 0.0 when taken, else the seconds until one is due."""
        rate = self._cfg.backfill_rate_per_s
        cap = max(1.0, rate * BURST_S)
        self._backfill_tokens = min(
            cap, self._backfill_tokens + (now - self._backfill_tokens_at) * rate
        )
        self._backfill_tokens_at = now
        if self._backfill_tokens < 1.0:
            return max(_MIN_RATE_WAIT_S, (1.0 - self._backfill_tokens) / rate)
        self._backfill_tokens -= 1.0
        return 0.0

    def _publish_sparkplug(
        self, client: mqtt.Client, rid: int, topic: str, payload: bytes, historical: bool
    ) -> bool:
        """Publish record ``rid`` as its Sparkplug B messages (see
        :class:`~appliance.uplink.sparkplug.SparkplugFormat`). The record is in flight under the
        mid of its last message (QoS 1 messages of one connection are delivered in order); one
        with nothing new to say (every metric unchanged) is settled at once. ``False``: paho
        did not queue it, try again later."""
        assert self._sparkplug is not None
        try:
            messages = self._sparkplug.translate(payload, historical)
        except ValueError as err:
            self._reject(rid, "not_translatable", topic, str(err))
            return True
        if not messages:
            self._acked.append(rid)
            return True
        info: mqtt.MQTTMessageInfo | None = None
        for sp_topic, sp_payload in messages:
            info = client.publish(sp_topic, sp_payload, qos=1, retain=False)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                log.debug("paho did not queue record %d: %s", rid, mqtt.error_string(info.rc))
                return False
        assert info is not None
        self._inflight[info.mid] = rid
        self._inflight_ids.add(rid)
        return True

    def _reject(self, rid: int, key: str, topic: str, detail: str) -> None:
        """Settle record ``rid`` as rejected (at the next flush) and count it under ``key``."""
        first = key not in self._by_reason
        self._by_reason[key] = self._by_reason.get(key, 0) + 1
        self._rejected.append(rid)
        if first:
            log.error(
                "MQTT record on %s refused (%s: %s): dropped and counted as rejected; further "
                "%s refusals are logged at debug level",
                topic,
                key,
                detail,
                key,
            )
        else:
            log.debug("MQTT record %d on %s refused: %s", rid, topic, key)
        self.notify()

    def _can_publish(self) -> bool:
        """Connected, and no resend pending.

        Records still unacked from before the current connection (``_carried``) hold new
        publishes back, so paho's resends always go out first.
        """
        return self._connected and not self._carried

    def _flush_settled(self, force: bool = False) -> float | None:
        """Settle the acks gathered so far in one outbox transaction, once the oldest of them
        is :data:`SETTLE_DELAY_S` old (at once when ``force``, stopping, :data:`SETTLE_MAX_ACKS`
        of them or a rejection). Returns the seconds until they are due, ``None`` when nothing
        waits."""
        if not self._acked and not self._rejected:
            self._settle_due = None
            return None
        if not (force or self._stopped or self._closing or self._rejected):
            now = self._loop.time() if self._loop is not None else 0.0
            if self._settle_due is None:
                self._settle_due = now + SETTLE_DELAY_S
            if now < self._settle_due and len(self._acked) < SETTLE_MAX_ACKS:
                return self._settle_due - now
        self._settle_due = None
        acked, rejected = self._acked, self._rejected
        self._outbox.settle(acked, rejected)
        self._acked, self._rejected = [], []
        # Acked records stay excluded from take() until settled: never published twice.
        self._inflight_ids.difference_update(acked)
        self._inflight_ids.difference_update(rejected)
        self._counters["rejected"] += len(rejected)
        if self._settled is not None:
            self._settled.set()
        return None

    def _handle_ack(self, mid: int, reason: ReasonCode) -> None:
        rid = self._inflight.pop(mid, None)
        self._carried.discard(mid)
        if rid is None:  # a status message (the birth, or stop()'s offline)
            waiter = self._status_waiters.get(mid)
            if waiter is not None and not waiter.done():
                waiter.set_result(not reason.is_failure)
            return
        if reason.is_failure and reason.value == QUOTA_EXCEEDED:
            self._inflight_ids.discard(rid)  # stays in the outbox, to be taken again
            self._pause_for_quota()
        elif reason.is_failure:
            self._reject(rid, reason_key(reason), f"record {rid}", f"0x{reason.value:02x}")
        else:
            self._quota_attempt = 0
            self._acked.append(rid)
            self._counters["published"] += 1  # acknowledged by the broker (settled later)
        self.notify()

    def _pause_for_quota(self) -> None:
        """0x97 quota exceeded: keep the record, pause all publishing for a jittered backoff."""
        cfg, loop = self._cfg, self._loop
        self._counters["quota_retries"] += 1
        self._by_reason["quota_exceeded"] = self._by_reason.get("quota_exceeded", 0) + 1
        if loop is None:
            return
        pause = max(
            cfg.reconnect_min_s,
            backoff_delay_s(
                self._quota_attempt, cfg.reconnect_min_s, cfg.reconnect_max_s, self._rng()
            ),
        )
        if self._quota_attempt == 0:
            log.warning(
                "MQTT broker %s:%d: quota exceeded (0x97); pausing publishing for %.2f s, the "
                "record stays in the outbox and is sent again",
                cfg.host,
                cfg.port,
                pause,
            )
        self._quota_attempt += 1
        self._hold_until = max(self._hold_until, loop.time() + pause)
