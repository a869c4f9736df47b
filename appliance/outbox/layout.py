"""The outbox's on-disk layout shared by its storage (:mod:`appliance.outbox.sqlite`) and its
disk budget (:mod:`appliance.outbox.budget`): see "On-disk format" in the storage module.

A record's id is ``priority << 48 | n`` (``n`` a counter of appends), so the rowid order is the
drain order (alerts, status, telemetry; oldest first) and a priority class is one id range.
"""

from __future__ import annotations

from appliance.contracts import Priority

CLASS_SHIFT = 48  # id = priority << 48 | n: rowid order is (priority, append order)
CLASSES = tuple(sorted(int(p) for p in Priority))

INSERT = (  # columns in OutboxRecord's field order: a record is its own parameter tuple
    "INSERT INTO records (id, stream, seq, topic, priority, payload, created, crc) "
    "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, crc32(?6))"
)
"""Insert a record; ``crc32`` (registered on the connection by the storage: ``zlib.crc32``)
checksums the payload as it is written."""


def class_range(priority: int) -> tuple[int, int]:
    """The half-open id range ``[lo, hi)`` of one priority class."""
    return priority << CLASS_SHIFT, (priority + 1) << CLASS_SHIFT
