"""The durable outbox: messages bound upstream wait here, on disk, until the broker acks them."""

from appliance.outbox.sqlite import OutboxError, OutboxFullError, SqliteOutbox

__all__ = ["OutboxError", "OutboxFullError", "SqliteOutbox"]
