"""A demo/test MQTT subscriber: counts what arrives, checks sequence numbers, prints a live view.

It stands for the plant's dashboards and historians: it subscribes to everything one appliance
publishes, drops duplicates by ``(stream, epoch, seq)`` and records gaps, exactly as the topic
contract (docs/mqtt.md) tells subscribers to.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger(__name__)


@dataclass
class StreamState:
    last_seq: int = 0
    epoch: object = None  # a new outbox epoch starts the stream's sequence again
    received: int = 0
    duplicates: int = 0
    gaps: list[tuple[int, int]] = field(default_factory=list)  # (expected, got)


class DemoSubscriber:
    """Subscribes to ``{prefix}/{appliance_id}/#`` with a persistent session and QoS 1.

    Thread-safety: paho calls ``_on_message`` in its network thread; counters are read by other
    threads under ``lock``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str,
        appliance_id: str,
        *,
        client_id: str = "demo-subscriber",
        printer: Callable[[str], None] | None = None,
        print_every_s: float = 2.0,
    ) -> None:
        self.host, self.port = host, port
        self.topic = f"{prefix}/{appliance_id}/#"
        self.printer = printer
        self.print_every_s = print_every_s
        self.lock = threading.Lock()
        self.streams: dict[str, StreamState] = {}
        self.telemetry_messages = 0
        self.alerts_raised = 0
        self.alerts_cleared = 0
        self.status: str | None = None
        self.messages: list[dict[str, Any]] = []
        self.keep_messages = False
        self.bad_messages = 0
        self._latest: dict[str, dict[str, Any]] = {}
        self._last_print = 0.0
        self._connected = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(1, 2)

    def start(self, timeout_s: float = 10.0) -> None:
        self._client.connect_async(self.host, self.port, keepalive=30)
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            raise TimeoutError(f"subscriber could not connect to {self.host}:{self.port}")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            log.warning("subscriber: connect refused: %s", reason)
            return
        client.subscribe(self.topic, qos=1)
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            m = json.loads(msg.payload)
            kind = m["kind"]
        except (ValueError, KeyError, TypeError):
            with self.lock:
                self.bad_messages += 1
            return
        if kind == "status":
            with self.lock:
                self.status = m.get("state")
            return
        stream, seq = m.get("stream"), m.get("seq")
        with self.lock:
            st = self.streams.setdefault(str(stream), StreamState())
            if isinstance(seq, int):
                if m.get("epoch") != st.epoch:
                    st.epoch, st.last_seq = m.get("epoch"), 0
                if seq <= st.last_seq:
                    st.duplicates += 1
                    return
                first = seq  # a coarsened telemetry message covers first_seq..seq
                coarse = m.get("coarsened")
                if isinstance(coarse, dict) and isinstance(coarse.get("first_seq"), int):
                    first = coarse["first_seq"]
                if st.last_seq and first > st.last_seq + 1:
                    st.gaps.append((st.last_seq + 1, first))
                st.last_seq = seq
            st.received += 1
            if self.keep_messages:
                self.messages.append(m)
            if kind == "telemetry":
                self.telemetry_messages += 1
                self._latest[m["machine"]] = m
            elif kind == "alert":
                if m.get("state") == "raised":
                    self.alerts_raised += 1
                elif m.get("state") == "cleared":  # "updated" is neither
                    self.alerts_cleared += 1
        if self.printer is not None:
            if kind == "alert":
                self.printer(format_alert(m))
            elif kind == "telemetry":
                self._maybe_print_telemetry()

    def _maybe_print_telemetry(self) -> None:
        now = time.monotonic()
        with self.lock:
            if now - self._last_print < self.print_every_s or self.printer is None:
                return
            self._last_print = now
            latest = dict(sorted(self._latest.items()))
        parts = []
        for machine, m in latest.items():
            ch = m["channels"]
            parts.append(
                f"{machine} {_fmt(ch, 'spindle_speed', '.0f')}rpm "
                f"{_fmt(ch, 'spindle_temp', '.1f')}°C {_fmt(ch, 'vibration_rms', '.1f')}mm/s"
            )
        self.printer("telemetry  " + " | ".join(parts))

    def summary(self) -> dict[str, Any]:
        with self.lock:
            return {
                "telemetry_messages": self.telemetry_messages,
                "alerts_raised": self.alerts_raised,
                "alerts_cleared": self.alerts_cleared,
                "duplicates": sum(s.duplicates for s in self.streams.values()),
                "gaps": sum(len(s.gaps) for s in self.streams.values()),
                "bad_messages": self.bad_messages,
                "status": self.status,
                "streams": {
                    k: {"last_seq": v.last_seq, "received": v.received, "gaps": v.gaps}
                    for k, v in sorted(self.streams.items())
                },
            }


def _fmt(channels: dict[str, Any], name: str, spec: str) -> str:
    v = channels.get(name, {}).get("mean")
    return "  -  " if v is None else format(v, spec)


def format_alert(m: dict[str, Any]) -> str:
    what = m.get("channel") or "anomaly score"

    def num(key: str) -> str:
        x = m.get(key)
        return f"{x:.2f}" if isinstance(x, (int, float)) else "-"

    if m.get("state") == "raised":
        return (
            f"ALERT RAISED   {m['machine']} {m['rule']} ({m['severity']}): {what} = "
            f"{num('value')} > {num('threshold')}"
        )
    if m.get("state") == "updated":
        return (
            f"ALERT UPDATED  {m['machine']} {m['rule']} ({m['severity']}): {what} = "
            f"{num('value')} (peak {num('peak')})"
        )
    return (
        f"ALERT CLEARED  {m['machine']} {m['rule']}: {what} = {num('value')} "
        f"after {m.get('duration_s', 0):.0f} s (peak {num('peak')})"
    )
