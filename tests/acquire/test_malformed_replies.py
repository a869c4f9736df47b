"""A Modbus TCP server answering garbage (issue 10): one WARNING per episode naming the reason,
no ERROR, no traceback above DEBUG (pymodbus' framer used to raise inside ``data_received``, and
asyncio logged a 14-line traceback at ERROR for every reply), with either Modbus TCP client."""

from __future__ import annotations

import asyncio
import logging
import struct
from pathlib import Path

import pytest

from appliance.acquire import Acquisition
from appliance.config import parse_config
from appliance.contracts import Frame

REPLIES = {
    "byte count past the frame": lambda fc: bytes([fc, 200]) + b"\x00\x01\x00\x02",
    "undecodable function code": lambda fc: bytes([0x2B]) + b"\x0e\x01\x00",
    "truncated": lambda fc: bytes([fc]) + b"\xff\xfe\xfd",
}


@pytest.mark.parametrize("client", ["native", "pymodbus"])
@pytest.mark.parametrize("kind", list(REPLIES))
def test_malformed_replies_log_one_warning_with_the_reason_and_no_traceback(
    kind: str, client: str, caplog: pytest.LogCaptureFixture
) -> None:
    reply = REPLIES[kind]

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                tid, _, length, unit = struct.unpack(">HHHB", await reader.readexactly(7))
                pdu = await reader.readexactly(length - 1)
                body = reply(pdu[0])
                writer.write(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(garbage, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        device = {
            "name": "m",
            "port": port,
            "poll_interval_ms": 50,
            "timeout_s": 0.5,
            "client": client,
            "registers": [{"name": "a", "address": 0, "type": "float32"}],
        }
        cfg = parse_config({"devices": [device]}, source="t", base_dir=Path("."))
        frames: list[Frame] = []
        acq = Acquisition(cfg.devices, frames.append)
        await acq.start()
        try:
            await asyncio.sleep(1.5)  # several polls and reconnects, each answered with garbage
        finally:
            await acq.stop()
            server.close()
            await server.wait_closed()
        stats = acq.stats()[0]
        assert stats["errors"] >= 2  # garbage again and again: one episode
        if client == "native":  # counted by the client, shown in the device's stats
            assert stats["malformed_replies"] == stats["errors"]

    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # as `appliance run` does
    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    ours = [r for r in caplog.records if not r.name.startswith("pymodbus")]
    warnings = [r for r in ours if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "malformed reply" in warnings[0].getMessage()
    assert not [r for r in ours if r.levelno >= logging.ERROR]
    assert not [r for r in ours if r.exc_info and r.levelno > logging.DEBUG]
