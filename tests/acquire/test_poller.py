"""DevicePoller and Acquisition: against real pymodbus servers on localhost for behaviour over
the wire (rate, values, outage and recovery, isolation of dead devices), and with a scripted
driver plus fake clocks where exact timing is the point (deadline grid, backoff delays)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import numpy as np
import pytest
from acqhelp import FakeClock, cnc_sim_device
from conftest import free_port
from pymodbus.server import ModbusTcpServer

import drivers.quality as dq
from appliance.acquire import Acquisition, DevicePoller
from appliance.config import DeviceConfig, ModbusTcpConfig
from appliance.contracts import Frame, Quality
from drivers.errors import DeviceUnavailable
from drivers.modbus.registers import load_profile
from drivers.quality import ReadResult

POLLER_LOG = "appliance.acquire.poller"
CNC_SIM = load_profile("cnc-sim")
#: cnc-sim values as the simulated machine holds them (see drivers/profiles/cnc-sim.toml).
CNC_VALUES = {
    "spindle_speed": 1200.0,
    "spindle_load": 45.5,
    "axis_load_x": -1.2,
    "axis_load_y": 3.0,
    "axis_load_z": 0.0,
    "spindle_temp": 38.25,
    "coolant_temp": 21.5,
    "vibration_rms": 1.75,
    "part_counter": 70000.0,
    "program_state": 1.0,
}


async def start_server(port: int) -> ModbusTcpServer:
    server = ModbusTcpServer(cnc_sim_device(), address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    return server


def cnc(name: str, port: int, interval_ms: int = 20, timeout_s: float = 0.5) -> DeviceConfig:
    return ModbusTcpConfig(
        name=name, port=port, poll_interval_ms=interval_ms, timeout_s=timeout_s, registers=CNC_SIM
    )


async def wait_for(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.005)


def poller_records(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == POLLER_LOG and r.levelno == level and text in r.getMessage()
    ]


def test_driver_quality_flags_are_the_contract_quality_values() -> None:
    assert (dq.GOOD, dq.STALE, dq.BAD) == (Quality.GOOD, Quality.STALE, Quality.BAD)


def test_polls_a_pymodbus_server_at_the_configured_rate_with_correct_values() -> None:
    frames: list[Frame] = []

    async def main() -> DevicePoller:
        port = free_port()
        server = await start_server(port)
        poller = DevicePoller(cnc("cnc-1", port, interval_ms=20), frames.append)
        task = asyncio.create_task(poller.run())
        await asyncio.sleep(0.5)
        await poller.close()
        await server.shutdown()
        assert task.done()
        return poller

    before = time.time()
    poller = asyncio.run(main())
    assert 15 <= len(frames) <= 27  # 0.5 s at 50 Hz is 25 polls (+1 at t=0)
    assert poller.stats()["polls"] == len(frames) and poller.state == "online"
    assert poller.stats()["errors"] == 0
    names = tuple(r.name for r in CNC_SIM)
    expected = [CNC_VALUES[n] for n in names]
    for frame in frames:
        assert frame.device == "cnc-1"
        assert frame.channels is frames[0].channels == names  # shared, never copied
        assert frame.channel.dtype == np.int32 and frame.channel.tolist() == list(range(10))
        assert frame.ts.dtype == np.float64 and len(set(frame.ts.tolist())) == 1
        assert before <= frame.ts[0] <= time.time()
        assert frame.value.dtype == np.float64
        assert frame.value.tolist() == pytest.approx(expected)
        assert frame.quality.dtype == np.uint8
        assert (frame.quality == Quality.GOOD).all()
    gaps = np.diff([f.ts[0] for f in frames])
    assert float(np.median(gaps)) == pytest.approx(0.020, abs=0.008)


def test_an_outage_logs_one_warning_holds_values_stale_and_recovery_resumes_good_frames(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=POLLER_LOG)
    frames: list[Frame] = []

    async def main() -> tuple[DevicePoller, int, int]:
        port = free_port()
        server = await start_server(port)
        poller = DevicePoller(
            cnc("cnc-1", port), frames.append, backoff_base_s=0.02, backoff_cap_s=0.1
        )
        task = asyncio.create_task(poller.run())
        try:
            await wait_for(lambda: len(frames) >= 3)
            assert poller.state == "online"
            await server.shutdown()
            await wait_for(lambda: poller.state == "offline")
            seen = len(frames)
            await asyncio.sleep(0.4)  # several failed reconnects while the server is down
            during = len(frames)
            assert poller.reconnects >= 2 and not task.done()
            server = await start_server(port)
            await wait_for(lambda: poller.state == "online")
            await wait_for(lambda: len(frames) >= during + 3)
        finally:
            await poller.close()
            await server.shutdown()
        return poller, seen, during

    poller, seen, during = asyncio.run(main())
    offline = poller_records(caplog, logging.WARNING, "offline")
    assert len(offline) == 1 and offline[0].startswith("device cnc-1 offline: ")
    assert len(poller_records(caplog, logging.INFO, "device cnc-1 online")) == 2  # start, back
    assert poller_records(caplog, logging.DEBUG, "still offline")
    assert poller.errors >= 3
    names = [r.name for r in CNC_SIM]
    expected = [CNC_VALUES[n] for n in names]
    held = frames[seen - 1 : during]  # from the failure on: the last good values, STALE
    assert len(held) >= 3 and poller.stale_values >= 30
    kinds = ["good" if (f.quality == Quality.GOOD).all() else "stale" for f in frames]
    runs = [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]
    assert runs == ["good", "stale", "good"]  # the outage is one explicit STALE stretch
    for frame, kind in zip(frames, kinds, strict=True):
        if kind == "stale":
            assert frame.quality.tolist() == [Quality.STALE] * 10
        assert frame.value.tolist() == pytest.approx(expected)


def test_a_dead_device_does_not_delay_polls_of_a_live_device() -> None:
    live: list[Frame] = []

    def sink(frame: Frame) -> None:
        assert frame.device == "live", "dead devices emit no frames"
        live.append(frame)

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # accept, never answer: every read runs into the timeout
        finally:
            writer.close()

    async def main() -> Acquisition:
        port = free_port()
        server = await start_server(port)
        mute = await asyncio.start_server(silent, "127.0.0.1", 0)
        devices = [
            cnc("refused", free_port(), timeout_s=0.3),
            cnc("live", port, interval_ms=20),
            cnc("mute", mute.sockets[0].getsockname()[1], timeout_s=0.3),
        ]
        acquisition = Acquisition(devices, sink, backoff_base_s=0.01, backoff_cap_s=0.05)
        try:
            await acquisition.start()
            await acquisition.start()  # idempotent while running
            await asyncio.sleep(1.0)
        finally:
            await acquisition.stop()
            await acquisition.stop()  # idempotent
            await server.shutdown()
            mute.close()
            await mute.wait_closed()
        return acquisition

    acquisition = asyncio.run(main())
    stats = {s["device"]: s for s in acquisition.stats()}
    assert stats["refused"]["state"] == "offline" and stats["mute"]["state"] == "offline"
    assert int(stats["mute"]["errors"]) >= 2  # it did hit its timeouts meanwhile
    assert len(live) >= 35  # 1 s at 50 Hz, with slack for a slow CI runner
    gaps = np.diff([f.ts[0] for f in live])
    assert float(gaps.max()) < 0.15  # never stalled behind a 0.3 s timeout


class ScriptedDriver:
    """Test double for a driver, for exact timing through the poller's clock seams (a real
    server cannot make reads take exactly 3.5 intervals). Each ``connect``/``read`` pops the
    next scripted step: an exception to raise, or seconds the call takes on the fake clock."""

    def __init__(
        self, clock: FakeClock, connects: list[float | Exception], reads: list[float | Exception]
    ) -> None:
        self.clock = clock
        self.connects = connects
        self.reads = reads
        self.read_starts: list[float] = []
        self.closes = 0

    async def connect(self) -> None:
        step = self.connects.pop(0) if self.connects else 0.0
        if isinstance(step, Exception):
            raise step
        self.clock.now += step

    async def read(self, group: str | None = None) -> ReadResult:
        self.read_starts.append(self.clock.now)
        step = self.reads.pop(0) if self.reads else 0.0
        if isinstance(step, Exception):
            raise step
        self.clock.now += step
        return ReadResult(values=np.zeros(10), quality=np.zeros(10, dtype=np.uint8))

    async def close(self) -> None:
        self.closes += 1


async def run_until_parked(poller: DevicePoller, clock: FakeClock) -> None:
    task = asyncio.create_task(poller.run())
    await clock.stopped.wait()
    await poller.close()
    assert task.cancelled()


def test_polls_stay_on_the_deadline_grid_and_overruns_skip_missed_deadlines() -> None:
    clock = FakeClock(stop_after_sleeps=5)  # 4 sleeps between polls, then the backoff
    reads: list[float | Exception] = [0.1, 3.5, 0.1, 0.2, 0.1, DeviceUnavailable("stop here")]
    driver = ScriptedDriver(clock, connects=[], reads=reads)
    frames: list[Frame] = []
    poller = DevicePoller(
        cnc("cnc-1", 502, interval_ms=1000),
        frames.append,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
        clock=lambda: 5.0,
        driver=driver,
    )
    asyncio.run(run_until_parked(poller, clock))
    # t0 = 100: polls at 100 and 101; the second takes 3.5 s, so deadlines 102 and 103 are
    # skipped (2 overruns), 104 runs late at 104.5, and the grid continues at 105, 106, 107.
    assert [round(t - 100.0, 6) for t in driver.read_starts] == [0, 1, 4.5, 5, 6, 7]
    assert poller.overruns == 2 and poller.polls == 5 and len(frames) == 6
    assert frames[-1].quality.tolist() == [Quality.STALE] * 10  # the outage, made explicit
    assert poller.last_jitter_ms == pytest.approx(0.0)
    assert frames[0].ts.tolist() == [5.0] * 10
    assert driver.closes == 3  # after the failure, by close(), when run() ended


def test_reconnect_backoff_is_capped_exponential_with_full_jitter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=POLLER_LOG)
    clock = FakeClock(stop_after_sleeps=9)
    refused: list[float | Exception] = [DeviceUnavailable("connection refused")] * 9
    driver = ScriptedDriver(clock, connects=refused, reads=[])
    jitter = iter([1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    poller = DevicePoller(
        cnc("cnc-1", 502),
        lambda f: None,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
        rng=lambda: next(jitter),
        driver=driver,
    )
    asyncio.run(run_until_parked(poller, clock))
    # base 0.5 s doubling, capped at 30 s, each scaled by the jitter draw
    assert clock.sleeps == [0.5, 0.5, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 0.0]
    assert poller.state == "offline" and poller.errors == 9 and poller.polls == 0
    assert poller_records(caplog, logging.WARNING, "offline") == [
        "device cnc-1 offline: connection refused"
    ]
    assert len(poller_records(caplog, logging.DEBUG, "still offline")) == 8


def test_backoff_restarts_from_the_base_after_a_successful_poll() -> None:
    clock = FakeClock(stop_after_sleeps=6)
    down = DeviceUnavailable("gone")
    driver = ScriptedDriver(clock, connects=[down, down, down, 0.0, down, down], reads=[0.0, down])
    poller = DevicePoller(
        cnc("cnc-1", 502),
        lambda f: None,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
        rng=lambda: 1.0,
        driver=driver,
    )
    asyncio.run(run_until_parked(poller, clock))
    # three refused connects (0.5, 1, 2), one good poll, 0.02 s to the next deadline, the
    # link drops, and the backoff starts again from the base: 0.5, then 1.
    assert clock.sleeps == pytest.approx([0.5, 1.0, 2.0, 0.02, 0.5, 1.0])
    assert poller.polls == 1 and poller.state == "offline"


def test_close_before_run_and_twice_is_harmless() -> None:
    clock = FakeClock(stop_after_sleeps=1)
    driver = ScriptedDriver(clock, connects=[], reads=[])
    poller = DevicePoller(cnc("cnc-1", 502), lambda f: None, driver=driver)

    async def main() -> None:
        await poller.close()
        await poller.close()
        await poller.run()  # returns at once: the poller is closed

    asyncio.run(main())
    assert poller.polls == 0 and poller.state == "connecting"


def test_a_device_without_resolved_registers_is_refused_at_construction() -> None:
    device = ModbusTcpConfig(name="cnc-9", profile="cnc-sim")  # not passed through load_config
    with pytest.raises(ValueError, match="no registers"):
        DevicePoller(device, lambda f: None)


@pytest.mark.parametrize("polls", [1, 2, 7, 999, 1000, 1001, 2503])
def test_jitter_percentiles_are_numpys_over_the_last_window_of_polls(polls: int) -> None:
    """Issue 11: the jitter window is a ring and p50/p99 come from two order statistics (not
    ``np.percentile`` per device per ``stats()``), with the very same values."""
    from appliance.acquire.poller import JITTER_WINDOW

    poller = DevicePoller(cnc("cnc-1", 502), lambda f: None)
    assert (poller.stats()["jitter_ms_p50"], poller.stats()["jitter_ms_max"]) == (0.0, 0.0)
    values = np.random.default_rng(polls).exponential(2.0, polls)
    for v in values:
        poller._note_jitter(float(v))
    last = values[-JITTER_WINDOW:]
    stats = poller.stats()
    p50, p99 = np.percentile(last, [50.0, 99.0])
    assert stats["jitter_ms_p50"] == pytest.approx(p50, rel=1e-12)
    assert stats["jitter_ms_p99"] == pytest.approx(p99, rel=1e-12)
    assert stats["jitter_ms_max"] == last.max()
    assert poller.recent_jitter_ms().tolist() == last.tolist()  # oldest first
    poller._note_jitter(1000.0)  # a new poll: computed again, not the cached figures
    assert poller.stats()["jitter_ms_max"] == 1000.0
