"""paho-mqtt on the asyncio event loop (see "Threads and tasks" in :mod:`appliance.uplink.mqtt`).

paho runs in its "external event loop" mode: :class:`PahoOnLoop` registers paho's socket with
the loop (``add_reader``/``add_writer``) through paho's ``on_socket_*`` callbacks and runs
``loop_read``/``loop_write`` as the loop's callbacks, so paho's callbacks run on the loop thread.
The callbacks paho makes from the connection worker thread (opening a connection) are handed
to the loop with ``call_soon_threadsafe``; its connector task (:meth:`PahoOnLoop._connect_loop`)
opens the connection, runs paho's keepalive and reconnects with backoff. :class:`PackedProperties`
and :func:`paho_logger` take paho's per-packet Python work off the publish path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.backoff import backoff_delay_s
from appliance.config import MqttSection
from appliance.uplink.tls import describe_connect_error

PROTOCOLS = {"3.1.1": mqtt.MQTTv311, "5": mqtt.MQTTv5}
"""``mqtt.protocol`` → paho's protocol constant."""

_MAX_PENDING_READS = 64  # TLS: extra loop_read calls per readable event for buffered records
_MISC_INTERVAL_S = 1.0  # paho's loop_misc (keepalive) period, as in paho's own network loop


class PackedProperties(Properties):
    """MQTT 5 properties packed once, at construction, instead of on every PUBLISH.

    paho packs a :class:`Properties` object for every packet it sends (~50 µs in pure Python
    for two properties); the publish properties never change, so their bytes are reused. Frozen:
    setting a property afterwards raises ``AttributeError``.
    """

    _packed: bytes
    _text: str

    def __init__(self, packet_type: int, **values: Any) -> None:
        super().__init__(packet_type)  # type: ignore[no-untyped-call]
        for name, value in values.items():
            setattr(self, name, value)
        object.__setattr__(self, "_packed", Properties.pack(self))  # type: ignore[no-untyped-call]
        object.__setattr__(self, "_text", Properties.__str__(self))  # type: ignore[no-untyped-call]

    def __setattr__(self, name: str, value: Any) -> None:
        if "_packed" in self.__dict__:
            raise AttributeError(f"{type(self).__name__} is frozen: cannot set {name}")
        super().__setattr__(name, value)  # type: ignore[no-untyped-call]

    def pack(self) -> bytes:
        return self._packed

    def __str__(self) -> str:
        return self._text


class _PahoErrors(logging.Handler):
    """Keeps paho's last error line (its ``on_log`` formatted every packet's debug line)."""

    def __init__(self, sink: Callable[[str], None]) -> None:
        super().__init__(logging.ERROR)
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self._sink(record.getMessage())


def paho_logger(sink: Callable[[str], None]) -> logging.Logger:
    """A private logger (not in the logging tree) handing paho's ERROR lines to ``sink``.

    paho's ``_easy_log`` formats its message eagerly for ``on_log`` (a debug line with the
    properties' ``str()`` for every PUBLISH and PUBACK); a logger at ERROR level filters those
    out before formatting.
    """
    logger = logging.Logger("appliance.uplink.mqtt.paho", logging.ERROR)
    logger.propagate = False
    logger.addHandler(_PahoErrors(sink))
    return logger


class PahoOnLoop:
    """The socket side and the connector of a client whose paho client runs on the event loop:
    a mixin of :class:`~appliance.uplink.mqtt.MqttUplink` and
    :class:`~appliance.downlink.channel.CommandChannel`, which set these attributes.

    ``_on_socket_*`` are paho's callbacks (on the loop, or in the connection worker thread);
    the rest runs on the loop. ``_sock_closed`` is set while no socket is registered, and
    ``_nudge`` wakes the connector task when the socket closes; ``_halt`` (set by ``stop()``)
    ends it. ``_attempt`` counts reconnect attempts (the owner resets it when a connection
    counts as up); ``_rng`` is the uniform [0, 1) source of the backoff's jitter.
    """

    _loop: asyncio.AbstractEventLoop | None
    _client: mqtt.Client | None
    _fd: int
    _sock_closed: asyncio.Event | None
    _nudge: asyncio.Event | None
    _halt: asyncio.Event | None
    _loop_thread: int
    _attempt: int
    _rng: Callable[[], float]

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        """In ``start()``, on the event loop: remember the loop (returned) and its thread, and
        create the connector's events (no socket registered yet)."""
        self._loop = loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._halt = asyncio.Event()
        self._nudge = asyncio.Event()
        self._sock_closed = asyncio.Event()
        self._sock_closed.set()
        return loop

    async def _connect_loop(self, cfg: MqttSection, on_failed: Callable[[str, str], None]) -> None:
        """The connector task: open connections until ``_halt``: attempt, run paho's keepalive
        while the socket is open, back off with full jitter (:func:`backoff_delay_s` of
        ``cfg.reconnect_min_s``/``reconnect_max_s``), again. A failed attempt goes to
        ``on_failed(category, reason)`` (:func:`describe_connect_error`)."""
        client, loop = self._client, self._loop
        halt, nudge = self._halt, self._nudge
        assert client is not None and loop is not None and halt is not None and nudge is not None
        while not halt.is_set():
            try:
                # Blocking (DNS, TCP, TLS handshake): in a worker thread. The socket callbacks
                # hand the open socket to the loop; CONNACK arrives through loop_read.
                await loop.run_in_executor(None, client.reconnect)
            except Exception as err:  # noqa: BLE001 - retried with backoff
                if not halt.is_set():
                    on_failed(*describe_connect_error(err, cfg.host))
            else:
                while not halt.is_set() and client.socket() is not None:
                    nudge.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(nudge.wait(), _MISC_INTERVAL_S)
                    if not nudge.is_set() and client.socket() is not None:
                        client.loop_misc()  # PINGREQ when due; closes a link gone quiet
            if halt.is_set():
                return
            delay = backoff_delay_s(
                self._attempt, cfg.reconnect_min_s, cfg.reconnect_max_s, self._rng()
            )
            self._attempt += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(halt.wait(), delay)

    def _on_loop(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` on the event loop: at once when called there (paho's callbacks
        are), else (the connection worker thread) with ``call_soon_threadsafe``."""
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            fn(*args)
            return
        # A closed loop means stop() was never awaited: nobody is left to tell.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)

    def _watch(self, sock: Any) -> None:
        """Register paho's new socket with the loop for reading."""
        loop, client = self._loop, self._client
        fd: int = sock.fileno()
        if loop is None or client is None or client.socket() is not sock or fd < 0:
            return  # already closed again
        self._fd = fd
        loop.add_reader(self._fd, self._on_readable)
        if self._sock_closed is not None:
            self._sock_closed.clear()

    def _unwatch(self, sock: Any) -> None:
        """The socket is closing: take it off the loop and wake the connector."""
        loop = self._loop
        if loop is not None and self._fd >= 0:
            loop.remove_reader(self._fd)
            loop.remove_writer(self._fd)
        self._fd = -1
        if self._sock_closed is not None and self._nudge is not None:
            self._sock_closed.set()
            self._nudge.set()

    def _watch_writes(self, sock: Any, on: bool) -> None:
        loop = self._loop
        if loop is None or self._fd < 0 or sock.fileno() != self._fd:
            return
        if on:
            loop.add_writer(self._fd, self._on_writable)
        else:
            loop.remove_writer(self._fd)

    def _on_readable(self) -> None:
        client = self._client
        if client is None:
            return
        client.loop_read()
        # TLS: bytes already decrypted into the SSL object leave the socket unreadable; read
        # them now or they would wait for the next packet.
        for _ in range(_MAX_PENDING_READS):
            sock = client.socket()
            if not isinstance(sock, ssl.SSLSocket) or not sock.pending():
                break
            client.loop_read()

    def _on_writable(self) -> None:
        if self._client is not None:
            self._client.loop_write()  # every queued packet; unregisters itself when done

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._watch, sock)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._unwatch, sock)

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._watch_writes, sock, True)

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._watch_writes, sock, False)


def new_client(
    owner: PahoOnLoop,
    cfg: MqttSection,
    client_id: str,
    *,
    on_pre_connect: Callable[..., None],
    on_connect: Callable[..., None],
    on_disconnect: Callable[..., None],
    log_sink: Callable[[str], None],
    password: str | None,
    tls: ssl.SSLContext | None,
) -> mqtt.Client:
    """A paho client for ``cfg`` (persistent session; credentials, TLS) whose socket ``owner``
    runs on the event loop; the uplink's and the command channel's. The caller adds its other
    callbacks and starts it with :func:`connect_async`."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=PROTOCOLS[cfg.protocol],
        clean_session=None if cfg.protocol == "5" else False,
    )
    client.on_pre_connect = on_pre_connect
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_socket_open = owner._on_socket_open
    client.on_socket_close = owner._on_socket_close
    client.on_socket_register_write = owner._on_socket_register_write
    client.on_socket_unregister_write = owner._on_socket_unregister_write
    client.enable_logger(paho_logger(log_sink))
    if cfg.username:
        client.username_pw_set(cfg.username, password)
    if tls is not None:
        client.tls_set_context(tls)
    return client


def connect_async(client: mqtt.Client, cfg: MqttSection, props: Properties | None) -> None:
    """Tell ``client`` where to connect (``cfg``: persistent session, keepalive) with the
    CONNECT properties ``props`` (:func:`connect_properties`); the connector connects."""
    client.connect_async(
        cfg.host,
        cfg.port,
        keepalive=cfg.keepalive_s,
        clean_start=False if cfg.protocol == "5" else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
        properties=props,
    )


def connect_properties(cfg: MqttSection) -> Properties | None:
    """MQTT 5: the CONNECT properties both clients send (session expiry); None for 3.1.1."""
    if cfg.protocol != "5":
        return None
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = cfg.session_expiry_s
    return props
