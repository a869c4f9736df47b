"""Bandwidth accounting: the bytes the appliance sends upstream versus the bytes of the naive
alternative, one JSON message per raw sample.

``raw_json_bytes`` counts, for every acquired sample, the size of the message that would carry
it alone in the appliance's own payload format (:func:`appliance.payload.encode_payload`: the
common header plus ``machine``, ``channel``, ``value``), sized with the channel's newest value,
re-measured every :data:`RESIZE_EVERY` frames of a device (an encode per channel then, not per
sample: the size varies with the value's digits by a few bytes at most). ``published_bytes``
counts the payload bytes of every message stored in the outbox for publishing (telemetry,
alerts, data-quality events); once the outbox has drained, every one of them has been
published. MQTT packet overhead is in neither figure. ``reduction`` is
``1 - published / raw`` (a fraction; 0.99 = 99 % fewer bytes).

Called on the event loop (frames from acquisition, records from the supervisor's append).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from appliance.contracts import Envelope, Frame, OutboxRecord, Priority
from appliance.payload import encode_payload

RESIZE_EVERY = 32
"""Frames of a device between two measurements of its per-sample message sizes."""


class BandwidthMeter:
    """Per machine and total: published payload bytes and one-message-per-sample bytes."""

    def __init__(self, appliance_id: str) -> None:
        self.appliance_id = appliance_id
        self.raw_json_bytes: dict[str, int] = {}
        self.raw_samples: dict[str, int] = {}
        self.published_bytes: dict[str, int] = {}
        self._seq: dict[str, int] = {}
        self._sizes: dict[str, tuple[int, npt.NDArray[np.int64]]] = {}  # frames, size per ch

    def on_frame(self, frame: Frame) -> None:
        """Count the frame's samples as one JSON message each."""
        n = len(frame.value)
        if not n:
            return
        machine = frame.device
        counts = np.bincount(frame.channel, minlength=len(frame.channels))
        seq = self._seq.get(machine, 0) + n
        self._seq[machine] = seq
        frames, sizes = self._sizes.get(machine, (0, np.zeros(0, np.int64)))
        if len(sizes) != len(counts):
            frames, sizes = 0, np.zeros(len(counts), np.int64)
        missing = (counts > 0) & (sizes == 0)
        if frames % RESIZE_EVERY == 0 or missing.any():
            self._measure(frame, counts, sizes, seq)
        self._sizes[machine] = (frames + 1, sizes)
        total = int(counts @ sizes)
        self.raw_json_bytes[machine] = self.raw_json_bytes.get(machine, 0) + total
        self.raw_samples[machine] = self.raw_samples.get(machine, 0) + n

    def _measure(
        self, frame: Frame, counts: npt.NDArray[np.int64], sizes: npt.NDArray[np.int64], seq: int
    ) -> None:
        machine = frame.device
        for ch in np.flatnonzero(counts).tolist():
            last = int(np.flatnonzero(frame.channel == ch)[-1])
            env = Envelope(
                stream=f"samples/{machine}",
                kind="sample",
                topic="",
                priority=Priority.TELEMETRY,
                ts=float(frame.ts[last]),
                body={
                    "machine": machine,
                    "channel": frame.channels[ch],
                    "value": float(frame.value[last]),
                },
            )
            sizes[ch] = len(encode_payload(self.appliance_id, env, seq))

    def on_records(self, records: Sequence[OutboxRecord]) -> None:
        """Count the payloads of records stored for publishing (stream ``<kind>/<machine>``)."""
        for rec in records:
            machine = rec.stream.split("/", 1)[-1]
            self.published_bytes[machine] = self.published_bytes.get(machine, 0) + len(rec.payload)

    def stats(self) -> dict[str, Any]:
        """``published_bytes``, ``raw_json_bytes``, ``reduction`` in total and per machine."""
        machines = sorted(set(self.raw_json_bytes) | set(self.published_bytes))
        per = {
            m: _figures(self.published_bytes.get(m, 0), self.raw_json_bytes.get(m, 0))
            for m in machines
        }
        total = _figures(sum(self.published_bytes.values()), sum(self.raw_json_bytes.values()))
        return {**total, "raw_samples": sum(self.raw_samples.values()), "machines": per}


def _figures(published: int, raw: int) -> dict[str, Any]:
    return {
        "published_bytes": published,
        "raw_json_bytes": raw,
        "reduction": (1.0 - published / raw) if raw else None,
    }
