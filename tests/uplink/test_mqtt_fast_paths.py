"""The uplink's per-message fast paths: properties packed once, batched hand-off from paho's
thread, the paho error line kept without formatting every packet's debug line."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest
from mqtt_helpers import APP, mqtt_cfg
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.outbox import SqliteOutbox
from appliance.uplink import MqttUplink
from appliance.uplink.mqtt import PackedProperties, _paho_logger


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
    logger = _paho_logger(lines.append)
    with caplog.at_level(logging.DEBUG):
        logger.log(logging.DEBUG, "Sending PUBLISH %s", "x")
        logger.log(logging.ERROR, "ssl error: %s", "bad certificate")
    assert lines == ["ssl error: bad certificate"]
    assert caplog.records == []


def test_calls_from_paho_s_thread_run_on_the_loop_in_order_with_one_wake_up_per_batch(
    tmp_path: Path,
) -> None:
    async def scenario() -> list[int]:
        ob = SqliteOutbox(str(tmp_path / "o.sqlite"), appliance_id=APP)
        uplink = MqttUplink(mqtt_cfg(1), APP, ob)
        uplink._loop = asyncio.get_running_loop()
        seen: list[int] = []
        wakeups = 0
        run = uplink._run_handoff

        def counting() -> None:
            nonlocal wakeups
            wakeups += 1
            run()

        uplink._run_handoff = counting  # type: ignore[method-assign]

        def paho_thread() -> None:
            for i in range(1000):
                uplink._to_loop(seen.append, i)

        t = threading.Thread(target=paho_thread)
        t.start()
        t.join()  # the loop is blocked meanwhile: every call waits in one batch
        for _ in range(3):
            await asyncio.sleep(0)
        assert wakeups == 1
        return seen

    assert asyncio.run(scenario()) == list(range(1000))
