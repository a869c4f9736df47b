"""The durable outbox: messages bound upstream wait here, on disk, until the broker acks them."""

from appliance.outbox.sqlite import SqliteOutbox

__all__ = ["SqliteOutbox"]
