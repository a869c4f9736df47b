"""The demo's embedded MQTT broker: amqtt (MQTT 3.1.1) on the demo's own event loop.

``appliance demo`` uses it where Mosquitto is not installed, so the demo needs nothing but
Python. amqtt comes with the ``demo`` extra (``pip install -e '.[demo]'``), never with what a
device installs; without it :meth:`EmbeddedBroker.start` raises :class:`BrokerUnavailable`,
whose message says how to install it.

The broker listens on one TCP address (no websocket or other listeners), accepts every client
(no credentials needed) and keeps its persistent session (``clean_session = False``: subscriptions
and QoS 1 messages queued while it is away) as Mosquitto does, in memory only, as are retained
messages. It speaks MQTT 3.1.1: clients must connect with protocol 3.1.1 (the demo's config sets
``mqtt.protocol = "3.1.1"``). amqtt logs only errors: its per-connection warnings (a client that
drops without DISCONNECT, one that reconnects quickly) are noise in a demo.

A known limit, fine for a demo on one machine: when a subscriber's connection breaks (no
DISCONNECT), amqtt 0.12 forgets the QoS 1 messages it had in flight to it and some published
until it notices, instead of resending them when the session comes back (upstream issue
Yakifo/amqtt#401). The demo's subscriber would report them as sequence gaps. The appliance's own
messages are not at risk: its outbox keeps each one until the broker acknowledged it.
"""

from __future__ import annotations

import logging
from typing import Any

from appliance.errors import ApplianceError

INSTALL_HINT = "pip install -e '.[demo]'"
"""How to install the embedded broker (the ``demo`` extra), as the error message says it."""

#: amqtt's loggers and the level they run at while the demo uses them.
QUIET_LOGGERS = {"amqtt": logging.ERROR, "transitions": logging.WARNING}


class BrokerUnavailable(ApplianceError):
    """The embedded broker cannot run: amqtt is not installed, or it could not bind."""


def _broker_class() -> Any:
    """amqtt's ``Broker``, imported on first use so the appliance never needs amqtt."""
    try:
        from amqtt.broker import Broker
    except ImportError as err:
        raise BrokerUnavailable(
            "the embedded MQTT broker needs amqtt, which is not installed: run "
            f"`{INSTALL_HINT}` (or install Mosquitto)"
        ) from err
    return Broker


class EmbeddedBroker:
    """An amqtt broker on ``host:port`` in the running event loop.

    Construction does no I/O; :meth:`start` binds (from a coroutine on the loop the broker will
    serve), :meth:`stop` disconnects every client and closes the listener, releasing the port.
    ``stop()`` is idempotent and a no-op before ``start()``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port
        self._broker: Any = None

    @property
    def config(self) -> dict[str, Any]:
        """amqtt's configuration: one TCP listener, every client accepted, no other plugin."""
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # An explicit plugin list (amqtt's default one adds $SYS topics and packet logging),
            # with our own anonymous access: see appliance.demo.amqtt_auth for why.
            "plugins": {"appliance.demo.amqtt_auth.AcceptEveryClient": {}},
        }

    async def start(self) -> None:
        """Bind and serve; :class:`BrokerUnavailable` if amqtt is missing or the bind fails."""
        broker_class = _broker_class()
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)
        broker = broker_class(self.config)
        # amqtt logs a failed start with a traceback at ERROR, then raises; the error we raise
        # says the same thing on one line.
        amqtt_log = logging.getLogger("amqtt")
        level = amqtt_log.level
        amqtt_log.setLevel(logging.CRITICAL)
        try:
            await broker.start()
        except Exception as err:
            raise BrokerUnavailable(
                f"the embedded MQTT broker could not listen on {self.host}:{self.port}: "
                f"{err.__cause__ or err}"
            ) from err
        finally:
            amqtt_log.setLevel(level)
        self._broker = broker

    async def stop(self) -> None:
        """Disconnect every client and close the listener; idempotent."""
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()
