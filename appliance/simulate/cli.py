"""``appliance simulate``: serve a simulated CNC cell over Modbus TCP until stopped.

:func:`add_arguments` fills the sub-command's parser and :func:`run` executes it; the top-level
CLI wires both. ``python -m appliance.simulate.cli`` runs the sub-command on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import sys
from collections.abc import Sequence
from typing import Any

from appliance.simulate.bench import BENCH_VALUE, MAX_BENCH_REGISTERS, BenchCell, bench_registers
from appliance.simulate.cell import (
    ALL_FAULT_KINDS,
    DEFAULT_FAULT_DURATION_S,
    FAULT_DURATION_REGISTER,
    FAULT_REQUEST_REGISTER,
    FIFO_ADDRESS,
    PROFILE,
    FaultSchedule,
    SimulatedCell,
)
from appliance.simulate.replay import load_replay, parse_map
from drivers.modbus.codec import BYTE_ORDERS

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Serve a cell of simulated 3-axis CNC machining centres over Modbus TCP, for development, demos
and tests without a machine shop. Machine N (1-based) is named cnc-N and listens on
BASE_PORT + N - 1, unit id 1, serving the register map of the `cnc-sim` profile
(drivers/profiles/cnc-sim.toml; the table, the fault-control registers and the model are
described in docs/simulator.md). Same --seed, same values. --profile bench-N serves
benchmark-sized machines instead (see "profiles" below).
"""

PROFILES_HELP = f"""\
profiles (--profile NAME):
  cnc-sim   the simulated CNC machining centre (default): physics, faults, FIFO, replay
  bench-N   a benchmark machine: N (1..{MAX_BENCH_REGISTERS}) contiguous uint16 holding
            registers at addresses 0..N-1, unit id 1, every one holding {BENCH_VALUE}; no model,
            no faults (e.g. bench-50: the cell of `appliance bench hotpath` and
            benchmarks/acquisition.py, polled with drivers/profiles/bench-50.toml)
"""

EPILOG = f"""\
{PROFILES_HELP}
faults:
  --fault KIND@MACHINE:AT_S[:DURATION_S]   e.g. temp_ramp@2:10:20 = machine 2, 10 s after start,
                                           for 20 s (default {DEFAULT_FAULT_DURATION_S:g} s)
  kinds: {", ".join(ALL_FAULT_KINDS)}
  (timeout, exception, busy, disconnect, crc_garbage: the machine's server stops answering,
  answers exception 4 / 6, drops its connections, or sends RTU answers with a bad CRC (--serial),
  for the duration)
  At run time, write holding register {FAULT_REQUEST_REGISTER} (1 = temp_ramp, 2 = vibration_surge,
  3 = timeout, 4 = exception, 5 = busy, 6 = disconnect, 7 = crc_garbage (RTU only),
  8 = tool_wear, 9 = bearing_defect, 10 = imbalance, 11 = chatter, 12 = coolant_loss) and
  register {FAULT_DURATION_REGISTER} (seconds, 0 = default) on a machine's server to inject a
  fault over Modbus.

replay:
  --replay rec.csv --map rpm=spindle_speed --map vib=vibration_rms
  serves the CSV's columns (first column: seconds or ISO 8601 time) on the named registers of
  every machine at the recorded times, looping at the end; other registers stay simulated.

Stops cleanly with exit status 0 on SIGINT/SIGTERM or after --duration seconds.
"""


def parse_fault(spec: str) -> FaultSchedule:
    """Parse ``KIND@MACHINE:AT_S[:DURATION_S]`` (machine 1-based) into a :class:`FaultSchedule`."""
    kind, sep, rest = spec.partition("@")
    parts = rest.split(":")
    if not sep or len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(
            f"{spec!r} is not KIND@MACHINE:AT_S[:DURATION_S] (e.g. temp_ramp@2:10:20)"
        )
    if kind not in ALL_FAULT_KINDS:
        raise argparse.ArgumentTypeError(
            f"{spec!r}: unknown fault kind {kind!r} (known: {', '.join(ALL_FAULT_KINDS)})"
        )
    try:
        machine = int(parts[0])
        at_s = float(parts[1])
        duration_s = float(parts[2]) if len(parts) == 3 else DEFAULT_FAULT_DURATION_S
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{spec!r}: MACHINE must be an integer and AT_S, DURATION_S numbers"
        ) from None
    if machine < 1:
        raise argparse.ArgumentTypeError(f"{spec!r}: machines are numbered from 1")
    try:
        return FaultSchedule(machine - 1, kind, at_s, duration_s)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{spec!r}: {err}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0.0):
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` options to ``parser`` (and its description and epilog if unset)."""
    if parser.description is None:
        parser.description = DESCRIPTION
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    if parser.epilog is None:
        parser.epilog = EPILOG
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--machines",
        type=_positive_int,
        default=4,
        metavar="N",
        help="number of machines, one Modbus TCP server each (default: %(default)s)",
    )
    parser.add_argument(
        "--profile",
        default=PROFILE,
        metavar="NAME",
        help=f"what each machine serves: {PROFILE} (default) or bench-N, see profiles below",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 for every interface (default: %(default)s)",
    )
    parser.add_argument(
        "--base-port",
        type=_positive_int,
        default=5020,
        metavar="PORT",
        help="port of machine 1; machine N listens on PORT + N - 1 (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=42,
        help="random seed; the same seed gives the same values (default: %(default)s)",
    )
    parser.add_argument(
        "--tick-hz",
        type=_positive_float,
        default=20.0,
        metavar="HZ",
        help="model update rate, wall-clock ticks per second (default: %(default)s)",
    )
    parser.add_argument(
        "--time-scale",
        type=_positive_float,
        default=1.0,
        metavar="X",
        help="simulated seconds per wall second; >1 fast-forwards (default: %(default)s)",
    )
    parser.add_argument(
        "--fault",
        type=parse_fault,
        action="append",
        default=[],
        metavar="KIND@MACHINE:AT_S[:DURATION_S]",
        help="schedule a fault (repeatable), times in simulated seconds after start; "
        f"kinds: {', '.join(ALL_FAULT_KINDS)}",
    )
    parser.add_argument(
        "--byte-order",
        choices=BYTE_ORDERS,
        default=None,
        help="serve 32/64-bit values in this order (profiles cnc-sim-cdab etc. match; "
        "default: the profile's own, ABCD)",
    )
    parser.add_argument(
        "--fifo-address",
        type=int,
        default=FIFO_ADDRESS,
        metavar="ADDR",
        help="first input register of the 1 kHz vibration FIFO block; -1 disables it "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--replay",
        default=None,
        metavar="FILE.csv",
        help="serve recorded values from this CSV file (needs --map)",
    )
    parser.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="COLUMN=REGISTER",
        help="with --replay: CSV column -> register name of the profile (repeatable)",
    )
    parser.add_argument(
        "--serial",
        default=None,
        metavar="PORT",
        help="also serve every machine over Modbus RTU on this serial port (e.g. one end of a "
        "socat pty pair); machine N is unit N",
    )
    parser.add_argument(
        "--serial-baud",
        type=_positive_int,
        default=19200,
        metavar="BAUD",
        help="baud rate of --serial, 8N1 (default: %(default)s)",
    )
    parser.add_argument(
        "--duration",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="exit 0 after this many wall seconds (default: run until SIGINT/SIGTERM)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the simulator as ``args`` say; 0 on a clean stop, 1 on failure, 2 on bad arguments."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    try:
        cell: SimulatedCell | BenchCell = _make_cell(args)
    except (ValueError, OSError) as err:
        print(f"appliance simulate: {err}", file=sys.stderr)
        return 2
    pymodbus_logger = logging.getLogger("pymodbus")
    pymodbus_level = pymodbus_logger.level
    if pymodbus_level == logging.NOTSET:
        # pymodbus logs every listen and reconnect at INFO; keep its warnings and errors only.
        pymodbus_logger.setLevel(logging.WARNING)
    try:
        return asyncio.run(_serve(cell, args.duration))
    except KeyboardInterrupt:  # a second Ctrl-C, or a platform without signal handlers
        return 0
    finally:
        pymodbus_logger.setLevel(pymodbus_level)


def _make_cell(args: argparse.Namespace) -> SimulatedCell | BenchCell:
    """The cell ``args`` describe; ``ValueError`` (or ``OSError``) naming what is wrong."""
    profile = getattr(args, "profile", PROFILE)
    if profile != PROFILE:
        registers = bench_registers(profile)
        if registers is None:
            raise ValueError(
                f"--profile {profile!r}: unknown profile (known: {PROFILE}, bench-N with N in "
                f"1..{MAX_BENCH_REGISTERS}, e.g. bench-50)"
            )
        for given, option in (
            (args.fault, "--fault"),
            (args.replay is not None or args.map, "--replay/--map"),
            (args.serial is not None, "--serial"),
            (args.byte_order is not None, "--byte-order"),
        ):
            if given:
                raise ValueError(f"{option} needs --profile {PROFILE} (not {profile})")
        if not 1 <= args.base_port <= 65536 - args.machines:
            raise ValueError(
                f"--base-port {args.base_port} + {args.machines} machines does not fit in 1..65535"
            )
        ports = [args.base_port + i for i in range(args.machines)]
        return BenchCell(ports, registers, host=args.host)
    replay = None
    if args.replay is not None:
        replay = load_replay(args.replay, parse_map(args.map))
    elif args.map:
        raise ValueError("--map needs --replay")
    return SimulatedCell(
        machines=args.machines,
        host=args.host,
        base_port=args.base_port,
        seed=args.seed,
        tick_hz=args.tick_hz,
        faults=tuple(args.fault),
        time_scale=args.time_scale,
        byte_order=args.byte_order,
        fifo_address=None if args.fifo_address < 0 else args.fifo_address,
        replay=replay,
        serial_port=args.serial,
        serial_baudrate=args.serial_baud,
    )


async def _serve(cell: SimulatedCell | BenchCell, duration_s: float | None) -> int:
    """Start the cell, wait for a signal, the duration or a failure, then stop it."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
            pass
    try:
        try:
            await cell.start()
        except OSError as err:
            logger.error("cannot start the simulated cell: %s", err)
            return 1
        if isinstance(cell, BenchCell):
            what = f"{cell.describe()} on {cell.host}:{cell.ports[0]}.."
        else:
            what = f"{len(cell.ports)} machines (seed {cell.seed}, {cell.tick_hz:.0f} Hz, "
            what += f"time x{cell.time_scale:g})"
        logger.info(
            "simulating %s%s",
            what,
            f" for {duration_s:g} s" if duration_s is not None else "; Ctrl-C stops",
        )
        stop_wait = asyncio.ensure_future(stop.wait())
        watched: list[asyncio.Future[Any]] = [stop_wait]
        if cell.tick_task is not None:
            watched.append(cell.tick_task)
        await asyncio.wait(watched, timeout=duration_s, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        task = cell.tick_task
        failed = task is not None and task.done() and not task.cancelled()
        await cell.stop()
        return 1 if failed else 0
    finally:
        await cell.stop()
        for sig in installed:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m appliance.simulate.cli [options]``."""
    parser = argparse.ArgumentParser(prog="appliance simulate")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
