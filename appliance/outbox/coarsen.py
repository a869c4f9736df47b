"""Merge consecutive telemetry messages of one machine into one coarser message.

The outbox calls this when it is over its disk budget (uplink down for long): rather than
dropping the oldest telemetry windows, it first replaces runs of consecutive messages of a
stream by one message whose statistics cover all of them (see "Disk budget" in
:mod:`appliance.outbox.sqlite`). The merged message is an ordinary telemetry message (same
schema) with one more member::

    "coarsened": {"windows": 10, "first_seq": 41}

``seq``, ``id`` and ``ts`` are those of the newest message merged, ``window`` spans from the
oldest one's ``start`` to the newest one's ``end``, and ``first_seq`` is the ``seq`` of the
oldest window merged: a subscriber checking for gaps expects ``first_seq`` (not ``seq``) to
follow the last ``seq`` it saw. Statistics per channel, over the good samples of all windows:
``n`` summed, ``mean`` weighted by ``n``, ``rms`` as the root of the ``n``-weighted mean square,
``min``/``max`` of the windows' ones, ``last`` the newest non-null one; model ``scores`` the
highest of the windows' ones per model, ``score_stats`` (``telemetry.interval_s``) per model
``n`` summed, ``max`` the highest, ``mean`` weighted by ``n``, ``last`` the newest. Never
rounded to a fixed number of decimals, like the downsampler's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from appliance.payload import HEADER_KEYS as _HEADER

COARSENED_KEY = "coarsened"
SCORES_KEY = "scores"
SCORE_STATS_KEY = "score_stats"
_BODY = frozenset({"machine", "window", "channels", SCORES_KEY, SCORE_STATS_KEY, COARSENED_KEY})
_STATS = frozenset({"n", "mean", "rms", "min", "max", "last"})


class NotMergeable(ValueError):
    """A message this module cannot merge (not a telemetry window of the known shape)."""


def extent(msg: Any) -> tuple[int, int]:
    """``(first_seq, windows)`` covered by a telemetry message: ``(seq, 1)`` unless coarsened.

    Raises :class:`NotMergeable` for anything but a well-formed telemetry message.
    """
    if (
        not isinstance(msg, dict)
        or msg.get("kind") != "telemetry"
        or not _BODY.issuperset(k for k in msg if k not in _HEADER)
    ):
        raise NotMergeable("not a telemetry window message")
    seq = msg.get("seq")
    window = msg.get("window")
    channels = msg.get("channels")
    if (
        not isinstance(seq, int)
        or not isinstance(window, dict)
        or not isinstance(window.get("start"), (int, float))
        or not isinstance(window.get("end"), (int, float))
        or not isinstance(channels, dict)
        or not isinstance(msg.get("machine"), str)
    ):
        raise NotMergeable("telemetry message without seq, window or channels")
    for entry in channels.values():
        if not isinstance(entry, dict) or not _STATS.issuperset(entry):
            raise NotMergeable("a channel with statistics this module does not know")
        n = entry.get("n")
        if not isinstance(n, int) or n < 0:
            raise NotMergeable("a channel without a sample count")
    c = msg.get(COARSENED_KEY)
    if c is None:
        return seq, 1
    if (
        not isinstance(c, dict)
        or not isinstance(c.get("windows"), int)
        or not isinstance(c.get("first_seq"), int)
        or c["windows"] < 1
        or not 1 <= c["first_seq"] <= seq
    ):
        raise NotMergeable("a malformed 'coarsened' member")
    return c["first_seq"], c["windows"]


def _round(x: float) -> float:
    """A merged statistic as sent: not rounded (JSON encodes the shortest decimal that reads
    back as the same float64), like the downsampler's."""
    return float(x)


def _merge_channel(entries: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """One channel's statistics over ``entries`` (oldest first; a window without the channel
    is simply absent)."""
    out: dict[str, Any] = {"n": sum(e["n"] for e in entries)}
    for key in keys:
        if key == "n":
            continue
        good = [(e["n"], e[key]) for e in entries if e["n"] > 0 and e.get(key) is not None]
        if not good:
            out[key] = None
        elif key == "min":
            out[key] = min(v for _, v in good)
        elif key == "max":
            out[key] = max(v for _, v in good)
        elif key == "last":
            out[key] = good[-1][1]
        else:
            weight = sum(n for n, _ in good)
            if key == "mean":
                out[key] = _round(sum(n * v for n, v in good) / weight)
            else:  # rms
                out[key] = _round(math.sqrt(sum(n * v * v for n, v in good) / weight))
    return out


def merge(
    msgs: Sequence[dict[str, Any]], extents: Sequence[tuple[int, int]] | None = None
) -> dict[str, Any]:
    """The message replacing ``msgs``: consecutive messages of one stream, oldest first.

    ``extents``: their :func:`extent`, when the caller has it already. Raises
    :class:`NotMergeable` when one of them is not mergeable (a statistic that is not a number
    included), they belong to different streams, or their ``seq`` ranges do not follow each
    other without a gap.
    """
    if len(msgs) < 2:
        raise NotMergeable("nothing to merge")
    if extents is None:
        extents = [extent(m) for m in msgs]
    first_seq, windows = extents[0]
    prev_seq = msgs[0]["seq"]
    for m, (lo, w) in zip(msgs[1:], extents[1:], strict=True):
        if m.get("stream") != msgs[0].get("stream") or lo != prev_seq + 1:
            raise NotMergeable("messages of different streams or with a gap between them")
        windows += w
        prev_seq = m["seq"]
    newest = msgs[-1]
    names: dict[str, list[dict[str, Any]]] = {}
    keys: dict[str, list[str]] = {}
    for m in msgs:
        for name, entry in m["channels"].items():
            names.setdefault(name, []).append(entry)
            known = keys.setdefault(name, [])
            known.extend(k for k in entry if k not in known)
    out = {k: newest[k] for k in _HEADER if k in newest}
    out["machine"] = newest["machine"]
    out["window"] = {"start": msgs[0]["window"]["start"], "end": newest["window"]["end"]}
    try:
        channels = {name: _merge_channel(es, keys[name]) for name, es in names.items()}
    except TypeError as err:  # a statistic that is not a number, met in arithmetic
        raise NotMergeable(f"a channel statistic that is not a number ({err})") from None
    for entry in channels.values():
        for v in entry.values():
            if v is not None and not isinstance(v, (int, float)):
                raise NotMergeable("a channel statistic that is not a number")
    out["channels"] = channels
    scores: dict[str, Any] = {}  # model outputs: the highest (most anomalous) of the windows'
    for m in msgs:
        for model, value in m.get(SCORES_KEY, {}).items():
            if not isinstance(value, (int, float)):
                raise NotMergeable("a model score that is not a number")
            scores[model] = max(scores.get(model, value), value)
    if scores:
        out[SCORES_KEY] = scores
    score_stats = _merge_score_stats(msgs)
    if score_stats:
        out[SCORE_STATS_KEY] = score_stats
    out[COARSENED_KEY] = {"windows": windows, "first_seq": first_seq}
    return out


def _merge_score_stats(msgs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The messages' ``score_stats`` merged per model (oldest message first)."""
    parts: dict[str, list[dict[str, Any]]] = {}
    for m in msgs:
        for model, st in m.get(SCORE_STATS_KEY, {}).items():
            if not isinstance(st, dict) or not all(
                isinstance(st.get(k), (int, float)) for k in ("n", "max", "mean", "last")
            ):
                raise NotMergeable("model score statistics that are not numbers")
            parts.setdefault(model, []).append(st)
    out: dict[str, dict[str, Any]] = {}
    for model, sts in parts.items():
        n = sum(int(st["n"]) for st in sts)
        out[model] = {
            "n": n,
            "max": max(st["max"] for st in sts),
            "mean": _round(sum(st["n"] * st["mean"] for st in sts) / n),
            "last": sts[-1]["last"],
        }
    return out
