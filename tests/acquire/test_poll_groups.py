"""Poll groups, availability and STALE quality in DevicePoller and Acquisition: against real
peers (a pymodbus TCP server; modbus-tk's RTU server on a socat pty pair) for rates and bus
sharing, and with a scripted driver plus a fake clock where exact timing is the point."""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import threading
import time
from typing import Any

import modbus_tk.defines as cst
import msgspec
import numpy as np
import pytest
import serial
from acqhelp import FakeClock, cnc_sim_device
from conftest import free_port
from modbus_tk import modbus_rtu
from pymodbus.server import ModbusTcpServer

from appliance.acquire import Acquisition, DevicePoller
from appliance.config import ModbusRtuConfig, ModbusTcpConfig
from appliance.contracts import Frame, Quality
from drivers.errors import DeviceException
from drivers.modbus import framing
from drivers.modbus.registers import Register, load_profile
from drivers.quality import BAD, GOOD, ReadResult

POLLER_LOG = "appliance.acquire.poller"
SLOW = {"part_counter", "program_state", "coolant_temp"}
CNC = tuple(
    msgspec.structs.replace(r, group="slow") if r.name in SLOW else r
    for r in load_profile("cnc-sim")
)


def test_two_poll_groups_produce_frames_at_their_own_rates_on_one_connection() -> None:
    frames: list[Frame] = []

    async def main() -> DevicePoller:
        port = free_port()
        server = ModbusTcpServer(cnc_sim_device(), address=("127.0.0.1", port))
        await server.serve_forever(background=True)
        device = ModbusTcpConfig(
            name="cnc-1", port=port, registers=CNC, groups={"fast": 20, "slow": 200}
        )
        poller = DevicePoller(device, frames.append)
        task = asyncio.create_task(poller.run())
        await asyncio.sleep(0.65)
        await poller.close()
        await server.shutdown()
        assert task.done()
        return poller

    poller = asyncio.run(main())
    names = poller.channels
    slow_ids = sorted(names.index(n) for n in SLOW)
    slow = [f for f in frames if f.channel.tolist() == slow_ids]
    fast = [f for f in frames if f.channel.tolist() != slow_ids]
    assert 3 <= len(slow) <= 5  # 0.65 s at 5 Hz: t = 0, 0.2, 0.4, 0.6
    assert 18 <= len(fast) <= 34  # 0.65 s at 50 Hz (slack for a loaded CI runner)
    assert len(fast[0].channel) == 7 and all(f.channels is names for f in frames)
    by_name = dict(zip(names, fast[0].value.tolist(), strict=False))
    fast_values = dict(
        zip([names[i] for i in fast[0].channel], fast[0].value.tolist(), strict=True)
    )
    slow_values = dict(
        zip([names[i] for i in slow[0].channel], slow[0].value.tolist(), strict=True)
    )
    assert fast_values["spindle_speed"] == 1200.0 and fast_values["spindle_temp"] == 38.25
    assert slow_values == {"part_counter": 70000.0, "program_state": 1.0, "coolant_temp": 21.5}
    assert by_name  # frames carry channel ids into the shared channel tuple
    gaps = np.diff([f.ts[0] for f in slow])
    assert float(np.median(gaps)) == pytest.approx(0.2, abs=0.03)
    stats = poller.stats()
    assert stats["groups"] == {"fast": 20.0, "slow": 200.0}
    assert stats["polls"] == len(frames) and stats["state"] == "online"
    assert 0.0 <= stats["jitter_ms_p50"] <= stats["jitter_ms_p99"] < 100.0


class GroupDriver:
    """Test double for a two-group driver (a real server cannot refuse one group's read at an
    exact moment of a fake clock). ``refuse`` lists poll numbers (per group) whose read comes
    back refused: values BAD with an exception, as a driver reports a Modbus exception."""

    groups = {"fast": np.array([0, 1]), "slow": np.array([2])}

    def __init__(self, clock: FakeClock, refuse: dict[str, set[int]]) -> None:
        self.clock = clock
        self.refuse = refuse
        self.reads: list[tuple[str, float]] = []

    async def connect(self) -> None:
        pass

    async def read(self, group: str | None = None) -> ReadResult:
        assert group is not None
        n = sum(1 for g, _ in self.reads if g == group)
        self.reads.append((group, self.clock.now))
        idx = self.groups[group]
        if n in self.refuse.get(group, set()):
            problem = DeviceException(
                "refused", table="holding", address=0, count=1, function_code=3, exception_code=2
            )
            return ReadResult(
                np.full(len(idx), np.nan), np.full(len(idx), BAD, np.uint8), (problem,), idx
            )
        return ReadResult(idx + 10.0 * (n + 1), np.zeros(len(idx), np.uint8), (), idx)

    async def close(self) -> None:
        pass


REGS3 = (
    Register(name="a", address=0),
    Register(name="b", address=1),
    Register(name="c", address=2, group="slow"),
)


def test_a_refused_group_read_repeats_the_last_good_values_stale_then_bad(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=POLLER_LOG)
    clock = FakeClock(stop_after_sleeps=12)
    driver = GroupDriver(clock, refuse={"slow": {1, 2, 3, 4}, "fast": {3}})
    frames: list[Frame] = []
    device = ModbusTcpConfig(
        name="m", registers=REGS3, groups={"fast": 1000, "slow": 2000}, stale_after_s=5.0
    )
    poller = DevicePoller(
        device,
        frames.append,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
        clock=lambda: clock.now,
        driver=driver,
    )

    async def main() -> None:
        task = asyncio.create_task(poller.run())
        await clock.stopped.wait()
        await poller.close()
        assert task.cancelled()

    asyncio.run(main())
    slow = [(f.ts[0] - 100.0, f.value[0], f.quality[0]) for f in frames if f.channel[0] == 2]
    # read at t=0 (good, 10), refused at 2, 4 (stale: 2 and 4 s old), 6 (6 s > 5 s: BAD), 8;
    # answered again at 10
    assert [t for t, _, _ in slow] == [0, 2, 4, 6, 8, 10]
    assert [q for _, _, q in slow] == [GOOD, Quality.STALE, Quality.STALE, BAD, BAD, GOOD]
    assert slow[-1][1] == 62.0
    assert [v for _, v, _ in slow[:3]] == [12.0, 12.0, 12.0]
    assert all(math.isnan(v) for _, v, _ in slow[3:5])
    fast = [f for f in frames if f.channel[0] == 0]
    assert fast[3].quality.tolist() == [Quality.STALE] * 2  # one refused fast poll at t=3
    assert fast[3].value.tolist() == [30.0, 31.0]  # the poll at t=2 was the last good one
    assert poller.stale_values == 2 + 2 and poller.bad_values == 2
    assert poller.exception_responses == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("device m degraded (127.0.0.1:502)")
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == [
        "device m online (127.0.0.1:502)",
        "device m online (127.0.0.1:502): all reads answered again",
    ]


def test_a_degraded_device_logs_once_and_once_more_when_all_reads_are_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=POLLER_LOG)
    clock = FakeClock(stop_after_sleeps=8)
    driver = GroupDriver(clock, refuse={"fast": {1, 2, 3}})
    device = ModbusTcpConfig(name="m", registers=REGS3, groups={"fast": 1000, "slow": 5000})
    poller = DevicePoller(
        device, lambda f: None, monotonic=clock.monotonic, sleep=clock.sleep, driver=driver
    )

    async def main() -> None:
        task = asyncio.create_task(poller.run())
        await clock.stopped.wait()
        await poller.close()
        assert task.cancelled()

    asyncio.run(main())
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert messages == [
        (logging.INFO, "device m online (127.0.0.1:502)"),
        (logging.WARNING, "device m degraded (127.0.0.1:502): 1 reads refused: refused"),
        (logging.INFO, "device m online (127.0.0.1:502): all reads answered again"),
    ]
    assert poller.state == "online"


@pytest.mark.pty
@pytest.mark.filterwarnings(r"ignore:isSet\(\) is deprecated:DeprecationWarning")
def test_a_dead_rtu_unit_does_not_stall_a_live_unit_on_the_same_bus(
    pty_pair: tuple[str, str],
) -> None:
    ours, theirs = pty_pair
    line = serial.Serial(theirs, baudrate=19200)
    server = modbus_rtu.RtuServer(line, error_on_missing_slave=False)  # unit 6: no reply
    slave = server.add_slave(5)
    slave.add_block("hr", cst.HOLDING_REGISTERS, 0, 4)
    slave.set_values("hr", 0, list(struct.unpack(">4H", struct.pack(">fhH", 38.25, -456, 7))))
    registers = (
        Register(name="temp", address=0, type="float32"),
        Register(name="load", address=2, type="int16", scale=0.1),
        Register(name="unit", address=3),
    )
    live: list[Frame] = []

    def sink(frame: Frame) -> None:
        assert frame.device == "live", "the dead unit was never good: nothing to hold"
        live.append(frame)

    def rtu(name: str, unit: int, **kw: Any) -> ModbusRtuConfig:
        return ModbusRtuConfig(
            name=name, port=ours, unit_id=unit, parity="N", registers=registers, **kw
        )

    async def main() -> Acquisition:
        acquisition = Acquisition(
            [rtu("live", 5, poll_interval_ms=50), rtu("dead", 6, timeout_s=0.25)],
            sink,
            rng=lambda: 1.0,  # dead unit tries at t = 0 and 0.75 s (0.25 s each), then 2 s
            backoff_base_s=0.5,
            backoff_cap_s=1.0,
        )
        try:
            await acquisition.start()
            await asyncio.sleep(1.2)
        finally:
            await acquisition.stop()
        return acquisition

    server.start()
    try:
        acquisition = asyncio.run(main())
    finally:
        server.stop()
        line.close()
    stats = {s["device"]: s for s in acquisition.stats()}
    assert stats["dead"]["state"] == "offline" and int(stats["dead"]["errors"]) == 2
    assert stats["live"]["state"] == "online"
    assert stats["live"]["frame_errors"] == 0 and stats["live"]["busy_retries"] == 0
    assert stats["live"]["bus"] == stats["dead"]["bus"]  # one bus, one set of counters
    assert stats["live"]["bus"]["port"] == ours
    assert len(acquisition.buses) == 1
    (bus,) = acquisition.buses.values()
    assert not bus.is_open and bus.no_replies >= 2
    assert len(live) >= 10  # 1.2 s at 20 Hz, minus the 0.5 s the dead unit held the bus
    gaps = np.diff([f.ts[0] for f in live])
    assert float(gaps.max()) < 0.05 + 0.25 + 0.1  # one poll interval plus one dead timeout
    assert live[-1].value.tolist() == pytest.approx([38.25, -45.6, 7.0])


class CorruptingResponder:
    """A scripted RTU unit on the server end of a pty (test double: no real server corrupts its
    CRC on purpose). Answers FC 3 with registers 100, 101, ...; while ``corrupt`` is set it
    flips the last CRC byte."""

    def __init__(self, port: str) -> None:
        self.line = serial.Serial(port, baudrate=19200, timeout=0.02)
        self.corrupt = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CorruptingResponder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.line.close()

    def _run(self) -> None:
        buf = b""
        while not self._stop.is_set():
            buf += self.line.read(64)
            if len(buf) < 8:
                continue
            request, buf = buf[:8], buf[8:]
            count = int.from_bytes(request[4:6], "big")
            data = b"".join((100 + k).to_bytes(2, "big") for k in range(count))
            reply = framing.with_crc(bytes((request[0], 3, len(data))) + data)
            if self.corrupt.is_set():
                reply = reply[:-1] + bytes((reply[-1] ^ 0xFF,))
            self.line.write(reply)


@pytest.mark.pty
def test_garbled_rtu_replies_degrade_the_device_hold_values_stale_and_polling_goes_on(
    pty_pair: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=POLLER_LOG)
    ours, theirs = pty_pair
    frames: list[Frame] = []
    device = ModbusRtuConfig(
        name="vfd",
        port=ours,
        unit_id=4,
        parity="N",
        poll_interval_ms=20,
        timeout_s=0.3,
        registers=(Register(name="a", address=0), Register(name="b", address=1)),
    )

    async def main(responder: CorruptingResponder) -> DevicePoller:
        acquisition = Acquisition([device], frames.append)
        (poller,) = acquisition.pollers
        await acquisition.start()
        try:
            await wait_for(lambda: len(frames) >= 3)
            responder.corrupt.set()
            await wait_for(lambda: poller.state == "degraded")
            mark = len(frames)
            await wait_for(lambda: len(frames) >= mark + 3)
            responder.corrupt.clear()
            await wait_for(lambda: poller.state == "online")
            await wait_for(lambda: len(frames) >= mark + 8)
        finally:
            await acquisition.stop()
        return poller

    with CorruptingResponder(theirs) as responder:
        poller = asyncio.run(main(responder))
    stats = poller.stats()
    assert stats["frame_errors"] >= 3 and stats["bus"]["garbage"] == stats["frame_errors"]
    assert stats["errors"] == 0  # garbage is not an outage: no reconnects
    kinds = [int(f.quality.max()) for f in frames]
    runs = [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]
    assert runs == [GOOD, Quality.STALE, GOOD]
    assert all(f.value.tolist() == [100.0, 101.0] for f in frames)  # held, never dropped
    messages = [r.getMessage() for r in caplog.records if r.name == POLLER_LOG]
    assert [m.split(" (")[0] for m in messages if "device vfd" in m] == [
        "device vfd online",
        "device vfd degraded",
        "device vfd online",
    ]


async def wait_for(condition: Any, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.005)
