"""Staggered poll grids: Acquisition spreads the first deadline of every device (per poll group
and interval) evenly over the interval; the grid stays drift-free and survives reconnects.
Exact timing through DevicePoller's fake-clock seams, and once over the wire against a real
pymodbus server with a tolerance."""

from __future__ import annotations

import asyncio
import time

import msgspec
import numpy as np
import pytest
from acqhelp import FakeClock
from conftest import free_port
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from appliance.acquire import Acquisition, DevicePoller, stagger_phases
from appliance.config import DeviceConfig, ModbusTcpConfig, WaveformConfig
from appliance.contracts import Frame
from drivers.errors import DeviceUnavailable
from drivers.modbus.registers import Register, load_profile
from drivers.quality import ReadResult

CNC_SIM = load_profile("cnc-sim")
SLOW = {"part_counter", "program_state"}
GROUPED = tuple(msgspec.structs.replace(r, group="slow") if r.name in SLOW else r for r in CNC_SIM)
ONE_REGISTER = (Register(name="r0", address=0, type="uint16", table="holding"),)


def cnc(name: str, interval_ms: int = 100, **kw: object) -> DeviceConfig:
    return ModbusTcpConfig(name=name, poll_interval_ms=interval_ms, registers=CNC_SIM, **kw)  # type: ignore[arg-type]


class ScriptedDriver:
    """Reads take no fake time; ``fail_at`` lists read numbers (0-based) that drop the link."""

    def __init__(self, clock: FakeClock, fail_at: set[int]) -> None:
        self.clock = clock
        self.fail_at = fail_at
        self.read_starts: list[float] = []

    async def connect(self) -> None:
        return None

    async def read(self, group: str | None = None) -> ReadResult:
        n = len(self.read_starts)
        self.read_starts.append(self.clock.now)
        if n in self.fail_at:
            raise DeviceUnavailable("link dropped")
        return ReadResult(values=np.zeros(10), quality=np.zeros(10, dtype=np.uint8))

    async def close(self) -> None:
        return None


def test_stagger_spreads_each_interval_evenly_over_the_devices_that_share_it() -> None:
    devices = [
        cnc("a"),
        ModbusTcpConfig(
            name="b",
            registers=GROUPED,
            groups={"fast": 100, "slow": 1000},
            waveform=WaveformConfig(),
        ),
        cnc("c"),
        ModbusTcpConfig(name="d", registers=GROUPED, groups={"fast": 100, "slow": 1000}),
        cnc("e", interval_ms=40, waveform=WaveformConfig(interval_ms=50)),
    ]
    phases, waves = stagger_phases(devices)
    ms = [{g: round(p * 1000.0, 6) for g, p in d.items()} for d in phases]
    # four groups at 100 ms (a, b, c, d): 0, 25, 50, 75; two at 1000 ms (b, d): 0, 500;
    # one at 40 ms (e): 0; two waveforms at 50 ms (b, e): 0, 25
    assert ms == [
        {"fast": 0.0},
        {"fast": 25.0, "slow": 0.0},
        {"fast": 50.0},
        {"fast": 75.0, "slow": 500.0},
        {"fast": 0.0},
    ]
    assert [round(w * 1000.0, 6) for w in waves] == [0.0, 0.0, 0.0, 0.0, 25.0]
    assert stagger_phases(devices) == (phases, waves)  # deterministic
    acq = Acquisition(devices, lambda f: None)
    assert [p.phase_s for p in acq.pollers] == phases
    wave = acq.pollers[4].waveform
    assert wave is not None and wave.phase_s == pytest.approx(0.025)
    assert acq.stats()[3]["phase_ms"] == {"fast": pytest.approx(75.0), "slow": 500.0}
    flat = Acquisition(devices, lambda f: None, stagger=False)
    assert all(set(p.phase_s.values()) == {0.0} for p in flat.pollers)


def test_many_devices_share_slots_of_at_least_the_slot_width_and_slot_zero_spreads_each() -> None:
    devices = [cnc(f"m-{i}") for i in range(30)]
    slotted = [d["fast"] * 1000.0 for d in stagger_phases(devices, slot_s=0.02)[0]]
    # 100 ms / 20 ms = 5 slots of 6 devices each, in device order
    assert [round(p, 6) for p in slotted] == [float(20 * (i // 6)) for i in range(30)]
    default = [round(d["fast"] * 1000.0, 6) for d in stagger_phases(devices)[0]]
    assert default == [float(10 * (i // 3)) for i in range(30)]  # 10 ms slots: 3 per slot
    each = [d["fast"] * 1000.0 for d in stagger_phases(devices, slot_s=0.0)[0]]
    assert each == pytest.approx([i * 100.0 / 30 for i in range(30)])
    with pytest.raises(ValueError, match="slot_s"):
        stagger_phases(devices, slot_s=-1.0)


def test_a_phase_delays_the_first_poll_keeps_the_grid_and_a_reconnect_rejoins_it() -> None:
    clock = FakeClock(stop_after_sleeps=7)  # .25, 1, 1, backoff .35, .65, 1, then parked
    driver = ScriptedDriver(clock, fail_at={2})
    poller = DevicePoller(
        cnc("cnc-1", interval_ms=1000),
        lambda f: None,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
        rng=lambda: 0.7,  # backoff 0.7 * 0.5 s = 0.35 s
        driver=driver,
        phase_s=2.25,  # taken modulo the interval: 0.25 s
    )

    async def main() -> None:
        task = asyncio.create_task(poller.run())
        await clock.stopped.wait()
        await poller.close()
        assert task.cancelled()

    asyncio.run(main())
    # t0 = 100: polls at .25, 1.25, 2.25 (link drops), backoff to 102.6, which rejoins the
    # grid at 103.25 (not at 102.6), then 104.25
    assert [round(t - 100.0, 6) for t in driver.read_starts] == [0.25, 1.25, 2.25, 3.25, 4.25]
    assert poller.phase_s == {"fast": 0.25} and poller.last_jitter_ms == pytest.approx(0.0)


def test_with_n_devices_over_the_wire_the_first_polls_are_spread_over_the_interval() -> None:
    n, interval_s = 5, 0.2
    first: dict[str, float] = {}
    polls: dict[str, list[float]] = {}

    def sink(frame: Frame) -> None:
        t = float(frame.ts[0])  # clock=time.monotonic: frames carry monotonic seconds
        first.setdefault(frame.device, t)
        polls.setdefault(frame.device, []).append(t)

    async def main() -> float:
        port = free_port()
        dev = SimDevice(
            1,
            simdata=(
                [SimData(0, values=False, datatype=DataType.BITS)],
                [SimData(0, values=False, datatype=DataType.BITS)],
                [SimData(0, values=7, datatype=DataType.REGISTERS)],
                [SimData(0, values=0, datatype=DataType.REGISTERS)],
            ),
        )
        server = ModbusTcpServer(dev, address=("127.0.0.1", port))
        await server.serve_forever(background=True)
        devices = [
            ModbusTcpConfig(
                name=f"dev-{i}", port=port, poll_interval_ms=200, registers=ONE_REGISTER
            )
            for i in range(n)
        ]
        acq = Acquisition(devices, sink, clock=time.monotonic)
        t0 = time.monotonic()
        try:
            async with acq:
                deadline = time.monotonic() + 3.0
                while min((len(v) for v in polls.values()), default=0) < 3 or len(polls) < n:
                    assert time.monotonic() < deadline, "devices did not poll"
                    await asyncio.sleep(0.01)
        finally:
            await server.shutdown()  # type: ignore[no-untyped-call]
        return t0

    t0 = asyncio.run(main())
    # Device i's polls land at t0 + i/n * interval (+ k * interval): compare each device's
    # median phase on the grid (circular, so a poll late across the interval end still fits).
    for i in range(n):
        rel = (np.asarray(polls[f"dev-{i}"]) - t0) % interval_s
        expected = i / n * interval_s
        err = np.abs((rel - expected + interval_s / 2) % interval_s - interval_s / 2)
        assert float(np.median(err)) < 0.015, (i, rel.tolist())
    order = sorted(first, key=first.__getitem__)
    assert len(order) == n
    spread = max(first.values()) - min(first.values())
    assert 0.1 < spread < interval_s + 0.05  # first polls cover the interval, not one instant
