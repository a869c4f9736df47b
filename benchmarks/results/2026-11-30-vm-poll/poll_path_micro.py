#!/usr/bin/env python3
"""One-off measurement behind docs/benchmarks.md ("Saturation", the poll path's per-poll cost):
``timeit`` of each per-poll step of the acquisition path for one ``bench-50`` poll (50 uint16
holding registers, one request), without I/O. Best of 7 repeats, µs per call.

* ``decode``: ``Decoder.decode`` of one reply block (``np.frombuffer`` of the reply, as the
  native client hands it over);
* ``ReadResult``: building the result (its finiteness check);
* ``device.read``: ``ModbusDevice.read()`` of a device whose transport answers at once (the
  coroutine driven by hand: no event loop, no socket), decoding and ``ReadResult`` included;
* ``poller._emit``: ``DevicePoller._emit`` of one all-GOOD result, the Frame to a sink that
  drops it;
* the same for a mixed map (``int16``, scaled ``uint16``, ``float32`` ABCD/CDAB/BADC/DCBA).

Run from the tree to measure (for another checkout: ``PYTHONPATH=/that/tree``)::

    .venv/bin/python benchmarks/results/2026-11-30-vm-poll/poll_path_micro.py
"""

from __future__ import annotations

import os
import struct
import timeit
from collections.abc import Coroutine
from typing import Any

import numpy as np

import appliance
from appliance.acquire.poller import DevicePoller
from appliance.config import ModbusTcpConfig
from appliance.contracts import Frame
from drivers.modbus.device import ModbusDevice
from drivers.modbus.plan import Block, Decoder, ReadRequest, plan_reads
from drivers.modbus.registers import Register, load_profile
from drivers.quality import ReadResult


class InstantDevice(ModbusDevice):
    """A Modbus device whose transport answers every read at once with ``block``."""

    def __init__(self, registers: tuple[Register, ...], block: np.ndarray) -> None:
        super().__init__(1, registers, 1.0)
        self.block = block

    @property
    def connected(self) -> bool:
        return True

    async def close(self) -> None:
        return None

    async def _open(self) -> None:
        return None

    async def _read_block(self, req: ReadRequest) -> Block:
        return self.block[: req.count]


def drive(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("suspended")


def best_us(fn: Any, number: int = 2000) -> float:
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def mixed_map() -> tuple[tuple[Register, ...], np.ndarray]:
    regs: list[Register] = []
    words: list[int] = []
    for i in range(20):
        regs.append(Register(name=f"i{i}", address=len(words), type="int16"))
        words.append(65535 - i)
        regs.append(Register(name=f"s{i}", address=len(words), type="uint16", scale=0.1, offset=-4))
        words.append(1000 + i)
    for order in ("ABCD", "CDAB", "BADC", "DCBA"):
        for i in range(2):
            regs.append(
                Register(name=f"f{order}{i}", address=len(words), type="float32", order=order)
            )
            raw = struct.pack(">f", 1.5 + i)
            w = [int.from_bytes(raw[0:2], "big"), int.from_bytes(raw[2:4], "big")]
            if order in ("CDAB", "DCBA"):
                w.reverse()
            if order in ("BADC", "DCBA"):
                w = [int.from_bytes(x.to_bytes(2, "big")[::-1], "big") for x in w]
            words += w
    return tuple(regs), np.frombuffer(struct.pack(f">{len(words)}H", *words), ">u2")


def measure(label: str, regs: tuple[Register, ...], block: np.ndarray) -> None:
    requests = plan_reads(regs)
    dec = Decoder(regs, requests)
    blocks = [block[: r.count] for r in requests]
    values, quality = dec.decode(blocks)
    channels = np.arange(len(regs), dtype=np.intp)
    device = InstantDevice(regs, block)
    cfg = ModbusTcpConfig(name="m", host="127.0.0.1", port=1502, registers=regs)
    frames = 0

    def sink(frame: Frame) -> None:
        nonlocal frames
        frames += 1

    poller = DevicePoller(cfg, sink, driver=device)
    result = drive(device.read())
    group = next(iter(poller.group_intervals_s))
    poller._emit(group, result)
    print(f"{label}: {len(regs)} registers, {len(requests)} request(s)")
    print(f"  decode          {best_us(lambda: dec.decode(blocks)):6.2f} us")
    print(f"  ReadResult      {best_us(lambda: ReadResult(values, quality, (), channels)):6.2f} us")
    print(f"  device.read     {best_us(lambda: drive(device.read())):6.2f} us")
    print(f"  poller._emit    {best_us(lambda: poller._emit(group, result)):6.2f} us")


def main() -> None:
    print(f"# {appliance.__file__}, load {os.getloadavg()[0]:.2f}")
    regs = load_profile("bench-50")
    block = np.frombuffer(struct.pack(">50H", *range(7, 57)), ">u2")
    measure("bench-50", regs, block)
    measure("mixed", *mixed_map())
    print(f"# load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
