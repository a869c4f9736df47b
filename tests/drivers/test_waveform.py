"""The FIFO waveform tracker (table tests) and the reader against the simulator's FIFO."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from conftest import free_port

from appliance.simulate.cell import FIFO_ADDRESS, SimulatedCell
from appliance.simulate.fifo import VibrationFifo
from drivers.errors import DeviceException
from drivers.modbus.waveform import (
    FLAG_GAP,
    FLAG_RESYNC,
    HEADER_REGISTERS,
    FifoBlock,
    FifoTracker,
    WaveformReader,
    encode_block,
    parse_block,
)

RATE = 1000
CAP = 10


def block(first_seq: int, n: int = CAP) -> FifoBlock:
    """A block of ``n`` samples whose raw value is the low 15 bits of its sequence number."""
    seqs = [(first_seq + i) % 2**32 for i in range(n)]
    return parse_block(encode_block(first_seq, [s & 0x7FFF for s in seqs], CAP, RATE, 1000))


# Each case: the first_seq of consecutive reads (10-sample blocks) → per read: new sample count,
# lost count, flags of the first new sample.
CASES = {
    "consecutive blocks": ([0, 10, 20], [(10, 0, FLAG_RESYNC), (10, 0, 0), (10, 0, 0)]),
    "overlapping reads return only the new tail": (
        [0, 4, 9],
        [(10, 0, FLAG_RESYNC), (4, 0, 0), (5, 0, 0)],
    ),
    "the same block read twice yields nothing": (
        [0, 0, 10],
        [(10, 0, FLAG_RESYNC), (0, 0, 0), (10, 0, 0)],
    ),
    "an overrun counts the overwritten samples": (
        [0, 25],
        [(10, 0, FLAG_RESYNC), (10, 15, FLAG_GAP)],
    ),
    "a wrap of the 32-bit counter is seamless": (
        [2**32 - 15, 2**32 - 5, 5],
        [(10, 0, FLAG_RESYNC), (10, 0, 0), (10, 0, 0)],
    ),
    "an overrun across the wrap is counted": (
        [2**32 - 10, 7],
        [(10, 0, FLAG_RESYNC), (10, 7, FLAG_GAP)],
    ),
    "a counter that goes backwards restarts the stream": (
        [1000, 0],
        [(10, 0, FLAG_RESYNC), (10, 0, FLAG_RESYNC)],
    ),
}


@pytest.mark.parametrize("firsts, expected", list(CASES.values()), ids=list(CASES))
def test_tracker_returns_each_sample_once_and_marks_gaps(
    firsts: list[int], expected: list[tuple[int, int, int]]
) -> None:
    tracker = FifoTracker()
    seen: list[int] = []
    for i, (first, (new, lost, flag0)) in enumerate(zip(firsts, expected, strict=True)):
        chunk = tracker.update(block(first), t_read=100.0 + 0.01 * i)
        assert len(chunk) == new
        assert chunk.lost == lost
        if new:
            assert int(chunk.flags[0]) == flag0
            assert not chunk.flags[1:].any()
            assert np.all(np.diff(chunk.seq) == 1)
            # values follow the device's sequence numbers (modulo the counter)
            raw = np.rint(chunk.value / 0.001).astype(np.int64)
            assert np.array_equal(raw, (chunk.seq % 2**32) & 0x7FFF) or chunk.reset
            seen.extend(chunk.seq.tolist())
    assert len(seen) == len(set(seen)), "a sample was returned twice"
    assert seen == sorted(seen)


def test_tracker_timestamps_are_spaced_by_the_sample_period_not_the_poll_jitter() -> None:
    tracker = FifoTracker(max_skew_s=0.05)
    a = tracker.update(block(0), t_read=50.0)
    b = tracker.update(block(10), t_read=50.013)  # polled 3 ms late
    assert a.ts[-1] == pytest.approx(50.0)
    assert np.allclose(np.diff(np.concatenate([a.ts, b.ts])), 1.0 / RATE)
    assert tracker.resyncs == 0


def test_tracker_reanchors_timestamps_when_the_read_time_drifts_too_far() -> None:
    tracker = FifoTracker(max_skew_s=0.05)
    tracker.update(block(0), t_read=50.0)
    c = tracker.update(block(10), t_read=51.0)  # a 1 s stall the sample clock cannot explain
    assert c.ts[-1] == pytest.approx(51.0)
    assert int(c.flags[0]) & FLAG_RESYNC
    assert tracker.resyncs == 1


def test_tracker_counts_duplicates_gaps_and_lost_samples() -> None:
    tracker = FifoTracker()
    for first in (0, 5, 5, 40):
        tracker.update(block(first), t_read=1.0)
    assert tracker.samples == 10 + 5 + 10
    assert tracker.duplicates == 5 + 10
    assert (tracker.gaps, tracker.lost) == (1, 25)


def test_a_partly_filled_block_yields_only_its_valid_samples() -> None:
    regs = encode_block(0, [1, 2, 3], CAP, RATE, 1000)
    assert len(regs) == HEADER_REGISTERS + CAP
    chunk = FifoTracker().update(parse_block(regs), t_read=0.0)
    assert chunk.value.tolist() == pytest.approx([0.001, 0.002, 0.003])


def test_a_block_announcing_more_samples_than_it_holds_is_rejected() -> None:
    regs = encode_block(0, [1, 2, 3], CAP, RATE, 1000)
    regs[2] = CAP + 1
    with pytest.raises(ValueError, match="announces"):
        parse_block(regs)


def test_the_simulated_fifo_serves_the_newest_samples_in_order() -> None:
    fifo = VibrationFifo(seed=1, rate_hz=1000, capacity=20, start_seq=2**32 - 30)
    fifo.advance(0.05, rms_mm_s=2.0, speed_rpm=6000.0)  # 50 samples
    b = parse_block(fifo.registers())
    assert b.count == 20
    assert b.first_seq == (2**32 - 30 + 50 - 20) % 2**32
    assert 1.0 < float(np.sqrt(np.mean((b.samples * b.scale) ** 2))) < 3.5


def test_reader_streams_the_simulators_fifo_without_duplicates_or_loss() -> None:
    async def scenario() -> None:
        port = free_port()
        async with SimulatedCell(machines=1, ports=[port], tick_hz=50.0):
            reader = WaveformReader("127.0.0.1", port, 1, FIFO_ADDRESS, 120, timeout_s=2.0)
            await reader.connect()
            try:
                chunks = []
                loop = asyncio.get_running_loop()
                end = loop.time() + 0.6
                while loop.time() < end:
                    chunks.append(await reader.read())
                    await asyncio.sleep(0.02)
            finally:
                await reader.close()
                await reader.close()
            seq = np.concatenate([c.seq for c in chunks])
            assert len(seq) > 300  # ~600 samples at 1 kHz
            assert np.all(np.diff(seq) == 1), "gap or duplicate in the stitched stream"
            assert reader.tracker.lost == 0
            assert reader.tracker.duplicates > 0  # consecutive reads overlapped
            ts = np.concatenate([c.ts for c in chunks])
            assert np.all(np.diff(ts) > 0)

    asyncio.run(scenario())


def test_reader_detects_an_overrun_when_polled_too_slowly() -> None:
    async def scenario() -> None:
        port = free_port()
        async with SimulatedCell(machines=1, ports=[port], tick_hz=50.0):
            reader = WaveformReader("127.0.0.1", port, address=FIFO_ADDRESS, capacity=120)
            await reader.connect()
            try:
                while not len(await reader.read()):  # the block is empty until the first tick
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.3)  # 300 samples produced, 120 kept
                chunk = await reader.read()
            finally:
                await reader.close()
            assert chunk.lost > 100
            assert int(chunk.flags[0]) & FLAG_GAP

    asyncio.run(scenario())


def test_reader_raises_device_exception_for_an_undefined_block() -> None:
    async def scenario() -> None:
        port = free_port()
        async with SimulatedCell(machines=1, ports=[port], fifo_address=None):
            reader = WaveformReader("127.0.0.1", port, address=FIFO_ADDRESS, capacity=120)
            await reader.connect()
            try:
                with pytest.raises(DeviceException, match="exception 2"):
                    await reader.read()
            finally:
                await reader.close()

    asyncio.run(scenario())


def test_stream_yields_gap_free_chunks_on_its_polling_grid() -> None:
    async def scenario() -> None:
        port = free_port()
        async with SimulatedCell(machines=1, ports=[port], tick_hz=50.0):
            reader = WaveformReader("127.0.0.1", port, address=FIFO_ADDRESS, capacity=120)
            await reader.connect()
            chunks = []
            try:
                async for chunk in reader.stream(interval_s=0.05):
                    chunks.append(chunk)
                    if sum(len(c) for c in chunks) >= 300:
                        break
            finally:
                await reader.close()
            seq = np.concatenate([c.seq for c in chunks])
            assert np.all(np.diff(seq) == 1)
            assert all(len(c) for c in chunks)

    asyncio.run(scenario())


def test_after_a_counter_reset_later_blocks_are_new_samples_not_more_resets() -> None:
    tracker = FifoTracker()
    tracker.update(block(1000, 10), 0.0)
    # The device restarts its counter at 0 and keeps sampling: 10, then 10 more.
    after_reset = tracker.update(block(0, 10), 0.5)
    assert after_reset.reset and len(after_reset.seq) == 10
    nxt = tracker.update(block(10, 10), 0.51)
    assert not nxt.reset and nxt.lost == 0 and len(nxt.seq) == 10
    assert nxt.seq[0] == after_reset.seq[-1] + 1  # our numbering keeps increasing
    assert tracker.resets == 1 and tracker.duplicates == 0
