"""Port blocks for simulated cells come from below the kernel's ephemeral range: an outgoing
connection's local port (picked from that range) cannot take one of them between the check and
the simulator's bind, which failed the crash test's setup under load."""

from __future__ import annotations

import socket

from appliance.demo.mosquitto import _ephemeral_low, free_port_block


def test_a_port_block_is_below_the_ephemeral_range_and_free() -> None:
    for _ in range(20):
        base = free_port_block(3)
        assert base >= 10000 and base + 3 <= _ephemeral_low()
        socks = [socket.socket() for _ in range(3)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", base + i))
        finally:
            for s in socks:
                s.close()
