"""Recordings as CSV: what ``appliance record`` writes and ``model fit``/``model eval`` read.

A recording is one CSV file per machine: a header row, a time column (seconds since the UNIX
epoch or any origin, or ISO 8601; the column named ``time``, ``ts``, ``timestamp`` or ``t``, else
the first column) and one column per channel. A historian's or data logger's export works too;
without a time column give the sample rate (``rate_hz``) and every column is data. A column is
numeric when its first non-empty cell is a number; other columns are ignored unless named as
the context (e.g. a program number or machining phase). An empty cell, ``nan`` or ``NaN``: no
value for that channel on that row. Rows are taken in time order (a waveform block is recorded
after the poll that read it but stamped with its samples' earlier times).

Bad data is refused with :class:`DataError`, naming the file, line and column: an empty file, a
cell that is not a number in a numeric column, a run of missing values (see
:data:`MAX_GAP_S`), and, across files (:func:`check_recordings`), a channel missing from some
files or constant in all of them.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

from appliance.contracts import Frame, Quality
from appliance.errors import ApplianceError

TIME_COLUMNS = ("time", "ts", "timestamp", "t")
#: Longest time a channel may go without a value (s): max(this, 5 % of the file's span).
MAX_GAP_S = 10.0


class DataError(ApplianceError):
    """Data a model cannot be fitted or evaluated on; the message says what and where."""


@dataclass(frozen=True)
class Recording:
    """One machine's recording: ``values[i, j]`` is channel ``channels[j]`` at ``ts[i]``."""

    path: Path
    channels: tuple[str, ...]
    ts: npt.NDArray[np.float64]
    values: npt.NDArray[np.float64]
    context: tuple[str, ...] = ()  # the context column's value per row, when one is named


def _time_of(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00")).timestamp()


def _number(text: str) -> float | None:
    t = text.strip()
    if not t:
        return math.nan
    try:
        return float(t)
    except ValueError:
        return None


def read_recording(
    path: str | Path,
    *,
    channels: Sequence[str] | None = None,
    rate_hz: float | None = None,
    context: str | None = None,
) -> Recording:
    """Read one CSV recording (see the module docstring). ``channels``: keep only these."""
    p = Path(path)
    try:
        with p.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except OSError as err:
        raise DataError(f"{p}: cannot read: {err.strerror or err}") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{p}: empty file (no header, no data)")
    header = [h.strip() for h in rows[0]]
    body = rows[1:]
    if not body:
        raise DataError(f"{p}: no data rows after the header")
    if rate_hz is None:
        lower = [h.lower() for h in header]
        tcol = next((lower.index(n) for n in TIME_COLUMNS if n in lower), 0)
    else:
        if not rate_hz > 0:
            raise DataError(f"--rate-hz must be > 0, got {rate_hz}")
        tcol = -1
    if context is not None and context not in header:
        raise DataError(f"{p}: no context column {context!r} (columns: {', '.join(header)})")
    ctx_col = header.index(context) if context is not None else -1
    numeric: list[int] = []
    for j, name in enumerate(header):
        if j in (tcol, ctx_col) or (channels is not None and name not in channels):
            continue
        first = next((r[j] for r in body if j < len(r) and r[j].strip()), "")
        if first and _number(first) is not None:
            numeric.append(j)
    if channels is not None:
        missing = [c for c in channels if c not in [header[j] for j in numeric]]
        if missing:
            raise DataError(f"{p}: no numeric column for channel(s) {', '.join(missing)}")
    if not numeric:
        raise DataError(f"{p}: no numeric channel column")
    ts = np.empty(len(body))
    values = np.full((len(body), len(numeric)), np.nan)
    ctx: list[str] = []
    for i, r in enumerate(body):
        line = i + 2
        if tcol >= 0:
            cell = r[tcol] if tcol < len(r) else ""
            try:
                ts[i] = _time_of(cell)
            except ValueError:
                raise DataError(
                    f"{p}:{line}: time column {header[tcol]!r}: {cell!r} is not a time"
                ) from None
        else:
            assert rate_hz is not None
            ts[i] = i / rate_hz
        for k, j in enumerate(numeric):
            cell = r[j] if j < len(r) else ""
            v = _number(cell)
            if v is None:
                raise DataError(f"{p}:{line}: column {header[j]!r}: {cell!r} is not a number")
            values[i, k] = v
        if ctx_col >= 0:
            ctx.append(r[ctx_col].strip() if ctx_col < len(r) else "")
    names = tuple(header[j] for j in numeric)
    if np.any(np.diff(ts) < 0):  # e.g. waveform blocks stamped before the poll that read them
        order = np.argsort(ts, kind="stable")
        ts, values = ts[order], values[order]
        ctx = [ctx[i] for i in order] if ctx else ctx
    _check_gaps(p, names, ts, values)
    return Recording(p, names, ts, values, tuple(ctx))


def _check_gaps(
    p: Path, names: Sequence[str], ts: npt.NDArray[np.float64], values: npt.NDArray[np.float64]
) -> None:
    span = float(ts[-1] - ts[0])
    limit = max(MAX_GAP_S, 0.05 * span)
    for k, name in enumerate(names):
        have = np.flatnonzero(np.isfinite(values[:, k]))
        if have.size == 0:
            raise DataError(f"{p}: column {name!r} has no value at all")
        marks = np.concatenate([[0], have, [len(ts) - 1]])
        gaps = np.diff(ts[marks])
        worst = int(np.argmax(gaps))
        if gaps[worst] > limit:
            a, b = int(marks[worst]), int(marks[worst + 1])
            raise DataError(
                f"{p}: column {name!r} has no value (empty or NaN) from line {a + 2} to line "
                f"{b + 2} ({gaps[worst]:g} s; at most {limit:g} s allowed)"
            )


def check_recordings(recordings: Sequence[Recording], channels: Sequence[str]) -> None:
    """Refuse a set of recordings a model cannot use: a channel missing from some files, or
    constant (one value) in all of them."""
    for c in channels:
        without = [str(r.path) for r in recordings if c not in r.channels]
        if without:
            raise DataError(f"channel {c!r} is missing from {', '.join(without)}")
    for c in channels:
        lo, hi = math.inf, -math.inf
        for r in recordings:
            col = r.values[:, r.channels.index(c)]
            col = col[np.isfinite(col)]
            lo, hi = min(lo, float(col.min())), max(hi, float(col.max()))
        if lo == hi:
            raise DataError(
                f"channel {c!r} is constant ({lo!r}) in every file: it carries no information "
                "(leave it out with --channels)"
            )


def context_labels(recordings: Sequence[Recording]) -> tuple[str, ...] | None:
    """The context's labels when it is not numeric (sorted; a label's code is its index), or
    None when every context cell of every recording is a number or empty."""
    seen = {c for r in recordings for c in r.context if c}
    if all(_number(c) is not None for c in seen):
        return None
    return tuple(sorted(seen))


def context_column(rec: Recording, name: str, labels: Sequence[str] | None) -> Recording:
    """``rec`` with its context as one more channel ``name``, as a device register would give
    it: the number itself (``labels`` None), else the label's index in ``labels``, and
    ``len(labels)`` for a label not among them (an unknown context); an empty cell: no value."""
    if labels is None:
        codes = [_number(c) for c in rec.context]
        bad = next((i for i, v in enumerate(codes) if v is None), None)
        if bad is not None:
            raise DataError(
                f"{rec.path}: context column {name!r}: {rec.context[bad]!r} is not "
                "a number (the model's context is numeric)"
            )
        col = np.array(codes, dtype=np.float64)
    else:
        index = {label: float(i) for i, label in enumerate(labels)}
        unknown = float(len(labels))
        col = np.array(
            [index.get(c, unknown) if c else math.nan for c in rec.context], dtype=np.float64
        )
    return Recording(
        rec.path,
        (*rec.channels, name),
        rec.ts,
        np.column_stack([rec.values, col]),
        rec.context,
    )


def frames_of(rec: Recording, device: str = "m", chunk_rows: int = 256) -> Iterator[Frame]:
    """The recording as frames (each of up to ``chunk_rows`` rows), as acquisition would give."""
    n, c = rec.values.shape
    for a in range(0, n, chunk_rows):
        v = rec.values[a : a + chunk_rows]
        ok = np.isfinite(v)
        rows, cols = np.nonzero(ok)
        yield Frame(
            device=device,
            channels=rec.channels,
            ts=rec.ts[a : a + chunk_rows][rows],
            channel=cols.astype(np.int32),
            value=v[rows, cols],
            quality=np.full(rows.size, Quality.GOOD, np.uint8),
        )
