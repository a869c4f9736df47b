"""Shared fixtures: free ports, a real Mosquitto broker per test (its own config file) and
socat pseudo-terminal pairs."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.demo.mosquitto import MosquittoProcess, free_port, mosquitto_binary, wait_port

__all__ = ["Mosquitto", "free_port", "wait_port"]

Mosquitto = MosquittoProcess


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A running Mosquitto broker on a free port (persistence on), stopped after the test."""
    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed: run `apt-get install -y mosquitto` (.ci/run does)")
    broker = MosquittoProcess(port=free_port(), workdir=tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two linked pseudo-terminals from socat: (our end, the server's end)."""
    socat = shutil.which("socat")
    if socat is None:
        pytest.fail("socat is not installed: run `apt-get install -y socat` (.ci/run does)")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    proc = subprocess.Popen(
        [socat, f"pty,raw,echo=0,link={ours}", f"pty,raw,echo=0,link={theirs}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5.0
        while not (ours.exists() and theirs.exists()):
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("socat did not create the pty pair")
            time.sleep(0.01)
        yield str(ours), str(theirs)
    finally:
        proc.terminate()
        proc.wait(timeout=5)
