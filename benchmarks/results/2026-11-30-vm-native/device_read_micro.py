#!/usr/bin/env python3
"""One-off measurement behind docs/benchmarks.md ("Native Modbus TCP client"): CPU per request
of each layer, ``N`` devices (default 100) polled back to back in one process against the
``bench-50`` servers of ``benchmarks/acquisition.py --serve`` (their own process).

Loops, each 3 s after 0.5 s of warm-up, in the order given on the command line:
``acq-native``/``acq-pymodbus`` (``Acquisition`` at a 1 ms poll interval, as ``--mode max``),
``native``/``pymodbus`` (``ModbusTcpDevice.read()`` in a loop, no poller), ``bare`` (pymodbus'
``read_holding_registers`` in a loop, no decoding).

    N=100 .venv/bin/python benchmarks/results/2026-11-30-vm-native/device_read_micro.py \\
        acq-native native bare acq-pymodbus pymodbus bare
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from pymodbus.client import AsyncModbusTcpClient  # noqa: E402

from appliance.acquire import Acquisition  # noqa: E402
from appliance.config import ModbusTcpConfig  # noqa: E402
from appliance.contracts import Frame  # noqa: E402
from drivers.modbus.registers import load_profile  # noqa: E402
from drivers.modbus.tcp import ModbusTcpDevice  # noqa: E402

REGS = load_profile("bench-50")


async def run(kind: str, ports: list[int], seconds: float = 3.0) -> str:
    count = 0
    stop = False

    async def one(port: int) -> None:
        nonlocal count
        if kind == "bare":
            client = AsyncModbusTcpClient("127.0.0.1", port=port, retries=0, reconnect_delay=0)
            await client.connect()
            while not stop:
                await client.read_holding_registers(0, count=50, device_id=1)
                count += 1
            client.close()
            return
        device = ModbusTcpDevice("127.0.0.1", port, 1, REGS, 2.0, client=kind)  # type: ignore[arg-type]
        await device.connect()
        while not stop:
            await device.read()
            count += 1
        await device.close()

    def sink(frame: Frame) -> None:
        nonlocal count
        count += 1

    acq: Acquisition | None = None
    tasks: list[asyncio.Task[Any]] = []
    if kind.startswith("acq-"):
        client: Any = kind.split("-", 1)[1]
        configs = [
            ModbusTcpConfig(
                name=f"b{i}",
                port=p,
                poll_interval_ms=1,
                timeout_s=2.0,
                registers=REGS,
                client=client,
            )
            for i, p in enumerate(ports)
        ]
        acq = Acquisition(configs, sink)
        await acq.start()
    else:
        tasks = [asyncio.create_task(one(p)) for p in ports]
    await asyncio.sleep(0.5)
    cpu0, n0, wall0 = time.process_time(), count, time.perf_counter()
    await asyncio.sleep(seconds)
    cpu1, n1, wall1 = time.process_time(), count, time.perf_counter()
    stop = True
    if acq is not None:
        await acq.stop()
    await asyncio.gather(*tasks)
    n = n1 - n0
    return (
        f"{kind:13} {n / (wall1 - wall0):8.0f} req/s  {1e6 * (cpu1 - cpu0) / n:6.1f} us CPU/request"
    )


def main() -> None:
    devices = int(os.environ.get("N", "100"))
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "acquisition.py"), "--serve"]
        + ["--devices", str(devices)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        ports = json.loads(server.stdout.readline())["ports"]
        print(f"# {devices} devices, load {os.getloadavg()[0]:.2f}")
        for kind in sys.argv[1:] or ["acq-native", "native", "bare"]:
            print(asyncio.run(run(kind, ports)), flush=True)
        print(f"# load {os.getloadavg()[0]:.2f}")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
