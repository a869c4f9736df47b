"""Waveforms in the acquisition stage: the `[devices.waveform]` config table, and an
Acquisition reading a real SimulatedCell's 1 kHz vibration FIFO (pymodbus servers on localhost)
into frames, windows, counters and log lines."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import free_port

import appliance.acquire.waveform as acquire_waveform
from appliance.acquire import Acquisition, DevicePoller
from appliance.config import ModbusTcpConfig, WaveformConfig, parse_config
from appliance.contracts import Frame, Quality, Window
from appliance.errors import ConfigError
from appliance.features.windows import WindowAggregator
from appliance.simulate.cell import SimulatedCell
from appliance.simulate.replay import Replay
from drivers.modbus.registers import load_profile
from drivers.modbus.waveform import FifoTracker, WaveformChunk, encode_block, parse_block
from drivers.quality import ReadResult

WAVE_LOG = "appliance.acquire.waveform"
CNC_SIM = load_profile("cnc-sim")
#: Constant spindle speed (rpm) and vibration RMS (mm/s) served by the cell while a test runs,
#: so the waveform's RMS has one known target (the model idles its spindle for seconds first).
RPM, VIB_RMS = 6000.0, 2.5


def steady_replay() -> Replay:
    """A replay that holds the spindle at RPM and the vibration register at VIB_RMS."""
    return Replay(
        t_s=np.array([0.0, 1.0]),
        channels={
            "spindle_speed": np.array([RPM, RPM]),
            "vibration_rms": np.array([VIB_RMS, VIB_RMS]),
        },
        period_s=2.0,
    )


def device(name: str, port: int, wave_ms: int = 50, **kw: Any) -> ModbusTcpConfig:
    return ModbusTcpConfig(
        name=name,
        port=port,
        registers=CNC_SIM,
        poll_interval_ms=100,
        timeout_s=0.5,
        waveform=WaveformConfig(interval_ms=wave_ms, **kw),
    )


async def wait_for(condition: Callable[[], bool], timeout_s: float = 4.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.01)


def wave_frames(frames: list[Frame], channel: str = "vibration_wave") -> list[Frame]:
    out = []
    for f in frames:
        ids = set(f.channel.tolist())
        if ids == {f.channels.index(channel)}:
            out.append(f)
    return out


def records(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == WAVE_LOG and r.levelno == level and text in r.getMessage()
    ]


# ----------------------------------------------------------------------------- configuration


def load(waveform: dict[str, Any], **device: Any) -> ModbusTcpConfig:
    dev = {"name": "cnc-1", "profile": "cnc-sim", "waveform": waveform, **device}
    cfg = parse_config({"devices": [dev]}, source="cell.toml", base_dir=Path("."))
    out = cfg.devices[0]
    assert isinstance(out, ModbusTcpConfig)
    return out


def test_an_empty_waveform_table_reads_the_simulators_fifo_defaults() -> None:
    wave = load({}).waveform
    assert wave == WaveformConfig(
        channel="vibration_wave", address=200, capacity=120, table="input", interval_ms=50
    )
    assert load({"channel": "acc_z", "table": "holding", "interval_ms": 20}).waveform == (
        WaveformConfig(channel="acc_z", table="holding", interval_ms=20)
    )


@pytest.mark.parametrize(
    ("waveform", "device", "message"),
    [
        ({"capacity": 121}, {}, r"devices\[0\] \(cnc-1\).waveform.capacity: Expected `int` <= 120"),
        ({"interval_ms": 0}, {}, r"devices\[0\] \(cnc-1\).waveform.interval_ms: "),
        ({"table": "coil"}, {}, r"devices\[0\] \(cnc-1\).waveform.table: "),
        ({"channel": "9x"}, {}, r"devices\[0\] \(cnc-1\).waveform.channel: "),
        (
            {"rate": 1000},
            {},
            r"devices\[0\] \(cnc-1\).waveform: Object contains unknown field `rate`",
        ),
        ({"address": 65500}, {}, r"devices\[0\] \(cnc-1\).waveform: .*runs past register 65535"),
        (
            {"channel": "vibration_rms"},
            {},
            r"devices\[0\] \(cnc-1\).waveform.channel: 'vibration_rms' is also a register",
        ),
        (
            {},
            {"protocol": "modbus_rtu", "port": "/dev/ttyUSB0"},
            r"devices\[0\] \(cnc-1\): Object contains unknown field `waveform`",
        ),
    ],
)
def test_a_bad_waveform_table_is_refused_at_load_naming_its_key_path(
    waveform: dict[str, Any], device: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=rf"^cell.toml: .*{message}"):
        load(waveform, **device)


def test_alert_rules_may_watch_a_waveform_channel() -> None:
    data = {
        "devices": [{"name": "cnc-1", "profile": "cnc-sim", "waveform": {}}],
        "alerts": {"rules": [{"name": "shock", "channel": "vibration_wave", "above": 20.0}]},
    }
    cfg = parse_config(data, source="cell.toml", base_dir=Path("."))
    assert cfg.alerts.rules[0].channel == "vibration_wave"


# ----------------------------------------------------------------------------- against the cell


def test_samples_arrive_at_1_khz_and_a_window_holds_a_second_of_them_at_the_register_rms() -> None:
    frames: list[Frame] = []
    windows: list[Window] = []
    agg = WindowAggregator(1.0, [windows.append])

    def sink(frame: Frame) -> None:
        frames.append(frame)
        agg.on_frame(frame)

    async def main() -> tuple[Acquisition, float]:
        port = free_port()
        acq = Acquisition([device("cnc-1", port)], sink)
        wave = acq.pollers[0].waveform
        assert wave is not None
        async with SimulatedCell(machines=1, ports=[port], replay=steady_replay()), acq:
            await wait_for(lambda: wave.samples > 0)
            t0, n0 = time.monotonic(), wave.samples
            await wait_for(lambda: len(windows) >= 2)  # the first is partial
            rate = (wave.samples - n0) / (time.monotonic() - t0)
        return acq, rate

    acq, rate = asyncio.run(main())
    stats = acq.stats()[0]
    wave = stats["waveform"]
    assert stats["state"] == "online" and wave["state"] == "online"
    assert 850 <= rate <= 1150, rate  # samples delivered per wall-clock second
    assert wave["rate_hz"] == pytest.approx(1000.0, rel=1e-3)
    assert wave["lost"] == wave["gaps"] == wave["resets"] == wave["resyncs"] == 0
    assert wave["samples"] >= 1000 and wave["reads"] > 20

    channels = acq.pollers[0].channels
    assert channels == (*(r.name for r in CNC_SIM), "vibration_wave")
    assert all(f.channels is channels for f in frames)  # one tuple: windows stay open
    waves = wave_frames(frames)
    assert 0 < len(waves) < len(frames)
    assert all(len(f.ts) > 1 for f in waves[1:])  # every new sample of a read, in one frame
    ts = np.concatenate([f.ts for f in waves])
    assert np.allclose(np.diff(ts), 1e-3, atol=1e-6)  # consecutive, 1 ms apart, no duplicate
    assert all((f.quality == Quality.GOOD).all() for f in waves)
    assert abs(ts[-1] - time.time()) < 1.0  # anchored on the wall clock

    w = channels.index("vibration_wave")
    reg = channels.index("vibration_rms")
    for window in windows[1:]:
        assert 900 <= window.count[w] <= 1100, window.count[w]
        assert window.count[reg] >= 5  # the registers' polls share the device's window
        assert window.mean[reg] == pytest.approx(VIB_RMS, rel=1e-3)
        assert window.rms[w] == pytest.approx(window.mean[reg], rel=0.1)
    assert agg.late_frames == 0


def test_reading_slower_than_the_fifo_holds_counts_lost_samples_marks_each_gap_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=WAVE_LOG)
    frames: list[Frame] = []
    windows: list[Window] = []
    agg = WindowAggregator(1.0, [windows.append])

    def sink(frame: Frame) -> None:
        frames.append(frame)
        agg.on_frame(frame)

    async def main() -> Acquisition:
        port = free_port()
        # 200 ms between reads, but the FIFO holds 120 samples = 120 ms at 1 kHz
        acq = Acquisition([device("cnc-1", port, wave_ms=200)], sink)
        wave = acq.pollers[0].waveform
        assert wave is not None
        async with SimulatedCell(machines=1, ports=[port], replay=steady_replay()), acq:
            await wait_for(lambda: wave.gaps >= 3)
        agg.flush()
        return acq

    wave = asyncio.run(main()).stats()[0]["waveform"]
    assert wave["gaps"] >= 3 and wave["lost"] >= 3 * 40  # about 80 lost per 200 ms read
    waves = wave_frames(frames)
    placeholders = [f for f in waves if f.quality[0] == Quality.BAD]
    assert len(placeholders) == wave["gaps"]
    for f in placeholders:  # one BAD NaN sample at the first lost sample's time, then GOOD
        assert np.isnan(f.value[0]) and (f.quality[1:] == Quality.GOOD).all()
        assert len(f.ts) == 1 + 120  # after a gap, the read returns the whole FIFO
        assert 0.02 < f.ts[1] - f.ts[0] < 0.2  # the lost stretch, in seconds
    good = sum(int((f.quality == Quality.GOOD).sum()) for f in waves)
    assert good == wave["samples"]
    w = frames[0].channels.index("vibration_wave")
    assert sum(int(win.count[w]) for win in windows) == wave["samples"]  # BAD never counted
    warnings = records(caplog, logging.WARNING, "lost")
    assert len(warnings) == 1  # one per gap episode, the rest at debug
    assert "reads every 200 ms; the FIFO holds 120 samples = 120 ms at 1000 Hz" in warnings[0]
    assert len(records(caplog, logging.DEBUG, "lost")) == wave["gaps"] - 1


def test_a_dead_waveform_device_backs_off_alone_and_a_missing_fifo_only_degrades_the_waveform(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=WAVE_LOG)

    async def main() -> tuple[Acquisition, float]:
        live, bare = free_port(), free_port()
        devices = [
            device("dead", free_port()),
            device("live", live),
            device("no-fifo", bare),
        ]
        async with (
            SimulatedCell(machines=1, ports=[live], replay=steady_replay()),
            SimulatedCell(machines=1, ports=[bare], fifo_address=None),
        ):
            acq = Acquisition(devices, lambda f: None, backoff_base_s=0.01, backoff_cap_s=0.05)
            async with acq:
                wave = acq.pollers[1].waveform
                assert wave is not None
                await wait_for(lambda: wave.samples > 0)
                # Over 1.5 s, not less: a read delayed by a loaded machine leaves its samples
                # out of the count at the end of the span, a larger share of a short one.
                t0, n0 = time.monotonic(), wave.samples
                await asyncio.sleep(1.5)
                rate = (wave.samples - n0) / (time.monotonic() - t0)
        return acq, rate

    acq, rate = asyncio.run(main())
    stats = {s["device"]: s for s in acq.stats()}
    dead, live, no_fifo = stats["dead"], stats["live"], stats["no-fifo"]
    assert 800 <= rate <= 1200, rate
    assert live["waveform"]["lost"] == 0 and live["waveform"]["state"] == "online"
    assert dead["waveform"]["state"] == "offline" and dead["waveform"]["errors"] >= 3
    assert dead["waveform"]["reconnects"] >= 2 and dead["waveform"]["samples"] == 0
    assert no_fifo["state"] == "online"  # its registers are fine
    assert no_fifo["waveform"]["state"] == "degraded"
    assert no_fifo["waveform"]["exception_responses"] >= 5
    assert records(caplog, logging.WARNING, "dead: waveform vibration_wave offline") != []
    assert len(records(caplog, logging.WARNING, "offline")) == 1  # logged once
    degraded = records(caplog, logging.WARNING, "degraded")
    assert len(degraded) == 1 and "no-fifo" in degraded[0] and "exception 2" in degraded[0]


# ----------------------------------------------------------------------------- exact timing


class FakeTime:
    """Monotonic seconds that move only when the reader sleeps or a read takes time; wall time
    is monotonic + 1e9. Parks the reader after ``stop_after_sleeps`` sleeps."""

    def __init__(self, stop_after_sleeps: int) -> None:
        self.now = 100.0
        self.sleeps = 0
        self.stop_after_sleeps = stop_after_sleeps
        self.stopped = asyncio.Event()

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1e9 + self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds
        if self.sleeps >= self.stop_after_sleeps:
            self.stopped.set()
            await asyncio.Event().wait()


class ScriptedFifo:
    """A device FIFO of 120 samples filled at 1 kHz of fake time (sample ``k`` is due at
    ``k / 1000`` s), read through a real FifoTracker. ``durations``: seconds each read takes
    (a slow read lets the FIFO overrun); ``reset_at``: read number at which the device's
    counter restarts (200 samples before that read; -1: never)."""

    def __init__(self, clock: FakeTime, durations: list[float], reset_at: int = -1) -> None:
        self.clock = clock
        self.durations = durations
        self.reset_at = reset_at
        self.reads = 0
        self.offset = 0
        self.tracker = FifoTracker()

    async def connect(self) -> None:
        return None

    async def read(self) -> WaveformChunk:
        self.clock.now += self.durations.pop(0) if self.durations else 0.0
        if self.reads == self.reset_at:
            self.offset = round(self.clock.now * 1000) - 200  # restarted 200 samples ago
        self.reads += 1
        newest = round(self.clock.now * 1000) - self.offset
        first = newest - 119
        raw = (np.arange(first, newest + 1) % 1000).astype(np.int16)
        block = parse_block(encode_block(first, raw, 120, 1000, 1000))
        return self.tracker.update(block, self.clock.wall())

    async def close(self) -> None:
        return None


def run_waveform(fifo: ScriptedFifo, clock: FakeTime) -> tuple[DevicePoller, list[Frame]]:
    """Run only the waveform reader of a DevicePoller on ``fifo`` until the clock parks it."""
    frames: list[Frame] = []
    poller = DevicePoller(
        device("cnc-1", 502),
        frames.append,
        clock=clock.wall,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
        driver=ScriptedRegisters(),
        waveform_source=fifo,
    )
    wave = poller.waveform
    assert wave is not None and wave.source is fifo

    async def main() -> None:
        task = asyncio.create_task(wave.run())
        await clock.stopped.wait()
        await poller.close()
        assert task.cancelled()

    asyncio.run(main())
    return poller, frames


def test_a_gap_episode_warns_once_and_ends_with_one_info_after_a_quiet_period(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG, logger=WAVE_LOG)
    monkeypatch.setattr(acquire_waveform, "GAP_QUIET_S", 0.3)
    clock = FakeTime(stop_after_sleeps=20)
    # reads 2 and 3 take 200 ms: the 120-sample FIFO overruns twice (250 ms since read 1, then
    # 200 ms: 130 and 80 samples lost), then reads are on time again
    fifo = ScriptedFifo(clock, durations=[0.0, 0.0, 0.2, 0.2])
    poller, frames = run_waveform(fifo, clock)
    stats = poller.stats()["waveform"]
    assert stats["gaps"] == 2 and stats["lost"] == 130 + 80 and stats["resets"] == 0
    assert stats["overruns"] >= 4 and stats["resyncs"] == 0 and stats["state"] == "online"
    assert stats["samples"] == fifo.tracker.samples
    assert stats["rate_hz"] == pytest.approx(1000.0, abs=0.1)
    placeholders = [f for f in frames if f.quality[0] == Quality.BAD]
    assert [round(float(f.ts[1] - f.ts[0]), 6) for f in placeholders] == [0.13, 0.08]
    assert records(caplog, logging.WARNING, "lost") == [
        "device cnc-1: waveform vibration_wave lost 130 samples (reads every 50 ms; the FIFO "
        "holds 120 samples = 120 ms at 1000 Hz)"
    ]
    assert len(records(caplog, logging.DEBUG, "lost 80 more samples")) == 1
    assert records(caplog, logging.INFO, "continuous again") == [
        "device cnc-1: waveform vibration_wave continuous again for 0 s (210 samples lost in "
        "2 gaps)"
    ]
    ts = np.concatenate([f.ts[f.quality == Quality.GOOD] for f in frames])
    steps_ms = np.round(np.diff(ts) * 1000.0, 3)
    assert steps_ms.tolist().count(1.0) == len(ts) - 3  # every sample once, 1 ms apart...
    assert sorted(set(steps_ms.tolist()) - {1.0}) == [81.0, 131.0]  # ...but across the gaps


def test_after_a_device_reset_the_stream_goes_on_without_repeating_samples() -> None:
    clock = FakeTime(stop_after_sleeps=12)
    fifo = ScriptedFifo(clock, durations=[], reset_at=5)
    poller, frames = run_waveform(fifo, clock)
    stats = poller.stats()["waveform"]
    assert stats["resets"] == 1
    assert stats["samples"] == 120 + 4 * 50 + 120 + 6 * 50  # each sample once


class ScriptedRegisters:
    """A register driver that is never run (only the waveform reader runs in this test)."""

    async def connect(self) -> None:
        return None

    async def read(self) -> ReadResult:
        raise AssertionError("not polled in this test")

    async def close(self) -> None:
        return None
