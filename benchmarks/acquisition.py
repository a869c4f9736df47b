#!/usr/bin/env python3
"""Acquisition benchmark: many Modbus TCP devices polled by ``appliance.acquire.Acquisition``.

Scenario (defaults: the issue's target): ``--devices`` simulated devices × ``--registers``
contiguous uint16 holding registers (the ``bench-50`` profile when 50), polled at ``--rate-hz``
over TCP on loopback. The devices run in a separate *server process* (``appliance simulate
--profile bench-N``: one pymodbus server per device, N constant holding registers, on a block of
free ports), so the poller process measures only its own CPU.

For each mode the same devices are driven twice, one after the other, in this process:

* ``acquisition``: ``Acquisition`` with ``ModbusTcpDevice`` drivers (Modbus TCP client
  ``--client``: ``native``, the default, or ``pymodbus``) and a Frame sink that only counts (and
  records each poll's start lateness from the poller);
* ``bare``: one plain ``pymodbus.client.AsyncModbusTcpClient`` per device calling
  ``read_holding_registers(0, count=REGISTERS)`` in a loop, no decoding, no frames.

Modes: ``paced`` runs both loops on the same monotonic deadline grid at ``--rate-hz``
(``bare rate`` = the request rate the bare loop achieves at that target); ``max`` runs both as
fast as they can (acquisition with a 1 ms poll interval, bare loop back to back; ``bare rate`` =
the bare loop's saturated request rate, i.e. the capacity of pymodbus + the server on this
machine). Each run warms up for ``--warmup`` s, then measures for ``--seconds`` s.

Reported per run: requests/s achieved (all devices) and as % of configured, poll start jitter
p50/p99/max (ms late against the deadline grid), CPU % of one core used by this process
(``time.process_time`` over the measured window) and by the server process (``/proc``), errors.
Per mode: acquisition rate ÷ bare rate. Targets from issue 3: ≥ 90 % of the bare rate, jitter
p99 ≤ 5 ms (paced).

Run ``python benchmarks/acquisition.py --help``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from appliance.acquire import Acquisition
from appliance.config import ModbusTcpConfig
from appliance.contracts import Frame
from appliance.demo.mosquitto import free_port_block, wait_port
from drivers.modbus.registers import Register, load_profile

TARGET_RATIO = 0.90
TARGET_JITTER_P99_MS = 5.0
#: How long a run's teardown may take before the benchmark reports it and moves on (s).
STOP_TIMEOUT_S = 10.0


# ----------------------------------------------------------------------------- server process


def _proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (Linux ``/proc``), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# ----------------------------------------------------------------------------- measurement


class Window:
    """Counts requests and collects jitter only inside the measured window."""

    def __init__(self) -> None:
        self.measuring = False
        self.requests = 0
        self.jitter_ms: list[float] = []

    def note(self, jitter_ms: float) -> None:
        if self.measuring:
            self.requests += 1
            self.jitter_ms.append(jitter_ms)


async def _measure(
    window: Window, warmup_s: float, seconds: float, server_pid: int
) -> dict[str, float]:
    await asyncio.sleep(warmup_s)
    cpu0, wall0, srv0 = time.process_time(), time.perf_counter(), _proc_cpu_s(server_pid)
    window.measuring = True
    await asyncio.sleep(seconds)
    window.measuring = False
    cpu1, wall1, srv1 = time.process_time(), time.perf_counter(), _proc_cpu_s(server_pid)
    wall = wall1 - wall0
    out = {"wall_s": wall, "cpu_pct": 100.0 * (cpu1 - cpu0) / wall}
    if srv0 is not None and srv1 is not None:
        out["server_cpu_pct"] = 100.0 * (srv1 - srv0) / wall
    return out


def _summary(
    window: Window, timing: dict[str, float], devices: int, rate_hz: float | None, errors: int
) -> dict[str, Any]:
    wall = timing["wall_s"]
    rate = window.requests / wall
    jit = np.asarray(window.jitter_ms) if window.jitter_ms else np.zeros(1)
    paced = rate_hz is not None
    out: dict[str, Any] = {
        "requests": window.requests,
        "requests_per_s": round(rate, 1),
        "per_device_hz": round(rate / devices, 2),
        # Jitter = how late each poll started against its deadline; only paced runs have one.
        "jitter_p50_ms": round(float(np.percentile(jit, 50)), 3) if paced else None,
        "jitter_p99_ms": round(float(np.percentile(jit, 99)), 3) if paced else None,
        "jitter_max_ms": round(float(jit.max()), 3) if paced else None,
        "cpu_pct": round(timing["cpu_pct"], 1),
        "errors": errors,
        "wall_s": round(wall, 3),
    }
    if "server_cpu_pct" in timing:
        out["server_cpu_pct"] = round(timing["server_cpu_pct"], 1)
    if rate_hz is not None:
        out["pct_of_configured"] = round(100.0 * rate / (devices * rate_hz), 1)
    return out


async def run_acquisition(
    ports: Sequence[int],
    registers: tuple[Register, ...],
    interval_ms: int,
    args: argparse.Namespace,
    server_pid: int,
) -> dict[str, Any]:
    """Poll every device with ``Acquisition``; the sink counts frames."""
    devices = [
        ModbusTcpConfig(
            name=f"bench-{i:03d}",
            host=args.host,
            port=port,
            poll_interval_ms=interval_ms,
            timeout_s=2.0,
            registers=registers,
            client=args.client,
        )
        for i, port in enumerate(ports)
    ]
    window = Window()
    pollers: dict[str, Any] = {}

    def sink(frame: Frame) -> None:
        # Only answered polls count (a poller may also send STALE/BAD frames while a device is
        # offline). The poller sets last_jitter_ms just before the read behind this frame.
        if not frame.quality.any():
            window.note(pollers[frame.device].last_jitter_ms)

    acq = Acquisition(devices, sink)
    pollers.update({p.name: p for p in acq.pollers})
    await acq.start()
    try:
        timing = await _measure(window, args.warmup, args.seconds, server_pid)
    finally:
        try:
            await asyncio.wait_for(acq.stop(), timeout=STOP_TIMEOUT_S)
        except asyncio.TimeoutError:
            print(
                f"WARNING: Acquisition.stop() did not return within {STOP_TIMEOUT_S:g} s",
                file=sys.stderr,
            )
    errors = sum(int(s["errors"]) for s in acq.stats())
    rate = None if interval_ms <= 1 else 1000.0 / interval_ms
    return _summary(window, timing, len(ports), rate, errors)


async def run_bare(
    ports: Sequence[int],
    count: int,
    interval_s: float | None,
    args: argparse.Namespace,
    server_pid: int,
) -> dict[str, Any]:
    """One plain pymodbus client per device reading the block on a grid (or back to back)."""
    from pymodbus.client import AsyncModbusTcpClient

    window = Window()
    errors = 0
    running = True
    clients = [
        AsyncModbusTcpClient(args.host, port=p, timeout=2.0, retries=0, reconnect_delay=0)
        for p in ports
    ]
    await asyncio.gather(*(c.connect() for c in clients))

    async def loop_one(i: int, client: AsyncModbusTcpClient) -> None:
        nonlocal errors
        deadline = time.monotonic()
        if interval_s is not None and args.stagger_bare:
            deadline += interval_s * i / len(clients)
        while running:
            if interval_s is not None:
                delay = deadline - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            jitter_ms = (time.monotonic() - deadline) * 1000.0 if interval_s else 0.0
            try:
                resp = await client.read_holding_registers(0, count=count, device_id=1)
            except Exception:  # a benchmark counts failures, it does not handle them
                errors += window.measuring
                await asyncio.sleep(0.1)
                continue
            if resp.isError():
                errors += window.measuring
            else:
                window.note(jitter_ms)
            if interval_s is not None:
                deadline += interval_s
                late = time.monotonic() - deadline
                if late > interval_s:
                    deadline += (late // interval_s) * interval_s

    tasks = [asyncio.create_task(loop_one(i, c)) for i, c in enumerate(clients)]
    try:
        timing = await _measure(window, args.warmup, args.seconds, server_pid)
    finally:
        # Let each loop finish its request in flight (a cancelled one leaves an orphan answer
        # that pymodbus logs), and never rely on cancel() alone: Python 3.10/3.11's wait_for,
        # which pymodbus awaits answers with, can swallow a cancellation that races an answer.
        running = False
        _, late = await asyncio.wait(tasks, timeout=5.0)
        for t in late:
            t.cancel()
        if late:
            await asyncio.wait(late, timeout=5.0)
        for c in clients:
            c.close()
    rate = None if interval_s is None else 1.0 / interval_s
    return _summary(window, timing, len(ports), rate, errors)


async def bench(args: argparse.Namespace, ports: list[int], server_pid: int) -> dict[str, Any]:
    if args.registers == 50:
        registers = load_profile("bench-50")
    else:
        registers = tuple(
            Register(name=f"r{i:03d}", address=i, type="uint16", table="holding")
            for i in range(args.registers)
        )
    interval_ms = max(1, round(1000.0 / args.rate_hz))
    modes = ["paced", "max"] if args.mode == "both" else [args.mode]
    result: dict[str, Any] = {}
    for mode in modes:
        if mode == "paced":
            acq = await run_acquisition(ports, registers, interval_ms, args, server_pid)
            bare = await run_bare(ports, args.registers, interval_ms / 1000.0, args, server_pid)
        else:
            acq = await run_acquisition(ports, registers, 1, args, server_pid)
            bare = await run_bare(ports, args.registers, None, args, server_pid)
        ratio = acq["requests_per_s"] / bare["requests_per_s"] if bare["requests_per_s"] else 0.0
        entry: dict[str, Any] = {
            "acquisition": acq,
            "bare": bare,
            "ratio_to_bare": round(ratio, 3),
            "meets_ratio_target": ratio >= TARGET_RATIO,
        }
        if mode == "paced":
            entry["meets_jitter_target"] = acq["jitter_p99_ms"] <= TARGET_JITTER_P99_MS
        result[mode] = entry
    return result


# ----------------------------------------------------------------------------- output


def table(summary: dict[str, Any]) -> str:
    cfg = summary["config"]
    lines = [
        f"acquisition benchmark: {cfg['devices']} devices x {cfg['registers']} registers "
        f"@ {cfg['rate_hz']:g} Hz, {cfg['seconds']:g} s measured, {cfg['client']} client "
        f"({cfg['python']}, {cfg['cpus']} CPUs)",
        "",
        f"{'mode':6} {'loop':12} {'req/s':>9} {'%conf':>6} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'max ms':>7} {'cpu %':>6} {'srv %':>6} {'err':>4}",
    ]
    for mode, entry in summary["modes"].items():
        for loop in ("acquisition", "bare"):
            r = entry[loop]
            conf = r.get("pct_of_configured")
            jit = " ".join(
                f"{'-' if r[k] is None else format(r[k], '.2f'):>7}"
                for k in ("jitter_p50_ms", "jitter_p99_ms", "jitter_max_ms")
            )
            lines.append(
                f"{mode:6} {loop:12} {r['requests_per_s']:9.1f} "
                f"{'-' if conf is None else f'{conf:.1f}':>6} {jit} {r['cpu_pct']:6.1f} "
                f"{r.get('server_cpu_pct', float('nan')):6.1f} {r['errors']:4d}"
            )
        verdict = f"  -> acquisition/bare = {entry['ratio_to_bare']:.3f} "
        verdict += "(target >= 0.90: " + ("met" if entry["meets_ratio_target"] else "MISSED") + ")"
        if "meets_jitter_target" in entry:
            verdict += ", jitter p99 target <= 5 ms: " + (
                "met" if entry["meets_jitter_target"] else "MISSED"
            )
        lines.append(verdict)
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/acquisition.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Full run (issue 3): --devices 100 --registers 50 --rate-hz 10 --seconds 30. "
        "Develop at a small scale: --devices 10 --seconds 5.",
    )
    p.add_argument("--devices", type=int, default=100, help="simulated devices (default: 100)")
    p.add_argument(
        "--registers", type=int, default=50, help="holding registers per device, 1..125 (50)"
    )
    p.add_argument("--rate-hz", type=float, default=10.0, help="poll rate per device (10)")
    p.add_argument("--seconds", type=float, default=30.0, help="measured window per run (30)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up before measuring, s (2)")
    p.add_argument(
        "--mode",
        choices=("paced", "max", "both"),
        default="both",
        help="paced: both loops at --rate-hz; max: both as fast as possible (both)",
    )
    p.add_argument("--host", default="127.0.0.1", help="loopback address (127.0.0.1)")
    p.add_argument(
        "--client",
        choices=("native", "pymodbus"),
        default="native",
        help="Modbus TCP client of the acquisition loop (the device key `client`; default: "
        "native); the bare loop is always pymodbus",
    )
    p.add_argument(
        "--stagger-bare",
        action="store_true",
        help="paced bare loop: spread the devices' deadlines evenly over one interval (the "
        "appliance's pollers stagger theirs in 10 ms slots); default: all deadlines aligned",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write JSON summary")
    args = p.parse_args(argv)
    if args.devices < 1 or not 1 <= args.registers <= 125 or args.rate_hz <= 0:
        p.error("need --devices >= 1, --registers in 1..125, --rate-hz > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    base = free_port_block(args.devices, args.host)
    ports = list(range(base, base + args.devices))
    server = subprocess.Popen(
        [
            sys.executable,
            *("-m", "appliance", "simulate", "--profile", f"bench-{args.registers}"),
            *("--machines", str(args.devices), "--base-port", str(base), "--host", args.host),
            *("--log-level", "warning"),
        ],
        cwd=Path(__file__).resolve().parents[1],
        stdin=subprocess.DEVNULL,
    )
    try:
        try:
            for port in ports:
                wait_port(port, 30.0, args.host)
        except TimeoutError as err:
            print(f"benchmark server failed to start: {err}", file=sys.stderr)
            return 1
        modes = asyncio.run(bench(args, ports, server.pid))
    finally:
        server.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=10)
        if server.poll() is None:
            server.kill()
            server.wait()
    summary = {
        "config": {
            "devices": args.devices,
            "registers": args.registers,
            "rate_hz": args.rate_hz,
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "mode": args.mode,
            "client": args.client,
            "stagger_bare": args.stagger_bare,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "targets": {"ratio_to_bare": TARGET_RATIO, "jitter_p99_ms": TARGET_JITTER_P99_MS},
        "modes": modes,
    }
    print(table(summary))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
