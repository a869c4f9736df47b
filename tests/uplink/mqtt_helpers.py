"""Helpers shared by the uplink tests: a real paho subscriber, polling waits, envelopes, and a
throw-away PKI made with the ``openssl`` CLI (a CA, a server certificate for localhost /
127.0.0.1, a client certificate, and an unrelated CA)."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from appliance.config import MqttSection
from appliance.contracts import Envelope, Priority
from appliance.outbox import SqliteOutbox
from appliance.uplink import MqttUplink, alert_topic, telemetry_topic

APP = "app-01"
PREFIX = "edge"


class Subscriber:
    """A real paho client subscribed with QoS 1 that records what it receives.

    ``persistent`` uses a fixed client id, MQTT 5 ``clean_start=False`` and a session expiry,
    so the broker queues QoS 1 messages for it while it is away (or the broker restarts); paho
    reconnects it by itself (``loop_start``).
    """

    def __init__(
        self,
        port: int,
        topic: str,
        *,
        persistent: bool = False,
        username: str = "",
        password: str = "",
    ) -> None:
        self.port = port
        self.topic = topic
        self.persistent = persistent
        client_id = "sub-persistent" if persistent else f"sub-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.reconnect_delay_set(1, 1)
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self._lock = threading.Lock()
        self._messages: list[tuple[str, bytes, bool]] = []
        self._received: list[float] = []  # time.monotonic() of each message
        self._subscribed = threading.Event()

    def __enter__(self) -> Subscriber:
        props = None
        if self.persistent:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 300
        self.client.connect(
            "127.0.0.1", self.port, keepalive=5, clean_start=not self.persistent, properties=props
        )
        self.client.loop_start()
        if not self._subscribed.wait(5):
            raise TimeoutError("no SUBACK within 5 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(
        self, client: mqtt.Client, u: Any, flags: mqtt.ConnectFlags, rc: ReasonCode, p: Any
    ) -> None:
        if not flags.session_present:
            client.subscribe(self.topic, qos=1)
        else:
            self._subscribed.set()

    def _on_subscribe(self, client: mqtt.Client, u: Any, mid: int, rcs: Any, p: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._received.append(time.monotonic())

    def messages(self, topic_part: str = "") -> list[dict[str, Any]]:
        """Decoded payloads received so far (on topics containing ``topic_part``), in order."""
        with self._lock:
            got = list(self._messages)
        return [msgspec.json.decode(p) for t, p, _ in got if topic_part in t]

    def timed(self, topic_part: str = "") -> list[tuple[float, dict[str, Any]]]:
        """(monotonic receive time, decoded payload) of each message on matching topics."""
        with self._lock:
            got = list(zip(self._received, self._messages, strict=True))
        return [(t, msgspec.json.decode(m[1])) for t, m in got if topic_part in m[0]]

    def seqs(self, topic_part: str = "") -> list[int]:
        return [int(m["seq"]) for m in self.messages(topic_part)]


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll ``predicate`` on the event loop (letting the uplink run) until true or timeout."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.01)


class _AnyFloat:
    """Equal to any float (status timestamps)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, float)


ANY_FLOAT: Any = _AnyFloat()


def mqtt_cfg(port: int, **kw: Any) -> MqttSection:
    kw.setdefault("reconnect_min_s", 0.05)
    kw.setdefault("reconnect_max_s", 0.5)
    kw.setdefault("keepalive_s", 5)
    return MqttSection(host="127.0.0.1", port=port, topic_prefix=PREFIX, **kw)


def telemetry(machine: str = "cnc-1", i: int = 0) -> Envelope:
    return Envelope(
        stream=f"telemetry/{machine}",
        kind="telemetry",
        topic=telemetry_topic(PREFIX, APP, machine),
        priority=Priority.TELEMETRY,
        ts=1_700_000_000.0 + i,
        body={"i": i},
    )


def alert(machine: str = "cnc-1") -> Envelope:
    return Envelope(
        stream=f"alerts/{machine}",
        kind="alert",
        topic=alert_topic(PREFIX, APP, machine),
        priority=Priority.ALERT,
        ts=1_700_000_000.0,
        body={"rule": "overheat", "state": "raised"},
    )


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[SqliteOutbox]:
    ob = SqliteOutbox(str(tmp_path / "outbox.sqlite"), appliance_id=APP, synchronous="NORMAL")
    ob.open()
    try:
        yield ob
    finally:
        ob.close()


def run_with_uplink(
    uplink: MqttUplink, scenario: Callable[[MqttUplink], Awaitable[None]], stop_s: float = 5.0
) -> None:
    """Start the uplink, run ``scenario``, always stop the uplink (joining paho's thread)."""

    async def main() -> None:
        await uplink.start()
        try:
            await scenario(uplink)
        finally:
            await uplink.stop(drain_timeout_s=stop_s)

    asyncio.run(main())


def await_condition(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``predicate`` from plain (non-async) test code until true or timeout."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(0.01)


@dataclass(frozen=True)
class Pki:
    """Paths of a test PKI: ``ca`` signed ``server`` (SAN localhost, 127.0.0.1), ``client`` and
    ``misnamed`` (a server certificate for elsewhere.example only); ``other_ca`` signed nothing
    here."""

    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    misnamed_cert: Path
    misnamed_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _make_leaf(d: Path, name: str, ca: str, ext: str) -> None:
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        cwd=d,
    )  # fmt: skip


def make_pki(d: Path) -> Pki:
    """Create the test PKI under ``d`` (EC P-256 keys: fast to generate)."""
    d.mkdir(parents=True, exist_ok=True)
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _make_leaf(
        d,
        "server",
        "ca",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    _make_leaf(
        d,
        "misnamed",
        "ca",
        "subjectAltName=DNS:elsewhere.example\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    _make_leaf(
        d,
        "client",
        "ca",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=clientAuth\n",
    )
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return Pki(
        ca=d / "ca.crt",
        other_ca=d / "other-ca.crt",
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        client_cert=d / "client.crt",
        client_key=d / "client.key",
        misnamed_cert=d / "misnamed.crt",
        misnamed_key=d / "misnamed.key",
    )


def tls_listener_conf(
    port: int, pki: Pki, *, require_certificate: bool = False, misnamed: bool = False
) -> str:
    """Mosquitto config lines adding a TLS listener on ``port`` (127.0.0.1); ``misnamed`` serves
    the certificate issued for another host name."""
    lines = [
        f"listener {port} 127.0.0.1",
        f"cafile {pki.ca}",
        f"certfile {pki.misnamed_cert if misnamed else pki.server_cert}",
        f"keyfile {pki.misnamed_key if misnamed else pki.server_key}",
    ]
    if require_certificate:
        lines.append("require_certificate true")
    return "\n".join(lines) + "\n"
