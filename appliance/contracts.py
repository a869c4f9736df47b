"""The data that flows between stages, and the interfaces stages implement.

Stages import this module, never each other. Data flow (one asyncio process)::

    acquire ──Frame──▶ features ──FeatureRow──▶ batch ──ndarray──▶ infer ──Score──▶ alerts
                          │                                                          │
                          └──Window──▶ downsample ──Envelope──▶ outbox ◀──Envelope───┘
                                                                  │
                                                                uplink

Threading: every stage runs on the event loop except the engine (one worker thread, called by the
batcher through ``run_in_executor``). The MQTT client runs on the loop as well; only its
connection attempts (DNS, TCP, TLS handshake) borrow a worker thread.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


class Quality(enum.IntEnum):
    """Quality flag carried by every acquired value instead of silently dropping it."""

    GOOD = 0
    STALE = 1  # the last good value repeated because this poll failed
    BAD = 2  # the device answered with garbage or an exception for this value


@dataclass(frozen=True, slots=True)
class Frame:
    """One poll of one device, columnar: ``n`` values of the device's channels.

    ``channel[i]`` indexes ``channels`` (the device's channel names: one tuple per device, shared
    by all its frames, never copied). A frame may carry a subset of the channels (one poll group)
    and several samples of one channel (a waveform block), each with its own ``ts``: wall-clock
    seconds (UNIX epoch, float64) at which the value was read or, for waveforms, sampled.
    """

    device: str
    channels: tuple[str, ...]
    ts: F64
    channel: npt.NDArray[np.int32]
    value: F64
    quality: npt.NDArray[np.uint8]


@dataclass(frozen=True, slots=True)
class Window:
    """Per-channel statistics of one machine over ``[start, end)`` (seconds, epoch).

    Arrays are aligned with ``channels``. ``count[i] == 0`` means no good sample of channel i
    arrived in the window; its statistics are NaN.
    """

    machine: str
    start: float
    end: float
    channels: tuple[str, ...]
    count: npt.NDArray[np.int32]
    mean: F64
    rms: F64
    min: F64
    max: F64
    last: F64


@dataclass(frozen=True, slots=True)
class FeatureRow:
    """Model input for one machine window; the vector layout is the model manifest's."""

    machine: str
    window_end: float
    vector: F32


@dataclass(frozen=True, slots=True)
class Score:
    """Model output for one :class:`FeatureRow`."""

    machine: str
    window_end: float
    score: float
    engine: str


class Priority(enum.IntEnum):
    """Outbox priority class: lower drains first and is evicted last."""

    ALERT = 0
    STATUS = 1
    TELEMETRY = 2


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message bound upstream, before the outbox gives it a stream sequence number.

    ``stream`` orders messages (e.g. ``telemetry/cnc-1``); ``kind`` names the JSON Schema of
    ``body``; ``ts`` is the event time in seconds (epoch).
    """

    stream: str
    kind: str
    topic: str
    priority: Priority
    ts: float
    body: dict[str, Any] = field(default_factory=dict)


class OutboxRecord(NamedTuple):
    """An envelope as stored: ``payload`` is the final encoded message (it carries ``seq``).

    A named tuple, so that the outbox inserts it as it is (one object per record on the
    append path, which runs at ~1e5 records/s).
    """

    id: int
    stream: str
    seq: int
    topic: str
    priority: int
    payload: bytes
    created: float


class EnvelopeSink(Protocol):
    """Anything that accepts envelopes bound upstream (the outbox).

    Called on the event loop. ``append`` returns once the envelopes are durable per the sink's
    documented loss window; it never drops silently (overflow follows the sink's eviction policy,
    counted in its metrics).
    """

    def append(self, envelopes: Sequence[Envelope]) -> object: ...


class FrameSink(Protocol):
    """Consumer of acquired frames (features, raw-value alert rules). Called on the event loop;
    must not block (no I/O)."""

    def on_frame(self, frame: Frame) -> None: ...


class WindowSink(Protocol):
    """Consumer of closed windows (downsample, features → batcher), called as ``sink(window)``
    on the event loop."""

    def __call__(self, window: Window) -> None: ...


class ScoreSink(Protocol):
    """Consumer of model scores (alerts). Called on the event loop, one call per scored batch."""

    def on_scores(self, scores: ScoreBatch) -> None: ...


@dataclass(frozen=True, slots=True)
class ScoreBatch:
    """Model output for one batch of :class:`FeatureRow` s, columnar (the batcher's output).

    Arrays are aligned with ``machines``: row ``i`` scores the window of ``machines[i]`` that
    ended at ``window_end[i]`` (seconds, epoch). ``backend`` names the engine that scored the
    whole batch (``onnxruntime-cpu``, ``tensorrt``, ...). Built by the batcher on the event
    loop; never mutated afterwards.
    """

    machines: tuple[str, ...]
    window_end: F64
    score: F32
    backend: str

    def __len__(self) -> int:
        return len(self.machines)
