"""The poller's all-GOOD fast path (issue 11) sends the same frames and keeps the same counters
and state as its general path, poll for poll: the same scripted answers go through a real
:class:`~drivers.modbus.device.ModbusDevice` (planning, decoding, ``ReadResult``) into one poller
that takes the fast path and one that never does, on the same fake clock."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import msgspec
import pytest
from acqhelp import FakeClock

from appliance.acquire import DevicePoller
from appliance.config import ModbusTcpConfig
from appliance.contracts import Frame, Quality
from drivers.modbus import codec
from drivers.modbus.device import ModbusDevice
from drivers.modbus.plan import Block, ReadRequest
from drivers.modbus.registers import Register

#: Holding registers (group "fast"): a scaled uint16, an int16, a float32 in each word order;
#: input registers (group "slow" where the device has two groups): plain uint16.
FLOAT_ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
HOLDING = (
    Register(name="speed", address=0, type="uint16", scale=0.1, offset=-5.0),
    Register(name="load", address=1, type="int16"),
    *(
        Register(name=f"temp_{o.lower()}", address=2 + 2 * k, type="float32", order=o)
        for k, o in enumerate(FLOAT_ORDERS)
    ),
)
INPUT = tuple(Register(name=f"in{k}", address=k, table="input", group="slow") for k in range(3))


def holding_words(step: int, nan_in: str | None = None) -> list[int]:
    words = codec.encode(1000 + step, "uint16") + codec.encode(-7 - step, "int16")
    for o in FLOAT_ORDERS:
        words += codec.encode(math.nan if o == nan_in else 21.5 + step, "float32", o)
    return words


#: Per table, the answer to each successive read: words, or a Modbus exception code (refused).
SCRIPT: dict[str, list[list[int] | int]] = {
    "holding": [
        holding_words(0),
        holding_words(1, nan_in="CDAB"),  # a NaN float: that value BAD, held STALE
        holding_words(2),
        2,  # refused: every holding value STALE (fresh last good values)
        2,
        2,  # ... until stale_after_s has passed: BAD
        holding_words(6),
        holding_words(7, nan_in="DCBA"),
    ],
    "input": [[1, 2, 3], 4, [4, 5, 6], [7, 8, 9], [7, 8, 9], [1, 1, 1], [2, 2, 2], [3, 3, 3]],
}


class ScriptedModbus(ModbusDevice):
    """A Modbus device whose transport answers from :data:`SCRIPT` at once: a test double, so
    that two pollers get exactly the same answers at the same fake-clock times (a real server
    cannot refuse a read, or serve a NaN, at an exact point of a fake clock)."""

    def __init__(self, registers: tuple[Register, ...]) -> None:
        super().__init__(1, registers, 1.0)
        self.answered = {table: 0 for table in SCRIPT}

    @property
    def connected(self) -> bool:
        return True

    async def close(self) -> None:
        pass

    async def _open(self) -> None:
        pass

    async def _read_block(self, req: ReadRequest) -> Block:
        answers = SCRIPT[req.table]
        step = self.answered[req.table]
        self.answered[req.table] += 1
        answer = answers[min(step, len(answers) - 1)]
        if isinstance(answer, int):
            raise self._refused(req, f"exception {answer}", answer)
        return answer


class GeneralPathPoller(DevicePoller):
    """The poller with its all-GOOD fast path turned off."""

    _all_good_fast_path = False


def run_poller(cls: type[DevicePoller], groups: dict[str, int]) -> tuple[list[Frame], Any]:
    registers = HOLDING + INPUT
    if not groups:
        registers = HOLDING + tuple(msgspec.structs.replace(r, group="fast") for r in INPUT)
    device = ModbusTcpConfig(
        name="m", registers=registers, groups=groups, poll_interval_ms=1000, stale_after_s=1.5
    )
    clock = FakeClock(stop_after_sleeps=8)
    frames: list[Frame] = []
    states: list[str] = []

    def sink(frame: Frame) -> None:
        frames.append(frame)
        states.append(poller.state)

    poller = cls(
        device,
        sink,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
        clock=lambda: clock.now,
        driver=ScriptedModbus(registers),
    )

    async def main() -> None:
        task = asyncio.create_task(poller.run())
        await clock.stopped.wait()
        await poller.close()
        assert task.cancelled()

    asyncio.run(main())
    stats = poller.stats()
    keep = ("polls", "exception_responses", "stale_values", "bad_values", "state", "errors")
    return frames, ({k: stats[k] for k in keep}, states)


@pytest.mark.parametrize(
    "groups",
    [pytest.param({}, id="one group"), pytest.param({"fast": 1000, "slow": 2000}, id="two groups")],
)
def test_the_all_good_fast_path_sends_what_the_general_path_sends(groups: dict[str, int]) -> None:
    fast_frames, fast_counters = run_poller(DevicePoller, groups)
    general_frames, general_counters = run_poller(GeneralPathPoller, groups)
    assert len(fast_frames) == len(general_frames) >= 8
    for fast, general in zip(fast_frames, general_frames, strict=True):
        assert fast.device == general.device and fast.channels is not None
        assert fast.channels == general.channels
        assert fast.ts.tobytes() == general.ts.tobytes()
        assert fast.channel.tolist() == general.channel.tolist()
        assert fast.value.tobytes() == general.value.tobytes()  # bit for bit, NaN included
        assert fast.quality.tolist() == general.quality.tolist()
    assert fast_counters == general_counters
    # The script did reach every case: all-GOOD polls, a NaN float, STALE holds, BAD values.
    qualities = [set(f.quality.tolist()) for f in fast_frames]
    assert {Quality.GOOD} in qualities
    assert any(Quality.STALE in q for q in qualities) and any(Quality.BAD in q for q in qualities)
    names = fast_frames[0].channels
    first = {names[i]: v for i, v in zip(fast_frames[0].channel, fast_frames[0].value, strict=True)}
    assert first["speed"] == pytest.approx(95.0) and first["load"] == -7.0
    assert all(first[f"temp_{o.lower()}"] == 21.5 for o in FLOAT_ORDERS)
    counters, states = fast_counters
    assert counters["stale_values"] > 0 and counters["bad_values"] > 0
    assert {"online", "degraded"} <= set(states)
