"""MQTT 5 response topic and correlation data, MQTT 3.1.1, and refusals answered on the reply
topic, through a real Mosquitto."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import jsonschema
import paho.mqtt.client as mqtt
import pytest
from dlhelp import DownlinkCell
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client import CollectorRegistry, generate_latest

from appliance.api.metrics import ApplianceCollector
from appliance.downlink.client import CommandTimeout
from appliance.downlink.schemas import load_cmd_schema

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def _request_v5(
    cell: DownlinkCell, command: str, body: dict[str, Any], response_topic: str, listen: str
) -> tuple[dict[str, Any], bytes | None, str]:
    """Publish with a response topic and correlation data; the first message on ``listen``."""
    got: list[tuple[dict[str, Any], bytes | None, str]] = []
    done, subscribed = threading.Event(), threading.Event()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"v5-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5
    )

    def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        got.append((json.loads(msg.payload), corr, msg.topic))
        done.set()

    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect("127.0.0.1", cell.broker.port)
    client.loop_start()
    try:
        client.subscribe(listen, qos=1)
        assert subscribed.wait(10)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = response_topic
        props.CorrelationData = b"\x00corr-42"
        payload = json.dumps({"request_id": "v5-req-1", "body": body}).encode()
        client.publish(f"edge/dl/cmd/{command}", payload, qos=1, properties=props)
        assert done.wait(20), "no reply"
    finally:
        client.loop_stop()
        client.disconnect()
    return got[0]


def test_mqtt5_response_topic_and_correlation_data_are_honoured(
    downlink_cell: DownlinkCell,
) -> None:
    reply, corr, topic = _request_v5(
        downlink_cell, "status", {}, "ops/responses/console-1", "ops/responses/#"
    )
    assert topic == "ops/responses/console-1" and corr == b"\x00corr-42"
    assert reply["request_id"] == "v5-req-1" and reply["code"] == "ok"
    jsonschema.validate(reply, load_cmd_schema("reply"))


def test_a_refusal_also_goes_to_the_response_topic(downlink_cell: DownlinkCell) -> None:
    reply, corr, topic = _request_v5(
        downlink_cell, "alerts.ack", {"alert_id": 5}, "ops/responses/c2", "ops/responses/#"
    )
    assert topic == "ops/responses/c2" and corr == b"\x00corr-42"
    assert reply["code"] == "refused" and "alert_id" in reply["message"]


def test_a_response_topic_inside_the_appliances_own_topics_is_refused(
    downlink_cell: DownlinkCell,
) -> None:
    reply, corr, topic = _request_v5(
        downlink_cell, "status", {}, "edge/dl/telemetry/cnc-1", "edge/dl/reply/#"
    )
    assert topic == "edge/dl/reply/v5-req-1" and reply["code"] == "refused"
    assert corr == b"\x00corr-42"
    assert downlink_cell.stats()["downlink"]["refused"]["bad_response_topic"] == 1


def test_commands_work_over_mqtt_3_1_1(downlink_cell_factory: Any) -> None:
    cell: DownlinkCell = downlink_cell_factory(protocol="3.1.1")
    reply = cell.send("status", {}, protocol="3.1.1")
    assert reply["code"] == "ok" and reply["body"]["ready"] is True
    refused = cell.send("no.such.command", {}, protocol="3.1.1")
    assert refused["code"] == "refused" and "unknown command" in refused["message"]
    bad = cell.send("alerts.ack", {"alert_id": 5}, protocol="3.1.1")
    assert bad["code"] == "refused" and "alert_id" in bad["message"]
    refused_counts = cell.stats()["downlink"]["refused"]
    assert refused_counts["unknown_command"] == 1 and refused_counts["schema"] == 1
    registry = CollectorRegistry()
    registry.register(ApplianceCollector(cell.app, lambda: ({}, {})))
    text = cell.on_loop(lambda: generate_latest(registry).decode())
    assert 'appliance_downlink_refused_total{reason="unknown_command"} 1.0' in text
    assert 'appliance_downlink_commands_total{command="status"} 1.0' in text
    assert "appliance_downlink_connected 1.0" in text


def test_a_request_far_above_the_limit_never_reaches_the_appliance_over_mqtt5(
    downlink_cell: DownlinkCell,
) -> None:
    huge = b'{"request_id": "huge-1", "body": {"config": "' + b"x" * 1_200_000 + b'"}}'
    with pytest.raises(CommandTimeout):
        downlink_cell.send("config.apply", payload=huge, request_id="huge-1", timeout_s=3)
    big = b'{"request_id": "big-1", "body": {"config": "' + b"x" * 300_000 + b'"}}'
    reply = downlink_cell.send("config.apply", payload=big, request_id="big-1")
    assert reply["code"] == "refused" and "max_payload_bytes" in reply["message"]
    dl = downlink_cell.stats()["downlink"]
    assert dl["received"] == 1 and dl["refused"]["too_large"] == 1
    assert downlink_cell.send("status", {})["code"] == "ok"
