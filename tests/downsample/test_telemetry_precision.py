"""Telemetry statistics reach subscribers with every significant digit (issue 9, defect 2).

Small-magnitude channels (drive output power around 1e-6..1e-4 W) used to arrive rounded to 6
decimals (`3e-06`, `-0.0`). The payload now carries the shortest decimal that reads back as the
same float64, both in the downsampler's messages and in coarsened (merged) ones.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest

from appliance.contracts import Envelope, Window
from appliance.downsample import TelemetryDownsampler
from appliance.outbox import coarsen
from appliance.payload import encode_payload

VALUES = [3e-06, -1.234567e-05, 1e-9, 123456.789, 0.1 + 0.2, -2.5e-30]


def one_window(values: Sequence[float]) -> Window:
    a = np.array(values, dtype=np.float64)
    return Window(
        machine="m",
        start=0.0,
        end=1.0,
        channels=tuple(f"c{i}" for i in range(len(values))),
        count=np.full(len(values), 5, dtype=np.int32),
        mean=a,
        rms=np.abs(a),
        min=a,
        max=a,
        last=a,
    )


def test_telemetry_payload_round_trips_every_statistic_exactly() -> None:
    sent: list[Envelope] = []
    TelemetryDownsampler(("mean", "rms", "min", "max", "last"), sent.extend, lambda m: f"t/{m}")(
        one_window(VALUES)
    )
    msg = json.loads(encode_payload("app", sent[0], 1))
    for i, v in enumerate(VALUES):
        entry = msg["channels"][f"c{i}"]
        assert entry["mean"] == v and entry["min"] == v and entry["last"] == v
        assert entry["rms"] == abs(v)


def test_float32_samples_arrive_as_their_float64_value() -> None:
    v = float(np.float32(-1.234567e-05))  # what a float32 register decodes to
    sent: list[Envelope] = []
    TelemetryDownsampler(("mean",), sent.extend, lambda m: m)(one_window([v]))
    assert json.loads(encode_payload("app", sent[0], 1))["channels"]["c0"]["mean"] == v
    assert np.float32(v) == np.float32(-1.234567e-05)


@pytest.mark.parametrize("v", VALUES)
def test_merged_statistics_are_not_rounded_to_fixed_decimals(v: float) -> None:
    def msg(seq: int) -> dict[str, object]:
        entry = {"n": 4, "mean": v, "rms": abs(v), "min": v, "max": v, "last": v}
        return {
            "v": 1,
            "kind": "telemetry",
            "appliance": "app",
            "stream": "telemetry/m",
            "seq": seq,
            "id": f"app/telemetry/m/{seq}",
            "ts": float(seq),
            "machine": "m",
            "window": {"start": seq - 1.0, "end": float(seq)},
            "channels": {"c": entry},
        }

    merged = json.loads(json.dumps(coarsen.merge([msg(1), msg(2)])))["channels"]["c"]
    assert merged["mean"] == pytest.approx(v, rel=1e-15, abs=0)
    assert merged["rms"] == pytest.approx(abs(v), rel=1e-15, abs=0)
    assert merged["min"] == v and merged["max"] == v and merged["last"] == v
