"""Over its disk budget the outbox merges old telemetry into coarser messages before evicting.

Checked on real outbox files: every window appended is accounted for exactly once (alone or
inside one merged message), merged statistics are those of all the samples, merged messages
follow the published JSON Schema, in-flight records are never merged, and eviction starts only
when everything is as coarse as ``coarsen_windows`` allows.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from appliance.config import ConfigError, parse_config
from appliance.contracts import Envelope, OutboxRecord, Priority
from appliance.outbox import SqliteOutbox, coarsen
from appliance.payload import encode_payload
from appliance.schemas import load_schema

APP = "app-01"
CHANNELS = ("spindle_speed", "spindle_temp", "vibration_rms")


def window(machine: str, i: int, n: int = 10) -> Envelope:
    """Window ``i`` (1 s) of ``machine`` with all five statistics, values depending on ``i``."""
    channels: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(CHANNELS):
        base = 100.0 * (k + 1) + i
        channels[name] = (
            {
                "n": n,
                "mean": base,
                "rms": base + 0.5,
                "min": base - 1,
                "max": base + 1,
                "last": base,
            }
            if n
            else {"n": 0, "mean": None, "rms": None, "min": None, "max": None, "last": None}
        )
    return Envelope(
        stream=f"telemetry/{machine}",
        kind="telemetry",
        topic=f"edge/{APP}/telemetry/{machine}",
        priority=Priority.TELEMETRY,
        ts=1000.0 + i + 1,
        body={
            "machine": machine,
            "window": {"start": 1000.0 + i, "end": 1000.0 + i + 1},
            "channels": channels,
        },
    )


def alert(i: int) -> Envelope:
    return Envelope(
        "alerts/cnc-1", "alert", f"edge/{APP}/alerts/cnc-1", Priority.ALERT, float(i), {"n": i}
    )


def decode(rec: OutboxRecord) -> dict[str, Any]:
    msg: dict[str, Any] = msgspec.json.decode(rec.payload)
    return msg


def coverage(records: list[OutboxRecord]) -> dict[str, list[tuple[int, int, int]]]:
    """Per stream, in drain order: (first_seq, seq, windows) of every telemetry record."""
    out: dict[str, list[tuple[int, int, int]]] = {}
    for rec in records:
        msg = decode(rec)
        if msg["kind"] != "telemetry":
            continue
        c = msg.get("coarsened", {"first_seq": msg["seq"], "windows": 1})
        out.setdefault(rec.stream, []).append((c["first_seq"], msg["seq"], c["windows"]))
    return out


def assert_contiguous(cover: list[tuple[int, int, int]], first: int, last: int) -> None:
    """The records cover ``first..last`` exactly once, in order, with no hole."""
    expected = first
    for lo, hi, windows in cover:
        assert lo == expected, cover
        assert windows == hi - lo + 1
        expected = hi + 1
    assert expected == last + 1


def test_merge_computes_the_statistics_of_all_the_samples() -> None:
    msgs = []
    for seq, (n, mean, rms, lo, hi, last) in enumerate(
        [
            (10, 1.0, 2.0, 0.5, 1.5, 1.2),
            (0, None, None, None, None, None),
            (30, 3.0, 1.0, -2, 9, 2.8),
        ],
        start=7,
    ):
        msgs.append(
            {
                "v": 1, "kind": "telemetry", "appliance": APP, "stream": "telemetry/m",
                "epoch": 5, "seq": seq, "id": f"{APP}/telemetry/m/5/{seq}", "ts": float(seq),
                "machine": "m",
                "window": {"start": seq - 1.0, "end": float(seq)},
                "channels": {
                    "c": {"n": n, "mean": mean, "rms": rms, "min": lo, "max": hi, "last": last}
                },
            }
        )  # fmt: skip
    msgs[1]["channels"]["d"] = {"n": 4, "mean": 5.0}  # a channel only one window has
    merged = coarsen.merge(msgs)
    assert merged["seq"] == 9 and merged["id"] == f"{APP}/telemetry/m/5/9" and merged["ts"] == 9.0
    assert merged["epoch"] == 5
    assert merged["window"] == {"start": 6.0, "end": 9.0}
    assert merged["coarsened"] == {"windows": 3, "first_seq": 7}
    c = merged["channels"]["c"]
    assert c["n"] == 40
    assert c["mean"] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)
    assert c["rms"] == pytest.approx(math.sqrt((10 * 4.0 + 30 * 1.0) / 40))
    assert (c["min"], c["max"], c["last"]) == (-2, 9, 2.8)
    assert merged["channels"]["d"] == {"n": 4, "mean": 5.0}
    jsonschema.validate(merged, load_schema("telemetry"))
    # Merging merged messages adds their windows up and keeps the oldest first_seq.
    again = coarsen.merge([merged, {**msgs[2], "seq": 10, "window": {"start": 9.0, "end": 10.0}}])
    assert again["coarsened"] == {"windows": 4, "first_seq": 7}
    assert again["channels"]["c"]["n"] == 70


def test_merge_sums_up_the_interval_score_statistics() -> None:
    first, second = decode_window(1), decode_window(2)
    first["scores"] = {"a": 2.0}
    first["score_stats"] = {"a": {"n": 3, "max": 2.0, "mean": 1.0, "last": 0.5}}
    second["scores"] = {"a": 1.5}
    second["score_stats"] = {"a": {"n": 1, "max": 1.5, "mean": 1.5, "last": 1.5}}
    merged = coarsen.merge([first, second])
    assert merged["scores"] == {"a": 2.0}
    assert merged["score_stats"] == {"a": {"n": 4, "max": 2.0, "mean": 1.125, "last": 1.5}}
    jsonschema.validate(merged, load_schema("telemetry"))


@pytest.mark.parametrize(
    "change",
    [
        {"kind": "alert"},
        {"seq": 9},  # not right after the first: a gap
        {"stream": "telemetry/other"},
        {"channels": {"c": {"n": 1, "median": 2.0}}},
        {"channels": {"c": {"n": 1, "mean": "2.0"}}},
        {"pad": "x"},
    ],
    ids=["not-telemetry", "seq-gap", "other-stream", "unknown-stat", "non-number", "unknown-key"],
)
def test_merge_refuses_what_it_cannot_merge_faithfully(change: dict[str, Any]) -> None:
    first = decode_window(1)
    second = {**decode_window(2), **change}
    with pytest.raises(coarsen.NotMergeable):
        coarsen.merge([first, second])


def decode_window(i: int) -> dict[str, Any]:
    """Window ``i`` as the outbox stores it, as record ``i`` of its stream."""
    msg: dict[str, Any] = msgspec.json.decode(encode_payload(APP, window("m", i), i))
    return msg


def fill(ob: SqliteOutbox, machines: int, windows: int, start: int = 0, batch: int = 50) -> None:
    """Append windows ``start`` to ``windows - 1`` of each machine, ``batch`` per append."""
    envs = [window(f"cnc-{m}", i) for i in range(start, windows) for m in range(1, machines + 1)]
    for k in range(0, len(envs), batch):
        ob.append(envs[k : k + batch])


def test_over_budget_old_telemetry_is_merged_not_evicted_and_every_window_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ob = SqliteOutbox(str(tmp_path / "o.sqlite"), appliance_id=APP, disk_budget_mb=0.5)
    with ob:
        alerts = ob.append([alert(i) for i in range(10)])
        with caplog.at_level(logging.WARNING, logger="appliance.outbox"):
            fill(ob, machines=3, windows=1000)
        stats = ob.stats()
        assert stats["evicted"] == 0 and stats["coarsened"] > 0
        assert stats["pending"] == 10 + 3000 - stats["coarsened"]
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1 and "merging the oldest telemetry" in warnings[0]
        left = ob.take(100_000)
        assert len(left) == stats["pending"]
        assert left[:10] == alerts  # alerts untouched, still first
        cover = coverage(left)
        assert set(cover) == {"telemetry/cnc-1", "telemetry/cnc-2", "telemetry/cnc-3"}
        for stream_cover in cover.values():
            assert_contiguous(stream_cover, 1, 1000)
            assert max(w for _, _, w in stream_cover) == 10  # coarsen_windows
            assert stream_cover[-1][2] == 1  # the newest windows stay as they were
        schema = load_schema("telemetry")
        merged = [decode(r) for r in left if b'"coarsened"' in r.payload]
        for msg in merged:
            jsonschema.validate(msg, schema)
            c = msg["channels"]["spindle_speed"]
            assert c["n"] == 10 * msg["coarsened"]["windows"]  # no sample lost
            first = msg["coarsened"]["first_seq"]
            assert msg["window"] == {"start": 1000.0 + first - 1, "end": 1000.0 + msg["seq"]}
            assert c["min"] == 100.0 + first - 1 - 1 and c["max"] == 100.0 + msg["seq"] - 1 + 1


def test_records_handed_to_the_uplink_are_never_merged(tmp_path: Path) -> None:
    ob = SqliteOutbox(str(tmp_path / "o.sqlite"), appliance_id=APP, disk_budget_mb=0.25)
    with ob:
        fill(ob, machines=1, windows=20)
        in_flight = ob.take(5)  # taken, never settled: the uplink may deliver them as they are
        fill(ob, machines=1, windows=1000, start=20)
        assert ob.stats()["coarsened"] > 0
        left = ob.take(100_000)
        assert left[:5] == in_flight  # still there, byte for byte
        cover = coverage(left)["telemetry/cnc-1"]
        assert cover[:5] == [(s, s, 1) for s in range(1, 6)]
        assert_contiguous(cover, 1, 1000)
        # Once settled, they are gone and the next windows merge as usual.
        ob.settle([r.id for r in in_flight])
        assert all(rec.id not in ob._taken for rec in in_flight)


def test_a_run_never_spans_a_gap_in_seq(tmp_path: Path) -> None:
    path = str(tmp_path / "o.sqlite")
    with SqliteOutbox(path, appliance_id=APP, disk_budget_mb=0.25) as ob:
        fill(ob, machines=1, windows=30)
        taken = ob.take(30)
        ob.settle([], rejected=[taken[14].id])  # seq 15 refused by the broker: a gap
    with SqliteOutbox(path, appliance_id=APP, disk_budget_mb=0.25) as ob:  # a restart
        fill(ob, machines=1, windows=1000, start=30)
        assert ob.stats()["coarsened"] > 0
        cover = coverage(ob.take(100_000))["telemetry/cnc-1"]
        gap = next(i for i, (lo, _, _) in enumerate(cover) if lo > 14)
        assert_contiguous(cover[:gap], 1, 14)
        assert_contiguous(cover[gap:], 16, 1000)
        assert cover[gap - 1][2] > 1  # 11..14 (or so) merged up to the gap, not across it


def test_when_all_telemetry_is_coarse_the_oldest_is_evicted_and_the_rest_stays_contiguous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ob = SqliteOutbox(
        str(tmp_path / "o.sqlite"), appliance_id=APP, disk_budget_mb=0.25, coarsen_windows=4
    )
    with ob:
        with caplog.at_level(logging.WARNING, logger="appliance.outbox"):
            fill(ob, machines=1, windows=4000)
        stats = ob.stats()
        assert stats["coarsened"] > 0 and stats["evicted"] > 0 and stats["evicted_alerts"] == 0
        assert sum("evicting the oldest records now" in r.getMessage() for r in caplog.records) == 1
        cover = coverage(ob.take(100_000))["telemetry/cnc-1"]
        # The oldest windows are gone, the rest is covered without a hole up to the newest.
        assert cover[0][0] > 1
        assert_contiguous(cover, cover[0][0], 4000)
        kept = sum(w for _, _, w in cover)
        assert kept >= 3 * stats["pending"]  # coarsen_windows=4: nearly every row holds 4


def test_coarsen_windows_0_evicts_as_before(tmp_path: Path) -> None:
    ob = SqliteOutbox(
        str(tmp_path / "o.sqlite"), appliance_id=APP, disk_budget_mb=0.25, coarsen_windows=0
    )
    with ob:
        fill(ob, machines=1, windows=1000)
        stats = ob.stats()
        assert stats["coarsened"] == 0 and stats["evicted"] > 0
        cover = coverage(ob.take(100_000))["telemetry/cnc-1"]
        assert all(w == 1 for _, _, w in cover)
        assert_contiguous(cover, int(stats["evicted"]) + 1, 1000)


def test_a_coarsened_outbox_reopens_and_goes_on_merging(tmp_path: Path) -> None:
    path = str(tmp_path / "o.sqlite")
    with SqliteOutbox(path, appliance_id=APP, disk_budget_mb=0.25) as ob:
        fill(ob, machines=1, windows=600)
        first = ob.stats()["coarsened"]
        assert first > 0
    with SqliteOutbox(path, appliance_id=APP, disk_budget_mb=0.25) as ob:
        fill(ob, machines=1, windows=1200, start=600)
        assert ob.stats()["coarsened"] > 0 and ob.stats()["evicted"] == 0
        assert_contiguous(coverage(ob.take(100_000))["telemetry/cnc-1"], 1, 1200)


@pytest.mark.parametrize("value", [1, -1, 10_001])
def test_coarsen_windows_is_checked_at_load(value: int, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="coarsen_windows"):
        parse_config({"outbox": {"coarsen_windows": value}}, base_dir=tmp_path)
    with pytest.raises(ValueError, match="coarsen_windows"):
        SqliteOutbox("x.sqlite", appliance_id=APP, coarsen_windows=value)
