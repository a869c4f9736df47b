"""The uplink's per-message fast paths: properties packed once, paho on the event loop's thread
(no network thread of its own), the paho error line kept without formatting every packet's
debug line."""

from __future__ import annotations

import asyncio
import logging
import threading
from itertools import pairwise
from typing import Any

import pytest
from conftest import Mosquitto
from mqtt_helpers import APP, eventually, mqtt_cfg, outbox, run_with_uplink, telemetry
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.outbox import SqliteOutbox
from appliance.uplink import MqttUplink
from appliance.uplink.delivery import PUBLISH_CHUNK
from appliance.uplink.paho_loop import PackedProperties, paho_logger

__all__ = ["outbox"]  # the fixture, imported for pytest


def test_packed_properties_are_the_same_bytes_as_paho_packs_and_are_frozen() -> None:
    ref = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    ref.PayloadFormatIndicator = 1
    ref.ContentType = "application/json"
    packed = PackedProperties(
        PacketTypes.PUBLISH, PayloadFormatIndicator=1, ContentType="application/json"
    )
    assert packed.pack() == ref.pack()  # type: ignore[no-untyped-call]
    assert str(packed) == str(ref)
    assert packed.ContentType == "application/json"  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="frozen"):
        packed.ContentType = "text/plain"
    assert packed.pack() == ref.pack()  # type: ignore[no-untyped-call]


def test_the_paho_logger_keeps_error_lines_only_and_stays_out_of_the_logging_tree(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lines: list[str] = []
    logger = paho_logger(lines.append)
    with caplog.at_level(logging.DEBUG):
        logger.log(logging.DEBUG, "Sending PUBLISH %s", "x")
        logger.log(logging.ERROR, "ssl error: %s", "bad certificate")
    assert lines == ["ssl error: bad certificate"]
    assert caplog.records == []


def test_paho_runs_on_the_event_loop_thread_without_a_network_thread_of_its_own(
    mosquitto: Mosquitto, outbox: SqliteOutbox
) -> None:
    """No paho thread competes with the loop for the GIL: CONNACK and PUBACK callbacks run on
    the loop's thread, and only the connection attempt borrows a worker thread."""
    uplink = MqttUplink(mqtt_cfg(mosquitto.port), APP, outbox)
    callback_threads: set[int] = set()
    real_connect, real_publish = uplink._on_connect, uplink._on_publish

    def on_connect(*args: Any) -> None:
        callback_threads.add(threading.get_ident())
        real_connect(*args)

    def on_publish(*args: Any) -> None:
        callback_threads.add(threading.get_ident())
        real_publish(*args)

    uplink._on_connect = on_connect  # type: ignore[method-assign,assignment]
    uplink._on_publish = on_publish  # type: ignore[method-assign,assignment]
    paho_threads: list[str] = []

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: up.connected)
        outbox.append([telemetry(i=i) for i in range(50)])
        up.notify()
        await eventually(lambda: outbox.pending == 0)
        paho_threads.extend(t.name for t in threading.enumerate() if "paho" in t.name)

    loop_thread = threading.get_ident()  # asyncio.run runs the loop on this thread
    run_with_uplink(uplink, scenario)
    assert callback_threads == {loop_thread}
    assert paho_threads == []
    assert uplink.stats()["published"] == 50


def test_a_large_backlog_is_published_in_chunks_with_the_loop_free_between_them(
    mosquitto: Mosquitto, outbox: SqliteOutbox
) -> None:
    """100 machines' telemetry of one window close is not published in one pass (3.5-6 ms of
    the loop at issue 11's load): the publisher takes PUBLISH_CHUNK records, publishes them,
    yields, and goes on; a task on the loop runs between any two chunks."""
    uplink = MqttUplink(mqtt_cfg(mosquitto.port, max_inflight=200), APP, outbox)
    ticks = [0]
    at_take: list[tuple[int, int]] = []
    real_take = outbox.take

    def take(limit: int, exclude: Any = ()) -> Any:
        at_take.append((limit, ticks[0]))
        return real_take(limit, exclude)

    outbox.take = take  # type: ignore[method-assign]

    async def ticker() -> None:
        while True:
            await asyncio.sleep(0)
            ticks[0] += 1

    async def scenario(up: MqttUplink) -> None:
        await eventually(lambda: up.connected)
        task = asyncio.create_task(ticker())
        at_take.clear()
        outbox.append([telemetry(machine=f"cnc-{i}") for i in range(100)])
        up.notify()
        await eventually(lambda: outbox.pending == 0)
        task.cancel()

    run_with_uplink(uplink, scenario)
    chunks = [t for t in at_take if t[0] == PUBLISH_CHUNK]
    assert len(chunks) >= 100 // PUBLISH_CHUNK
    assert all(limit <= PUBLISH_CHUNK for limit, _ in at_take)
    ticks_at = [t for _, t in at_take]
    assert all(b > a for a, b in pairwise(ticks_at))  # the loop ran between any two takes
