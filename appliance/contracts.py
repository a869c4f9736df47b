"""The data that flows between stages, and the interfaces stages implement.

Stages import this module, never each other (``tests/test_import_graph.py`` checks it); the
supervisor (``appliance/runtime``) wires them. The payload format of stored messages lives
next to it in :mod:`appliance.payload`. Data flow (one asyncio process)::

    acquire ──Frame──▶ features ──FeatureRow──▶ batch ──ndarray──▶ infer ──ScoreBatch──▶ alerts
                          │                                                          │
                          └──Window──▶ downsample ──Envelope──▶ outbox ◀──Envelope───┘
                                                                  │
                                                                uplink

Threading: every stage runs on the event loop except the engine (the batcher's one inference
worker thread; a better backend may be built in a background thread and swapped in between two
batches). The MQTT client runs on the loop as well; only its
connection attempts (DNS, TCP, TLS handshake) borrow a worker thread.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from drivers.quality import ReadResult

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


class Priority(enum.IntEnum):
    """Outbox priority class: lower drains first and is evicted last."""

    ALERT = 0
    STATUS = 1
    TELEMETRY = 2
    BACKFILL = 3
    """Delivered telemetry queued again by the ``backfill`` command (the outbox's
    ``requeue_delivered``): drained after all live records, at ``mqtt.backfill_rate_per_s``,
    always flagged ``historical``. Producers never append it."""


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


FrameSink = Callable[[Frame], None]
"""Consumer of acquired frames (features, raw-value alert rules), called as ``sink(frame)`` by
the acquisition tasks on the event loop, once per poll of one poll group or per waveform read.
Must not block (no I/O); an exception stops that device's poller (and is logged)."""

WindowSink = Callable[[Window], None]
"""Consumer of closed windows (downsample, features → batcher), called as ``sink(window)`` by
``WindowAggregator`` on the event loop, once per machine window, in window order."""


@dataclass(frozen=True)
class FeatureSpec:
    """One model input: statistic ``stat`` (one of :data:`FEATURE_STATS`) of a channel over a
    window. Written in a model bundle's manifest (``infer``), laid out by ``features``."""

    channel: str
    stat: str


FEATURE_STATS = ("mean", "rms", "min", "max", "last")
"""The per-channel window statistics a :class:`FeatureSpec` may name (fields of :class:`Window`)."""

SAMPLE_FEATURE_STATS = (
    *FEATURE_STATS,
    "std",
    "p2p",
    "skew",
    "kurtosis",
    "crest",
    "slope",
    "dom_freq",
    "centroid",
    "order1_frac",
    "nonharmonic_frac",
)
"""Statistics computed from a window's raw samples (``appliance.features.extract``); also
``band:LO-HI`` (mean-square in the band LO..HI Hz, dB) and ``order_frac:K`` (share of the power
at K times the rotation frequency). A manifest naming any statistic outside
:data:`FEATURE_STATS` is served from raw samples."""


def is_sample_feature_stat(stat: str) -> bool:
    """Whether ``stat`` is one of :data:`SAMPLE_FEATURE_STATS`, a well-formed ``band:LO-HI``
    or ``order_frac:K`` (K a positive rotation order, e.g. a bearing's ``order_frac:3.58``)."""
    if stat in SAMPLE_FEATURE_STATS:
        return True
    if stat.startswith("spectrogram("):
        return parse_spectrogram_stat(stat) is not None
    if stat.startswith("order_frac:"):
        try:
            k = float(stat[11:])
        except ValueError:
            return False
        return 0.0 < k < float("inf")
    if not stat.startswith("band:"):
        return False
    lo, sep, hi = stat[5:].partition("-")
    try:
        return bool(sep) and 0.0 <= float(lo) < float(hi)
    except ValueError:
        return False


@dataclass(frozen=True)
class SpectrogramSpec:
    """A log-spectrogram image of a waveform channel as model input (``appliance.features.
    spectrogram`` computes it). One manifest entry ``{"channel": ..., "stat": "spectrogram",
    "shape": [height, width], "nperseg", "hop", "rate_hz", "min_samples", "offset_db",
    "scale_db"}`` stands for ``height × width`` feature columns (row-major, row 0 = lowest
    frequency), each a :class:`FeatureSpec` whose ``stat`` is :meth:`stat` of its index."""

    height: int  # frequency rows, 0 … rate_hz / 2
    width: int  # time columns across the window
    nperseg: int  # STFT segment length (samples, Hann window)
    hop: int  # samples between segment starts
    rate_hz: float  # the waveform's sample rate the image is made for (±2 %)
    min_samples: int  # fewer samples in a window: not scored (incomplete)
    offset_db: float  # normalised pixel = (dB − offset_db) / scale_db
    scale_db: float

    def __post_init__(self) -> None:
        if not (self.height > 0 and self.width > 0 and self.hop > 0 and self.nperseg >= 4):
            raise ValueError("shape, nperseg (≥ 4) and hop must be positive")
        if not (self.rate_hz > 0 and self.scale_db > 0 and np.isfinite(self.offset_db)):
            raise ValueError("rate_hz and scale_db must be > 0 and offset_db finite")
        if self.min_samples < self.nperseg:
            raise ValueError(f"min_samples {self.min_samples} < nperseg {self.nperseg}")

    @property
    def size(self) -> int:
        return self.height * self.width

    def stat(self, index: int) -> str:
        """The :class:`FeatureSpec` statistic of pixel ``index`` (row-major)."""
        return (
            f"spectrogram({self.height}x{self.width},nperseg={self.nperseg},hop={self.hop},"
            f"rate_hz={self.rate_hz!r},min_samples={self.min_samples},"
            f"offset_db={self.offset_db!r},scale_db={self.scale_db!r})[{index}]"
        )

    def columns(self, channel: str) -> tuple[FeatureSpec, ...]:
        return tuple(FeatureSpec(channel, self.stat(k)) for k in range(self.size))

    def manifest_entry(self, channel: str) -> dict[str, Any]:
        return {
            "channel": channel,
            "stat": "spectrogram",
            "shape": [self.height, self.width],
            "nperseg": self.nperseg,
            "hop": self.hop,
            "rate_hz": self.rate_hz,
            "min_samples": self.min_samples,
            "offset_db": self.offset_db,
            "scale_db": self.scale_db,
        }

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> SpectrogramSpec:
        """From a manifest entry; ``KeyError``/``ValueError``/``TypeError`` when malformed."""
        h, w = entry["shape"]
        return cls(
            height=int(h),
            width=int(w),
            nperseg=int(entry["nperseg"]),
            hop=int(entry["hop"]),
            rate_hz=float(entry["rate_hz"]),
            min_samples=int(entry.get("min_samples", entry["nperseg"])),
            offset_db=float(entry["offset_db"]),
            scale_db=float(entry["scale_db"]),
        )


def parse_spectrogram_stat(stat: str) -> tuple[SpectrogramSpec, int] | None:
    """``(spec, pixel index)`` of a :meth:`SpectrogramSpec.stat` string; None if it is not one."""
    head, sep, tail = stat.partition(")[")
    if not (sep and head.startswith("spectrogram(") and tail.endswith("]")):
        return None
    try:
        shape, *pairs = head[len("spectrogram(") :].split(",")
        h, w = shape.split("x")
        kv = dict(p.split("=", 1) for p in pairs)
        spec = SpectrogramSpec(
            int(h),
            int(w),
            int(kv["nperseg"]),
            int(kv["hop"]),
            float(kv["rate_hz"]),
            int(kv["min_samples"]),
            float(kv["offset_db"]),
            float(kv["scale_db"]),
        )
        index = int(tail[:-1])
    except (KeyError, ValueError):
        return None
    return (spec, index) if 0 <= index < spec.size and spec.stat(index) == stat else None


def features_from_manifest(entries: Sequence[dict[str, Any]]) -> tuple[FeatureSpec, ...]:
    """A manifest's ``features`` list as one :class:`FeatureSpec` per input column (a
    spectrogram entry becomes its ``height × width`` columns). Raises ``ValueError`` naming the
    entry (``features[3]``) when one is malformed."""
    out: list[FeatureSpec] = []
    for i, e in enumerate(entries):
        try:
            if e["stat"] == "spectrogram":
                out.extend(SpectrogramSpec.from_manifest(e).columns(str(e["channel"])))
            else:
                out.append(FeatureSpec(str(e["channel"]), str(e["stat"])))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"features[{i}] ({e!r}): {err!r}") from None
    return tuple(out)


def features_to_manifest(features: Sequence[FeatureSpec]) -> list[dict[str, Any]]:
    """The inverse of :func:`features_from_manifest`: one entry per column, one per
    spectrogram image. Raises ``ValueError`` for an image whose columns are not complete and
    in order."""
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(features):
        f = features[i]
        parsed = parse_spectrogram_stat(f.stat)
        if parsed is None:
            out.append({"channel": f.channel, "stat": f.stat})
            i += 1
            continue
        spec = parsed[0]
        if tuple(features[i : i + spec.size]) != spec.columns(f.channel):
            raise ValueError(f"feature {i}: spectrogram columns of {f.channel} incomplete")
        out.append(spec.manifest_entry(f.channel))
        i += spec.size
    return out


class PolledDevice(Protocol):
    """A device driver as the acquisition stage uses it (``drivers/``: Modbus TCP/RTU, serial
    text protocols).

    Called by one poller task on the event loop, never concurrently. ``connect``/``read`` raise
    ``drivers.errors.DeviceUnavailable`` when the transport fails (having closed the
    connection); the poller then reconnects with backoff. ``close`` is idempotent and never
    raises. ``read()`` reads every channel and returns values aligned with
    ``ReadResult.channels`` (indices into the device's channels; ``None``: all, in order), each
    with a quality flag: a failed value is BAD, never dropped."""

    async def connect(self) -> None: ...

    async def read(self) -> ReadResult: ...

    async def close(self) -> None: ...


class GroupedDevice(PolledDevice, Protocol):
    """A driver whose channels are split into poll groups (the Modbus drivers):
    ``read(group)`` reads one group (``None``: all)."""

    async def read(self, group: str | None = None) -> ReadResult: ...


class Engine(Protocol):
    """The model server as the batcher uses it: ``appliance.infer.select.ServingEngine``, the
    fallback chain over the backends (``appliance.infer.base.Engine`` subclasses).

    The batcher calls ``start``, ``infer`` and ``close`` from its one inference worker thread,
    never two at once; ``n_features`` is read on the event loop when the batcher is built.
    ``start()`` starts the best backend that passes its golden parity check (raises
    ``ConfigError``/``ModelError`` when none can serve). ``infer(batch)`` takes an ``[N, F]``
    float32 batch (``N`` rows of the manifest's ``F`` features) and returns ``[N]`` float32
    scores in row order plus the name of the backend that scored them; a backend that fails
    is dropped for the next one and the batch re-run there, so it raises only when no backend
    is left (the batch is then lost, counted by the batcher). ``close()`` is idempotent."""

    @property
    def n_features(self) -> int: ...

    def start(self) -> None: ...

    def infer(self, batch: F32) -> tuple[F32, str]: ...

    def close(self) -> None: ...


class Outbox(Protocol):
    """The durable outbox as the producers and the uplink use it (``appliance.outbox``:
    ``SqliteOutbox``), a transaction API: ``append``, then ``take``, publish, ``settle``.

    Every method is called on the event loop (the outbox is not thread-safe). ``append`` stores
    envelopes in one transaction, gives each the next ``seq`` of its stream and encodes its
    final payload (:mod:`appliance.payload`); once it returns they are durable per the outbox's
    documented loss window; overflow follows its eviction policy, counted, never silent.
    ``take(limit, exclude)`` returns up to ``limit`` stored records in drain order (alerts,
    status, telemetry; oldest first), skipping the ids in ``exclude`` (those in flight); it
    deletes nothing. ``settle(accepted, rejected)`` deletes records the broker acknowledged or
    refused, in one transaction; anything not settled is taken again (after a restart too).
    ``pending`` is the number of records stored and not settled."""

    def append(self, envelopes: Sequence[Envelope]) -> Sequence[OutboxRecord]: ...

    def take(self, limit: int, exclude: Collection[int] = ()) -> Sequence[OutboxRecord]: ...

    def settle(self, accepted: Sequence[int], rejected: Sequence[int] = ()) -> None: ...

    @property
    def pending(self) -> int: ...


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
