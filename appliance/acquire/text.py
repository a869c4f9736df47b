"""Builds serial text-protocol drivers (``drivers/text``) from their device config.

Called by :func:`appliance.acquire.poller.make_driver` for ``protocol = "haas_q"`` and
``protocol = "line"``. No I/O: the transport is opened by the driver's ``connect()``.
"""

from __future__ import annotations

from appliance.config import HaasConfig, LineConfig
from drivers.text.haas import HaasDevice, HaasVariable
from drivers.text.line import LineChannelMap, LineDevice, LineFormat
from drivers.text.transport import SerialSettings, SerialTransport, TcpTransport, Transport

__all__ = ["HaasConfig", "LineConfig", "make_text_driver", "make_transport"]


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
