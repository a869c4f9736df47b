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
2 = ``vibration_surge``) and :data:`FAULT_DURATION_REGISTER` (seconds; 0 means
:data:`DEFAULT_FAULT_DURATION_S`). The tick task reads the request, injects it and resets the
request register to 0. These two registers are not in the polled profile on purpose: the
appliance never needs them, only a demo or a test does.

Built on pymodbus' ``SimDevice``/``SimData`` datastore: the older ``ModbusDeviceContext`` /
``ModbusSequentialDataBlock`` classes are thin deprecated wrappers around it that pymodbus 4
removes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from appliance.simulate.machine import CHANNELS, FAULT_KINDS, CncMachine
from drivers.modbus.codec import encode
from drivers.modbus.registers import Register, load_profile

logger = logging.getLogger(__name__)

#: Register profile the simulator serves.
PROFILE = "cnc-sim"
#: Holding register a client writes to request a fault (see :data:`FAULT_CODES`).
FAULT_REQUEST_REGISTER = 100
#: Holding register with the requested fault's duration in seconds (0: the default).
FAULT_DURATION_REGISTER = 101
#: Fault kind for each value of the fault request register.
FAULT_CODES: dict[int, str] = {1: "temp_ramp", 2: "vibration_surge"}
#: Duration of a fault requested over Modbus with a duration register of 0 (simulated s).
DEFAULT_FAULT_DURATION_S = 20.0
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
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r} (known: {', '.join(FAULT_KINDS)})")
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


def _plan(registers: Sequence[Register]) -> list[_Run]:
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


async def _shutdown(server: ModbusTcpServer) -> None:
    """Close a server's listening socket and its connections (pymodbus leaves this untyped)."""
    await server.shutdown()  # type: ignore[no-untyped-call]


def _device(unit_id: int, runs: Sequence[_Run]) -> SimDevice:
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
    ) -> None:
        """Validate the cell's shape.

        ``tick_hz`` is the wall-clock tick rate (Hz); ``time_scale`` simulated seconds per wall
        second (values above 1 fast-forward, for tests and demos); ``ports`` overrides
        ``base_port`` with one explicit port per machine.
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
        for f in faults:
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
        #: Ticks dropped because the event loop fell behind (see the module docstring).
        self.overruns = 0
        self._models: tuple[CncMachine, ...] = tuple(CncMachine(seed, i) for i in range(machines))
        self._schedule: list[FaultSchedule] = sorted(faults, key=lambda f: f.at_s)
        self._next_fault = 0
        self._active: list[frozenset[str]] = [frozenset() for _ in range(machines)]
        self._runs: list[_Run] = []
        self._servers: list[ModbusTcpServer] = []
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
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return bool(self._servers)

    @property
    def tick_task(self) -> asyncio.Task[None] | None:
        """The tick task; it ends only through :meth:`stop` or with an unexpected error."""
        return self._task

    def inject(self, machine_index: int, kind: str, duration_s: float) -> None:
        """Start fault ``kind`` on machine ``machine_index`` (0-based) for ``duration_s``.

        ``duration_s`` is in simulated seconds. Raises ``ValueError`` for an unknown machine or
        kind, or a non-positive duration.
        """
        self._inject(machine_index, kind, duration_s, "api")

    async def start(self) -> None:
        """Bind every machine's port, publish initial values and start the tick task.

        Raises ``OSError`` naming the machine and port when a port cannot be bound (nothing
        stays bound then), ``RuntimeError`` when already running.
        """
        if self._servers:
            raise RuntimeError("simulated cell is already running")
        self._runs = _plan(load_profile(self.profile))
        try:
            for i, port in enumerate(self.ports):
                server = ModbusTcpServer(
                    _device(self.unit_id, self._runs), address=(self.host, port)
                )
                await self._publish(server, self._models[i])
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

    async def _close_servers(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            await _shutdown(server)
        if servers:
            logger.info("simulated cell stopped (%d machines)", len(servers))

    def _inject(self, i: int, kind: str, duration_s: float, via: str) -> None:
        if not 0 <= i < len(self._models):
            raise ValueError(f"machine index {i} is outside 0..{len(self._models) - 1}")
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
            if self._active[i]:
                now = model.active_faults
                for kind in self._active[i] - now:
                    logger.info("%s: fault %s ended", self.machine_names[i], kind)
                self._active[i] = now
            await self._publish(server, model)

    async def _poll_fault_request(self, i: int, server: ModbusTcpServer) -> None:
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
        self._inject(i, kind, duration_s, "modbus")

    async def _publish(self, server: ModbusTcpServer, model: CncMachine) -> None:
        """Encode the model's current values into the server's datastore."""
        values = model.values()
        for run in self._runs:
            if run.table in ("coil", "discrete"):
                bits = [False] * run.count
                for reg in run.registers:
                    bits[reg.address - run.start] = bool(_raw_value(reg, values[reg.name]))
                await server.async_setValues(self.unit_id, _WRITE_FC[run.table], run.start, bits)
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
            await server.async_setValues(self.unit_id, _WRITE_FC[run.table], run.start, words)
