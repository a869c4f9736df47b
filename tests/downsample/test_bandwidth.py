"""Bandwidth accounting: raw samples counted as one JSON message each, published payload
bytes per machine, the reduction as a fraction."""

from __future__ import annotations

import numpy as np

from appliance.contracts import Envelope, Frame, OutboxRecord, Priority
from appliance.downsample import BandwidthMeter
from appliance.payload import encode_payload


def test_raw_bytes_are_one_payload_per_sample_and_reduction_compares_published() -> None:
    meter = BandwidthMeter("cell")
    frame = Frame(
        "m1",
        ("a", "b"),
        np.array([1.5, 1.5, 1.5]),
        np.array([0, 1, 1], np.int32),
        np.array([2.0, 3.0, 4.0]),
        np.zeros(3, np.uint8),
    )
    meter.on_frame(frame)

    def one(ch: str, v: float) -> int:
        body = {"machine": "m1", "channel": ch, "value": v}
        env = Envelope("samples/m1", "sample", "", Priority.TELEMETRY, 1.5, body)
        return len(encode_payload("cell", env, 3))

    raw = one("a", 2.0) + 2 * one("b", 4.0)
    meter.on_records([OutboxRecord(1, "telemetry/m1", 1, "t", 2, b"x" * 50, 0.0)])
    stats = meter.stats()
    assert stats["raw_json_bytes"] == raw and stats["published_bytes"] == 50
    assert stats["reduction"] == 1 - 50 / raw
    assert stats["machines"]["m1"]["raw_json_bytes"] == raw and stats["raw_samples"] == 3
