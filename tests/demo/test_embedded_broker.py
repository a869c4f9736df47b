"""The demo's embedded broker (amqtt, from the ``demo`` extra) and how ``appliance demo`` picks it.

Real peers throughout: paho clients over TCP to the amqtt broker, and the demo as a user runs it
in a subprocess. Only the absence of Mosquitto or of amqtt is simulated, by making
``shutil.which`` miss ``mosquitto`` (it is installed in /usr/sbin here, which the lookup always
searches) and by blocking the ``amqtt`` import in that subprocess.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from appliance.demo.broker import INSTALL_HINT, BrokerUnavailable, EmbeddedBroker
from appliance.demo.mosquitto import free_port

N_MESSAGES = 2_000

# Runs the CLI as `appliance` does, on a machine where Mosquitto is not found (and, with
# `no-amqtt` as the first argument, where the `demo` extra is not installed either).
NO_MOSQUITTO_CLI = """\
import shutil, sys
which = shutil.which
shutil.which = lambda cmd, *a, **k: None if cmd == "mosquitto" else which(cmd, *a, **k)
if sys.argv[1] == "no-amqtt":
    sys.modules["amqtt"] = None  # `import amqtt...` now raises ImportError
from appliance.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _client(client_id: str, **kwargs: object) -> mqtt.Client:
    return mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, **kwargs
    )


def _relay(port: int, n: int) -> tuple[bool, list[int]]:
    """Publish ``n`` numbered QoS 1 messages through the broker on ``port`` to a QoS 1 subscriber;
    return whether every PUBLISH was acknowledged and the numbers the subscriber received."""
    received: list[int] = []
    all_in, subscribed = threading.Event(), threading.Event()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        received.append(int(msg.payload))
        if len(received) >= n:
            all_in.set()

    sub = _client("test-sub", clean_session=False)
    sub.on_message = on_message
    sub.on_connect = lambda c, u, f, r, p: c.subscribe("relay/#", qos=1)
    sub.on_subscribe = lambda *_: subscribed.set()
    pub = _client("test-pub")
    pub.max_inflight_messages_set(100)
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    try:
        assert subscribed.wait(10), "the subscriber got no SUBACK"
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        infos = [pub.publish("relay/x", str(i).encode(), qos=1) for i in range(n)]
        for info in infos:
            info.wait_for_publish(30)
        acked = all(info.is_published() for info in infos)
        all_in.wait(30)
        pub.disconnect()
        pub.loop_stop()
    finally:
        sub.disconnect()
        sub.loop_stop()
    return acked, received


def test_qos1_messages_pass_through_in_order_and_stop_releases_the_port() -> None:
    port = free_port()

    async def scenario() -> tuple[bool, list[int]]:
        broker = EmbeddedBroker("127.0.0.1", port)
        await broker.start()
        try:
            return await asyncio.to_thread(_relay, port, N_MESSAGES)
        finally:
            await broker.stop()
            await broker.stop()  # idempotent

    acked, received = asyncio.run(scenario())
    assert acked
    assert received == list(range(N_MESSAGES))
    # SO_REUSEADDR lets closed connections in TIME_WAIT be, but a listener still open on the
    # port makes bind() fail (Linux).
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def _away_and_back(port: int, n: int) -> list[int]:
    """Subscribe with a persistent session, go away, let ``n`` QoS 1 messages be published, come
    back without subscribing again; return the numbers delivered within 10 s."""
    received: list[int] = []
    all_in, subscribed = threading.Event(), threading.Event()

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        received.append(int(msg.payload))
        if len(received) >= n:
            all_in.set()

    sub = _client("test-away", clean_session=False)
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    sub.subscribe("away/#", qos=1)
    assert subscribed.wait(10), "the subscriber got no SUBACK"
    sub.disconnect()
    sub.loop_stop()
    pub = _client("test-pub")
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    infos = [pub.publish("away/x", str(i).encode(), qos=1) for i in range(n)]
    for info in infos:
        info.wait_for_publish(30)
    pub.disconnect()
    pub.loop_stop()
    back = _client("test-away", clean_session=False)
    back.on_message = on_message
    back.connect("127.0.0.1", port)
    back.loop_start()
    all_in.wait(10)
    back.disconnect()
    back.loop_stop()
    return received


def test_a_persistent_session_gets_what_was_published_while_it_was_away() -> None:
    """As on Mosquitto; amqtt's own anonymous access would drop the session at disconnect."""
    port = free_port()

    async def scenario() -> list[int]:
        broker = EmbeddedBroker("127.0.0.1", port)
        await broker.start()
        try:
            return await asyncio.to_thread(_away_and_back, port, 200)
        finally:
            await broker.stop()

    assert asyncio.run(scenario()) == list(range(200))


def test_start_on_a_taken_port_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BrokerUnavailable, match=f"could not listen on 127.0.0.1:{port}"):
            asyncio.run(EmbeddedBroker("127.0.0.1", port).start())


def test_demo_without_mosquitto_or_the_demo_extra_says_how_to_install_it() -> None:
    res = subprocess.run(
        [sys.executable, "-c", NO_MOSQUITTO_CLI, "no-amqtt", "demo", "--duration", "5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert "amqtt" in res.stderr and INSTALL_HINT in res.stderr


@pytest.mark.slow
def test_demo_without_mosquitto_runs_on_the_embedded_broker(tmp_path: Path) -> None:
    summary = tmp_path / "s.json"
    args = ["demo", "--broker", "auto", "--duration", "4", "--machines", "1", "--quiet"]
    res = subprocess.run(
        [sys.executable, "-c", NO_MOSQUITTO_CLI, "-", *args, "--summary-json", str(summary)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    s = json.loads(summary.read_text())
    assert s["broker"] == "embedded"
    assert s["telemetry_messages"] >= 1 and s["subscriber"]["gaps"] == 0
