"""A simulated CNC cell: one Modbus TCP server per :class:`~appliance.simulate.machine.CncMachine`.

Machine ``i`` (0-based) is named ``cnc-{i+1}`` and listens on ``ports[i]`` (``base_port + i``
unless explicit ports are given), unit id 1, serving the ``cnc-sim`` register profile
(``drivers/profiles/cnc-sim.toml``; the table is in ``docs/simulator.md``). Values are encoded
with :func:`drivers.modbus.codec.encode` honouring each register's table, type, byte order, scale
and offset (raw = (value - offset) / scale, integers saturate at their type's limits as a real
device's would), so a correct poller decodes exactly what the model produced.

One tick task advances every machine by ``time_scale / tick_hz`` *simulated* seconds per tick
(wall period ``1 / tick_hz``) and then writes its values into that machine's datastore. Overload
policy: when the loop falls more than :data:`MAX_LAG_TICKS` ticks behind, the missed ticks are
dropped (counted in :attr:`SimulatedCell.overruns`), so simulated time runs slower than asked
instead of bursting.

Faults reach a machine three ways: a :class:`FaultSchedule` (``at_s`` simulated seconds after
:meth:`SimulatedCell.start`), :meth:`SimulatedCell.inject`, or over Modbus through the
fault-control holding registers :data:`FAULT_REQUEST_REGISTER` (write 1 = ``temp_ramp``,
2 = ``vibration_surge``, 3-7 the transport faults, 8-12 the subtle faults of
:data:`FAULT_CODES`) and
:data:`FAULT_DURATION_REGISTER` (seconds; 0 means
:data:`DEFAULT_FAULT_DURATION_S`). The tick task reads the request, injects it and resets the
request register to 0. These two registers are not in the polled profile on purpose: the
appliance never needs them, only a demo or a test does.

Extensions (``docs/simulator.md`` has the tables):

* **Vibration FIFO**: each machine also serves a :class:`~appliance.simulate.fifo.VibrationFifo`
  block (header + the newest 120 int16 samples at 1 kHz of simulated time) at input register
  ``fifo_address`` (default :data:`FIFO_ADDRESS`), in the layout :mod:`drivers.modbus.waveform`
  reads. Samples are produced per tick, so the block advances in steps of
  ``rate_hz * time_scale / tick_hz`` samples.
* **Byte-order variants**: ``byte_order=`` re-encodes the profile's 32/64-bit values
  (:func:`with_byte_order`); the shipped ``cnc-sim-cdab``/``-badc``/``-dcba`` profiles match.
* **Transport faults** (:data:`DEVICE_FAULT_KINDS`): ``timeout``, ``exception`` (code 4),
  ``busy`` (code 6) and ``disconnect`` change how one machine's server answers, through the
  same three ways as model faults (fault request codes 3-6). They are played by a subclass of
  pymodbus' per-connection request handler.
* **CSV replay**: ``replay=`` (:mod:`appliance.simulate.replay`) overrides mapped channels with
  recorded values at their recorded times.

Built on pymodbus' ``SimDevice``/``SimData`` datastore: the older ``ModbusDeviceContext`` /
``ModbusSequentialDataBlock`` classes are thin deprecated wrappers around it that pymodbus 4
removes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import msgspec
from pymodbus import FramerType
from pymodbus.pdu import ExceptionResponse
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import DataType, SimData, SimDevice

from appliance.simulate.fifo import VibrationFifo
from appliance.simulate.machine import CHANNELS, FAULT_KINDS, CncMachine
from appliance.simulate.replay import Replay
from drivers.modbus.codec import BYTE_ORDERS, encode
from drivers.modbus.registers import Register, load_profile
from drivers.modbus.waveform import HEADER_REGISTERS

logger = logging.getLogger(__name__)

#: Register profile the simulator serves.
PROFILE = "cnc-sim"
#: Holding register a client writes to request a fault (see :data:`FAULT_CODES`).
FAULT_REQUEST_REGISTER = 100
#: Holding register with the requested fault's duration in seconds (0: the default).
FAULT_DURATION_REGISTER = 101
#: Transport faults of a machine's Modbus server (see :meth:`SimulatedCell.inject`).
DEVICE_FAULT_KINDS: tuple[str, ...] = ("timeout", "exception", "busy", "disconnect", "crc_garbage")
#: Every fault kind :meth:`SimulatedCell.inject` and :class:`FaultSchedule` accept.
ALL_FAULT_KINDS: tuple[str, ...] = FAULT_KINDS + DEVICE_FAULT_KINDS
#: Fault kind for each value of the fault request register.
FAULT_CODES: dict[int, str] = {
    1: "temp_ramp",
    2: "vibration_surge",
    3: "timeout",
    4: "exception",
    5: "busy",
    6: "disconnect",
    7: "crc_garbage",
    8: "tool_wear",
    9: "bearing_defect",
    10: "imbalance",
    11: "chatter",
    12: "coolant_loss",
}
#: Modbus exception code a server answers with during each exception fault.
DEVICE_FAULT_EXCEPTION: dict[str, int] = {"exception": 4, "busy": 6}
#: Default first input register of the vibration FIFO block (``drivers.modbus.waveform``).
FIFO_ADDRESS = 200
#: Duration of a fault requested over Modbus with a duration register of 0 (simulated s).
DEFAULT_FAULT_DURATION_S = 20.0
#: Samples in the served vibration FIFO block.
_FIFO_CAPACITY = 120
#: Ticks the tick task may fall behind before it drops them.
MAX_LAG_TICKS = 5

# Function codes used to write each table through the server's datastore API.
_WRITE_FC: dict[str, int] = {"holding": 16, "input": 4, "coil": 15, "discrete": 2}
_INT_RANGE: dict[str, tuple[int, int]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}


@dataclass(frozen=True)
class FaultSchedule:
    """A fault to inject at a fixed simulated time.

    ``machine`` is the 0-based machine index (machine ``cnc-{machine+1}``), ``at_s`` simulated
    seconds after :meth:`SimulatedCell.start`, ``duration_s`` simulated seconds.
    """

    machine: int
    kind: str
    at_s: float
    duration_s: float

    def __post_init__(self) -> None:
        if self.machine < 0:
            raise ValueError(f"fault schedule machine must be >= 0, got {self.machine}")
        if self.kind not in ALL_FAULT_KINDS:
            raise ValueError(
                f"unknown fault kind {self.kind!r} (known: {', '.join(ALL_FAULT_KINDS)})"
            )
        if not (math.isfinite(self.at_s) and self.at_s >= 0.0):
            raise ValueError(f"fault schedule at_s must be >= 0, got {self.at_s!r}")
        if not (math.isfinite(self.duration_s) and self.duration_s > 0.0):
            raise ValueError(f"fault schedule duration_s must be > 0, got {self.duration_s!r}")


@dataclass(frozen=True)
class _Run:
    """A contiguous span of one table, written with one datastore call per tick."""

    table: str
    start: int
    count: int
    registers: tuple[Register, ...]


def _raw_value(reg: Register, value: float) -> float | bool:
    """Engineering value → the raw number the register holds, saturated to its type."""
    if reg.type in ("bit", "bool"):
        return bool(value)
    raw = (value - reg.offset) / reg.scale
    limits = _INT_RANGE.get(reg.type)
    if limits is not None:
        raw = float(min(max(round(raw), limits[0]), limits[1]))
    return raw


def with_byte_order(registers: Sequence[Register], order: str) -> tuple[Register, ...]:
    """``registers`` with every multi-register numeric value (32/64-bit) in byte ``order``.

    16-bit values and strings keep their order: the variants this models are devices that lay
    out the *words* (and bytes within them) of wide values differently, the common real-world
    case. Raises ``ValueError`` for an unknown order.
    """
    if order not in BYTE_ORDERS:
        raise ValueError(f"unknown byte order {order!r} (known: {', '.join(BYTE_ORDERS)})")
    return tuple(
        msgspec.structs.replace(r, order=order)
        if r.count > 1 and r.type != "string" and r.table in ("holding", "input")
        else r
        for r in registers
    )


def _plan(registers: Sequence[Register], fifo_address: int | None = None) -> list[_Run]:
    """Group a profile's registers into contiguous runs per table; reject clashes."""
    unknown = [r.name for r in registers if r.name not in CHANNELS]
    if unknown:
        raise ValueError(
            f"profile registers {unknown} are not channels the machine model produces "
            f"({', '.join(CHANNELS)})"
        )
    runs: list[_Run] = []
    for table in ("holding", "input", "coil", "discrete"):
        regs = sorted((r for r in registers if r.table == table), key=lambda r: r.address)
        if table == "holding":
            for r in regs:
                if r.address <= FAULT_DURATION_REGISTER and r.address + r.count > (
                    FAULT_REQUEST_REGISTER
                ):
                    raise ValueError(
                        f"profile register {r.name!r} (holding {r.address}) overlaps the "
                        f"simulator's fault-control registers {FAULT_REQUEST_REGISTER}-"
                        f"{FAULT_DURATION_REGISTER}"
                    )
        if table == "input" and fifo_address is not None:
            fifo_end = fifo_address + HEADER_REGISTERS + _FIFO_CAPACITY
            for r in regs:
                if r.address < fifo_end and r.address + r.count > fifo_address:
                    raise ValueError(
                        f"profile register {r.name!r} (input {r.address}) overlaps the "
                        f"vibration FIFO block {fifo_address}-{fifo_end - 1}"
                    )
        group: list[Register] = []
        start = end = 0
        for r in regs:
            if group and r.address <= end:
                end = max(end, r.address + r.count)
                group.append(r)
                continue
            if group:
                runs.append(_Run(table, start, end - start, tuple(group)))
            group, start, end = [r], r.address, r.address + r.count
        if group:
            runs.append(_Run(table, start, end - start, tuple(group)))
    return runs


async def _shutdown(server: ModbusTcpServer | ModbusSerialServer) -> None:
    """Close a server's listening socket and its connections (pymodbus leaves this untyped)."""
    await server.shutdown()  # type: ignore[no-untyped-call]


def _device(unit_id: int, runs: Sequence[_Run], fifo_address: int | None = None) -> SimDevice:
    """A pymodbus device with one block per table; addresses outside the runs are invalid."""
    blocks: dict[str, list[SimData]] = {t: [] for t in _WRITE_FC}
    for run in runs:
        if run.table in ("coil", "discrete"):
            blocks[run.table].append(
                SimData(run.start, count=run.count, values=False, datatype=DataType.BITS)
            )
        else:
            blocks[run.table].append(
                SimData(run.start, count=run.count, values=0, datatype=DataType.REGISTERS)
            )
    blocks["holding"].append(
        SimData(FAULT_REQUEST_REGISTER, count=2, values=0, datatype=DataType.REGISTERS)
    )
    if fifo_address is not None:
        blocks["input"].append(
            SimData(
                fifo_address,
                count=HEADER_REGISTERS + _FIFO_CAPACITY,
                values=0,
                datatype=DataType.REGISTERS,
            )
        )
        blocks["input"].sort(key=lambda b: b.address)
    # pymodbus needs at least one entry per table; a lone zero at address 0 is harmless.
    for table in ("coil", "discrete"):
        if not blocks[table]:
            blocks[table].append(SimData(0, values=False, datatype=DataType.BITS))
    if not blocks["input"]:
        blocks["input"].append(SimData(0, values=0, datatype=DataType.REGISTERS))
    return SimDevice(
        unit_id,
        simdata=(blocks["coil"], blocks["discrete"], blocks["holding"], blocks["input"]),
    )


class _DeviceFault:
    """The transport fault a machine's server is playing, until ``until`` (``time.monotonic``)."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.until = 0.0
        #: Requests the fault swallowed, refused or cut off.
        self.hits = 0

    def active(self) -> str | None:
        """The fault in force now, or None."""
        if self.kind is not None and time.monotonic() >= self.until:
            self.kind = None
        return self.kind


class _Handler(ServerRequestHandler):
    """pymodbus' per-connection handler, playing the addressed unit's transport fault if set."""

    _garble = False

    async def handle_request(self) -> None:
        pdu = self.last_pdu
        server: _FaultyTcpServer | _FaultySerialServer = self.server
        fault = server.device_faults.get(pdu.dev_id) if pdu is not None else None
        kind = fault.active() if fault is not None else None
        if kind == "crc_garbage" and not server.is_serial:
            kind = None  # no CRC on TCP: answer normally
        if fault is None or kind is None or pdu is None or kind == "crc_garbage":
            self._garble = kind == "crc_garbage"
            if fault is not None and self._garble:
                fault.hits += 1
            try:
                await super().handle_request()  # type: ignore[no-untyped-call]
            finally:
                self._garble = False
            return
        fault.hits += 1
        if kind in DEVICE_FAULT_EXCEPTION:
            response = ExceptionResponse(
                pdu.function_code,
                DEVICE_FAULT_EXCEPTION[kind],
                device_id=pdu.dev_id,
                transaction=pdu.transaction_id,
            )
            self.server_send(response, self.last_addr)  # type: ignore[no-untyped-call]
        elif kind == "disconnect" and not server.is_serial:
            self.close()
        # "timeout" (and "disconnect" on a serial line, which has no connection to drop):
        # swallow the request; the client waits out its own timeout.

    def send(self, data: bytes, addr: tuple[str, int] | None = None) -> None:
        """Send an answer; during ``crc_garbage`` with its last (CRC) byte inverted."""
        if self._garble and data:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        super().send(data, addr)


class _FaultyTcpServer(ModbusTcpServer):
    """A pymodbus TCP server whose connections can play a :class:`_DeviceFault` per unit id."""

    is_serial = False

    def __init__(
        self, context: SimDevice, address: tuple[str, int], faults: dict[int, _DeviceFault]
    ) -> None:
        super().__init__(context, address=address)
        self.device_faults = faults

    def callback_new_connection(self) -> _Handler:
        return _Handler(  # type: ignore[no-untyped-call]
            self, self.trace_packet, self.trace_pdu, self.trace_connect
        )

    def drop_connections(self) -> int:
        """Close every client connection now; return how many."""
        conns = list(self.active_connections.values())
        for conn in conns:
            conn.close()
        return len(conns)


class _FaultySerialServer(ModbusSerialServer):
    """A pymodbus Modbus RTU server on a serial port, one unit id per machine, with faults."""

    is_serial = True

    def __init__(
        self,
        context: list[SimDevice],
        port: str,
        baudrate: int,
        faults: dict[int, _DeviceFault],
    ) -> None:
        super().__init__(context, framer=FramerType.RTU, port=port, baudrate=baudrate)
        self.device_faults = faults

    def callback_new_connection(self) -> _Handler:
        return _Handler(  # type: ignore[no-untyped-call]
            self, self.trace_packet, self.trace_pdu, self.trace_connect
        )


class SimulatedCell:
    """A cell of simulated CNC machines served over Modbus TCP on localhost ports.

    Construction validates and builds the (pure) machine models; :meth:`start` loads the
    register profile, binds the ports and starts the tick task on the running event loop;
    :meth:`stop` is idempotent. Also an async context manager. All methods run on one event
    loop; none is thread-safe.
    """

    def __init__(
        self,
        machines: int = 4,
        host: str = "127.0.0.1",
        base_port: int = 5020,
        seed: int = 42,
        tick_hz: float = 20.0,
        faults: Sequence[FaultSchedule] = (),
        *,
        ports: Sequence[int] | None = None,
        time_scale: float = 1.0,
        unit_id: int = 1,
        profile: str = PROFILE,
        byte_order: str | None = None,
        fifo_address: int | None = FIFO_ADDRESS,
        fifo_rate_hz: int = 1000,
        replay: Replay | None = None,
        serial_port: str | None = None,
        serial_baudrate: int = 19200,
    ) -> None:
        """Validate the cell's shape.

        ``tick_hz`` is the wall-clock tick rate (Hz); ``time_scale`` simulated seconds per wall
        second (values above 1 fast-forward, for tests and demos); ``ports`` overrides
        ``base_port`` with one explicit port per machine. ``byte_order`` (``ABCD``, ``CDAB``,
        ``BADC``, ``DCBA``) re-encodes the profile's 32/64-bit values in that order (see
        :func:`with_byte_order`). ``fifo_address`` places the vibration FIFO block (input
        registers, ``None``: no FIFO), sampled at ``fifo_rate_hz`` of simulated time.
        ``replay`` overrides the channels it maps with recorded values (see
        :mod:`appliance.simulate.replay`). ``serial_port`` (e.g. one end of a socat pty pair)
        additionally serves every machine over Modbus RTU on that port at ``serial_baudrate``
        (8N1), machine ``i`` as unit ``unit_id + i``.
        """
        if machines < 1:
            raise ValueError(f"machines must be >= 1, got {machines}")
        if ports is None:
            if not 1 <= base_port <= 65536 - machines:
                raise ValueError(
                    f"base_port {base_port} + {machines} machines does not fit in 1..65535"
                )
            port_list = [base_port + i for i in range(machines)]
        else:
            port_list = [int(p) for p in ports]
            if len(port_list) != machines:
                raise ValueError(f"{len(port_list)} ports given for {machines} machines")
            if len(set(port_list)) != len(port_list):
                raise ValueError(f"ports must be distinct, got {port_list}")
            for p in port_list:
                if not 1 <= p <= 65535:
                    raise ValueError(f"port {p} is outside 1..65535")
        if not (math.isfinite(tick_hz) and tick_hz > 0.0):
            raise ValueError(f"tick_hz must be > 0, got {tick_hz!r}")
        if not (math.isfinite(time_scale) and time_scale > 0.0):
            raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
        if not 1 <= unit_id <= 247:
            raise ValueError(f"unit_id must be in 1..247, got {unit_id}")
        if byte_order is not None and byte_order not in BYTE_ORDERS:
            raise ValueError(f"unknown byte order {byte_order!r} (known: {', '.join(BYTE_ORDERS)})")
        if serial_port is not None and unit_id + machines - 1 > 247:
            raise ValueError(
                f"{machines} machines from unit id {unit_id} exceed unit id 247 on the serial line"
            )
        if fifo_address is not None and not (
            0 <= fifo_address <= 65536 - HEADER_REGISTERS - _FIFO_CAPACITY
        ):
            raise ValueError(f"fifo_address {fifo_address} does not leave room for the block")
        for f in faults:
            if f.kind == "crc_garbage" and serial_port is None:
                raise ValueError("fault crc_garbage needs the RTU server (serial_port=/--serial)")
            if f.machine >= machines:
                raise ValueError(
                    f"fault {f.kind} at {f.at_s} s is for machine index {f.machine}, "
                    f"but the cell has {machines} machines (indices 0..{machines - 1})"
                )
        self.host = host
        self.ports: list[int] = port_list
        self.machine_names: list[str] = [f"cnc-{i + 1}" for i in range(machines)]
        self.seed = seed
        self.tick_hz = float(tick_hz)
        self.time_scale = float(time_scale)
        self.unit_id = unit_id
        self.profile = profile
        self.byte_order = byte_order
        self.fifo_address = fifo_address
        self.replay = replay
        self.serial_port = serial_port
        self.serial_baudrate = serial_baudrate
        self._faults: tuple[_DeviceFault, ...] = tuple(_DeviceFault() for _ in range(machines))
        self._serial: _FaultySerialServer | None = None
        #: Ticks dropped because the event loop fell behind (see the module docstring).
        self.overruns = 0
        self._models: tuple[CncMachine, ...] = tuple(CncMachine(seed, i) for i in range(machines))
        self._schedule: list[FaultSchedule] = sorted(faults, key=lambda f: f.at_s)
        self._next_fault = 0
        self._active: list[frozenset[str]] = [frozenset() for _ in range(machines)]
        self._fifos: tuple[VibrationFifo, ...] = tuple(
            VibrationFifo(seed * 1000 + i, fifo_rate_hz, _FIFO_CAPACITY) for i in range(machines)
        )
        self._runs: list[_Run] = []
        self._servers: list[_FaultyTcpServer] = []
        self._task: asyncio.Task[None] | None = None
        self._sim_time_s = 0.0

    # ------------------------------------------------------------------ public API

    @property
    def models(self) -> tuple[CncMachine, ...]:
        """The machine models, in machine order (read them; drive them only via the cell)."""
        return self._models

    @property
    def sim_time_s(self) -> float:
        """Simulated seconds since :meth:`start`."""
        return self._sim_time_s

    @property
    def transport_fault_hits(self) -> list[int]:
        """Per machine: requests a transport fault swallowed, refused, cut off or garbled."""
        return [f.hits for f in self._faults]

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return bool(self._servers)

    @property
    def tick_task(self) -> asyncio.Task[None] | None:
        """The tick task; it ends only through :meth:`stop` or with an unexpected error."""
        return self._task

    def inject(self, machine_index: int, kind: str, duration_s: float) -> None:
        """Start fault ``kind`` on machine ``machine_index`` (0-based) for ``duration_s``.

        ``duration_s`` is in simulated seconds. Model faults are in
        :data:`~appliance.simulate.machine.FAULT_KINDS`; the transport faults of
        :data:`DEVICE_FAULT_KINDS` change how the machine's server answers, for ``duration_s /
        time_scale`` wall seconds: ``timeout`` (requests get no answer), ``exception`` /
        ``busy`` (every request is answered with exception 4 / 6), ``disconnect`` (every client
        connection is closed now, and again on each request while the fault lasts). A transport
        fault replaces the one in force. Raises ``ValueError`` for an unknown machine or kind, or
        a non-positive duration.
        """
        self._inject(machine_index, kind, duration_s, "api")

    async def start(self) -> None:
        """Bind every machine's port, publish initial values and start the tick task.

        Raises ``OSError`` naming the machine and port when a port cannot be bound (nothing
        stays bound then), ``RuntimeError`` when already running.
        """
        if self._servers:
            raise RuntimeError("simulated cell is already running")
        registers = load_profile(self.profile)
        if self.byte_order is not None:
            registers = with_byte_order(registers, self.byte_order)
        self._runs = _plan(registers, self.fifo_address)
        try:
            for i, port in enumerate(self.ports):
                server = _FaultyTcpServer(
                    _device(self.unit_id, self._runs, self.fifo_address),
                    (self.host, port),
                    {self.unit_id: self._faults[i]},
                )
                await self._publish(server, self.unit_id, i)
                try:
                    await server.serve_forever(background=True)
                except RuntimeError:
                    await _shutdown(server)
                    raise OSError(
                        f"{self.machine_names[i]}: cannot listen on {self.host}:{port} "
                        "(address in use or not available)"
                    ) from None
                self._servers.append(server)
                logger.info(
                    "%s: Modbus TCP on %s:%s unit %s (profile %s)",
                    self.machine_names[i],
                    self.host,
                    port,
                    self.unit_id,
                    self.profile,
                )
            if self.serial_port is not None:
                await self._start_serial(self.serial_port)
        except BaseException:
            await self._close_servers()
            raise
        self._sim_time_s = 0.0
        self._next_fault = 0
        self._task = asyncio.create_task(self._run(), name="simulated-cell-tick")

    async def stop(self) -> None:
        """Stop the tick task and close every server and connection. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._close_servers()

    async def __aenter__(self) -> SimulatedCell:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ internals

    async def _start_serial(self, port: str) -> None:
        """Serve every machine over Modbus RTU on ``port`` (unit ``unit_id + i``)."""
        units = [self.unit_id + i for i in range(len(self._models))]
        serial = _FaultySerialServer(
            [_device(u, self._runs, self.fifo_address) for u in units],
            port,
            self.serial_baudrate,
            {u: f for u, f in zip(units, self._faults, strict=True)},
        )
        for i, unit in enumerate(units):
            await self._publish(serial, unit, i)
        try:
            await serial.serve_forever(background=True)
        except RuntimeError:
            await _shutdown(serial)
            raise OSError(f"cannot open serial port {port}") from None
        self._serial = serial
        logger.info(
            "Modbus RTU on %s at %d baud: units %d-%d (cnc-1..cnc-%d)",
            port,
            self.serial_baudrate,
            units[0],
            units[-1],
            len(units),
        )

    async def _close_servers(self) -> None:
        serial, self._serial = self._serial, None
        if serial is not None:
            await _shutdown(serial)
        servers, self._servers = self._servers, []
        for server in servers:
            await _shutdown(server)
        if servers:
            logger.info("simulated cell stopped (%d machines)", len(servers))

    def _inject(self, i: int, kind: str, duration_s: float, via: str) -> None:
        if not 0 <= i < len(self._models):
            raise ValueError(f"machine index {i} is outside 0..{len(self._models) - 1}")
        if kind in DEVICE_FAULT_KINDS:
            if not (math.isfinite(duration_s) and duration_s > 0.0):
                raise ValueError(f"fault duration must be > 0, got {duration_s!r}")
            if not self._servers:
                raise RuntimeError("transport faults need a running cell (call start() first)")
            if kind == "crc_garbage" and self._serial is None:
                raise ValueError("crc_garbage needs the RTU server (serial_port=)")
            server = self._servers[i]
            self._faults[i].kind = kind
            self._faults[i].until = time.monotonic() + duration_s / self.time_scale
            dropped = server.drop_connections() if kind == "disconnect" else 0
            logger.info(
                "%s: transport fault %s for %.1f s (via %s)%s",
                self.machine_names[i],
                kind,
                duration_s,
                via,
                f", {dropped} connections dropped" if dropped else "",
            )
            return
        self._models[i].inject(kind, duration_s)
        self._active[i] = self._models[i].active_faults
        logger.info(
            "%s: fault %s injected for %.1f s (via %s)",
            self.machine_names[i],
            kind,
            duration_s,
            via,
        )

    async def _run(self) -> None:
        """Tick at ``tick_hz`` on the loop clock until cancelled."""
        loop = asyncio.get_running_loop()
        period = 1.0 / self.tick_hz
        dt_s = self.time_scale * period
        next_t = loop.time()
        try:
            while True:
                next_t += period
                delay = next_t - loop.time()
                if delay > 0.0:
                    await asyncio.sleep(delay)
                else:
                    if delay < -MAX_LAG_TICKS * period:
                        self.overruns += 1
                        logger.debug("simulated cell %.3f s behind; dropping ticks", -delay)
                        next_t = loop.time()
                    await asyncio.sleep(0)
                await self._tick(dt_s)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("simulated cell tick task failed")
            raise

    async def _tick(self, dt_s: float) -> None:
        """Advance simulated time by ``dt_s``: scheduled and requested faults, models, registers."""
        self._sim_time_s += dt_s
        while (
            self._next_fault < len(self._schedule)
            and self._schedule[self._next_fault].at_s <= self._sim_time_s
        ):
            f = self._schedule[self._next_fault]
            self._next_fault += 1
            self._inject(f.machine, f.kind, f.duration_s, f"schedule at {f.at_s:g} s")
        for i, server in enumerate(self._servers):
            await self._poll_fault_request(i, server)
            model = self._models[i]
            model.step(dt_s)
            if self.fifo_address is not None:
                values = self._values(i)
                self._fifos[i].advance(
                    dt_s, values["vibration_rms"], values["spindle_speed"], model.waveform_tones()
                )
            if self._active[i]:
                now = model.active_faults
                for kind in self._active[i] - now:
                    logger.info("%s: fault %s ended", self.machine_names[i], kind)
                self._active[i] = now
            await self._publish(server, self.unit_id, i)
            if self._serial is not None:
                await self._publish(self._serial, self.unit_id + i, i)

    async def _poll_fault_request(self, i: int, server: _FaultyTcpServer) -> None:
        """Inject a fault a client requested through the fault-control registers."""
        regs = await server.async_getValues(self.unit_id, 3, FAULT_REQUEST_REGISTER, 2)
        code = int(regs[0])
        if code == 0:
            return
        await server.async_setValues(self.unit_id, 16, FAULT_REQUEST_REGISTER, [0])
        kind = FAULT_CODES.get(code)
        if kind is None:
            logger.warning(
                "%s: ignoring unknown fault request %s in holding register %s (known: %s)",
                self.machine_names[i],
                code,
                FAULT_REQUEST_REGISTER,
                FAULT_CODES,
            )
            return
        duration_s = float(regs[1]) or DEFAULT_FAULT_DURATION_S
        try:
            self._inject(i, kind, duration_s, "modbus")
        except ValueError as err:
            logger.warning("%s: ignoring fault request %s: %s", self.machine_names[i], code, err)

    def _values(self, i: int) -> dict[str, float]:
        """Machine ``i``'s channel values now: the model's, overridden by the replay's."""
        values = self._models[i].values()
        if self.replay is not None:
            values.update(self.replay.values_at(self._sim_time_s))
        return values

    async def _publish(
        self, server: _FaultyTcpServer | _FaultySerialServer, unit: int, i: int
    ) -> None:
        """Encode machine ``i``'s current values (and FIFO block) into ``server``'s ``unit``."""
        values = self._values(i)
        if self.fifo_address is not None:
            await server.async_setValues(unit, 4, self.fifo_address, self._fifos[i].registers())
        for run in self._runs:
            if run.table in ("coil", "discrete"):
                bits = [False] * run.count
                for reg in run.registers:
                    bits[reg.address - run.start] = bool(_raw_value(reg, values[reg.name]))
                await server.async_setValues(unit, _WRITE_FC[run.table], run.start, bits)
                continue
            words = [0] * run.count
            for reg in run.registers:
                regs = encode(
                    _raw_value(reg, values[reg.name]),
                    reg.type,
                    reg.order,
                    length=reg.length,
                    bit=reg.bit,
                )
                at = reg.address - run.start
                if reg.type == "bit":
                    words[at] |= regs[0]
                else:
                    words[at : at + len(regs)] = regs
            await server.async_setValues(unit, _WRITE_FC[run.table], run.start, words)
