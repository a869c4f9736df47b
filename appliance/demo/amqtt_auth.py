"""The embedded broker's authentication plugin: every client is accepted, as on the demo's
Mosquitto (``allow_anonymous true``), and its persistent session is kept like Mosquitto keeps it.

amqtt's own ``AnonymousAuthPlugin`` marks every client it lets in as anonymous, and amqtt then
deletes an anonymous client's session when it disconnects and queues nothing for it, even with
``clean_session = False``: a subscriber that lost its connection for a second would miss what
was published meanwhile. This plugin accepts the client without that mark, so a persistent
session keeps its subscriptions and its QoS 1 messages while the client is away.

Imported by amqtt's plugin loader only (by its dotted path, see
:mod:`appliance.demo.broker`), so amqtt is imported here at module level.
"""

from __future__ import annotations

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session


class AcceptEveryClient(BaseAuthPlugin):  # type: ignore[misc]  # amqtt ships no type hints
    """Accepts every CONNECT, with or without a user name, as a non-anonymous session."""

    async def authenticate(self, *, session: Session) -> bool:
        return True
