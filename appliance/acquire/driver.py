"""The driver factory: builds the driver (``drivers/``) of one configured device, no I/O.

Modbus TCP and RTU devices get :class:`~drivers.modbus.tcp.ModbusTcpDevice` /
:class:`~drivers.modbus.rtu.ModbusRtuDevice` (RTU units on one serial port share one
:class:`~drivers.modbus.transport.RtuBus`); ``protocol = "haas_q"`` and ``protocol = "line"``
get the serial text-protocol drivers of ``drivers/text`` on a serial or TCP transport. The
transport is opened by the driver's ``connect()``.
"""

from __future__ import annotations

from appliance.config import DeviceConfig, HaasConfig, LineConfig, ModbusRtuConfig, ModbusTcpConfig
from appliance.contracts import PolledDevice
from drivers.modbus.rtu import ModbusRtuDevice
from drivers.modbus.tcp import ModbusTcpDevice
from drivers.modbus.transport import RtuBus
from drivers.text.haas import HaasDevice, HaasVariable
from drivers.text.line import LineChannelMap, LineDevice, LineFormat
from drivers.text.transport import SerialSettings, SerialTransport, TcpTransport, Transport

__all__ = ["make_driver", "make_text_driver", "make_transport"]


def make_driver(device: DeviceConfig, buses: dict[str, RtuBus] | None = None) -> PolledDevice:
    """The driver for one configured device (no I/O). RTU devices on the same ``port`` share
    one :class:`RtuBus` from ``buses`` (created there when missing). Raises ``ValueError`` on an
    unusable config, e.g. a device whose profile was not resolved by ``load_config``."""
    if isinstance(device, (HaasConfig, LineConfig)):  # serial text protocols
        return make_text_driver(device)
    if isinstance(device, (ModbusTcpConfig, ModbusRtuConfig)) and not device.registers:
        raise ValueError(
            f"device {device.name}: no registers (load the config with load_config, which "
            f"resolves profile {device.profile!r})"
        )
    if isinstance(device, ModbusTcpConfig):
        return ModbusTcpDevice(
            device.host,
            device.port,
            device.unit_id,
            device.registers,
            device.timeout_s,
            max_gap=device.max_gap,
            max_registers=device.max_registers,
            max_bits=device.max_bits,
            client=device.client,
        )
    if isinstance(device, ModbusRtuConfig):
        buses = {} if buses is None else buses
        bus = buses.get(device.port)
        if bus is None:
            bus = buses[device.port] = RtuBus(
                device.port,
                baudrate=device.baudrate,
                bytesize=device.bytesize,
                parity=device.parity,
                stopbits=device.stopbits,
                inter_frame_gap_ms=device.inter_frame_gap_ms,
                local_echo=device.local_echo,
            )
        return ModbusRtuDevice(
            bus,
            device.unit_id,
            device.registers,
            device.timeout_s,
            max_gap=device.max_gap,
            max_registers=device.max_registers,
            max_bits=device.max_bits,
        )
    raise ValueError(f"device {device.name}: unsupported device type {type(device).__name__}")


def make_transport(device: HaasConfig | LineConfig) -> Transport:
    """A serial transport when ``serial_port`` is set, else TCP to ``host:port``."""
    if device.serial_port:
        settings = SerialSettings(
            url=device.serial_port,
            baudrate=device.baudrate,
            bytesize=device.bytesize,
            parity=device.parity,
            stopbits=device.stopbits,
            xonxoff=device.xonxoff,
            rtscts=device.rtscts,
        )
        return SerialTransport(settings, write_timeout_s=device.timeout_s)
    return TcpTransport(device.host, device.port, connect_timeout_s=device.timeout_s)


def make_text_driver(device: HaasConfig | LineConfig) -> HaasDevice | LineDevice:
    """The driver for one text-protocol device. Raises ``ValueError`` naming the device."""
    transport = make_transport(device)
    if isinstance(device, HaasConfig):
        return HaasDevice(
            transport,
            [HaasVariable(v.name, v.var, v.scale, v.offset) for v in device.variables],
            parts_channel=device.parts_channel,
            running_channel=device.running_channel,
            timeout_s=device.timeout_s,
            command_prefix=device.command_prefix,
            query_mode=device.query_mode,
            name=device.name,
        )
    fmt = LineFormat(
        kind=device.format,
        columns=device.columns,
        separator=device.separator,
        pair_separator=device.pair_separator,
        kv_separator=device.kv_separator,
        comment=device.comment,
    )
    return LineDevice(
        transport,
        fmt,
        [LineChannelMap(c.name, c.key or c.name, c.scale, c.offset) for c in device.channels],
        max_line_bytes=device.max_line_bytes,
        silence_timeout_s=device.silence_timeout_s,
        name=device.name,
    )
