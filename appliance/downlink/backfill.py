"""``backfill``: re-publish the delivered telemetry of a time range still held on disk (issue 16).

Request body (``appliance/schemas/cmd/backfill.request.json``)::

    {"from": 1795000000.0, "to": 1795000600.0, "machines": ["cnc-1"], "streams": [...]}

``from``/``to`` bound the windows' event time ``ts`` (seconds since the UNIX epoch, inclusive);
``machines`` and ``streams`` (``telemetry/<machine>``) narrow it (both given: either matches).
It needs ``outbox.keep_delivered_s`` > 0: the outbox then keeps every delivered telemetry
record that long instead of deleting it at its PUBACK.

The matching records are queued in the outbox, in transactions of
:data:`~appliance.outbox.sqlite.BACKFILL_CHUNK` records with the event loop free between
them (:meth:`~appliance.outbox.SqliteOutbox.requeue_delivered`), as
:attr:`~appliance.contracts.Priority.BACKFILL` records: byte for byte the stored payloads (same
``id``, ``seq``, ``epoch``), which the uplink publishes after every live record, flagged
``"historical": true``, at most ``mqtt.backfill_rate_per_s`` per second. So live telemetry and
alerts are never delayed behind a backfill, and a backfill still queued at a restart is sent
after it. The reply is ``accepted`` with ``queued`` (the count) as soon as they are queued; the
uplink's ``backfilled`` counter shows the progress. ``refused`` (counted, nothing queued): a
bad range (``from`` > ``to``, not finite), retention off, or nothing stored in the range; every
refusal says what is held (``held``: ``records``, ``oldest_ts``, ``newest_ts``).
One request queues at most :data:`MAX_RECORDS` records (the oldest of the range; ``truncated``
says so: ask again for the rest).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from typing import Any

from appliance.downlink.base import CommandContext, Handler, Reply, Request
from appliance.outbox.sqlite import BACKFILL_CHUNK

log = logging.getLogger(__name__)

MAX_RECORDS = 50_000
"""Records one ``backfill`` request queues at most (the oldest of its range)."""

COUNTERS: Counter[str] = Counter()
"""Outcomes since the process started: ``accepted``, ``queued`` (records), ``refused`` and
``refused_<reason>`` (``bad_request``, ``retention_off``, ``nothing_stored``)."""


def stats() -> dict[str, int]:
    """A copy of :data:`COUNTERS`."""
    return dict(COUNTERS)


def _refused(reason: str, message: str, body: dict[str, Any] | None = None) -> Reply:
    COUNTERS["refused"] += 1
    COUNTERS[f"refused_{reason}"] += 1
    log.info("backfill refused: %s", message)
    return Reply("refused", message, {"reason": reason, **(body or {})})


def _time(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _names(value: Any) -> list[str] | None:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        return None
    return list(value)


async def backfill(ctx: CommandContext, request: Request) -> Reply:
    """Handle ``backfill`` (see the module docstring)."""
    body = request.body if isinstance(request.body, dict) else {}
    start, end = _time(body.get("from")), _time(body.get("to"))
    machines, streams = _names(body.get("machines")), _names(body.get("streams"))
    outbox = ctx.appliance.outbox
    held = outbox.delivered_summary()
    if start is None or end is None:
        return _refused(
            "bad_request",
            "`from` and `to` must be finite numbers (epoch seconds)",
            {"held": held},
        )
    if start > end:
        return _refused("bad_request", f"`from` ({start}) is after `to` ({end})", {"held": held})
    if machines is None or streams is None:
        return _refused(
            "bad_request", "`machines` and `streams` must be lists of names", {"held": held}
        )
    if held["keep_delivered_s"] <= 0:
        return _refused(
            "retention_off",
            "delivered telemetry is not kept (outbox.keep_delivered_s = 0): nothing to backfill",
            {"held": held},
        )
    wanted = set(streams) | {f"telemetry/{m}" for m in machines}
    n = 0
    cursor: tuple[float, int] | None = None
    while True:  # in chunks, the loop free in between (acquisition keeps polling)
        queued, cursor = outbox.requeue_delivered(
            start, end, wanted or None, limit=min(BACKFILL_CHUNK, MAX_RECORDS - n), after=cursor
        )
        n += queued
        if queued:
            ctx.appliance.uplink.notify()
        if cursor is None or n >= MAX_RECORDS:
            break
        await asyncio.sleep(0)
    truncated = cursor is not None
    if not n:
        return _refused(
            "nothing_stored",
            f"no delivered telemetry held for {start}..{end}"
            + (f" of {sorted(wanted)}" if wanted else "")
            + f"; held: {held['records']} record(s) from {held['oldest_ts']} to "
            f"{held['newest_ts']}",
            {"held": held},
        )
    COUNTERS["accepted"] += 1
    COUNTERS["queued"] += n
    reply: dict[str, Any] = {"queued": n, "from": start, "to": end, "truncated": truncated}
    if wanted:
        reply["streams"] = sorted(wanted)
    log.info(
        "backfill request %s: %d telemetry record(s) of %s..%s queued%s",
        request.request_id,
        n,
        start,
        end,
        " (truncated)" if truncated else "",
    )
    return Reply("accepted", f"{n} telemetry record(s) queued for re-publishing", reply)


COMMANDS: dict[str, Handler] = {"backfill": backfill}
