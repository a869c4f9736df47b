"""Generic line protocol: sensors that stream CSV or ``key=value`` text lines.

Layers: :class:`LineFormat` with :meth:`LineFormat.parse` is the pure codec (one line → numbers
by field key); :class:`LineDevice` is the driver.

Streaming in a polled pipeline: :meth:`LineDevice.connect` starts a background reader task that
consumes lines continuously and keeps, per channel, the most recent value. :meth:`LineDevice.read`
returns that value with GOOD when it was updated since the previous read, the same value with
STALE when not, and NaN with BAD when the channel was never seen. So a stream faster than the
poll rate is **decimated to the poll rate** (the last line wins; the overwritten values are
counted in ``merged``), and a slower stream shows STALE between its lines.

A malformed line (wrong field count, a number that does not parse, bytes that do not decode) is
counted and skipped, never fatal; the warning is logged once when lines start being malformed and
an info once when they parse again. A link failure, or no complete line for
``silence_timeout_s`` (0 disables), surfaces on the next ``read()`` as
:class:`~drivers.errors.DeviceUnavailable`, so the supervisor marks the device offline and
reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from drivers.errors import DeviceUnavailable
from drivers.quality import BAD, GOOD, STALE, ReadResult
from drivers.text.framing import LineFramer
from drivers.text.transport import Transport

log = logging.getLogger(__name__)

#: Longest wait of one transport read in the reader task (s); bounds silence detection latency.
READ_SLICE_S = 0.25


class LineError(ValueError):
    """A line that does not match the configured format."""


@dataclass(frozen=True)
class LineFormat:
    """How a line is split into fields.

    ``csv``: fields separated by ``separator``, named by ``columns`` in order (a column named
    ``""`` or ``"_"`` is ignored); the field count must equal ``len(columns)``.
    ``kv``: pairs separated by ``pair_separator`` (``" "`` means any run of blanks), key and value
    separated by ``kv_separator``; unknown keys are ignored. Lines starting with ``comment``
    (unless empty) are skipped, not malformed.
    """

    kind: Literal["csv", "kv"] = "csv"
    columns: tuple[str, ...] = ()
    separator: str = ","
    pair_separator: str = " "
    kv_separator: str = "="
    comment: str = "#"

    def __post_init__(self) -> None:
        if self.kind == "csv" and not self.columns:
            raise ValueError("csv format needs columns")
        if not self.separator or not self.pair_separator or not self.kv_separator:
            raise ValueError("separators must not be empty")

    def is_comment(self, line: str) -> bool:
        """Blank lines and comment lines carry no values."""
        s = line.strip()
        return not s or (bool(self.comment) and s.startswith(self.comment))

    def parse(self, line: str) -> dict[str, float]:
        """Fields of one line by key, as floats. Raises :class:`LineError`. Pure."""
        out: dict[str, float] = {}
        if self.kind == "csv":
            fields = line.strip().split(self.separator)
            if len(fields) != len(self.columns):
                raise LineError(f"{len(fields)} fields, expected {len(self.columns)}")
            for key, field in zip(self.columns, fields, strict=True):
                if key and key != "_":
                    out[key] = _number(field, key)
            return out
        sep = None if self.pair_separator.isspace() else self.pair_separator
        for pair in line.strip().split(sep):
            if not pair.strip():
                continue
            key, found, value = pair.partition(self.kv_separator)
            if not found or not key.strip():
                raise LineError(f"{pair.strip()!r} is not key{self.kv_separator}value")
            out[key.strip()] = _number(value, key.strip())
        return out


def _number(field: str, key: str) -> float:
    try:
        value = float(field)
    except ValueError:
        raise LineError(f"{key}: {field.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise LineError(f"{key}: {field.strip()!r} is not finite")
    return value


@dataclass(frozen=True)
class LineChannelMap:
    """Field ``key`` of each line as channel ``name`` (value * scale + offset)."""

    name: str
    key: str
    scale: float = 1.0
    offset: float = 0.0


class LineDevice:
    """A streaming text sensor read as the latest value per channel; see the module docstring.

    Construction does no I/O; :meth:`connect` opens the transport and starts the reader task;
    :meth:`close` stops it (idempotent). ``monotonic`` (seconds) is a seam for tests.
    Counters: ``lines`` (complete lines, comments included), ``malformed``, ``merged`` (channel
    values overwritten before a read took them), ``overflows`` (over-long lines).
    """

    def __init__(
        self,
        transport: Transport,
        fmt: LineFormat,
        channels: Sequence[LineChannelMap],
        *,
        encoding: str = "utf-8",
        max_line_bytes: int = 1024,
        silence_timeout_s: float = 10.0,
        name: str = "line",
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not channels:
            raise ValueError(f"line {name}: no channels")
        names = [c.name for c in channels]
        if len(set(names)) != len(names):
            raise ValueError(f"line {name}: duplicate channel names in {names}")
        if fmt.kind == "csv":
            missing = [c.key for c in channels if c.key not in fmt.columns]
            if missing:
                raise ValueError(f"line {name}: keys {missing} are not columns {fmt.columns}")
        if silence_timeout_s < 0:
            raise ValueError(f"line {name}: silence_timeout_s must be >= 0")
        self.name = name
        self.channels: tuple[str, ...] = tuple(names)
        self._transport = transport
        self._fmt = fmt
        self._index = {c.key: i for i, c in enumerate(channels)}
        self._scale = [c.scale for c in channels]
        self._offset = [c.offset for c in channels]
        self._encoding = encoding
        self._max_line_bytes = max_line_bytes
        self._silence_s = silence_timeout_s
        self._monotonic = monotonic
        n = len(channels)
        self._value = np.full(n, math.nan, dtype=np.float64)
        self._updates = np.zeros(n, dtype=np.int64)
        self._task: asyncio.Task[None] | None = None
        self._failure: DeviceUnavailable | None = None
        self._last_line_t = 0.0
        self._malformed_state = False
        self.lines = 0
        self.malformed = 0
        self.merged = 0
        self.overflows = 0

    def stats(self) -> dict[str, int]:
        """Counters since construction (see the class docstring)."""
        return {
            "lines": self.lines,
            "malformed": self.malformed,
            "merged": self.merged,
            "overflows": self.overflows,
        }

    async def connect(self) -> None:
        """Open the transport and start the reader task. Raises DeviceUnavailable."""
        await self.close()
        await self._transport.open()
        self._failure = None
        self._last_line_t = self._monotonic()
        self._updates[:] = 0
        framer = LineFramer(b"\r\n", max_line_bytes=self._max_line_bytes)
        self._task = asyncio.create_task(self._reader(framer), name=f"line reader {self.name}")

    async def read(self, group: str | None = None) -> ReadResult:
        """The latest value per channel: GOOD if updated since the last read, STALE if not,
        BAD/NaN if never seen. Raises DeviceUnavailable after a link failure or silence.
        ``group`` is accepted for the poller's interface and ignored (one group)."""
        if self._failure is not None or self._task is None:
            err = self._failure or DeviceUnavailable(f"line {self.name}: not connected")
            await self.close()
            raise err
        if self._silence_s and self._monotonic() - self._last_line_t > self._silence_s:
            await self.close()
            raise DeviceUnavailable(
                f"line {self.name} ({self._transport.name}): no complete line for "
                f"{self._silence_s:g} s"
            )
        updates = self._updates
        self.merged += int(np.maximum(updates - 1, 0).sum())
        values = self._value.copy()
        quality = np.where(updates > 0, GOOD, STALE).astype(np.uint8)
        quality[np.isnan(values)] = BAD
        updates[:] = 0
        return ReadResult(values, quality)

    def feed_line(self, raw: bytes) -> None:
        """Take one complete line (without its delimiter). Public for tests and replays."""
        self.lines += 1
        self._last_line_t = self._monotonic()
        try:
            text = raw.decode(self._encoding)
            if self._fmt.is_comment(text):
                return
            fields = self._fmt.parse(text)
        except (LineError, UnicodeDecodeError) as err:
            self.malformed += 1
            if not self._malformed_state:
                log.warning("line %s: malformed line %r: %s", self.name, raw[:80], err)
                self._malformed_state = True
            else:
                log.debug("line %s: malformed line %r: %s", self.name, raw[:80], err)
            return
        if self._malformed_state:
            log.info("line %s: lines parse again", self.name)
            self._malformed_state = False
        index = self._index
        for key, value in fields.items():
            i = index.get(key)
            if i is not None:
                self._value[i] = value * self._scale[i] + self._offset[i]
                self._updates[i] += 1

    async def _reader(self, framer: LineFramer) -> None:
        try:
            while True:
                data = await self._transport.read_some(READ_SLICE_S)
                if not data:
                    continue
                for raw in framer.feed(data):
                    self.feed_line(raw)
                self.overflows = framer.overflows
        except DeviceUnavailable as err:
            self._failure = err
        except Exception as err:  # a bug: surface it as a failed link, never kill the process
            log.exception("line %s: reader task failed", self.name)
            self._failure = DeviceUnavailable(f"line {self.name}: reader failed: {err!r}")

    async def close(self) -> None:
        """Stop the reader task and close the transport. Idempotent."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._transport.close()
