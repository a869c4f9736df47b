"""The command channel: MQTT requests in, replies out (docs/mqtt.md, "Commands").

:class:`CommandChannel` has its own paho client (client id ``<client id>-cmd``, persistent
session, the uplink's TLS and credentials from :mod:`appliance.uplink.tls`, paho on the event
loop through :mod:`appliance.uplink.paho_loop`). It is owned by
:class:`~appliance.downlink.runner.DownlinkRunner`, which outlives the pipeline: a
``config.apply`` stops and restarts the :class:`~appliance.runtime.Appliance` while the channel
stays connected and answers.

It subscribes ``<prefix>/<appliance>/cmd/+`` at QoS 1. Every message is checked, in this order,
on the event loop as it arrives (each failure is a refusal counted per reason in
``stats()["refused"]``, answered with a ``refused`` reply when a request id could be read, and
never an exception out of the channel):

``too_large``   payload above ``downlink.max_payload_bytes``
``not_json``    not UTF-8 JSON
``not_object``  not a JSON object with a ``body`` object (and no other keys than
                ``request_id`` and ``body``)
``bad_request_id``  ``request_id`` missing or not ``[A-Za-z0-9._-]{1,64}``
``bad_response_topic``  an MQTT 5 response topic with a wildcard, or inside this appliance's
                own topics other than its ``reply/`` subtree
``unknown_command``  no handler registered for the topic's last level
``schema``      the request fails ``appliance/schemas/cmd/<command>.request.json``
``busy``        more than :data:`QUEUE_SIZE` requests waiting for execution

A request that passes is deduplicated by ``request_id`` (:class:`~.store.DedupStore`): an id
already answered is not executed again, its stored reply is published again (counted in
``duplicates``); an id waiting or executing is ignored (its reply is on its way). Then it waits
in a queue and is executed by one worker task, one request at a time, in arrival order: a
``config.apply`` never overlaps another command. A handler exception becomes an ``error`` reply.

The reply is stored, then published with QoS 1 on ``<prefix>/<appliance>/reply/<request_id>``;
over MQTT 5 a request's *response topic* is used instead when given, with its *correlation
data*. Each request and each reply is logged in one line (command, id, code, message: never a
body, which may hold secrets).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from appliance.config import Config
from appliance.downlink.base import CommandContext, Handler, Reply, Request
from appliance.downlink.schemas import request_validator
from appliance.downlink.store import DedupStore
from appliance.errors import ConfigError
from appliance.uplink.paho_loop import PahoOnLoop, connect_async, connect_properties, new_client
from appliance.uplink.tls import read_password, tls_context
from appliance.uplink.topics import command_topic, reply_topic

log = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # used with fullmatch (no trailing newline)
QUEUE_SIZE = 64
"""Requests waiting for execution at most; more are refused (``busy``)."""
REFUSAL_REASONS = (
    "too_large",
    "not_json",
    "not_object",
    "bad_request_id",
    "bad_response_topic",
    "unknown_command",
    "schema",
    "busy",
)


def _finite(value: Any) -> Any:
    """``value`` with NaN and ±Inf replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class _Refused(Exception):
    def __init__(self, reason: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.request_id = request_id


class CommandChannel(PahoOnLoop):
    """Receives commands, runs their handlers, publishes the replies (module docstring).

    Construction does no I/O; ``start()``/``stop()`` on the event loop. ``handlers`` maps a
    command name to its handler (:mod:`appliance.downlink.registry`); ``ctx`` is what they get.
    """

    def __init__(
        self,
        cfg: Config,
        ctx: CommandContext,
        handlers: Mapping[str, Handler],
        store: DedupStore,
        *,
        rng: Any = random.random,
        clock: Any = time.time,
    ) -> None:
        self._mqtt = cfg.mqtt
        self._dl = cfg.downlink
        self.appliance_id = cfg.appliance.id
        self._prefix = cfg.mqtt.topic_prefix
        self._own = f"{self._prefix}/{self.appliance_id}/"
        self._cmd_base = command_topic(self._prefix, self.appliance_id, "")
        self._ctx = ctx
        self._handlers = dict(handlers)
        self._validators: dict[str, Callable[[dict[str, Any]], str | None]] = {}
        self._store = store
        self._rng = rng
        self._clock = clock
        self.client_id = f"{cfg.mqtt.client_id or self.appliance_id}-cmd"
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._fd = -1
        self._sock_closed: asyncio.Event | None = None
        self._nudge: asyncio.Event | None = None
        self._halt: asyncio.Event | None = None
        self._connector: asyncio.Task[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._running: asyncio.Future[Reply] | None = None  # the handler under way
        self._closing = False
        self._queue: asyncio.Queue[tuple[Request, str | None, bytes | None]] | None = None
        self._pending: set[str] = set()
        self._connected = False
        self._attempt = 0
        self._fail_logged = ""
        self._subscribed = asyncio.Event()
        self.received = 0
        self.duplicates = 0
        self.replies = 0
        self.connects = 0
        self.by_command: dict[str, int] = {}
        self.by_code: dict[str, int] = {}
        self.refused: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)

    # -- public ------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def subscribed(self) -> asyncio.Event:
        """Set once the broker granted the subscription of the current connection."""
        return self._subscribed

    def stats(self) -> dict[str, Any]:
        """``received`` (messages on the command topics) = ``refused_total`` + the sum of
        ``commands`` (requests that passed the checks, per command: executed, or answered
        again as ``duplicates``); ``codes`` (replies per code), ``refused`` (per reason),
        ``duplicates``, ``replies`` (published, resends included), ``connected``,
        ``connects``, ``queued``."""
        return {
            "received": self.received,
            "commands": dict(self.by_command),
            "codes": dict(self.by_code),
            "refused": dict(self.refused),
            "refused_total": sum(self.refused.values()),
            "duplicates": self.duplicates,
            "replies": self.replies,
            "connected": self._connected,
            "connects": self.connects,
            "queued": self._queue.qsize() if self._queue is not None else 0,
        }

    async def start(self) -> None:
        """Create the client and connect in the background (retried with backoff)."""
        if self._loop is not None:
            raise RuntimeError("CommandChannel.start() called twice")
        cfg = self._mqtt
        password = read_password(cfg)
        ctx = tls_context(cfg) if cfg.tls else None
        self._validators = {name: request_validator(name) for name in self._handlers}
        self._bind_loop()
        self._subscribed = asyncio.Event()
        self._queue = asyncio.Queue(QUEUE_SIZE)
        client = new_client(
            self,
            cfg,
            self.client_id,
            on_pre_connect=self._on_pre_connect,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
            log_sink=lambda line: log.debug("paho: %s", line),
            password=password.value if password else None,
            tls=ctx,
        )
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        props = connect_properties(cfg)
        if props is not None:
            props.MaximumPacketSize = max_packet_bytes(self._dl.max_payload_bytes)
        connect_async(client, cfg, props)
        self._client = client
        self._store.open()
        self._connector = asyncio.create_task(
            self._connect_loop(cfg, lambda _category, text: self._log_failure(text)),
            name="downlink-connector",
        )
        self._worker = asyncio.create_task(self._work(), name="downlink-worker")
        log.info(
            "downlink: command channel starting: %s:%d, client id %r, commands on %s (%s)",
            cfg.host,
            cfg.port,
            self.client_id,
            command_topic(self._prefix, self.appliance_id),
            ", ".join(sorted(self._handlers)),
        )

    async def stop(self) -> None:
        """Let the command under way finish and answer (bounded: twice
        ``downlink.apply_deadline_s`` + 30 s; then it is cancelled), drop the queued ones (already
        acknowledged to the broker: their senders get no reply and may send them again),
        disconnect. Idempotent."""
        client = self._client
        if client is None or self._halt is None or self._nudge is None:
            return
        self._closing = True
        running, worker = self._running, self._worker
        if worker is not None and running is not None and not running.done():
            limit = 2 * self._dl.apply_deadline_s + 30.0  # config.apply: two restarts at worst
            log.info("downlink: waiting for the command under way (up to %.0f s)", limit)
            await asyncio.wait({worker}, timeout=limit)  # it ends after publishing the reply
        self._client = None
        if running is not None and not running.done():
            running.cancel()
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._halt.set()
        self._nudge.set()
        if self._fd >= 0 and self._sock_closed is not None:
            client.disconnect()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._sock_closed.wait(), 1.0)
        if self._connector is not None:
            await self._connector
        sock = client.socket()
        if sock is not None:
            if self._fd >= 0:
                self._unwatch(sock)
            with contextlib.suppress(OSError):
                sock.close()
        self._connected = False
        self._store.close()
        log.info("downlink: command channel stopped (%d request(s) received)", self.received)

    # -- the checks --------------------------------------------------------------------------
    def _check(self, topic: str, payload: bytes, props: Any) -> tuple[Request, str | None]:
        """The request in a message, and the response topic to answer on (None: the reply
        topic); raises :class:`_Refused`."""
        command = topic[len(self._cmd_base) :] if topic.startswith(self._cmd_base) else ""
        if len(payload) > self._dl.max_payload_bytes:
            raise _Refused(
                "too_large",
                f"payload of {len(payload)} bytes is above downlink.max_payload_bytes "
                f"({self._dl.max_payload_bytes})",
                _peek_request_id(payload[:200]),
            )
        try:
            data = json.loads(payload)
        except (UnicodeDecodeError, ValueError) as err:
            raise _Refused("not_json", f"not JSON: {err}") from None
        rid = data.get("request_id") if isinstance(data, dict) else None
        readable = rid if isinstance(rid, str) and REQUEST_ID.fullmatch(rid) else None
        if not isinstance(data, dict):
            raise _Refused("not_object", "a request is a JSON object {request_id, body}")
        if readable is None:
            raise _Refused("bad_request_id", "request_id must be a string of 1-64 [A-Za-z0-9._-]")
        extra = sorted(set(data) - {"request_id", "body"})
        if not isinstance(data.get("body", {}), dict) or extra:
            why = f"unknown key(s) {extra}" if extra else "body must be an object"
            raise _Refused("not_object", f"a request is {{request_id, body}}: {why}", readable)
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        if response is not None and not self._response_ok(response):
            raise _Refused(
                "bad_response_topic",
                "the response topic must hold no wildcard and lie outside this "
                "appliance's topics (except its reply/ subtree)",
                readable,
            )
        handler = self._handlers.get(command)
        if handler is None or "/" in command:
            raise _Refused(
                "unknown_command",
                f"unknown command {command!r} (known: {', '.join(sorted(self._handlers))})",
                readable,
            )
        error = self._validators[command](data)
        if error is not None:
            raise _Refused("schema", f"{command}: {error}", readable)
        body = data.get("body", {})
        req = Request(command, readable, body, self._clock())
        return req, response

    def _response_ok(self, topic: str) -> bool:
        """An MQTT 5 response topic the appliance may publish a reply on."""
        if not topic or "+" in topic or "#" in topic:
            return False
        return not topic.startswith(self._own) or topic.startswith(f"{self._own}reply/")

    # -- paho callbacks (on the loop) --------------------------------------------------------
    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._receive(msg.topic, bytes(msg.payload), getattr(msg, "properties", None))
        except Exception:  # noqa: BLE001 - nothing escapes into paho's read loop
            log.exception("downlink: unexpected failure while receiving a command")

    def _receive(self, topic: str, payload: bytes, props: Any) -> None:
        self.received += 1
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        try:
            req, response = self._check(topic, payload, props)
        except _Refused as refusal:
            self.refused[refusal.reason] += 1
            log.info(
                "downlink: refused a message on %s (%d bytes, request %s): %s",
                topic,
                len(payload),
                refusal.request_id or "unreadable",
                refusal.reason,
            )
            if refusal.request_id is not None:
                command = topic.rsplit("/", 1)[-1]
                reply = Reply("refused", str(refusal))
                response = getattr(props, "ResponseTopic", None) if props is not None else None
                if response is not None and not self._response_ok(response):
                    response = None  # refused for it: answered on the reply topic
                self._publish(
                    command, refusal.request_id, reply, response, correlation, store=False
                )
            return
        if req.request_id in self._pending:
            self._count(req.command)
            self.duplicates += 1
            log.info("downlink: %s %s received again while under way", req.command, req.request_id)
            return
        stored = self._store.get(req.request_id)
        if stored is not None:
            self._count(req.command)
            self.duplicates += 1
            log.info(
                "downlink: %s %s already answered (%s): reply sent again",
                req.command,
                req.request_id,
                stored.get("code"),
            )
            self._send(stored, req.request_id, response, correlation)
            return
        assert self._queue is not None
        try:
            self._queue.put_nowait((req, response, correlation))
        except asyncio.QueueFull:
            self.refused["busy"] += 1
            reply = Reply("refused", f"busy: {QUEUE_SIZE} requests waiting; send it again later")
            self._publish(req.command, req.request_id, reply, response, correlation, store=False)
            return
        self._pending.add(req.request_id)
        self._count(req.command)
        log.info(
            "downlink: command %s request %s received (%d bytes)",
            req.command,
            req.request_id,
            len(payload),
        )

    def _count(self, command: str) -> None:
        self.by_command[command] = self.by_command.get(command, 0) + 1

    async def _work(self) -> None:
        """Execute queued requests one at a time, in arrival order."""
        assert self._queue is not None
        while not self._closing:
            req, response, correlation = await self._queue.get()
            try:
                self._running = asyncio.ensure_future(self._execute(req))
                reply = await asyncio.shield(self._running)
                self._publish(req.command, req.request_id, reply, response, correlation)
            except Exception:  # noqa: BLE001 - the channel keeps serving
                log.exception("downlink: cannot answer %s %s", req.command, req.request_id)
            finally:
                self._pending.discard(req.request_id)

    async def _execute(self, req: Request) -> Reply:
        handler = self._handlers[req.command]
        try:
            reply = await handler(self._ctx, req)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - a failing handler is an error reply
            log.exception("downlink: %s %s failed", req.command, req.request_id)
            return Reply("error", f"{req.command} failed: {type(err).__name__}: {err}")
        if not isinstance(reply, Reply):
            return Reply("error", f"{req.command}: the handler returned no Reply")
        return reply

    def _publish(
        self,
        command: str,
        request_id: str,
        reply: Reply,
        response: str | None,
        correlation: bytes | None,
        *,
        store: bool = True,
    ) -> None:
        doc: dict[str, Any] = {
            "request_id": request_id,
            "command": command,
            "code": reply.code,
            "message": reply.message,
            "body": _finite(dict(reply.body)),
            "ts": self._clock(),
        }
        self.by_code[reply.code] = self.by_code.get(reply.code, 0) + 1
        if store:
            try:
                self._store.put(request_id, command, doc)
            except Exception:  # noqa: BLE001 - the reply still goes out
                log.exception("downlink: cannot store the reply to %s", request_id)
        log.info("downlink: reply %s to %s %s: %s", reply.code, command, request_id, reply.message)
        self._send(doc, request_id, response, correlation)

    def _send(
        self,
        doc: dict[str, Any],
        request_id: str,
        response: str | None,
        correlation: bytes | None,
    ) -> None:
        client = self._client
        if client is None:
            return
        payload = json.dumps(doc, allow_nan=False, default=str).encode()
        props: Properties | None = None
        if self._mqtt.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.PayloadFormatIndicator = 1
            props.ContentType = "application/json"
            if correlation is not None:
                props.CorrelationData = correlation
        topic = response or reply_topic(self._prefix, self.appliance_id, request_id)
        client.publish(topic, payload, qos=1, properties=props)
        self.replies += 1

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        """Re-read ``mqtt.password_file`` before each attempt, as the uplink does (in the
        connection worker thread)."""
        if not self._mqtt.password_file:
            return
        try:
            password = read_password(self._mqtt)
        except ConfigError as err:
            self._on_loop(self._log_failure, f"{err}; keeping the previous password")
            return
        if password is not None:
            client.username_pw_set(self._mqtt.username, password.value)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        if reason.is_failure:
            self._log_failure(f"refused by the broker: {reason}")
            return
        self._connected = True
        self._attempt = 0
        self._fail_logged = ""
        self.connects += 1
        client.subscribe(command_topic(self._prefix, self.appliance_id), qos=1)
        log.info(
            "downlink: command channel connected to %s:%d (session present: %s)",
            self._mqtt.host,
            self._mqtt.port,
            flags.session_present,
        )

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        if any(getattr(r, "is_failure", False) for r in reasons):
            log.error("downlink: the broker refused the subscription to the command topics")
            return
        self._subscribed.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Any,
    ) -> None:
        if self._connected:
            log.warning("downlink: command channel lost its connection (%s)", reason)
        self._connected = False
        self._subscribed.clear()

    def _log_failure(self, text: str) -> None:
        if text != self._fail_logged:
            self._fail_logged = text
            log.warning(
                "downlink: command channel cannot connect to %s:%d (%s); retrying",
                self._mqtt.host,
                self._mqtt.port,
                text,
            )


def max_packet_bytes(max_payload_bytes: int) -> int:
    """The MQTT 5 *Maximum Packet Size* the channel announces: twice the payload limit plus
    64 KiB. Requests up to it arrive and are refused (and counted) as ``too_large``; the
    broker drops larger ones for this client, so they never take the appliance's memory."""
    return min(2 * max_payload_bytes + 65536, 268_435_455)


def _peek_request_id(head: bytes) -> str | None:
    """The request id of an oversized request, when its first bytes show one."""
    m = re.search(rb'"request_id"\s*:\s*"([A-Za-z0-9._-]{1,64})"', head)
    return m.group(1).decode() if m else None
