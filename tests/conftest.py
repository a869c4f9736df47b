"""Shared fixtures: free ports and a real Mosquitto broker per test (its own config file)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 10.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts TCP connections on ``port``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s} s")


@dataclass
class Mosquitto:
    """A real mosquitto process on a free port; ``stop()``/``start()`` simulate an outage.

    Persistence is on, so subscribers' persistent sessions (and their queued QoS 1 messages)
    survive a restart, like a production broker's would.
    """

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def conf(self) -> Path:
        return self.workdir / "mosquitto.conf"

    def write_conf(self, extra: str = "") -> None:
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            f"log_dest file {self.workdir}/mosquitto.log\n"
            "max_queued_messages 100000\n"
            f"{extra}"
        )

    def start(self) -> None:
        if not self.conf.exists():
            self.write_conf()
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running Mosquitto broker on a free port, stopped after the test."""
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed: run `apt-get install -y mosquitto` (.ci/run does)")
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    broker = Mosquitto(port=free_port(), workdir=workdir)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
