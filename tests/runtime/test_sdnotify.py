"""The appliance speaks systemd's notify protocol (the unit is ``Type=notify`` with a watchdog):
``READY=1`` once every stage runs, ``WATCHDOG=1`` from the event loop, ``STOPPING=1`` on stop.
systemd's end is played by a real AF_UNIX datagram socket bound by the test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import parse_config
from appliance.demo.mosquitto import free_port
from appliance.runtime import Appliance
from appliance.runtime.sdnotify import Notifier, watchdog_interval_s
from appliance.simulate.cell import SimulatedCell


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    # A short folder: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path can be longer.
    folder = tempfile.mkdtemp(prefix="sdn")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    try:
        yield path, sock
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(folder)


def received(sock: socket.socket) -> list[tuple[float, str]]:
    out: list[tuple[float, str]] = []
    while True:
        try:
            out.append((time.monotonic(), sock.recv(4096).decode()))
        except BlockingIOError:
            return out


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_this_process() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "20000000"}) == 10.0
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "x"}) is None
    mine = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval_s(mine) == 0.5
    assert watchdog_interval_s({**mine, "WATCHDOG_PID": "1"}) is None


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled and not n.notify("READY=1") and n.sent == 0


def test_a_vanished_socket_is_logged_once_and_never_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify"})
    assert not n.notify("READY=1") and not n.notify("WATCHDOG=1")
    assert caplog.text.count("sd_notify") == 1


def test_a_full_receiver_queue_fails_the_send_instead_of_blocking_the_loop(
    notify_socket: tuple[str, socket.socket],
) -> None:
    path, _ = notify_socket  # nobody reads: the kernel queues a few datagrams, then refuses
    n = Notifier({"NOTIFY_SOCKET": path})
    t0 = time.monotonic()
    results = [n.notify("WATCHDOG=1") for _ in range(1000)]
    assert time.monotonic() - t0 < 5.0
    assert results[0] and not results[-1]


def test_abstract_socket_names_are_supported() -> None:
    name = f"appliance-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).notify("READY=1")
        assert sock.recv(100) == b"READY=1"


def test_the_watchdog_is_fed_by_the_event_loop_so_a_blocked_loop_starves_it(
    notify_socket: tuple[str, socket.socket],
) -> None:
    path, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})  # feed every 50 ms
    stamps: list[float] = []
    done = threading.Event()

    def listen() -> None:  # systemd's side, timing each keep-alive as it arrives
        sock.settimeout(0.05)
        while not done.is_set():
            with contextlib.suppress(TimeoutError, socket.timeout):
                if sock.recv(100) == b"WATCHDOG=1":
                    stamps.append(time.monotonic())

    async def go() -> None:
        n.start_watchdog()
        await asyncio.sleep(0.3)
        time.sleep(0.4)  # the loop is stuck: no keep-alive may be sent meanwhile
        await asyncio.sleep(0.1)
        await n.close()

    listener = threading.Thread(target=listen)
    listener.start()
    try:
        asyncio.run(go())
        time.sleep(0.1)
    finally:
        done.set()
        listener.join()
    assert len(stamps) >= 4
    assert max(b - a for a, b in zip(stamps, stamps[1:], strict=False)) >= 0.35


def test_a_running_appliance_notifies_ready_feeds_the_watchdog_and_notifies_stopping(
    tmp_path: Path, notify_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sock = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "300000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    port = free_port()
    cfg = parse_config(
        {
            "devices": [{"name": "cnc-1", "port": port, "profile": "cnc-sim"}],
            "outbox": {"path": "o.sqlite"},
            "mqtt": {"port": free_port(), "reconnect_min_s": 5.0},
        },
        base_dir=tmp_path,
    )
    seen: list[str] = []

    async def go() -> None:
        async with SimulatedCell(machines=1, ports=[port]):
            app = Appliance(cfg)
            await app.start()
            seen.extend(m for _, m in received(sock))
            await asyncio.sleep(0.6)
            await app.stop(drain_timeout_s=0.5)

    asyncio.run(go())
    seen.extend(m for _, m in received(sock))
    assert seen[0].startswith("READY=1\nSTATUS=running on ")
    assert seen.count("WATCHDOG=1") >= 2
    assert "STOPPING=1" in seen
    assert seen.index("STOPPING=1") > seen.index("WATCHDOG=1")
